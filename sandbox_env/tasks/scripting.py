"""Helpers for the scripted teachers of the task families.

A script is a generator: `results = yield AssistantStep(...)` hands a turn to the loop and gets
back the text of the tool results that answered it. Scripts decide from those texts only,
which is what makes their thinking and their answers genuine; the one idea of this module is to
make "make a call, maybe botch it first, read the error, correct it" a single reusable step.
"""

from __future__ import annotations

import random
import re
from collections.abc import Generator
from typing import Any

from sandbox_env.agent.types import AssistantStep, ToolCall

# The argument names a script uses when the ToolBox's schema does not say otherwise.
_FALLBACK_PARAM = {"python": "code", "shell": "command", "search": "query", "open": "id"}
_WRONG_PARAM = {"python": "source", "shell": "cmd", "search": "q", "open": "doc"}


class ScriptContext:
    """What a script gets besides its task: an RNG, the mistake rate, the tool schemas (to use
    the ToolBox's real argument names) and the notes dict whose counters go to metadata."""

    def __init__(self, rng: random.Random, mistake_rate: float, notes: dict[str, Any], tools: list[dict[str, Any]] | None = None):
        self.rng = rng
        self.mistake_rate = mistake_rate
        self.notes = notes
        self.notes.setdefault("mistakes", 0)
        self.params: dict[str, str] = {}
        for t in tools or []:
            fn = t.get("function", {})
            req = fn.get("parameters", {}).get("required") or list(fn.get("parameters", {}).get("properties", {}))
            if req:
                self.params[fn["name"]] = req[0]

    def param(self, tool: str) -> str:
        return self.params.get(tool, _FALLBACK_PARAM[tool])

    def call(self, tool: str, value: Any, **extra: Any) -> ToolCall:
        return ToolCall(tool, {self.param(tool): value, **extra})

    def err(self) -> bool:
        """Whether to make a mistake at this call (drawn at each call)."""
        return self.mistake_rate > 0 and self.rng.random() < self.mistake_rate

    def mistake(self) -> None:
        self.notes["mistakes"] += 1

    def pick(self, *options: str) -> str:
        return self.rng.choice(options)


def lines(text: str) -> list[str]:
    return [ln.strip() for ln in (text or "").splitlines() if ln.strip()]


def last_line(text: str) -> str:
    """The last line of a tool's output, skipping the ToolBox's bracketed status notes such as
    `[exit status 1]` (grep -c exits 1 when it counts zero)."""
    ls = [ln for ln in lines(text) if not (ln.startswith("[") and ln.endswith("]") and not ln[1:2].isdigit())]
    return ls[-1] if ls else ""


_ERROR_WORDS = re.compile(r"error|no such|not found|unknown|invalid|cannot|traceback", re.IGNORECASE)


def error_line(text: str) -> str:
    """The line of a tool's output that states the error (the last such line: a traceback's
    last line names the exception), else its last line."""
    hits = [ln for ln in lines(text) if _ERROR_WORDS.search(ln)]
    return hits[-1] if hits else last_line(text)


def quote(text: str, limit: int = 160) -> str:
    t = " ".join((text or "").split())
    return t if len(t) <= limit else t[: limit - 3] + "..."


def call_with_recovery(ctx: ScriptContext, tool: str, value: str, thinking: str, typo: tuple[str, str] | None = None) -> Generator[AssistantStep, list[str], str]:
    """Make one tool call; with probability `mistake_rate` botch it first (either a typo
    `typo=(good, bad)` in the value, or the wrong argument name), read the error the tool
    returned, say what went wrong, and redo it. -> the text of the successful call's result."""
    if ctx.err():
        kinds = ["bad_args"] + (["typo"] if typo and typo[0] in value else [])
        kind = ctx.rng.choice(kinds)
        ctx.mistake()
        if kind == "typo":
            bad = value.replace(typo[0], typo[1], 1)
            out = (yield AssistantStep(thinking, "", [ctx.call(tool, bad)]))[0]
            fix = (
                f"That did not work. The tool returned: \"{quote(error_line(out))}\". I wrote `{typo[1]}` where I meant "
                f"`{typo[0]}`. Fixing that and running it again."
            )
        else:
            out = (yield AssistantStep(thinking, "", [ToolCall(tool, {_WRONG_PARAM[tool]: value})]))[0]
            fix = (
                f"The call was rejected: \"{quote(out)}\". The {tool} tool takes its input in the argument "
                f"`{ctx.param(tool)}`, not `{_WRONG_PARAM[tool]}`. Calling it again with the right name."
            )
        return (yield AssistantStep(fix, "", [ctx.call(tool, value)]))[0]
    return (yield AssistantStep(thinking, "", [ctx.call(tool, value)]))[0]


def python_solve(ctx: ScriptContext, plan: str, code: str) -> Generator[AssistantStep, list[str], str]:
    """Run `code` with the python tool (maybe botching `print` first); -> the last output line."""
    out = yield from python_run(ctx, plan, code)
    return last_line(out)


def python_run(ctx: ScriptContext, plan: str, code: str) -> Generator[AssistantStep, list[str], str]:
    """Run `code` with the python tool (maybe botching `print` first); -> the whole output."""
    return (yield from call_with_recovery(ctx, "python", code, plan, typo=("print(", "prnt(")))


def line_before_last(text: str) -> str:
    ls = [ln for ln in lines(text) if not (ln.startswith("[") and ln.endswith("]") and not ln[1:2].isdigit())]
    return ls[-2] if len(ls) >= 2 else ""
