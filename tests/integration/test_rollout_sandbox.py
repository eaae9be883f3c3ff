"""The rollout loop with tools run in real sandboxes: context management, malformed tool calls,
tool errors, and records that validate. The policies are small real policies written for each
case. (Budgets and context rules that need no tool run: tests/unit/test_rollout.py.)"""

from __future__ import annotations

import json

import pytest

from data.schema import validate_record
from sandbox_env.agent.rollout import (
    HIDDEN_PLACEHOLDER,
    Budgets,
    TokenCounter,
    ToolEnv,
    run_episode,
)
from sandbox_env.agent.types import AssistantStep, ToolCall
from sandbox_env.tasks import get_family
from tests.fixtures import ScriptedSteps

ENV = ToolEnv(tools=("python", "shell"))
FAM = get_family("arith")
TASK = FAM.make("train", 0)




def py(code: str, thinking: str = "run it") -> AssistantStep:
    return AssistantStep(thinking, "", [ToolCall("python", {"code": code})])


def final(value: str, thinking: str = "done") -> AssistantStep:
    return AssistantStep(thinking, f"Answer: {value}")


def generated(rec, counter=None) -> int:
    """Tokens the policy generated in a record, counted independently of the loop."""
    counter = TokenCounter() if counter is None else counter
    n = 0
    for m in rec["messages"]:
        if m["role"] == "assistant":
            n += counter.count(m["content"]) + counter.count(m["reasoning_content"])
            for c in m.get("tool_calls", []):
                n += counter.count(c["function"]["name"]) + counter.count(json.dumps(c["function"]["arguments"]))
    return n


def test_final_answer_ends_the_episode_and_the_record_validates():
    rec = run_episode(TASK, ScriptedSteps(py("print(6 * 7)"), final(TASK.answer)), ENV, family=FAM, seed=3)
    validate_record(rec)
    assert [m["role"] for m in rec["messages"]] == ["system", "user", "assistant", "tool", "assistant"]
    assert rec["messages"][3]["content"] == "42\n" and rec["messages"][3]["tool_call_id"] == "call_0"
    assert rec["verdict"]["correct"]
    m = rec["metadata"]
    assert (m["steps"], m["tool_calls"], m["invalid_tool_calls"], m["budget_exhausted"], m["seed"]) == (2, 1, 0, None, 3)
    assert m["generated_tokens"] == generated(rec)
    assert [t["function"]["name"] for t in rec["tools"]] == ["python", "shell"]


def test_files_are_written_before_the_episode():
    fam = get_family("files")
    task = fam.make("train", 0)
    path = next(iter(task.files))
    rec = run_episode(task, ScriptedSteps(AssistantStep("look", "", [ToolCall("shell", {"command": f"cat {path}"})]), final("x")), ENV, family=fam)
    assert rec["messages"][3]["content"] == task.files[path]


