"""The rollout loop's pieces that run no tool: context trimming above the budget, an empty final
reply, tool-call checks, budget validation. Episodes whose tools run in real sandboxes (budgets
enforced exactly, malformed calls, context management in an episode) are in
tests/integration/test_rollout_sandbox.py."""

from __future__ import annotations

import pytest

from data.schema import validate_record
from sandbox_env.agent.rollout import (
    EMPTY_REPLY,
    HIDDEN_PLACEHOLDER,
    Budgets,
    TokenCounter,
    ToolEnv,
    call_problem,
    manage_context,
    run_episode,
)
from sandbox_env.agent.types import AssistantStep
from sandbox_env.tasks import get_family
from tests.fixtures import ScriptedSteps

ENV = ToolEnv(tools=("python", "shell"))
FAM = get_family("arith")
TASK = FAM.make("train", 0)




def test_manage_context_only_acts_above_budget():
    counter = TokenCounter()
    msgs = [{"role": "user", "content": "q"}] + [{"role": "tool", "tool_call_id": f"c{i}", "content": "y" * 40} for i in range(3)]
    size = counter.context_tokens(msgs, [])
    assert manage_context(msgs, [], counter, Budgets(context_budget=size, keep_last_tool_outputs=1)) == 0
    assert manage_context(msgs, [], counter, Budgets(context_budget=size - 1, keep_last_tool_outputs=1)) == 2
    assert [m["content"] for m in msgs[1:]] == [HIDDEN_PLACEHOLDER, HIDDEN_PLACEHOLDER, "y" * 40]
    msgs2 = [{"role": "tool", "tool_call_id": "c", "content": "z" * 400}]
    assert manage_context(msgs2, [], counter, Budgets(context_budget=5, keep_last_tool_outputs=0)) == 1


def test_an_empty_final_reply_still_makes_a_valid_record():
    rec = run_episode(TASK, ScriptedSteps(AssistantStep("hmm", "", [])), ENV, family=FAM)
    validate_record(rec)
    assert rec["messages"][-1]["content"] == EMPTY_REPLY and rec["metadata"]["empty_replies"] == 1
    assert not rec["verdict"]["correct"]


def test_call_problem():
    tools = [{"type": "function", "function": {"name": "python", "parameters": {"properties": {"code": {}}, "required": ["code"]}}}]
    assert call_problem("python", {"code": "1"}, tools) is None
    assert call_problem("python", '{"code": "1"}', tools) is None
    assert "unknown tool" in call_problem("shell", {}, tools)
    assert "not valid JSON" in call_problem("python", "{", tools)
    assert "missing arguments ['code']" in call_problem("python", {}, tools)


def test_budgets_are_validated():
    with pytest.raises(ValueError, match="budgets.max_steps must be a positive int, got 0"):
        Budgets(max_steps=0)
    with pytest.raises(ValueError, match="budgets.keep_last_tool_outputs"):
        Budgets(keep_last_tool_outputs=-1)
    with pytest.raises(ValueError, match="search/open but no index_path"):
        ToolEnv(tools=("python", "search"))


