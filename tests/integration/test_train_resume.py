"""Exact resume and crash safety of the training job, through `python -m train` subprocesses.

- A run stopped at step k and resumed (resume=auto) ends with weights bit-identical to an
  uninterrupted run (single process, deterministic CPU, same thread count).
- A process SIGKILLed while writing a checkpoint leaves the previous checkpoint complete and
  loadable; resume=auto picks it and the run still ends bit-identical to the uninterrupted one.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}


def _args(traj, out, *extra):
    # QAT switches on mid-run (step 3), an mse observer refreshes every 2 steps: all of that state
    # must come back on resume, not just weights and optimizer.
    return ["experiment=tiny_cpu_smoke", f"data.path={traj}", f"output_dir={out}", "threads=1", "progress_bar=false",
            "max_steps=8", "qat_schedule.start_step=3", "qat.observer=mse", "qat_schedule.refresh_every=2", "checkpoint.every=2",
            "checkpoint.keep_last=null", "eval.every=4", *extra]


def _train(traj, out, *extra, code=None):
    cmd = [sys.executable, "-m", "train", *_args(traj, out, *extra)]
    if code is not None:  # run the job with a patch applied first
        cmd = [sys.executable, "-c", code, *_args(traj, out, *extra)]
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def _weights(ckpt_dir: Path) -> dict:
    sd = load_file(str(ckpt_dir / "model.safetensors"))
    sd.update(load_file(str(ckpt_dir / "qat_state.safetensors")))
    return sd


def _assert_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


@pytest.fixture(scope="module")
def uninterrupted(traj, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    r = _train(traj, out)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_stop_and_resume_is_bit_identical(traj, uninterrupted, tmp_path):
    r = _train(traj, tmp_path, "stop_at_step=5")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step_000005" / "COMPLETE").exists()
    r = _train(traj, tmp_path, "resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    log = r.stdout + r.stderr
    assert "resumed from" in log and "step_000005" in log
    _assert_identical(_weights(uninterrupted / "checkpoints" / "step_000008"), _weights(tmp_path / "checkpoints" / "step_000008"))
    # The metrics log of the resumed run reads like the uninterrupted one, step for step.
    def rows(d):
        return [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]

    a, b = rows(uninterrupted), rows(tmp_path)
    assert [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r.get("eval/loss") for r in a] == [r.get("eval/loss") for r in b]


KILL_IN_SAVE = """
import os, signal, sys, runpy
import train.checkpoint as ck
write_marker = ck.write_marker
def killed_at_step_6(tmp, step):
    if step == 6:  # every file of the checkpoint is written, the marker is not: SIGKILL, no cleanup
        os.kill(os.getpid(), signal.SIGKILL)
    write_marker(tmp, step)
ck.write_marker = killed_at_step_6
sys.argv = ["train"] + sys.argv[1:]
runpy.run_module("train", run_name="__main__")
"""


def test_kill_during_save_leaves_previous_checkpoint_loadable(traj, uninterrupted, tmp_path):
    from transformers import AutoModelForCausalLM

    from train import checkpoint as ck

    r = _train(traj, tmp_path, code=KILL_IN_SAVE)
    assert r.returncode == -9, (r.returncode, r.stderr[-3000:])
    root = tmp_path / "checkpoints"
    assert (root / "step_000006.tmp").is_dir() and not (root / "step_000006.tmp" / "COMPLETE").exists()
    assert ck.latest_checkpoint(root) == root / "step_000004"
    model = AutoModelForCausalLM.from_pretrained(root / "step_000004")
    assert sum(p.numel() for p in model.parameters()) > 0

    r = _train(traj, tmp_path, "resume=auto")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout + r.stderr and "step_000004" in r.stdout + r.stderr
    assert not (root / "step_000006.tmp").exists()  # the torn save was cleaned up
    _assert_identical(_weights(uninterrupted / "checkpoints" / "step_000008"), _weights(root / "step_000008"))
