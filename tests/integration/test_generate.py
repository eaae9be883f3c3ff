"""`python -m sandbox_env.generate` end to end: the real CLI on a handful of tasks, datasets on
disk that validate, the summary, and resume (a rerun skips finished task ids)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data.schema import read_trajectories
from sandbox_env.generate import generate

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["tasks.splits.train=2", "tasks.splits.heldout=1", "progress=false", "corpus.people=60", "corpus.companies=20", "corpus.places=20"]
pytestmark = pytest.mark.integration


def config(out_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("generate", overrides=[f"out_dir={out_dir}", *SMALL, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_generate_cli_end_to_end_then_resume(tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "sandbox_env.generate", f"out_dir={out}", *SMALL, "workers=2", "policy.mistake_rate=0.3"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "success" in p.stdout and "all" in p.stdout  # the table

    summary = json.loads((out / "summary.json").read_text())
    n_tags = 7  # conf/tasks/default.yaml
    assert summary["ran_tasks"] == 3 * n_tags and summary["errors"] == []
    assert len(list((out / "shards").glob("*.json"))) == 3 * n_tags
    total = summary["groups"]["all"]
    assert total["tasks"] == 3 * n_tags and total["success_rate"] >= 0.9 and total["mean_tool_calls"] >= 1

    train, heldout = read_trajectories(out / "train"), read_trajectories(out / "heldout")
    assert len(train) == sum(v["kept"] for k, v in summary["groups"].items() if k.endswith("/train"))
    assert len(heldout) == sum(v["kept"] for k, v in summary["groups"].items() if k.endswith("/heldout"))
    assert all(r["verdict"]["correct"] and r["task"]["split"] == "train" for r in train)
    assert all(r["task"]["split"] == "heldout" for r in heldout)
    assert {r["task"]["id"] for r in train}.isdisjoint({r["task"]["id"] for r in heldout})
    assert {r["task"]["family"] for r in train} == {"arith", "dates", "primes", "strings", "files", "retrieval"}
    assert sum(r["metadata"]["mistakes"] for r in train + heldout) > 0  # mistake_rate=0.3 shows up
    if (out / "rejected").exists():
        assert all(not r["verdict"]["correct"] for r in read_trajectories(out / "rejected"))
    assert (out / "cache").is_dir() and list((out / "cache").glob("corpus-*/index.sqlite"))

    # resume: the same command again runs nothing and writes the same datasets
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["ran_tasks"] == 0 and again["skipped_done"] == 3 * n_tags
    assert [r["task"]["id"] for r in read_trajectories(out / "train")] == [r["task"]["id"] for r in train]


def test_resume_runs_only_missing_tasks_and_refuses_other_settings(tmp_path):
    out = tmp_path / "gen"
    cfg = config(out, "tasks=compute", "workers=0")
    first = generate(cfg)
    reasons = [json.loads(p.read_text())["attempts"][-1]["verdict"]["reason"] for p in (out / "shards").glob("*.json")]
    assert first["ran_tasks"] == 12 and first["groups"]["all"]["success_rate"] == 1.0, (first["errors"], reasons)
    # an interrupted run: two shards missing
    shards = sorted((out / "shards").glob("*.json"))
    for s in shards[:2]:
        s.unlink()
    second = generate(cfg)
    assert second["ran_tasks"] == 2 and second["skipped_done"] == 10
    assert {p.name for p in (out / "shards").glob("*.json")} == {s.name for s in shards}
    # more tasks: only the new ones run
    third = generate(config(out, "tasks=compute", "workers=2", "tasks.splits.train=3"))
    assert third["ran_tasks"] == 4 and third["written"]["train"] == 12
    with pytest.raises(ValueError, match="holds a run with different settings \\(seed\\)"):
        generate(config(out, "tasks=compute", "seed=1"))
