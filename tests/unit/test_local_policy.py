"""The local-model policy and its engine: cache reuse is exact, batching changes nothing, budgets
hold. Episodes that run tools in a sandbox: tests/integration/test_local_policy_sandbox.py; the
300-call episode: tests/integration/test_evaluate_long_horizon.py.

Models are tiny and randomly initialised (tests.fixtures.tiny_model_and_tokenizer).
Where an episode needs valid tool calls, the policy is *guided*: a small scripted policy decides
each step and its tokens are forced through the real model (every forward runs, the KV cache is
kept and cropped as in free decoding); the engine's own free decoding is tested token for token
against recomputing the whole sequence from scratch.
"""

from __future__ import annotations

import threading

import pytest
import torch

from data.render import get_renderer
from sandbox_env.agent.rollout import (
    HIDDEN_PLACEHOLDER,
    SYSTEM_PROMPT,
    ToolEnv,
)
from sandbox_env.agent.types import AssistantStep, ToolCall
from sandbox_env.inference.engine import InferenceEngine, KVCache, Request, SamplingConfig
from sandbox_env.inference.loading import checkpoint_kind, load_policy_model
from tests.fixtures import greedy_by_recompute, tiny_model_and_tokenizer

torch.set_num_threads(1)  # 2 threads on a shared 2-core box run ~20x slower (contention)


def _conversation(n_tools=3):
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 2**100?"}]
    for i in range(n_tools):
        msgs.append({"role": "assistant", "content": "", "reasoning_content": f"step {i}",
                     "tool_calls": [{"id": f"call_{i}", "type": "function",
                                     "function": {"name": "python", "arguments": {"code": f"print({i}*7)"}}}]})
        msgs.append({"role": "tool", "tool_call_id": f"call_{i}", "name": "python", "content": f"{i * 7}\n" * 5})
    return msgs


PY_TOOL = ToolEnv(tools=("python",))


def test_kv_cache_decoding_equals_recompute_including_after_context_management(tiny_policy):
    model, _tok, r = tiny_policy
    eng = InferenceEngine(model, r)
    tools = [{"type": "function", "function": {"name": "python", "parameters": {"type": "object", "properties": {}}}}]
    msgs = _conversation(3)
    cache = KVCache()
    p1 = r.render_prompt(msgs[:4], tools)
    a = eng.generate([Request(p1, cache=cache, max_new_tokens=12)])[0]
    assert a.reused_tokens == 0 and a.token_ids == greedy_by_recompute(model, p1, 12, eng.stop_ids)
    # the next step extends the conversation: most of the prompt comes from the cache
    p2 = r.render_prompt(msgs, tools)
    b = eng.generate([Request(p2, cache=cache, max_new_tokens=12)])[0]
    assert b.reused_tokens > len(p1) // 2
    assert b.token_ids == greedy_by_recompute(model, p2, 12, eng.stop_ids)
    # context management hides the first tool output: the prefix changes in the middle, the cache is cropped there
    hidden = [dict(m) for m in msgs]
    hidden[3]["content"] = HIDDEN_PLACEHOLDER
    p3 = r.render_prompt(hidden, tools)
    k = next(i for i, (x, y) in enumerate(zip(p2, p3)) if x != y)
    c = eng.generate([Request(p3, cache=cache, max_new_tokens=12)])[0]
    assert c.reused_tokens == k and c.prefill_tokens == len(p3) - k
    assert c.token_ids == greedy_by_recompute(model, p3, 12, eng.stop_ids)
    assert cache.ids == (p3 + c.token_ids)[: len(cache.ids)] and len(cache.ids) == c.cache_tokens
    assert cache.layers[0][0].shape[2] == len(cache.ids)


def test_batched_decoding_equals_unbatched_and_threads_share_forwards(tiny_policy):
    model, _tok, r = tiny_policy
    prompts = [r.render_prompt(_conversation(n)[: 2 + 2 * n], None) for n in (0, 1, 2, 3)]
    alone = [InferenceEngine(model, r).generate([Request(p, max_new_tokens=16)])[0].token_ids for p in prompts]
    eng = InferenceEngine(model, r, max_batch_size=8)
    together = [x.token_ids for x in eng.generate([Request(p, max_new_tokens=16) for p in prompts])]
    assert together == alone
    assert eng.stats["max_batch"] == 4
    # concurrent submits from threads are batched by the worker and give the same tokens
    eng2 = InferenceEngine(model, r, max_batch_size=8)
    out = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def go(i):
        barrier.wait()
        out[i] = eng2.submit(Request(prompts[i], max_new_tokens=16)).token_ids

    ts = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in ts]
    [t.join() for t in ts]
    eng2.close()
    assert out == alone
    assert eng2.stats["forwards"] < sum(len(a) for a in alone) + len(prompts)  # some forwards were shared