def test_context_management_hides_old_tool_outputs_and_keeps_the_last_k():
    calls = [py(f"print('{i}' * 300)") for i in range(6)]
    policy = ScriptedSteps(*calls, final("0"))
    budgets = Budgets(context_budget=700, keep_last_tool_outputs=2)
    rec = run_episode(TASK, policy, ENV, budgets, family=FAM)
    validate_record(rec)
    tools = [m for m in rec["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tools[:-2]] == [HIDDEN_PLACEHOLDER] * 4
    assert [m["content"] for m in tools[-2:]] == ["4" * 300 + "\n", "5" * 300 + "\n"]
    assert rec["metadata"]["context_hidden"] == 4
    # the policy was shown the managed context, not the full one
    last_seen = [m["content"] for m in policy.seen[-1] if m["role"] == "tool"]
    assert last_seen[:4] == [HIDDEN_PLACEHOLDER] * 4
    # with a big budget nothing is hidden
    rec = run_episode(TASK, ScriptedSteps(*calls, final("0")), ENV, Budgets(context_budget=100000), family=FAM)
    assert rec["metadata"]["context_hidden"] == 0 and HIDDEN_PLACEHOLDER not in json.dumps(rec["messages"])


def test_malformed_tool_calls_become_errors_and_the_episode_goes_on():
    bad = AssistantStep("try things", "", [
        ToolCall("nope", {"x": 1}),            # unknown tool
        ToolCall("python", "{not json"),        # invalid JSON
        ToolCall("python", {"source": "1"}),    # wrong argument name
        ToolCall("python", "[1, 2]"),           # JSON, but not an object
        ToolCall("", {}),                       # no name at all
    ])
    rec = run_episode(TASK, ScriptedSteps(bad, py("print(2)"), final("2")), ENV, family=FAM)
    validate_record(rec)
    tools = [m for m in rec["messages"] if m["role"] == "tool"]
    assert all(t["content"].startswith("Error") for t in tools[:5]) and tools[5]["content"] == "2\n"
    m = rec["metadata"]
    assert (m["tool_calls"], m["invalid_tool_calls"], m["steps"]) == (6, 5, 3)
    calls = rec["messages"][2]["tool_calls"]
    assert calls[1]["function"]["arguments"] == {} and calls[1]["raw_arguments"] == "{not json"
    assert calls[3]["raw_arguments"] == "[1, 2]" and calls[2]["function"]["arguments"] == {"source": "1"}
    assert rec["messages"][-1]["content"] == "Answer: 2"


def test_python_errors_are_tool_errors_not_invalid_calls():
    rec = run_episode(TASK, ScriptedSteps(py("1/0"), final("x")), ENV, family=FAM)
    assert "ZeroDivisionError" in rec["messages"][3]["content"]
    assert rec["metadata"]["invalid_tool_calls"] == 0 and rec["metadata"]["tool_errors"] == 1


@pytest.mark.parametrize("max_steps", [1, 3])
def test_max_steps_is_exact(max_steps):
    rec = run_episode(TASK, ScriptedSteps(py("print(1)")), ENV, Budgets(max_steps=max_steps), family=FAM)
    validate_record(rec)
    assert sum(m["role"] == "assistant" for m in rec["messages"]) == max_steps
    assert rec["metadata"]["steps"] == max_steps and rec["metadata"]["budget_exhausted"] == "max_steps"
    assert not rec["verdict"]["correct"] and "max_steps" in rec["verdict"]["reason"]


def test_long_thinking_is_cut_to_exactly_the_budget():
    long = "I am thinking very hard. " * 200
    rec = run_episode(TASK, ScriptedSteps(py("print(1)", long), final("1", "short")), ENV, Budgets(max_thinking_tokens=37), family=FAM)
    r = rec["messages"][2]["reasoning_content"]
    assert TokenCounter().count(r) == 37 and long.startswith(r)
    assert rec["messages"][4]["reasoning_content"] == "short"
    assert rec["metadata"]["thinking_truncated"] == 1


def test_total_token_budget_is_never_exceeded():
    step = py("print(1)", "t" * 400)  # 100 thinking tokens + 2 + ceil(17/4)=5 call tokens
    counter = TokenCounter()
    per_step = 100 + counter.call_tokens("python", {"code": "print(1)"})
    budget = 3 * per_step + 50  # three whole steps, then 50 tokens left: thinking is cut to fit
    rec = run_episode(TASK, ScriptedSteps(step), ENV, Budgets(max_total_tokens=budget, max_steps=50), family=FAM)
    validate_record(rec)
    m = rec["metadata"]
    assert m["budget_exhausted"] == "max_total_tokens"
    assert m["generated_tokens"] == generated(rec) == budget  # filled exactly, never more
    assistants = [x for x in rec["messages"] if x["role"] == "assistant"]
    assert len(assistants) == 4 and counter.count(assistants[-1]["reasoning_content"]) == 50 - (per_step - 100)
    assert m["thinking_truncated"] == 1


def test_a_step_whose_calls_alone_do_not_fit_is_dropped():
    big = py("print('" + "x" * 400 + "')", "")
    rec = run_episode(TASK, ScriptedSteps(py("print(1)", ""), big), ENV, Budgets(max_total_tokens=60), family=FAM)
    validate_record(rec)
    assert rec["metadata"]["steps"] == 1 and rec["metadata"]["budget_exhausted"] == "max_total_tokens"
    assert rec["metadata"]["generated_tokens"] <= 60 and rec["messages"][-1]["role"] == "tool"


def test_token_counter_with_a_real_tokenizer():
    from data.tokenizer import train_tokenizer

    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog " * 20, "print(2 ** 100)"], vocab_size=300, min_frequency=1)
    counter = TokenCounter(tok)
    text = "the quick brown fox jumps over the lazy dog " * 5
    n = counter.count(text)
    assert n == len(tok.encode(text, add_special_tokens=False)) and n > 5
    cut = counter.truncate(text, 7)
    assert counter.count(cut) <= 7 and text.startswith(cut.strip()[:10]) and counter.count(cut) >= 6
    long = "the quick brown fox " * 100
    rec = run_episode(TASK, ScriptedSteps(py("print(1)", long), final("1")), ENV, Budgets(max_thinking_tokens=10), family=FAM, token_counter=counter)
    assert counter.count(rec["messages"][2]["reasoning_content"]) <= 10 and rec["metadata"]["thinking_truncated"] == 1
