"""`python -m sandbox_env.generate`: tasks x policy -> verified trajectories, as HF datasets.

The recipe: build the task list from `conf/tasks` (families x splits x counts), make sure the
retrieval corpus and its FTS5 index exist (cached in `<out_dir>/cache`), run every pending task
through the rollout loop in parallel worker processes (each episode in its own sandbox), verify
it, and keep the verified trajectories (rejection sampling: up to `attempts` tries per task).
Then assemble `<out_dir>/<split>` datasets of kept trajectories, `<out_dir>/rejected` with the
failed attempts and their verdicts, and `<out_dir>/summary.{json,txt}` (per family tag and split:
tasks, kept, success rate = kept / tasks, attempts, mean tool calls and steps of the final
attempts, invalid tool calls, budget exhaustions).

The one idea that makes it resumable: every finished task is written at once, atomically, as
its own shard `<out_dir>/shards/<task id>.json`; a rerun skips the task ids that have a shard
and re-assembles the datasets from all shards. A run's fingerprint (seed, families, policy,
budgets, ...; not the counts) is saved in `<out_dir>/run.json`, and a rerun with a different
one is refused, so a dataset never mixes two configurations.

    python -m sandbox_env.generate out_dir=outputs/gen tasks=default policy=scripted workers=2
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from sandbox_env.tasks.suite import SPLITS, build_families, family_specs, task_id, work_items

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- workers

_W: dict[str, Any] = {}  # per-process state, built once by _init_worker


def _init_worker(cfg: dict[str, Any], index_path: str | None) -> None:
    from sandbox_env import SandboxConfig
    from sandbox_env.agent.rollout import Budgets, TokenCounter, ToolEnv
    from sandbox_env.agent.teachers import build_policy
    from sandbox_env.tasks.corpus import Corpus, CorpusConfig

    specs = family_specs(cfg["tasks"])
    corpus = Corpus.generate(CorpusConfig(**cfg["corpus"])) if any(s["family"] == "retrieval" for s in specs) else None
    tokenizer = None
    if cfg.get("tokenizer"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg["tokenizer"], local_files_only=True)
    _W.update(
        cfg=cfg,
        families=build_families(specs, corpus),
        policy=build_policy(cfg["policy"]),
        env=ToolEnv(SandboxConfig(**cfg["sandbox"]), index_path=index_path, tools=tuple(cfg["tools"]),
                    compact=bool(cfg.get("compact_prompt", False))),
        budgets=Budgets(**cfg["budgets"]),
        counter=TokenCounter(tokenizer),
        shards=Path(cfg["out_dir"]) / "shards",
    )


def _run_task(item: tuple[str, str, int]) -> dict[str, Any]:
    """Run one task (up to `attempts` episodes, stopping at the first verified one) and write
    its shard. -> a short summary row; an exception becomes an `error` row (no shard, so a
    rerun retries it)."""
    from sandbox_env.agent.rollout import run_episode

    tag, split, index = item
    cfg = _W["cfg"]
    try:
        family = _W["families"][tag]
        task = family.make(split, index, cfg["seed"])
        attempts = []
        for a in range(cfg["attempts"]):
            rec = run_episode(task, _W["policy"], _W["env"], _W["budgets"], family=family,
                              seed=cfg["seed"] * 1000 + a, token_counter=_W["counter"])
            rec["metadata"]["attempt"] = a
            attempts.append(rec)
            if rec["verdict"]["correct"]:
                break
        tmp = _W["shards"] / f".{task.id}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({"task_id": task.id, "tag": tag, "split": split, "attempts": attempts}))
        os.replace(tmp, _W["shards"] / f"{task.id}.json")  # atomic: a shard is complete or absent
        last = attempts[-1]
        return {"id": task.id, "correct": last["verdict"]["correct"]}
    except Exception as e:  # one broken task must not kill a long run; reported, retried on rerun
        log.exception("task %s failed", task_id(tag, split, index))
        return {"id": task_id(tag, split, index), "error": f"{type(e).__name__}: {e}"}


# ----------------------------------------------------------------------------- the job


def _fingerprint(cfg: dict[str, Any]) -> dict[str, Any]:
    fams = {t: {k: v for k, v in (o or {}).items() if k not in SPLITS} for t, o in cfg["tasks"]["families"].items()}
    return {k: cfg[k] for k in ("seed", "corpus", "policy", "budgets", "tools", "attempts", "tokenizer")} | {"families": fams}


def summarize(shard_rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts, success rate and means per family tag and split, and over everything."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in shard_rows:
        groups.setdefault(f"{row['tag']}/{row['split']}", []).append(row)
        groups.setdefault("all", []).append(row)
    out = {}
    for key, rows in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        finals = [r["attempts"][-1] for r in rows]
        n = len(rows)
        kept = sum(f["verdict"]["correct"] for f in finals)
        mean = lambda k: round(sum(f["metadata"][k] for f in finals) / n, 3) if n else 0.0  # noqa: E731, B023 - used in this iteration only
        out[key] = {
            "tasks": n, "kept": kept, "success_rate": round(kept / n, 4) if n else 0.0,
            "attempts": sum(len(r["attempts"]) for r in rows),
            "mean_tool_calls": mean("tool_calls"), "mean_steps": mean("steps"),
            "mean_invalid_tool_calls": mean("invalid_tool_calls"), "mean_generated_tokens": mean("generated_tokens"),
            "budget_exhausted": sum(f["metadata"]["budget_exhausted"] is not None for f in finals),
        }
    return out


def format_table(summary: dict[str, Any]) -> str:
    cols = ("tasks", "kept", "success_rate", "mean_tool_calls", "mean_steps", "mean_invalid_tool_calls", "budget_exhausted")
    heads = ("group",) + ("tasks", "kept", "success", "tool calls", "steps", "invalid", "budget out")
    rows = [[k] + [str(v[c]) for c in cols] for k, v in summary.items()]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(heads)]
    fmt = lambda r: "  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(heads), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def generate(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the whole job for a plain-dict config (the Hydra config, resolved); -> summary."""
    from tqdm import tqdm

    from data.schema import write_trajectories
    from sandbox_env.tasks.corpus import Corpus, CorpusConfig, ensure_corpus

    if not isinstance(cfg.get("workers"), int) or cfg["workers"] < 0:
        raise ValueError(f"workers must be an int >= 0 (0 = run in this process), got {cfg.get('workers')!r}")
    if not isinstance(cfg.get("attempts"), int) or cfg["attempts"] < 1:
        raise ValueError(f"attempts must be an int >= 1 (episodes per task before it is rejected), got {cfg.get('attempts')!r}")
    from sandbox_env.tasks import FAMILIES

    # Validate everything before touching out_dir, so a typo never leaves a run.json behind.
    specs = family_specs(cfg["tasks"])
    has_retrieval = any(s["family"] == "retrieval" for s in specs)
    build_families(specs, Corpus.generate(CorpusConfig(**cfg["corpus"])) if has_retrieval else None)  # bad options raise here
    # no index to search without a retrieval family: do not offer tools that cannot work
    tools = [t for t in cfg["tools"] if has_retrieval or t not in ("search", "open")]
    for spec in specs:
        missing = [t for t in FAMILIES[spec["family"]].tools if t not in tools]
        if missing:
            raise ValueError(f"tools={tools} lacks {missing}, which family {spec['tag']!r} needs; add them to `tools` or drop the family")

    out = Path(cfg["out_dir"])
    (out / "shards").mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(cfg)
    run_file = out / "run.json"
    if run_file.exists():
        old = json.loads(run_file.read_text())
        if old != json.loads(json.dumps(fp)):
            diff = sorted(k for k in set(old) | set(fp) if old.get(k) != json.loads(json.dumps(fp.get(k))))
            raise ValueError(
                f"out_dir={str(out)!r} holds a run with different settings ({', '.join(diff)}); resume with the same "
                f"settings (see {run_file}) or choose a new out_dir"
            )
    else:
        run_file.write_text(json.dumps(fp, indent=2))

    index_path = None
    if has_retrieval:
        _, index_path = ensure_corpus(CorpusConfig(**cfg["corpus"]), cfg.get("cache_dir") or out / "cache")
    cfg = {**cfg, "tools": tools}
    items = work_items(specs)
    pending = [it for it in items if not (out / "shards" / f"{task_id(*it)}.json").exists()]
    log.info("%d tasks, %d already done, %d to run with %d workers", len(items), len(items) - len(pending), len(pending), cfg["workers"])

    t0 = time.perf_counter()
    errors = []
    bar = tqdm(total=len(pending), desc="generate", unit="task", disable=not cfg.get("progress", True))
    if cfg["workers"] <= 1 or len(pending) <= 1:
        _init_worker(cfg, index_path)
        results = map(_run_task, pending)
        pool = None
    else:
        pool = mp.get_context("fork").Pool(cfg["workers"], initializer=_init_worker, initargs=(cfg, index_path))
        results = pool.imap_unordered(_run_task, pending)
    try:
        for r in results:
            if "error" in r:
                errors.append(r)
            bar.update(1)
    except BaseException:  # Ctrl-C or a crash: stop the workers now; finished shards are kept
        if pool is not None:
            pool.terminate()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    wall = time.perf_counter() - t0

    shard_rows = []
    for it in items:
        p = out / "shards" / f"{task_id(*it)}.json"
        if p.exists():
            shard_rows.append(json.loads(p.read_text()))
    kept: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    rejected = []
    for row in shard_rows:
        for rec in row["attempts"]:
            (kept[row["split"]] if rec["verdict"]["correct"] else rejected).append(rec)
    import datasets

    datasets.disable_progress_bars()  # one bar (ours) is enough
    written = {}
    for name, recs in [*kept.items(), ("rejected", rejected)]:
        if name == "rejected" and not cfg.get("keep_rejected", True):
            continue
        if recs:
            write_trajectories(recs, out / name, source=name)
        written[name] = len(recs)

    summary = {
        "groups": summarize(shard_rows),
        "written": written,
        "errors": errors,
        "ran_tasks": len(pending),
        "skipped_done": len(items) - len(pending),
        "wall_s": round(wall, 3),
        "trajectories_per_s": round((len(pending) - len(errors)) / wall, 3) if pending and wall > 0 else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    table = format_table(summary["groups"])
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    print(f"written: {written}; ran {len(pending)} tasks ({len(errors)} errors) in {wall:.1f}s; summary: {out / 'summary.json'}")
    if errors:
        log.warning("%d tasks failed (rerun to retry them); first: %s", len(errors), errors[0])
    return summary


def _main() -> None:
    from omegaconf import OmegaConf

    from qat.jobs import job
    from sandbox_env.config import register

    register()

    @job("generate")
    def main(cfg) -> None:
        generate(OmegaConf.to_container(cfg, resolve=True))

    main()


if __name__ == "__main__":
    _main()
