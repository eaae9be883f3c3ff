"""Policies in real sandboxes: the scripted teacher on every family (several seeds, with and
without mistakes) and the OpenAI-compatible teacher against a local HTTP openai_server, whole episodes.
(What needs no sandbox: tests/unit/test_policies.py.)"""

from __future__ import annotations

import dataclasses
import json

import pytest

from data.schema import validate_record
from sandbox_env.agent.rollout import Budgets, ToolEnv, run_episode
from sandbox_env.agent.teachers import OpenAITeacher, ScriptedTeacher
from sandbox_env.tasks import get_family
from tests.fixtures import FAMILY_IDS as IDS
from tests.fixtures import FAMILY_VARIANTS as VARIANTS
from tests.fixtures import family_in as family
from tests.fixtures import openai_completion


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_scripted_teacher_solves_every_family(world, name, kw):
    fam = family(world, name, kw)
    for split, index, seed in [("train", 0, 0), ("train", 1, 0), ("heldout", 0, 0), ("train", 0, 5), ("heldout", 1, 5)]:
        task = fam.make(split, index, seed=seed)
        rec = run_episode(task, ScriptedTeacher(0.0), world[1], family=fam, seed=index)
        validate_record(rec)
        m = rec["metadata"]
        assert rec["verdict"]["correct"], (task.prompt, rec["messages"][-3:])
        assert m["mistakes"] == m["invalid_tool_calls"] == m["tool_errors"] == 0
        assert m["tool_calls"] >= 1 and m["budget_exhausted"] is None
        assert rec["task"] == task.to_record()
        # genuine thinking: every assistant turn explains itself, the answer follows the convention
        assert all(msg.get("reasoning_content") for msg in rec["messages"] if msg["role"] == "assistant")
        assert rec["messages"][-1]["content"].splitlines()[-1].startswith("Answer: ")
    if kw.get("hops") == 3:  # 3 documents: a search and an open each
        assert m["tool_calls"] == 6


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_brief_style_makes_the_same_calls_with_less_text(world, name, kw):
    """style=brief: the same tool calls and answer as style=full, one sentence of thinking per
    step, the final message only its `Answer:` line."""
    fam = family(world, name, kw)
    for index in range(2):
        task = fam.make("train", index)
        full, brief = (run_episode(task, ScriptedTeacher(0.3, style=st), world[1], family=fam, seed=index)
                       for st in ("full", "brief"))
        validate_record(brief)
        assert brief["verdict"]["correct"] and brief["verdict"] == full["verdict"]
        calls = [[(m["role"], json.dumps(m.get("tool_calls") and [c["function"] for c in m["tool_calls"]]))
                  for m in r["messages"]] for r in (full, brief)]
        assert calls[0] == calls[1]
        for fm, bm in zip(full["messages"], brief["messages"]):
            if fm["role"] != "assistant":
                assert fm == bm
                continue
            assert bm["reasoning_content"] and fm["reasoning_content"].startswith(bm["reasoning_content"])
            assert bm["reasoning_content"][-1] in ".?" or bm["reasoning_content"] == fm["reasoning_content"]
        assert brief["messages"][-1]["content"] == full["messages"][-1]["content"].splitlines()[-1]
        assert brief["messages"][-1]["content"].startswith("Answer: ")
        assert sum(len(m.get("reasoning_content") or "") for m in brief["messages"]) < \
            sum(len(m.get("reasoning_content") or "") for m in full["messages"])


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_mistakes_are_observed_and_corrected(world, name, kw):
    fam = family(world, name, kw)
    for index in range(3):
        task = fam.make("train", index)
        rec = run_episode(task, ScriptedTeacher(1.0), world[1], family=fam, seed=index)
        validate_record(rec)
        assert rec["verdict"]["correct"], rec["messages"][-4:]
        msgs, m = rec["messages"], rec["metadata"]
        assert m["mistakes"] >= 1
        # every mistake is visible: a turn whose thinking reads the failed result just before it
        # and calls the same tool again, correctly
        fixes = [i for i, x in enumerate(msgs) if x["role"] == "assistant"
                 and any(w in x["reasoning_content"] for w in ("was rejected", "did not work", "wrong search hit"))]
        assert len(fixes) == m["mistakes"]
        for i in fixes:
            failed, fix = msgs[i - 1], msgs[i]
            assert failed["role"] == "tool" and fix["tool_calls"][0]["function"]["name"] == failed["name"]
            if "wrong search hit" not in fix["reasoning_content"]:
                assert failed["content"].startswith("Error") or "No such file" in failed["content"] or "NameError" in failed["content"]
                assert msgs[i + 1]["role"] == "tool" and not msgs[i + 1]["content"].startswith("Error")


