"""K2's agentic-search setting: one episode of 300 tool calls with a tiny model in the real sandbox.

The model is guided (sandbox_env.inference.policy.LocalModelPolicy(guide=...)): a scripted policy decides
each call and its tokens are forced through the real model, so every forward runs and the KV cache is
kept, cropped and reused exactly as in free decoding. About 1.5 minutes on one CPU thread.
"""

from __future__ import annotations

import pytest
import torch

from data.render import get_renderer
from sandbox_env.agent.rollout import (
    HIDDEN_PLACEHOLDER,
    Budgets,
    TokenCounter,
    ToolEnv,
    run_episode,
)
from sandbox_env.agent.types import AssistantStep, EpisodeState, ToolCall
from sandbox_env.inference.engine import InferenceEngine
from sandbox_env.inference.policy import LocalModelPolicy
from sandbox_env.tasks import get_family
from tests.fixtures import tiny_model_and_tokenizer
from train.models import set_experts_implementation

pytestmark = pytest.mark.integration
torch.set_num_threads(1)  # 2 threads on a shared 2-core box run ~20x slower (contention)
PY_TOOL = ToolEnv(tools=("python",))


class LoopingCaller:
    """Calls python `n` times (one short call that prints `lines` lines), then answers."""

    name = "looping"

    def __init__(self, n, lines):
        self.n, self.lines = n, lines

    def act(self, messages, tools, state: EpisodeState) -> AssistantStep:
        i = state.step
        if i >= self.n:
            return AssistantStep("done", "Answer: 42", [])
        # output: one line per j of 8 copies of j; a short call keeps the kept assistant turns short
        code = f"def p():\n    for j in range({self.lines}): print(str(j)*8)\np()" if i == 0 else "p()"
        return AssistantStep("", "", [ToolCall("python", {"code": code}, f"c{i}")])


def _task():
    fam = get_family("arith")
    return fam, fam.make("heldout", 0, 0)


def test_long_horizon_300_tool_calls_with_bounded_context_and_cache():
    """K2's agentic-search setting: 300 tool calls in one episode. Context management (the loop's:
    hide old tool outputs past the budget) keeps the tool outputs in context bounded; the KV cache
    follows the managed context exactly (cropped where an output was hidden), so it never holds more
    than the current prompt plus one step. Assistant turns themselves are kept by the loop's policy,
    so the context still grows by one short call + placeholder per step; that growth is bounded too."""
    model, tok = tiny_model_and_tokenizer(seed=1, layers=1)
    set_experts_implementation(model, "eager")  # fastest on CPU for one row
    r = get_renderer(tok)
    fam, task = _task()
    lines = 24
    budgets = Budgets(max_steps=320, max_total_tokens=10**6, context_budget=1200, keep_last_tool_outputs=2)
    pol = LocalModelPolicy(InferenceEngine(model, r), guide=LoopingCaller(n=300, lines=lines), batched=False)
    counter = TokenCounter(tok)
    rec = run_episode(task, pol, PY_TOOL, budgets, family=fam, token_counter=counter)
    m = rec["metadata"]
    assert m["tool_calls"] == 300 and m["steps"] == 301 and m["tool_errors"] == 0
    assert rec["messages"][-1]["content"] == "Answer: 42"
    assert m["context_hidden"] >= 297
    managed = len(r.render_prompt(rec["messages"], rec["tools"]))
    output = counter.count("".join(f"{j}{j}{j}{j}{j}{j}{j}{j}\n" for j in range(lines)))
    unmanaged = managed + m["context_hidden"] * (output - counter.count(HIDDEN_PLACEHOLDER))
    assert managed < unmanaged / 3, (managed, unmanaged)
    # per step the managed context grows by at most one assistant call and one hidden result
    per_step = (managed - len(r.render_prompt(rec["messages"][:2], rec["tools"]))) / 300
    assert per_step < output, (per_step, output)
    # the cache never holds hidden outputs: at most the final prompt plus one step
    assert m["max_cache_tokens"] <= managed + 40, (m["max_cache_tokens"], managed)
    assert m["reused_tokens"] > 5 * m["prefill_tokens"]  # the cache did most of the work
