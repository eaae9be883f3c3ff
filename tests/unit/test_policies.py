"""Policies without a sandbox: the scripted teacher's choices, building policies from configs, and
the OpenAI-compatible teacher's messages against a local HTTP server. Whole episodes in real
sandboxes are in tests/integration/test_policies_sandbox.py."""

from __future__ import annotations

import pytest

from data.schema import validate_record
from sandbox_env.agent.rollout import Budgets, run_episode
from sandbox_env.agent.teachers import OpenAITeacher, ScriptedTeacher, build_policy, to_openai_messages
from sandbox_env.agent.types import AssistantStep, EpisodeState
from tests.fixtures import family_in as family
from tests.fixtures import openai_completion


def test_brief_style_first_sentence_ignores_quoted_and_numeric_stops():
    from sandbox_env.agent.teachers import _first_sentence

    assert _first_sentence('The search lists "1. [doc_id: p-1] A B": id p-1 is "A B". Opening it.') == \
        'The search lists "1. [doc_id: p-1] A B": id p-1 is "A B".'
    assert _first_sentence("771! has 3.5 thousand digits. More.") == "771! has 3.5 thousand digits."
    assert _first_sentence("no stop at all") == "no stop at all"
    with pytest.raises(ValueError, match="policy.style"):
        ScriptedTeacher(0.0, style="terse")


def test_opening_a_namesake_is_noticed_and_corrected(world):
    fam = family(world, "retrieval", {"hops": 2})
    seen = 0
    for index in range(8):
        rec = run_episode(fam.make("train", index), ScriptedTeacher(1.0), world[1], family=fam)
        assert rec["verdict"]["correct"]
        msgs = rec["messages"]
        for i, m in enumerate(msgs):
            if m["role"] == "assistant" and "I opened the wrong search hit" in m.get("reasoning_content", ""):
                wrong = msgs[i - 1]  # the tool result of the namesake's document
                assert wrong["role"] == "tool" and wrong["name"] == "open" and not wrong["content"].startswith("Error")
                assert wrong["content"].split("]", 1)[1].split("(page")[0].strip() in m["reasoning_content"]  # quotes the title it saw
                seen += 1
    assert seen > 0


def test_scripted_episodes_are_deterministic(world):
    fam = family(world, "retrieval", {"hops": 3})
    a, b = (run_episode(fam.make("train", 2), ScriptedTeacher(0.5), world[1], family=fam, seed=4) for _ in range(2))
    assert a["messages"] == b["messages"] and a["metadata"]["mistakes"] == b["metadata"]["mistakes"]


def test_mistake_rate_between_zero_and_one_mixes(world):
    fam = family(world, "retrieval", {"hops": 4})
    counts = [run_episode(fam.make("train", i), ScriptedTeacher(0.3), world[1], family=fam)["metadata"]["mistakes"] for i in range(6)]
    assert sum(counts) > 0 and min(counts) < max(counts)


def test_build_policy_from_config_and_errors():
    assert isinstance(build_policy({"kind": "scripted", "mistake_rate": 0.2}), ScriptedTeacher)
    with pytest.raises(ValueError, match="policy.kind must be"):
        build_policy({"kind": "nope"})
    with pytest.raises(ValueError, match="mistake_rate must be in"):
        ScriptedTeacher(1.5)
    with pytest.raises(ValueError, match="policy.model is empty"):
        OpenAITeacher(base_url="http://127.0.0.1:1/v1", model="")


# ----------------------------------------------------------------------------- OpenAI teacher


def test_openai_teacher_passes_malformed_arguments_to_the_loop(openai_server):
    srv, replies = openai_server
    replies.append(openai_completion({"content": "", "reasoning": "calling",
                                "tool_calls": [{"id": "x", "type": "function", "function": {"name": "python", "arguments": "{not json"}}]}))
    teacher = OpenAITeacher(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", model="m", max_tokens=64, max_retries=0)
    state = EpisodeState(task=None, family=None, seed=0, tokens_left=1000)
    step = teacher.act([{"role": "user", "content": "hi"}], [], state)
    assert step == AssistantStep(reasoning_content="calling", content="", tool_calls=step.tool_calls)
    assert step.tool_calls[0].arguments == "{not json" and step.tool_calls[0].name == "python"
    assert srv.requests[0][1]["max_tokens"] == 64 and "tools" not in srv.requests[0][1]


def test_to_openai_messages_can_send_reasoning():
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "", "reasoning_content": "r",
             "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "python", "arguments": {"code": "1"}}}]}]
    out = to_openai_messages(msgs, send_reasoning=True)
    assert out[1]["reasoning_content"] == "r" and out[1]["tool_calls"][0]["function"]["arguments"] == '{"code": "1"}'
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"code": "1"}  # the input is not modified


def test_long_horizon_chain_with_context_management(world):
    """12 documents: tens of tool calls; with a small context budget old results get hidden,
    and the teacher still answers right because its thinking carried each fact forward."""
    fam = family(world, "retrieval", {"hops": 12})
    rec = run_episode(fam.make("train", 0), ScriptedTeacher(0.1), world[1],
                      Budgets(context_budget=3000, keep_last_tool_outputs=2, max_steps=64), family=fam)
    validate_record(rec)
    m = rec["metadata"]
    assert rec["verdict"]["correct"] and m["tool_calls"] >= 24 and m["context_hidden"] > 0
    tools = [x for x in rec["messages"] if x["role"] == "tool"]
    assert all(x["content"] != "[tool output hidden to save context]" for x in tools[-2:])
