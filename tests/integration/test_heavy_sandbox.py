"""Heavy mode with episodes in real sandboxes: the vote is deterministic for a seed and pass@k is
counted right. (Vote and tie-breaking alone: tests/unit/test_heavy.py.)"""

from __future__ import annotations

import random

import pytest
import torch

from sandbox_env.agent.heavy import answer_key, majority_vote, run_heavy
from sandbox_env.agent.rollout import Budgets, ToolEnv
from sandbox_env.agent.types import AssistantStep, EpisodeState
from sandbox_env.tasks import get_family

torch.set_num_threads(1)
ENV = ToolEnv(tools=("python",))


class Guesser:
    """Answers after one python call with a value drawn from the episode's seed: right 1 time in 3."""

    name = "guesser"

    def act(self, messages, tools, state: EpisodeState) -> AssistantStep:
        from sandbox_env.agent.types import ToolCall

        if state.step == 0:
            return AssistantStep("check", "", [ToolCall("python", {"code": "print(1)"}, "c0")])
        rng = random.Random(f"{state.task.id}|{state.seed}")
        value = rng.choice([state.task.answer, "1", "2"])
        return AssistantStep("guess", f"Answer: {value}", [])


def test_run_heavy_vote_is_deterministic_for_a_seed_and_counts_pass_at_k():
    fam = get_family("arith")
    task = fam.make("heldout", 1, 0)
    a = run_heavy(task, Guesser(), ENV, Budgets(max_steps=3), n=5, family=fam, seed=3)
    b = run_heavy(task, Guesser(), ENV, Budgets(max_steps=3), n=5, family=fam, seed=3)
    assert a["answers"] == b["answers"] and a["heavy_answer"] == b["heavy_answer"]
    assert a["heavy_correct"] == b["heavy_correct"]
    correct = [r["verdict"]["correct"] for r in a["records"]]
    assert a["pass@1"] == pytest.approx(sum(correct) / 5) and a["pass@n"] == any(correct)
    assert a["heavy_answer"] == majority_vote(a["answers"], seed=3, task_id=task.id)
    assert a["heavy_correct"] == (answer_key(a["heavy_answer"]) == answer_key(task.answer))
    with pytest.raises(ValueError, match="heavy.mode"):
        run_heavy(task, Guesser(), ENV, n=2, mode="best", family=fam)


