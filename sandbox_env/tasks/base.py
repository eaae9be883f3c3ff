"""Task, verdict and the shared machinery of every task family.

A task family turns `(split, index, seed)` into a `Task`: a prompt, a reference answer, the
files to write into the sandbox before the episode, and the question's parameters. The one
idea: a task's split is a pure function of its parameters (a hash bucket), never of the index
or the seed. A family draws parameters from an RNG seeded by (family, split, index, seed) and
redraws until the parameters hash into the requested split, so train and held-out tasks can
never share a question, whatever indices and seeds two runs use.

Final-answer convention (the renderer and evaluation rely on it): the assistant's final
message ends with a line `Answer: <value>`. `extract_answer` takes the last such line; the
value is compared numerically (integers exactly, floats within `rel_tol`) when the reference
is a number, else as text after `normalize`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.2  # of each family's parameter space; fixed so splits stay disjoint across runs
ANSWER_PREFIX = "Answer:"
_ANSWER_RE = re.compile(r"^\s*\**\s*answer\s*\**\s*:\s*\**\s*(.+?)\s*$", re.IGNORECASE | re.MULTILINE)
_NUMBER_RE = re.compile(r"^[+-]?(\d[\d,_]*)(\.\d+)?([eE][+-]?\d+)?$|^[+-]?\.\d+$")


@dataclass
class Task:
    """One generated task. `params` are the question's parameters (what the prompt states);
    `files` are written into the sandbox work dir by the family's `setup`."""

    family: str  # registry name, e.g. "retrieval"
    tag: str  # variant label used in ids, e.g. "retrieval_multihop"
    id: str
    split: str
    prompt: str
    answer: str
    params: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)

    def to_record(self) -> dict[str, Any]:
        """The `task` field of a trajectory record."""
        return {"family": self.family, "id": self.id, "split": self.split, "prompt": self.prompt, "answer": self.answer}


def format_final(text: str, answer: str) -> str:
    """A final assistant message in the convention: free text, then `Answer: <value>` last."""
    return f"{text.rstrip()}\n\n{ANSWER_PREFIX} {answer}"


def extract_answer(text: str | None) -> str | None:
    """The value on the last `Answer: ...` line of `text`, or None when there is none."""
    if not text:
        return None
    found = _ANSWER_RE.findall(text)
    return found[-1] if found else None


def normalize(value: str, case_sensitive: bool = False) -> str:
    """Strip markup a model adds around a value (quotes, backticks, bold, a final period) and
    collapse whitespace; casefold unless `case_sensitive`."""
    v = value.strip()
    for _ in range(3):  # markup nests: **`"x"`**.
        v = v.strip().strip("*`\"'").strip()
        if v.endswith("."):
            v = v[:-1]
    v = re.sub(r"\s+", " ", v)
    return v if case_sensitive else v.casefold()


def parse_number(value: str) -> float | int | None:
    """`value` as a number ("48,213" -> 48213, "1.5e3" -> 1500.0), or None if it is not one."""
    v = value.strip().replace(" ", "")
    if not _NUMBER_RE.match(v):
        return None
    v = v.replace(",", "").replace("_", "")
    try:
        return int(v)
    except ValueError:
        return float(v)


def split_bucket(family: str, key: Any) -> str:
    """The split a question belongs to: a hash of the family name and the question's canonical
    parameters, so it never depends on index or seed."""
    digest = hashlib.sha256(f"{family}|{json.dumps(key, sort_keys=True)}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    return "heldout" if u < HELDOUT_FRACTION else "train"


def task_rng(tag: str, split: str, index: int, seed: int, attempt: int = 0) -> random.Random:
    digest = hashlib.sha256(f"{tag}|{split}|{index}|{seed}|{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def check_split(split: str, index: int) -> None:
    if split not in SPLITS:
        raise ValueError(f"task split must be one of {SPLITS}, got {split!r}; set the split name in conf/tasks")
    if not isinstance(index, int) or index < 0:
        raise ValueError(f"task index must be a non-negative int, got {index!r}")


class TaskFamily:
    """Base class of a family. Subclasses set `name`, `tools`, `case_sensitive` and
    implement `draw` (parameters from an RNG), `build` (prompt, answer, files from
    parameters) and `script` (the scripted teacher's episode)."""

    name: str = ""
    tools: tuple[str, ...] = ()
    case_sensitive: bool = False
    rel_tol: float = 1e-9  # floats only (sums of cents): tight enough that one cent in 1e6 counts
    max_draws: int = 2000

    def __init__(self, tag: str | None = None):
        self.tag = tag or self.name

    # -- to implement -------------------------------------------------------------------
    def draw(self, rng: random.Random) -> dict[str, Any]:
        raise NotImplementedError

    def split_key(self, params: dict[str, Any]) -> Any:
        """What identifies the question for the split hash; by default all parameters."""
        return params

    def build(self, params: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
        """-> (prompt, reference answer, files to write into the sandbox)."""
        raise NotImplementedError

    def script(self, task: Task, ctx: Any) -> Generator:
        """The scripted teacher (`ctx`: a `scripting.ScriptContext`): a generator that yields
        `AssistantStep`s and is sent the list of tool-result texts that answered each step's
        tool calls. It must read answers from those texts, never from `task.answer`."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    def make(self, split: str, index: int, seed: int = 0) -> Task:
        check_split(split, index)
        rng = task_rng(self.tag, split, index, seed)
        for _ in range(self.max_draws):
            params = self.draw(rng)
            if split_bucket(self.name, self.split_key(params)) == split:
                prompt, answer, files = self.build(params)
                return Task(self.name, self.tag, f"{self.tag}-{split}-{index:06d}", split, prompt, answer, params, files)
        raise ValueError(
            f"family {self.tag!r} found no {split} task in {self.max_draws} draws; its parameter space is too "
            f"small (for retrieval, raise corpus sizes in conf/generate.yaml `corpus`)"
        )

    def setup(self, task: Task, sandbox: Any) -> None:
        """Write the task's files into the sandbox work dir before the episode."""
        for rel_path, text in task.files.items():
            sandbox.write_file(rel_path, text)

    def verify(self, task: Task, final_text: str | None) -> dict[str, Any]:
        """-> verdict {"correct", "answer", "reason"} for the final assistant message."""
        got = extract_answer(final_text)
        if got is None:
            return {"correct": False, "answer": None, "reason": f"no '{ANSWER_PREFIX} <value>' line in the final message"}
        b = parse_number(task.answer)
        if b is not None:  # a numeric reference is compared as a number: "48,213" == "48213"
            a = parse_number(got)
            if a is None:
                return {"correct": False, "answer": got, "reason": f"expected a number, got {got!r}"}
            if isinstance(b, int):
                # an integer reference is exact: "125.0" is fine, "1.27e30" (float-rounded) is not
                ok = a == b if isinstance(a, int) else (a.is_integer() and abs(a) < 2**53 and int(a) == b)
            else:
                ok = math.isclose(a, b, rel_tol=self.rel_tol, abs_tol=1e-9)
            reason = "numeric match" if ok else f"numeric mismatch: got {got}, expected {task.answer}"
            return {"correct": ok, "answer": got, "reason": reason}
        ok = normalize(got, self.case_sensitive) == normalize(task.answer, self.case_sensitive)
        reason = "exact match after normalisation" if ok else f"mismatch: got {got!r}, expected {task.answer!r}"
        return {"correct": ok, "answer": got, "reason": reason}
