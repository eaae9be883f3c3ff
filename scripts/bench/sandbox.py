"""Sandbox speed: warm python tool calls and session starts, bubblewrap vs no sandbox.

Run:  .venv/bin/python scripts/bench/sandbox.py [--calls 2000] [--starts 100] [--repeats 3]

Every figure is measured side by side in one run, so the ratios hold on a busy machine too:
- warm call: `run_python("x = x + 1")` through a warm session, bubblewrap vs the same
  persistent worker and protocol without bubblewrap (SandboxConfig(isolation="none")); plus an
  in-process `exec` of the same code as the floor. Target: bwrap overhead <= 2 ms per call over
  the unsandboxed worker.
- session start: open a session, run one call (the worker starts lazily, so a session that is
  never used costs only a temp dir), close it; bubblewrap vs no sandbox vs a bare
  `python -I -S -c pass` subprocess. Sequential and with 2 threads (2 cores). Target: >= 50
  sandbox session starts per second on 2 cores.
Repeats are interleaved (a, b, a, b, ...) and the best of each is kept.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))

from sandbox_env import Sandbox, SandboxConfig

BWRAP = SandboxConfig()
NONE = SandboxConfig(isolation="none")


def warm_calls(cfg: SandboxConfig, n: int) -> float:
    """Seconds per call."""
    with Sandbox(cfg) as sb:
        sb.run_python("x = 0")
        t = time.perf_counter()
        for _ in range(n):
            r = sb.run_python("x = x + 1")
        dt = time.perf_counter() - t
        assert r.ok and sb.run_python("x").output == f"{n}\n"
    return dt / n


def exec_calls(n: int) -> float:
    g = {"x": 0}
    code = "x = x + 1"
    t = time.perf_counter()
    for _ in range(n):
        exec(compile(code, "<cell>", "exec"), g)  # the worker compiles each call too
    return (time.perf_counter() - t) / n


def session_once(cfg: SandboxConfig) -> None:
    with Sandbox(cfg) as sb:
        assert sb.run_python("1 + 1").output == "2\n"


def lazy_session_once(cfg: SandboxConfig) -> None:
    with Sandbox(cfg) as sb:
        sb.write_file("task.txt", "setup")


def bare_python_once() -> None:
    subprocess.run([sys.executable, "-I", "-S", "-c", "pass"], check=True)


def per_second(fn, n: int, threads: int) -> float:
    t = time.perf_counter()
    if threads == 1:
        for _ in range(n):
            fn()
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda _: fn(), range(n)))
    return n / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--starts", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # isolation="none" warns each time, on purpose
    import logging

    logging.getLogger("sandbox_env.sandbox").setLevel(logging.ERROR)

    # Other work on the machine slows every row alike; the load average says how much to trust
    # absolute rates (the ratios are measured side by side and hold up better).
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, euid {os.geteuid()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    calls = {"bwrap": [], "none": [], "exec": []}
    for _ in range(args.repeats):
        calls["bwrap"].append(warm_calls(BWRAP, args.calls))
        calls["none"].append(warm_calls(NONE, args.calls))
        calls["exec"].append(exec_calls(args.calls))
    b, u, e = (min(calls[k]) * 1e3 for k in ("bwrap", "none", "exec"))
    print(f"\nwarm python call, {args.calls} calls x {args.repeats} repeats (best)")
    print(f"  {'':<34}{'ms/call':>8}{'calls/s':>10}")
    for name, ms in (("sandbox (bwrap)", b), ("same worker, no sandbox", u), ("in-process exec", e)):
        print(f"  {name:<34}{ms:8.3f}{1e3 / ms:10.0f}")
    print(f"  bwrap overhead over the unsandboxed worker: {b - u:+.3f} ms/call (ratio {b / u:.2f}x); "
          f"over in-process exec: {b - e:+.3f} ms/call")

    rows = [("sandbox session, start+1 call (bwrap)", lambda: session_once(BWRAP)),
            ("same, no sandbox", lambda: session_once(NONE)),
            ("bare `python -I -S -c pass`", bare_python_once),
            ("sandbox session, never called (lazy)", lambda: lazy_session_once(BWRAP))]
    print(f"\nsession starts per second, {args.starts} starts x {args.repeats} repeats (best)")
    print(f"  {'':<40}{'1 thread':>10}{'2 threads':>11}")
    results = {}
    for threads in (1, 2):
        best = {name: 0.0 for name, _ in rows}
        for _ in range(args.repeats):
            for name, fn in rows:
                best[name] = max(best[name], per_second(fn, args.starts, threads))
        results[threads] = best
    for name, _ in rows:
        print(f"  {name:<40}{results[1][name]:10.1f}{results[2][name]:11.1f}")
    sb2, none2, bare2 = (results[2][rows[i][0]] for i in range(3))
    print(f"  bwrap session vs no-sandbox session (2 threads): {sb2 / none2:.2f}x; "
          f"vs bare python start: {sb2 / bare2:.2f}x")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
