"""Benchmark: our agent loop (KV cache kept across steps, episodes batched) against transformers'
`generate()` re-run on the full history at every step; and INT4 against BF16 in our loop.

Workload, identical for every contender, all in one run: E episodes of a held-out arith task in
the real sandbox, S assistant steps each. At every step the model decodes exactly M tokens of
thinking (greedy, stop tokens masked until M so all contenders decode the same count), then the
step calls the python tool (a scripted call, so every episode has S steps with real tool
results). The next step's prompt holds the decoded thinking, the call and its result; our loop
reuses the cache up to the longest common token prefix, the baseline re-encodes everything.

    .venv/bin/python scripts/bench/agent_loop.py                      # tiny_qwen3_moe preset, random init
    .venv/bin/python scripts/bench/agent_loop.py --episodes 16 --steps 12 --tokens 48 --threads 2

Prints one table: episodes/s, decode tokens/s, prompt tokens the model re-read, and the ratios
measured side by side in this run. No network, no downloads; CPU by default.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from sandbox_env.agent.types import AssistantStep, ToolCall


class DecodeThenCall:
    """Thinks for exactly M model tokens (through `decode(prompt_ids) -> ids`), then calls python."""

    def __init__(self, renderer, decode, name):
        self.renderer, self.decode, self.name = renderer, decode, name

    def act(self, messages, tools, state):
        prompt = self.renderer.render_prompt(messages, tools)
        ids, reused = self.decode(prompt, state)
        n = state.notes
        n["decoded"] = n.get("decoded", 0) + len(ids)
        n["reread"] = n.get("reread", 0) + len(prompt) - reused
        text = self.renderer.decode(ids)
        for special in ("<think>", "</think>", "<|im_end|>"):  # keep the thinking a plain text field
            text = text.replace(special, " ")
        return AssistantStep(text, "", [ToolCall("python", {"code": f"print({state.step} * 7)"}, f"c{state.step}")])


def run(policy_factory, tasks, env, budgets, concurrency, label=""):
    from sandbox_env.agent.rollout import run_episode

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        recs = list(pool.map(lambda ft: run_episode(ft[1], policy_factory(), env, budgets, family=ft[0], seed=0), tasks))
    wall = time.perf_counter() - t0
    decoded = sum(r["metadata"]["decoded"] for r in recs)
    reread = sum(r["metadata"]["reread"] for r in recs)
    print(f"  {label}: {wall:.2f}s, {decoded} tokens decoded, {reread} prompt tokens re-read", flush=True)
    return {"wall_s": wall, "episodes_per_s": len(recs) / wall, "decode_tokens_per_s": decoded / wall,
            "decoded": decoded, "reread": reread, "thinking": [m["reasoning_content"] for r in recs for m in r["messages"] if m["role"] == "assistant"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--episodes", type=int, default=8)
    ap.add_argument("--steps", type=int, default=8, help="assistant steps per episode")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared 2-core box)")
    ap.add_argument("--preset", default="tiny_qwen3_moe")
    ap.add_argument("--skip-int4", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from data.render import get_renderer
    from qat import QuantConfig, prepare
    from qat.export import export_int4
    from qat.load import load_int4
    from sandbox_env.agent.rollout import Budgets, ToolEnv
    from sandbox_env.inference.engine import InferenceEngine, KVCache, Request
    from sandbox_env.tasks import get_family
    from tests.fixtures import tiny_tokenizer
    from train.models import build_model, load_preset

    tok = tiny_tokenizer(vocab_size=1024)
    torch.manual_seed(0)
    model = build_model(load_preset(args.preset), vocab_size=len(tok)).eval()
    renderer = get_renderer(tok)
    fam = get_family("arith")
    tasks = [(fam, fam.make("heldout", i, 0)) for i in range(args.episodes)]
    env = ToolEnv(tools=("python",))
    budgets = Budgets(max_steps=args.steps, max_thinking_tokens=10**6, max_total_tokens=10**7, context_budget=10**6)
    M = args.tokens
    print(f"model {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; {args.episodes} episodes x "
          f"{args.steps} steps x {M} decoded tokens; torch threads {args.threads}", flush=True)

    def ours(m, concurrency, name):
        engine = InferenceEngine(m, renderer, max_batch_size=max(1, concurrency))

        def decode(prompt, state):
            cache = state.scratch.setdefault("kv", KVCache())
            res = engine.submit(Request(prompt, cache=cache, max_new_tokens=M, min_new_tokens=M))
            return res.token_ids, res.reused_tokens

        try:
            return run(lambda: DecodeThenCall(renderer, decode, name), tasks, env, budgets, concurrency, name)
        finally:
            engine.close()

    def baseline(m):
        stop = renderer.stop_token_ids

        def decode(prompt, state):
            with torch.no_grad():
                out = m.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=M, min_new_tokens=M, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tok.pad_token_id)
            return out[0, len(prompt):].tolist(), 0

        return run(lambda: DecodeThenCall(renderer, decode, "generate"), tasks, env, budgets, 1, "generate")

    rows = {}
    rows["generate() full history, sequential"] = baseline(model)
    rows["ours, 1 episode at a time (cache only)"] = ours(model, 1, "ours1")
    rows[f"ours, {args.episodes} episodes batched"] = ours(model, args.episodes, "ours")
    base = rows["generate() full history, sequential"]
    same = rows[f"ours, {args.episodes} episodes batched"]["thinking"] == base["thinking"]

    if not args.skip_int4:
        with tempfile.TemporaryDirectory() as d:
            try:  # qat's export/load are developed alongside this bench; a failure is reported, not fatal
                q = build_model(load_preset(args.preset), vocab_size=len(tok))
                q.load_state_dict(model.state_dict())
                prepare(q, QuantConfig())
                export_int4(q, os.path.join(d, "int4"), tok)
                int4 = load_int4(os.path.join(d, "int4"), dtype=torch.bfloat16).eval()
            except Exception as e:  # noqa: BLE001
                print(f"INT4 rows skipped: export/load failed: {type(e).__name__}: {e}")
                args.skip_int4 = True
            else:
                rows["ours batched, BF16 (dense experts)"] = ours(model.to(torch.bfloat16), args.episodes, "bf16")
                rows["ours batched, INT4 (load_int4, bf16 activations)"] = ours(int4, args.episodes, "int4")

    print(f"\n{'contender':52s} {'wall s':>8s} {'episodes/s':>11s} {'decode tok/s':>13s} {'re-read prompt tok':>19s}")
    for name, r in rows.items():
        print(f"{name:52s} {r['wall_s']:8.2f} {r['episodes_per_s']:11.3f} {r['decode_tokens_per_s']:13.1f} {r['reread']:19d}")
    b = rows[f"ours, {args.episodes} episodes batched"]
    c = rows["ours, 1 episode at a time (cache only)"]
    print(f"\nours batched / generate():  episodes/s x{b['episodes_per_s'] / base['episodes_per_s']:.2f}, "
          f"decode tokens/s x{b['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}")
    print(f"ours unbatched / generate(): episodes/s x{c['episodes_per_s'] / base['episodes_per_s']:.2f}")
    print(f"greedy thinking identical to generate()'s in every step: {same}")
    if not args.skip_int4:
        i4, bf = rows["ours batched, INT4 (load_int4, bf16 activations)"], rows["ours batched, BF16 (dense experts)"]
        print(f"INT4 / BF16 decode tokens/s in our loop: x{i4['decode_tokens_per_s'] / bf['decode_tokens_per_s']:.2f}")


if __name__ == "__main__":
    main()