def test_thinking_budget_closes_the_think_block_and_the_model_goes_on(tiny_policy):
    model, _tok, r = tiny_policy
    eng = InferenceEngine(model, r)
    think, end_think = eng.think_open_id, eng.think_close_id
    p = r.render_prompt(_conversation(0), None)
    res = eng.generate([Request(p, max_new_tokens=12, max_thinking_tokens=3, force_ids=[think])])[0]
    ids = res.token_ids
    assert ids[0] == think and end_think not in ids[1:4]  # this random model never closes its thinking itself...
    assert ids[4] == end_think and res.forced_think_close == 1  # ...so the budget closed it after 3 tokens
    assert len(ids) == 12 and end_think not in ids[5:]  # and the model went on decoding the visible part
    # the thinking is those 3 tokens' text (compared as text: 3 byte-level tokens may end inside a UTF-8
    # character, and re-encoding the replacement character would count more tokens)
    assert r.parse_assistant(ids).reasoning_content.strip() == r.decode(ids[1:4]).strip()


def test_sampling_is_seeded(tiny_policy):
    model, _tok, r = tiny_policy
    eng = InferenceEngine(model, r)
    p = r.render_prompt(_conversation(1), None)
    a, b, c = eng.generate([Request(p, max_new_tokens=20, temperature=1.0, top_p=0.9, seed=s) for s in (1, 1, 2)])
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    with pytest.raises(ValueError, match="sampling.top_p"):
        SamplingConfig(top_p=0.0)


def test_load_policy_model_dispatches_on_files(tiny_policy, tmp_path):
    model, tok, r = tiny_policy
    with pytest.raises(ValueError, match="no config.json"):
        checkpoint_kind(tmp_path)
    model.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    assert checkpoint_kind(tmp_path / "hf") == "hf"
    loaded = load_policy_model(tmp_path / "hf")
    assert loaded.kind == "hf" and len(loaded.tokenizer) == len(tok)
    p = r.render_prompt(_conversation(1), None)
    with torch.no_grad():
        assert torch.equal(loaded.model(torch.tensor([p])).logits, model(torch.tensor([p])).logits)
    with pytest.raises(ValueError, match="dtype="):
        load_policy_model(tmp_path / "hf", dtype="int3")


def test_engine_decodes_fake_quant_and_int4_checkpoints_exactly(tiny_policy, tmp_path):
    """The engine on the two quantized kinds: cached + batched greedy decoding equals recomputing
    from scratch, and the INT4 export decodes what the fake-quant model decodes."""
    import json

    from qat import QuantConfig, prepare
    from qat.export import export_int4

    _model, tok, r = tiny_policy
    q, _ = tiny_model_and_tokenizer(seed=0)
    prepare(q, QuantConfig())
    q.save_pretrained(tmp_path / "fq")
    tok.save_pretrained(tmp_path / "fq")
    (tmp_path / "fq" / "qat_config.json").write_text(json.dumps(QuantConfig().to_dict()))
    export_int4(q, tmp_path / "int4", tok)
    prompts = [r.render_prompt(_conversation(n)[: 2 + 2 * n], None) for n in (0, 2)]
    outs = {}
    for kind in ("fq", "int4"):
        loaded = load_policy_model(tmp_path / kind, dtype="float32")
        assert loaded.kind == {"fq": "fake_quant", "int4": "int4"}[kind]
        eng = InferenceEngine(loaded.model, get_renderer(loaded.tokenizer))
        outs[kind] = [x.token_ids for x in eng.generate([Request(p, max_new_tokens=10) for p in prompts])]
        assert outs[kind] == [greedy_by_recompute(loaded.model, p, 10, eng.stop_ids) for p in prompts]
    assert outs["fq"] == outs["int4"]
    with pytest.raises(ValueError, match="ptq='rtn' applies to a dense HF checkpoint"):
        load_policy_model(tmp_path / "int4", ptq="rtn")


def test_guided_body_ids_equal_the_training_labels(tiny_policy):
    """The fast path of assistant_body_ids (tiny format) gives exactly the labelled tokens of the training render."""
    from sandbox_env.inference.policy import assistant_body_ids

    _model, _tok, r = tiny_policy
    msgs = _conversation(3)
    step = AssistantStep("think é", "some text", [ToolCall("python", {"code": "print(1)"}, "x1"),
                                                  ToolCall("shell", '{"command": "ls"', "x2")])
    fast = assistant_body_ids(r, msgs, None, step)
    msg = {"role": "assistant", "content": step.content, "reasoning_content": step.reasoning_content,
           "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                          for c in step.tool_calls]}
    labels = r.render_documents({"messages": msgs + [msg]})[-1]["labels"]
    end = len(labels)
    assert labels[end - len(fast):] == fast and labels[end - len(fast) - 1] == -100
    assert r.parse_assistant(fast).tool_calls[0].arguments == {"code": "print(1)"}


