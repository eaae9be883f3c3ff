"""The training job where it starts processes: `python -m train` on the command line, and wandb
(offline) through accelerate's trackers, whose service runs in a process of its own."""

import json
import subprocess
import sys
from pathlib import Path

from qat.jobs import compose
from train.recipe import run

ROOT = Path(__file__).resolve().parents[2]
TINY = ["experiment=tiny_cpu_smoke", "threads=2", "progress_bar=false"]


def _run(traj, out, *overrides):
    run(compose("train", [*TINY, f"data.path={traj}", f"output_dir={out}", *overrides]))
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_wandb_offline_logs_locally(traj, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    _run(traj, out, "logger=wandb", "logger.mode=offline", "max_steps=2", "checkpoint.every=0", "eval.every=0")
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run dir missing"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # the JSONL is written all the same


def test_unknown_override_fails_naming_it_on_the_command_line(traj, tmp_path):
    r = subprocess.run([sys.executable, "-m", "train", f"data.path={traj}", f"output_dir={tmp_path}", "optim.lrr=1e-3"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "optim.lrr" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "train", f"data.path={traj}", f"output_dir={tmp_path}", "precision=fp64"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "precision='fp64'" in r.stderr, r.stderr[-2000:]
