"""File tasks: questions about files that the task's setup writes into the sandbox work dir.

Count log lines at a level, find the largest file, sum a CSV column for one region, count
files by extension in a tree. The one idea: the data exists only inside the sandbox (written
by `setup` before the episode), so the only way to the answer is to inspect it with the shell
tool (grep, wc, awk, find), and the reference is computed from the same generated contents.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from decimal import Decimal
from typing import Any

from sandbox_env.agent.types import AssistantStep
from sandbox_env.tasks.base import Task, TaskFamily, format_final
from sandbox_env.tasks.scripting import ScriptContext, call_with_recovery, last_line, quote

KINDS = ("count_matching", "largest_file", "csv_sum", "count_files")
LEVELS = ("INFO", "WARN", "ERROR", "DEBUG")
_SERVICES = ("api", "worker", "db", "cache", "auth", "billing")
_MSGS = ("request served", "job finished", "retrying connection", "slow query", "cache miss", "token refreshed", "queue drained", "disk usage high")
_REGIONS = ("North", "South", "East", "West", "Central")
_PRODUCTS = ("anvil", "bolt", "crate", "drill", "easel", "flask")
_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "quartz", "maple", "river", "stone", "cloud", "ember", "vale")


def _log(rng: random.Random, n: int) -> str:
    out = []
    for _ in range(n):
        t = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}"
        out.append(f"{t} {rng.choices(LEVELS, weights=(6, 2, 1, 3))[0]} service={rng.choice(_SERVICES)} msg=\"{rng.choice(_MSGS)}\"")
    return "\n".join(out) + "\n"


def _text(rng: random.Random, n_words: int) -> str:
    words = [rng.choice(_WORDS) for _ in range(n_words)]
    return "\n".join(" ".join(words[i : i + 10]) for i in range(0, len(words), 10)) + "\n"


class FilesFamily(TaskFamily):
    name = "files"
    tools = ("shell",)

    def draw(self, rng: random.Random) -> dict[str, Any]:
        kind = rng.choice(KINDS)
        files: dict[str, str] = {}
        q: dict[str, Any] = {"kind": kind}
        if kind == "count_matching":
            for i in range(rng.randint(3, 6)):
                files[f"data/{rng.choice(_SERVICES)}-{i}.log"] = _log(rng, rng.randint(20, 200))
            q["level"] = rng.choice(LEVELS[1:])
        elif kind == "largest_file":
            sizes = rng.sample(range(20, 900), rng.randint(4, 8))  # distinct word counts -> a unique largest file
            for i, n in enumerate(sizes):
                files[f"data/{rng.choice(_WORDS)}_{i}.{rng.choice(['txt', 'md', 'csv', 'log'])}"] = _text(rng, n)
            # distinct word counts do not guarantee distinct byte sizes; redraw rather than tie
            b = sorted((len(t) for t in files.values()), reverse=True)
            if b[0] == b[1]:
                return self.draw(rng)
        elif kind == "csv_sum":
            rows = ["date,region,product,units,price"]
            for _ in range(rng.randint(30, 150)):
                rows.append(f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d},{rng.choice(_REGIONS)},{rng.choice(_PRODUCTS)},"
                            f"{rng.randint(1, 500)},{rng.randint(100, 99999) / 100:.2f}")
            files["data/sales.csv"] = "\n".join(rows) + "\n"
            q["region"] = rng.choice(_REGIONS)
            q["column"] = rng.choice(["units", "price"])
        else:
            for i in range(rng.randint(6, 20)):
                sub = "/".join(rng.choice(["a", "b", "c", "old", "new"]) for _ in range(rng.randint(0, 3)))
                path = f"data/{sub}/" if sub else "data/"
                files[f"{path}{rng.choice(_WORDS)}{i}.{rng.choice(['txt', 'json', 'py', 'md'])}"] = _text(rng, rng.randint(5, 40))
            q["ext"] = rng.choice(["txt", "json", "py", "md"])
        return {**q, "files": files}

    def split_key(self, params: dict[str, Any]) -> Any:
        digest = hashlib.sha256(json.dumps(params["files"], sort_keys=True).encode()).hexdigest()
        return {k: v for k, v in params.items() if k != "files"} | {"files": digest}

    def build(self, p: dict[str, Any]) -> tuple[str, str, dict[str, str]]:
        files, k = p["files"], p["kind"]
        if k == "count_matching":
            n = sum(1 for t in files.values() for line in t.splitlines() if re.search(rf"\b{p['level']}\b", line))
            return f"The directory data/ in your working directory holds log files (*.log). How many lines in total, across all of them, have the level {p['level']}?", str(n), files
        if k == "largest_file":
            name = max(files, key=lambda f: len(files[f].encode())).split("/")[-1]
            return "Which file in the directory data/ (in your working directory) is the largest in bytes? Answer with the file name only, e.g. notes.txt.", name, files
        if k == "csv_sum":
            rows = [r.split(",") for r in files["data/sales.csv"].splitlines()[1:]]
            col = {"units": 3, "price": 4}[p["column"]]
            total = sum(Decimal(r[col]) for r in rows if r[1] == p["region"])  # Decimal: an exact reference for cents
            return (
                f"The file data/sales.csv (in your working directory) has the columns date,region,product,units,price. "
                f"What is the sum of the {p['column']} column over the rows whose region is {p['region']}?"
            ), str(total), files
        n = sum(1 for f in files if f.endswith("." + p["ext"]))
        return f"How many files with the extension .{p['ext']} are there under the directory data/ in your working directory, subdirectories included?", str(n), files

    def script(self, task: Task, ctx: ScriptContext):
        p, k = task.params, task.params["kind"]
        bad_dir = ("data/", "dat/")
        if k == "count_matching":
            plan = (
                f"I need the number of lines at level {p['level']} across data/*.log. grep -w matches the level as a whole word, "
                "and piping all files through one grep -c gives a single total instead of per-file counts."
            )
            cmd = f"cat data/*.log | grep -c -w {p['level']}"
            out = yield from call_with_recovery(ctx, "shell", cmd, plan, typo=bad_dir)
            value = last_line(out)
            yield AssistantStep(
                f"grep printed {value}: that many lines in all the log files carry the level {p['level']}.",
                format_final(f"There are {value} {p['level']} lines across the log files.", value),
            )
        elif k == "largest_file":
            plan = "I need the largest file in data/. wc -c prints each file's size in bytes; I'll read the sizes and take the biggest (ignoring the total line)."
            out = yield from call_with_recovery(ctx, "shell", "wc -c data/*", plan, typo=bad_dir)
            sizes = [(int(m.group(1)), m.group(2)) for m in re.finditer(r"^\s*(\d+)\s+(data/\S+)\s*$", out, re.MULTILINE)]
            if not sizes:
                yield AssistantStep(f"I could not read any file sizes from {quote(out)!r}.", format_final("I could not list the files.", "unknown"))
                return
            size, path = max(sizes)
            listing = "; ".join(f"{p_} = {s} bytes" for s, p_ in sizes)
            yield AssistantStep(
                f"wc -c reports {listing}. The biggest is {path} with {size} bytes, so its name is {path.split('/')[-1]}.",
                format_final(f"The largest file is {path} ({size} bytes).", path.split("/")[-1]),
            )
        elif k == "csv_sum":
            col = {"units": 4, "price": 5}[p["column"]]
            plan = (
                f"I need the sum of {p['column']} (column {col}) over rows with region {p['region']} in data/sales.csv. awk splits on commas; "
                "NR>1 skips the header, and printf with two decimals avoids awk's default 6-digit rounding."
            )
            cmd = f"awk -F, 'NR>1 && $2==\"{p['region']}\" {{s += ${col}; n++}} END {{printf \"%d rows\\n%.2f\\n\", n, s}}' data/sales.csv"
            out = yield from call_with_recovery(ctx, "shell", cmd, plan, typo=bad_dir)
            value = last_line(out)
            if value.endswith(".00") and p["column"] == "units":
                value = value[:-3]
            yield AssistantStep(
                f"awk printed {quote(out)!r}: the {p['column']} of the {p['region']} rows add up to {value}.",
                format_final(f"The {p['column']} column sums to {value} over the {p['region']} rows.", value),
            )
        else:
            plan = f"I need to count the .{p['ext']} files anywhere under data/. find with -type f and -name '*.{p['ext']}' lists them recursively; wc -l counts the lines."
            out = yield from call_with_recovery(ctx, "shell", f"find data -type f -name '*.{p['ext']}' | wc -l", plan, typo=("data", "dat"))
            value = last_line(out)
            yield AssistantStep(
                f"find | wc -l printed {value}, so there are {value} .{p['ext']} files under data/.",
                format_final(f"There are {value} .{p['ext']} files under data/.", value),
            )