@pytest.mark.parametrize("name,kw", VARIANTS, ids=IDS)
def test_teacher_reads_answers_from_tools_not_from_the_reference(world, name, kw):
    """The teacher is given a poisoned reference answer; it must still answer right (judged
    against the true task), because it only ever reads tool outputs."""
    fam = family(world, name, kw)
    task = fam.make("train", 3)
    poisoned = dataclasses.replace(task, answer="POISON-0")
    rec = run_episode(poisoned, ScriptedTeacher(0.0), world[1], family=fam)
    final = rec["messages"][-1]["content"]
    assert "POISON" not in json.dumps(rec["messages"])
    assert fam.verify(task, final)["correct"]


# ----------------------------------------------------------------------------- OpenAI teacher


def test_openai_teacher_drives_a_real_episode(openai_server, world):
    srv, replies = openai_server
    fam = get_family("arith")
    task = fam.make("train", 0)
    code = f"print({task.params['a']} * {task.params['b']})" if task.params["kind"] == "product" else "print(6 * 7)"
    replies += [
        openai_completion({"content": None, "reasoning_content": "I should compute this with python.",
                     "tool_calls": [{"id": "srv-1", "type": "function", "function": {"name": "python", "arguments": json.dumps({"code": code})}}]}, "tool_calls"),
        openai_completion({"content": "<think>The tool printed the value.</think>Done.\n\nAnswer: 42"}),
    ]
    teacher = OpenAITeacher(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", model="tiny", temperature=0.0, max_retries=0)
    rec = run_episode(task, teacher, ToolEnv(tools=("python",)), Budgets(max_total_tokens=5000), family=fam)
    validate_record(rec)
    msgs = rec["messages"]
    assert msgs[2]["reasoning_content"] == "I should compute this with python."
    assert msgs[2]["tool_calls"][0]["function"]["arguments"] == {"code": code}  # a dict in the record
    assert msgs[3]["role"] == "tool" and msgs[3]["content"].strip() == (str(int(task.params["a"]) * int(task.params["b"])) if task.params["kind"] == "product" else "42")
    assert msgs[4]["reasoning_content"] == "The tool printed the value." and msgs[4]["content"].startswith("Done.")
    assert rec["metadata"]["policy"] == "openai:tiny"
    # what the server saw: tools, OpenAI-form messages (arguments as JSON text), the token cap
    path, first = srv.requests[0]
    assert path.endswith("/chat/completions")
    assert [t["function"]["name"] for t in first["tools"]] == ["python"]
    assert first["model"] == "tiny" and first["max_tokens"] == 5000
    _, second = srv.requests[1]
    call = second["messages"][2]["tool_calls"][0]
    assert isinstance(call["function"]["arguments"], str) and json.loads(call["function"]["arguments"]) == {"code": code}
    assert second["messages"][3] == {"role": "tool", "content": msgs[3]["content"], "tool_call_id": "call_0", "name": "python"}
    assert "reasoning_content" not in second["messages"][2]  # thinking is not sent back by default
    assert second["max_tokens"] < 5000  # the first turn's tokens were spent


