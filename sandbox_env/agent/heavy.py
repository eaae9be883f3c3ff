"""Heavy mode: N rollouts of one task in parallel, then one answer from all of them.

K2 Thinking's "heavy" setting runs several trajectories and aggregates. Two aggregations here:
- `vote`: majority over the answers in the verified format (a final message with an
  `Answer: <value>` line); values are compared as the verifier compares them (numbers as numbers,
  text after normalisation). Ties are broken by an RNG seeded with (task id, seed), so the vote is
  deterministic for a seed and unbiased across seeds.
- `reflect`: the model reads the N final answers (no tools) and writes one final answer.

Reported per task: pass@1 (the mean correctness of the N rollouts, an unbiased estimate of one
rollout's success), pass@N (any rollout correct) and the heavy answer's correctness.
The rollouts run in threads, so with a `LocalModelPolicy` they decode as one batch.
"""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sandbox_env.agent.rollout import Budgets, TokenCounter, ToolEnv, run_episode
from sandbox_env.agent.types import EpisodeState, Policy
from sandbox_env.tasks import extract_answer, normalize, parse_number

MODES = ("vote", "reflect")

REFLECT_PROMPT = (
    "{prompt}\n\nIndependent attempts at this task gave these final answers:\n{answers}\n\n"
    "Weigh them, decide which is right, and reply with one line of the form `Answer: <value>`."
)


def answer_key(value: str, case_sensitive: bool = False) -> str:
    """The form two answers are compared in: a canonical number when it is one, else normalised text."""
    n = parse_number(value)
    if n is not None:
        return repr(float(n)) if isinstance(n, float) and not n.is_integer() else str(int(n))
    return normalize(value, case_sensitive)


def majority_vote(answers: list[str | None], *, seed: int, task_id: str, case_sensitive: bool = False) -> str | None:
    """The most frequent answer (None entries are unformatted answers and do not vote); ties are
    broken by random.Random(f"{task_id}|{seed}") over the tied keys in sorted order. Returns the
    first original spelling of the winning key, or None when no answer has the format."""
    keyed = [(answer_key(a, case_sensitive), a) for a in answers if a is not None]
    if not keyed:
        return None
    counts = Counter(k for k, _ in keyed)
    top = max(counts.values())
    tied = sorted(k for k, c in counts.items() if c == top)
    win = tied[0] if len(tied) == 1 else random.Random(f"{task_id}|{seed}").choice(tied)
    return next(a for k, a in keyed if k == win)


def run_heavy(task: Any, policy: Policy, env: ToolEnv, budgets: Budgets | None = None, *, n: int = 4,
              mode: str = "vote", family: Any = None, seed: int = 0, token_counter: TokenCounter | None = None,
              max_workers: int | None = None) -> dict[str, Any]:
    """N rollouts of `task` (episode seeds seed*1000 + i) in parallel threads, then aggregation.
    -> {"records", "answers", "heavy_answer", "heavy_correct", "pass@1", "pass@n", "mode", "n"}."""
    from sandbox_env.tasks import get_family

    if mode not in MODES:
        raise ValueError(f"heavy.mode={mode!r}; choose one of {list(MODES)}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"heavy.n must be a positive int (rollouts per task), got {n!r}")
    family = family or get_family(task.family)
    with ThreadPoolExecutor(max_workers=max_workers or n) as pool:
        futs = [pool.submit(run_episode, task, policy, env, budgets, family=family, seed=seed * 1000 + i,
                            token_counter=token_counter) for i in range(n)]
        records = [f.result() for f in futs]
    finals = [r["messages"][-1]["content"] if r["verdict"].get("answer") is not None else None for r in records]
    answers = [extract_answer(f) for f in finals]
    if mode == "vote":
        heavy = majority_vote(answers, seed=seed, task_id=task.id, case_sensitive=family.case_sensitive)
        heavy_text = None if heavy is None else f"Answer: {heavy}"
    else:
        heavy_text = reflect(task, policy, answers, seed=seed, family=family)
        heavy = extract_answer(heavy_text)
    verdict = family.verify(task, heavy_text) if heavy_text is not None else {
        "correct": False, "answer": None, "reason": "no rollout gave an answer in the format"}
    correct = [bool(r["verdict"]["correct"]) for r in records]
    return {"task_id": task.id, "family": family.tag, "mode": mode, "n": n, "records": records, "answers": answers,
            "heavy_answer": heavy, "heavy_verdict": verdict, "heavy_correct": bool(verdict["correct"]),
            "pass@1": sum(correct) / n, "pass@n": any(correct)}


def reflect(task: Any, policy: Policy, answers: list[str | None], *, seed: int, family: Any) -> str:
    """One more policy turn, without tools, that reads the N answers and writes the final one."""
    listed = "\n".join(f"{i + 1}. {a if a is not None else '(no answer)'}" for i, a in enumerate(answers))
    messages = [{"role": "user", "content": REFLECT_PROMPT.format(prompt=task.prompt, answers=listed)}]
    state = EpisodeState(task=task, family=family, seed=seed, step=0)
    step = policy.act(messages, [], state)
    return step.content or ""
