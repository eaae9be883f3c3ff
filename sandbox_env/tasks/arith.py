"""Big-number arithmetic: exact answers no one gets right by hand, easy with python's ints.

The idea: the numbers are far too large for mental arithmetic (tens of digits, huge powers),
so the only reliable route is the python tool, and python's arbitrary-precision integers make
the reference answer exact.
"""

from __future__ import annotations

import math
import random
from typing import Any

from sandbox_env.agent.types import AssistantStep
from sandbox_env.tasks.base import Task, TaskFamily, format_final
from sandbox_env.tasks.scripting import ScriptContext, last_line, line_before_last, python_run

KINDS = ("product", "power_mod", "factorial_digit_sum", "sum_of_powers")


def _big(rng: random.Random, lo: int, hi: int) -> int:
    digits = rng.randint(lo, hi)
    return rng.randint(10 ** (digits - 1), 10**digits - 1)


class ArithFamily(TaskFamily):
    name = "arith"
    tools = ("python",)

    def draw(self, rng: random.Random) -> dict[str, Any]:
        kind = rng.choice(KINDS)
        if kind == "product":
            return {"kind": kind, "a": str(_big(rng, 20, 40)), "b": str(_big(rng, 20, 40))}
        if kind == "power_mod":
            return {"kind": kind, "a": str(_big(rng, 15, 25)), "e": rng.randint(10**5, 10**7), "m": str(_big(rng, 10, 15))}
        if kind == "factorial_digit_sum":
            return {"kind": kind, "n": rng.randint(100, 1400)}  # n! stays under python's 4300-digit str() limit
        return {"kind": kind, "n": rng.randint(1000, 50000), "p": rng.randint(3, 9)}

    def build(self, p: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
        k = p["kind"]
        if k == "product":
            a, b = int(p["a"]), int(p["b"])
            return f"Compute the exact product {a} × {b}.", str(a * b), {}
        if k == "power_mod":
            a, e, m = int(p["a"]), p["e"], int(p["m"])
            return f"What is {a}^{e} mod {m}? (The remainder of {a} raised to the power {e}, divided by {m}.)", str(pow(a, e, m)), {}
        if k == "factorial_digit_sum":
            n = p["n"]
            return f"What is the sum of the decimal digits of {n}! ({n} factorial)?", str(sum(map(int, str(math.factorial(n))))), {}
        n, q = p["n"], p["p"]
        return f"Compute 1^{q} + 2^{q} + 3^{q} + ... + {n}^{q} exactly.", str(sum(i**q for i in range(1, n + 1))), {}

    def script(self, task: Task, ctx: ScriptContext):
        p, k = task.params, task.params["kind"]
        why = ctx.pick(
            "Doing this by hand would be slow and error-prone with numbers this size",
            "These numbers are far beyond what I can multiply out reliably in my head",
            "Exact arithmetic at this scale needs a computer",
        )
        if k == "product":
            plan = f"I need the exact product of a {len(p['a'])}-digit and a {len(p['b'])}-digit number. {why}; Python integers are exact at any size, so I'll multiply them there."
            code = f"a = {p['a']}\nb = {p['b']}\nprint(a * b)"
            what = "the product"
        elif k == "power_mod":
            plan = f"I need {p['a']}^{p['e']} modulo {p['m']}. The full power would have millions of digits; {why.lower()}. Python's three-argument pow does modular exponentiation by repeated squaring, which is exact and fast."
            code = f"a = {p['a']}\ne = {p['e']}\nm = {p['m']}\nprint(pow(a, e, m))"
            what = "the remainder"
        elif k == "factorial_digit_sum":
            plan = f"{p['n']}! has thousands of digits. {why}. I'll compute the factorial with math.factorial and add up its decimal digits."
            code = f"import math\ndigits = str(math.factorial({p['n']}))\nprint(len(digits))\nprint(sum(int(d) for d in digits))"
            what = "the digit sum"
        else:
            plan = f"The sum of k^{p['p']} for k from 1 to {p['n']} is a huge integer. {why}; a direct sum over Python integers is exact and only {p['n']} terms."
            code = f"n = {p['n']}\nprint(sum(k**{p['p']} for k in range(1, n + 1)))"
            what = "the sum"
        out = yield from python_run(ctx, plan, code)
        value = last_line(out)
        seen = f"{p['n']}! has {line_before_last(out)} digits, and their sum printed as {value}." if k == "factorial_digit_sum" else f"The program printed {value}."
        yield AssistantStep(
            f"{seen} That is {what} the task asks for, computed exactly, so I can report it as is.",
            format_final(f"Computed exactly with Python: {what} is {value}.", value),
        )
