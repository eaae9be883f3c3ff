"""String transforms: chains of exact edits (reverse, Caesar shift, vowel removal, ...) and
overlapping substring counts.

The idea: each step is trivial, but a chain of three over a long string is where hand
execution slips a character; the python tool applies them literally. Answers are compared
case-sensitively, since case is part of a transform's result.
"""

from __future__ import annotations

import random
from typing import Any

from sandbox_env.agent.types import AssistantStep
from sandbox_env.tasks.base import Task, TaskFamily, format_final
from sandbox_env.tasks.scripting import ScriptContext, python_solve

_C, _V = "bcdfghklmnprstvz", "aeiou"

# op -> (description in the prompt, python expression over `s`, host implementation)
OPS: dict[str, tuple[str, str]] = {
    "reverse": ("reverse the whole string", "s = s[::-1]"),
    "reverse_words": ("reverse the order of the words (words are separated by single spaces)", "s = ' '.join(s.split(' ')[::-1])"),
    "upper": ("convert it to upper case", "s = s.upper()"),
    "swapcase": ("swap the case of every letter", "s = s.swapcase()"),
    "remove_vowels": ("delete every vowel (a, e, i, o, u, in either case)", "s = ''.join(c for c in s if c.lower() not in 'aeiou')"),
    "sort_words": ("sort the words alphabetically (plain string order, upper case before lower case)", "s = ' '.join(sorted(s.split(' ')))"),
    "capitalize_words": ("capitalize each word (first letter upper case, the rest lower case)", "s = ' '.join(w.capitalize() for w in s.split(' '))"),
    "caesar": ("shift every letter forward by {k} places in the alphabet, wrapping from z to a and keeping its case", None),
}


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(_C) + rng.choice(_V) for _ in range(rng.randint(2, 4))) + rng.choice(["", rng.choice(_C)])


def _caesar(s: str, k: int) -> str:
    out = []
    for c in s:
        if c.isalpha():
            base = ord("a") if c.islower() else ord("A")
            out.append(chr((ord(c) - base + k) % 26 + base))
        else:
            out.append(c)
    return "".join(out)


def _caesar_code(k: int) -> str:
    return (
        "s = ''.join(chr((ord(c) - (97 if c.islower() else 65) + "
        f"{k}) % 26 + (97 if c.islower() else 65)) if c.isalpha() else c for c in s)"
    )


def apply_op(s: str, op: str, k: int | None) -> str:
    if op == "caesar":
        return _caesar(s, k)
    scope: dict[str, Any] = {"s": s}
    exec(OPS[op][1], {}, scope)  # the same statement the teacher runs, on trusted text
    return scope["s"]


class StringsFamily(TaskFamily):
    name = "strings"
    tools = ("python",)
    case_sensitive = True

    def draw(self, rng: random.Random) -> dict[str, Any]:
        if rng.random() < 0.3:
            text = "".join(rng.choice("ab") for _ in range(rng.randint(150, 400)))
            return {"kind": "count_overlapping", "text": text, "pattern": "".join(rng.choice("ab") for _ in range(rng.randint(3, 5)))}
        words = [_word(rng) for _ in range(rng.randint(4, 8))]
        words = [w.capitalize() if rng.random() < 0.3 else w for w in words]
        ops = rng.sample(sorted(OPS), rng.randint(2, 4))
        return {"kind": "transform", "text": " ".join(words), "ops": ops, "k": rng.randint(1, 25)}

    def build(self, p: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
        if p["kind"] == "count_overlapping":
            t, pat = p["text"], p["pattern"]
            n = sum(1 for i in range(len(t)) if t.startswith(pat, i))
            return f'How many times does "{pat}" occur in the string below, counting overlapping occurrences?\n\n{t}', str(n), {}
        s = p["text"]
        steps = []
        for i, op in enumerate(p["ops"], 1):
            steps.append(f"{i}. {OPS[op][0].format(k=p['k'])}")
            s = apply_op(s, op, p["k"])
        prompt = f'Start from the string "{p["text"]}" and apply these steps in order:\n' + "\n".join(steps) + "\nWhat is the resulting string?"
        return prompt, s, {}

    def script(self, task: Task, ctx: ScriptContext):
        p = task.params
        if p["kind"] == "count_overlapping":
            plan = (
                f'I need the number of overlapping occurrences of "{p["pattern"]}" in a {len(p["text"])}-character string. '
                "str.count skips overlaps, so I'll test every start position with startswith instead."
            )
            code = f"t = {p['text']!r}\npat = {p['pattern']!r}\nprint(sum(1 for i in range(len(t)) if t.startswith(pat, i)))"
            value = yield from python_solve(ctx, plan, code)
            yield AssistantStep(
                f"The count printed is {value}; testing every position includes the overlapping matches, as the task asks.",
                format_final(f'"{p["pattern"]}" occurs {value} times, overlaps included.', value),
            )
            return
        lines = [f"s = {p['text']!r}"]
        for op in p["ops"]:
            lines.append(_caesar_code(p["k"]) if op == "caesar" else OPS[op][1])
            lines.append("print(repr(s))")
        names = ", then ".join(op.replace("_", " ") for op in p["ops"])
        plan = (
            f"The steps are: {names}. Each is simple, but doing {len(p['ops'])} of them by hand over {len(p['text'])} characters "
            "is where a letter slips. I'll apply them one by one in Python and print the string after each step so I can check each."
        )
        out_last = yield from python_solve(ctx, plan, "\n".join(lines))
        value = out_last[1:-1] if len(out_last) >= 2 and out_last[0] == out_last[-1] and out_last[0] in "'\"" else out_last
        yield AssistantStep(
            f"The tool printed the string after every step; the last line, {out_last}, is the result after step {len(p['ops'])}. Without the quotes that is {value}.",
            format_final("After applying the steps in order, the string is:\n" + value, value),
        )
