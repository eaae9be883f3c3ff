"""Date arithmetic: shifting dates by thousands of days, day counts, weekdays.

The idea: calendars are irregular (month lengths, leap years, the Gregorian rule for
centuries), so the answer is reliable only through a date library; python's `datetime`
is both the teacher's tool and the reference.
"""

from __future__ import annotations

import datetime as dt
import random
from typing import Any

from sandbox_env.agent.types import AssistantStep
from sandbox_env.tasks.base import Task, TaskFamily, format_final
from sandbox_env.tasks.scripting import ScriptContext, python_solve

KINDS = ("add_days", "days_between", "weekday")
_LO, _HI = dt.date(1700, 1, 1).toordinal(), dt.date(2300, 12, 31).toordinal()


def _date(rng: random.Random) -> dt.date:
    return dt.date.fromordinal(rng.randint(_LO, _HI))


def _spoken(d: dt.date) -> str:
    return f"{d.strftime('%B')} {d.day}, {d.year}"


class DatesFamily(TaskFamily):
    name = "dates"
    tools = ("python",)

    def draw(self, rng: random.Random) -> dict[str, Any]:
        kind = rng.choice(KINDS)
        d = _date(rng)
        if kind == "add_days":
            n = rng.choice([-1, 1]) * rng.randint(100, 30000)
            n = n if dt.date(1, 1, 1).toordinal() < d.toordinal() + n < dt.date(9999, 12, 31).toordinal() else -n
            return {"kind": kind, "date": d.isoformat(), "days": n}
        if kind == "days_between":
            d2 = _date(rng)
            a, b = sorted([d, d2])
            return {"kind": kind, "start": a.isoformat(), "end": b.isoformat()}
        return {"kind": kind, "date": d.isoformat()}

    def build(self, p: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
        k = p["kind"]
        if k == "add_days":
            d, n = dt.date.fromisoformat(p["date"]), p["days"]
            direction = "after" if n > 0 else "before"
            prompt = f"What date is {abs(n)} days {direction} {_spoken(d)}? Give the date as YYYY-MM-DD."
            return prompt, (d + dt.timedelta(days=n)).isoformat(), {}
        if k == "days_between":
            a, b = dt.date.fromisoformat(p["start"]), dt.date.fromisoformat(p["end"])
            return f"How many days are there from {a.isoformat()} to {b.isoformat()} (the second date minus the first)?", str((b - a).days), {}
        d = dt.date.fromisoformat(p["date"])
        return f"On which day of the week did (or will) {_spoken(d)} fall? Answer with the weekday's English name.", d.strftime("%A"), {}

    def script(self, task: Task, ctx: ScriptContext):
        p, k = task.params, task.params["kind"]
        y, m, d = (int(x) for x in p.get("date", p.get("start", "2000-01-01")).split("-"))
        if k == "add_days":
            plan = (
                f"I need the date {abs(p['days'])} days {'after' if p['days'] > 0 else 'before'} {p['date']}. Counting that many days by hand "
                "through month lengths and leap years invites off-by-one errors, so I'll let datetime do the calendar arithmetic."
            )
            code = f"import datetime as dt\nstart = dt.date({y}, {m}, {d})\nprint((start + dt.timedelta(days={p['days']})).isoformat())"
            what = "the shifted date"
        elif k == "days_between":
            y2, m2, d2 = (int(x) for x in p["end"].split("-"))
            plan = f"I need the number of days from {p['start']} to {p['end']}. Subtracting two datetime.date objects gives the exact count, leap years included."
            code = f"import datetime as dt\nprint((dt.date({y2}, {m2}, {d2}) - dt.date({y}, {m}, {d})).days)"
            what = "the day count"
        else:
            plan = f"I need the weekday of {p['date']}. The proleptic Gregorian calendar in datetime handles this directly; strftime('%A') gives the English name."
            code = f"import datetime as dt\nprint(dt.date({y}, {m}, {d}).strftime('%A'))"
            what = "the weekday"
        value = yield from python_solve(ctx, plan, code)
        yield AssistantStep(
            f"The tool printed {value}. That is {what} asked for; datetime's calendar is exact, so I'll give it in the requested form.",
            format_final(f"According to the calendar computation, {what} is {value}.", value),
        )
