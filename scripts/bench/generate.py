"""Benchmark: trajectories per second of the default generate config (scripted teacher, real
sandboxes), per task family, with 2 workers and with 1, measured side by side in one run.

    .venv/bin/python scripts/bench/generate.py              # 24 tasks per family
    .venv/bin/python scripts/bench/generate.py --tasks 64 --workers 2

Each measurement is a fresh `generate` run (fresh out_dir, so nothing is resumed) over one
family's train tasks; the corpus index is built once beforehand and shared, so it is not
timed. The last row runs the whole default mix. Ratios: the 2-worker rate over the 1-worker
rate (the parallel speedup on this machine), and each family's rate over arith's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def load_config(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import sandbox_env.config  # noqa: F401  registers the job schemas
    from qat.jobs import VERSION_BASE

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=VERSION_BASE):
        return OmegaConf.to_container(compose("generate", overrides=overrides), resolve=True)


def run(cfg: dict, families: dict, n: int, workers: int, cache: str) -> float:
    from sandbox_env.generate import generate

    with tempfile.TemporaryDirectory() as d:
        cfg = {**cfg, "out_dir": d, "cache_dir": cache, "workers": workers, "progress": False,
               "tasks": {"splits": {"train": n, "heldout": 0}, "families": families}}
        with contextlib.redirect_stdout(io.StringIO()):
            s = generate(cfg)
    assert not s["errors"], s["errors"][:2]
    return s["ran_tasks"] / s["wall_s"], s["groups"]["all"]["success_rate"], s["groups"]["all"]["mean_tool_calls"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=24, help="train tasks per family per measurement")
    ap.add_argument("--workers", type=int, default=2, help="the parallel setting, compared with 1 worker")
    args = ap.parse_args()

    from sandbox_env.tasks.corpus import CorpusConfig, ensure_corpus

    cfg = load_config([])
    cache = tempfile.mkdtemp(prefix="bench-gen-cache-")
    ensure_corpus(CorpusConfig(**cfg["corpus"]), cache)
    print(f"default generate config, scripted teacher (mistake_rate={cfg['policy']['mistake_rate']}), "
          f"{args.tasks} tasks per family, {os.cpu_count()} CPUs")
    print(f"{'family':<20} {'traj/s w=' + str(args.workers):>12} {'traj/s w=1':>11} {'speedup':>8} {'vs arith':>9} {'success':>8} {'calls/traj':>11}")
    base = None
    groups = [(tag, {tag: opts}) for tag, opts in cfg["tasks"]["families"].items()]
    groups.append(("all (default mix)", cfg["tasks"]["families"]))
    for label, fams in groups:
        par, ok, calls = run(cfg, fams, args.tasks, args.workers, cache)
        one, _, _ = run(cfg, fams, args.tasks, 1, cache)
        base = base or par
        print(f"{label:<20} {par:>12.1f} {one:>11.1f} {par / one:>7.2f}x {par / base:>8.2f}x {ok:>8.3f} {calls:>11.2f}")


if __name__ == "__main__":
    main()
