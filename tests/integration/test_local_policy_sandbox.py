"""The local-model policy in episodes whose tools run in a real sandbox: budgets hold, malformed
calls are survivable, a real chat template renders. (The engine alone: tests/unit/test_local_policy.py;
the 300-call episode: tests/integration/test_evaluate_long_horizon.py.)

Models and guided decoding as in tests/unit/test_local_policy.py.
"""

from __future__ import annotations

import torch

from data.render import get_renderer
from sandbox_env.agent.rollout import (
    Budgets,
    TokenCounter,
    ToolEnv,
    run_episode,
)
from sandbox_env.agent.types import AssistantStep, EpisodeState, ToolCall
from sandbox_env.inference.engine import InferenceEngine, Request, SamplingConfig
from sandbox_env.inference.policy import LocalModelPolicy
from sandbox_env.tasks import get_family
from tests.fixtures import greedy_by_recompute

torch.set_num_threads(1)  # 2 threads on a shared 2-core box run ~20x slower (contention)


PY_TOOL = ToolEnv(tools=("python",))


class LoopingCaller:
    """Calls python forever (or `n` times, then answers): a policy for budget and horizon tests."""

    name = "looping"

    def __init__(self, n=None, lines=3, bad_first=False):
        self.n, self.lines, self.bad_first = n, lines, bad_first

    def act(self, messages, tools, state: EpisodeState) -> AssistantStep:
        i = state.step
        if self.bad_first and i == 0:
            return AssistantStep("try", "", [ToolCall("python", '{"code": "print(1)"', "c0"), ToolCall("pyton", {"code": "1"}, "c1")])
        if self.n is not None and i >= self.n:
            return AssistantStep("done", "Answer: 42", [])
        code = f"for j in range({self.lines}): print({i}, j, 'x' * 20)"
        return AssistantStep(f"call {i}", "", [ToolCall("python", {"code": code}, f"c{i}")])


def _task():
    fam = get_family("arith")
    return fam, fam.make("heldout", 0, 0)


def test_episode_in_sandbox_enforces_max_steps_and_max_total_tokens_exactly(tiny_policy):
    model, tok, r = tiny_policy
    fam, task = _task()
    counter = TokenCounter(tok)
    pol = LocalModelPolicy(InferenceEngine(model, r), guide=LoopingCaller(), batched=False)
    rec = run_episode(task, pol, PY_TOOL, Budgets(max_steps=3), family=fam, token_counter=counter)
    m = rec["metadata"]
    assert m["steps"] == 3 and m["tool_calls"] == 3 and m["budget_exhausted"] == "max_steps"
    assert [x["role"] for x in rec["messages"]].count("tool") == 3
    assert "0 0 xxxxxxxx" in rec["messages"][3]["content"]  # the real sandbox ran the call
    assert m["reused_tokens"] > 0 and m["decode_tokens"] > 0
    # free decoding by the random model under a tight token budget: never more generated tokens than allowed
    free = LocalModelPolicy(InferenceEngine(model, r), sampling=SamplingConfig(max_new_tokens=64), batched=False)
    rec = run_episode(task, free, PY_TOOL, Budgets(max_steps=4, max_total_tokens=40, max_thinking_tokens=8),
                      family=fam, token_counter=counter)
    m = rec["metadata"]
    assert m["generated_tokens"] <= 40
    assert m["steps"] <= 4 and (m["budget_exhausted"] is not None or rec["messages"][-1]["role"] == "assistant")
    for msg in rec["messages"]:
        if msg["role"] == "assistant":
            assert counter.count(msg["reasoning_content"]) <= 8


def test_malformed_tool_calls_get_error_results_and_the_loop_continues(tiny_policy):
    model, tok, r = tiny_policy
    fam, task = _task()
    pol = LocalModelPolicy(InferenceEngine(model, r), guide=LoopingCaller(n=2, bad_first=True), batched=False)
    rec = run_episode(task, pol, PY_TOOL, Budgets(max_steps=6), family=fam, token_counter=TokenCounter(tok))
    m = rec["metadata"]
    assert m["invalid_tool_calls"] == 2 and m["parse_errors"] >= 1
    tool_msgs = [x for x in rec["messages"] if x["role"] == "tool"]
    assert "JSON" in tool_msgs[0]["content"] or "json" in tool_msgs[0]["content"]
    assert "pyton" in tool_msgs[1]["content"]
    assert m["steps"] == 3 and m["budget_exhausted"] is None  # went on: one more call, then the answer
    assert rec["messages"][-1]["content"] == "Answer: 42"


def test_policy_with_a_real_chat_template_renderer():
    """A real model's chat template (Qwen3-style, tests.fixtures.qwen3_style_tokenizer): guided steps go
    through the training template's labels, the cache is reused across steps, the calls parse back."""
    from tests.fixtures import qwen3_style_tokenizer
    from train.models import build_model, load_preset

    tok = qwen3_style_tokenizer(vocab_size=512)
    r = get_renderer(tok)
    assert type(r).__name__ == "ChatTemplateRenderer"
    torch.manual_seed(0)
    model = build_model(dict(load_preset("tiny_qwen3_moe"), copy_circuit=None), vocab_size=len(tok), hidden_size=64,
                        intermediate_size=128,
                        moe_intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=32, num_experts=4).eval()
    fam, task = _task()
    pol = LocalModelPolicy(InferenceEngine(model, r), guide=LoopingCaller(n=2), batched=False)
    rec = run_episode(task, pol, PY_TOOL, Budgets(max_steps=4), family=fam, token_counter=TokenCounter(tok))
    m = rec["metadata"]
    assert m["tool_calls"] == 2 and m["invalid_tool_calls"] == 0 and m["parse_errors"] == 0
    assert rec["messages"][-1]["content"] == "Answer: 42" and m["reused_tokens"] > 0
    eng = InferenceEngine(model, r)
    p = r.render_prompt(rec["messages"][:4], rec["tools"])
    assert eng.generate([Request(p, max_new_tokens=8)])[0].token_ids == greedy_by_recompute(model, p, 8, eng.stop_ids)
