"""Two processes on CPU (gloo) train the same function as one: DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Each run goes through the shipped launch configs (`accelerate launch --config_file
conf/accelerate/<name>.yaml --num_processes 2 -m train ...`). The reference is one process with
grad_accum_steps=4 against 2 processes x grad_accum_steps=2, one row per micro-batch: the same
global batch of the same rows. Fake
quant switches on at step 3 of 6, so QAT off and QAT on are both compared.

Tolerance: losses within 1e-5 absolute (nats/token) and final weights within 1e-4; only float
summation order differs (the all-reduce sums two halves that one process sums in one go).
Measured: DDP and ZeRO-3 agree to ~1e-9, ZeRO-2 to ~5e-7 (its flat fp32 buffers reduce
in another order).
"""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
LOSS_TOL, WEIGHT_TOL = 1e-5, 1e-4


def _args(traj, out, grad_accum_steps=2):
    # 2 processes x 2 accumulation steps x 1 row = the reference's 1 process x 4 x 1 row: the
    # distributed runs also exercise accumulation (DDP no_sync, DeepSpeed's own boundary).
    return ["experiment=tiny_cpu_smoke", f"grad_accum_steps={grad_accum_steps}", f"data.path={traj}", f"output_dir={out}", "threads=1", "progress_bar=false",
            "max_steps=6", "micro_batch_size=1", "qat_schedule.start_step=2", "qat_schedule.log_every=3", "checkpoint.every=0",
            "eval.every=3"]


@pytest.fixture(scope="module")
def single(traj, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    r = subprocess.run([sys.executable, "-m", "train", *_args(traj, out, grad_accum_steps=4)], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _free_port() -> str:
    # A port nobody listens on now: a fixed one collides with another suite running on the same
    # host (a rank then joins the other job's rendezvous and both hang).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


_RUNS: dict[str, Path] = {}  # launch config -> output dir of its uninterrupted run (for the resume test)


def _launch(launch_config: str, args: list[str]) -> str:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", f"conf/accelerate/{launch_config}.yaml",
           "--num_processes", "2", "--main_process_port", _free_port(), "-m", "train", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    return log


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("launch_config, mode", [
    ("ddp_cpu", "MULTI_CPU"),
    ("zero2", "DeepSpeed ZeRO-2"),
    ("zero3", "DeepSpeed ZeRO-3"),
])
def test_two_processes_match_one(traj, single, tmp_path_factory, launch_config, mode):
    tmp_path = tmp_path_factory.mktemp(launch_config)
    log = _launch(launch_config, _args(traj, tmp_path))
    _RUNS[launch_config] = tmp_path
    assert f"2 process(es), {mode}, torch.distributed backend gloo (CPU host: gloo)" in log

    ref, got = _rows(single), _rows(tmp_path)
    assert [x["step"] for x in got] == list(range(1, 7))
    for a, b in zip(ref, got):
        assert b["tokens"] == a["tokens"] and b["loss_tokens"] == a["loss_tokens"]  # the same global batch
        assert abs(a["loss"] - b["loss"]) < LOSS_TOL, (a["step"], a["loss"], b["loss"])
        assert abs(a["aux_loss"] - b["aux_loss"]) < LOSS_TOL
        if "eval/loss" in a:
            assert abs(a["eval/loss"] - b["eval/loss"]) < LOSS_TOL
        if "qat/sqnr_db/gate_up_proj" in a:
            assert b["qat/fake_quant"] == a["qat/fake_quant"]
            assert abs(a["qat/sqnr_db/gate_up_proj"] - b["qat/sqnr_db/gate_up_proj"]) < 1e-3
    assert [x.get("qat/fake_quant") for x in got if "qat/fake_quant" in x] == [0, 1, 1]  # steps 1, 3, 6

    # The final checkpoint is a whole HF model (ZeRO-3: gathered from the shards) equal to the reference.
    name = "checkpoints/step_000006/model.safetensors"
    w_ref, w_got = load_file(str(single / name)), load_file(str(tmp_path / name))
    assert w_ref.keys() == w_got.keys()
    worst = max(float((w_ref[k] - w_got[k]).abs().max()) for k in w_ref)
    assert worst < WEIGHT_TOL, worst
    assert not any(torch.equal(w_ref[k], torch.zeros_like(w_ref[k])) for k in w_ref if "experts" in k)


def test_multinode_launcher_two_nodes_on_localhost(traj, single, tmp_path):
    """scripts/launch_multinode.sh as two 'nodes' of one process each on this host (ZeRO-3 config,
    static rendezvous): the ranks meet, share one run dir, and train what one process trains."""
    args = [a for a in _args(traj, tmp_path) if not a.startswith("output_dir=")]
    port = _free_port()
    env = {**ENV, "NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "GPUS_PER_NODE": "1",
           "RUN_DIR": str(tmp_path), "PYTHON": sys.executable}
    cmd = ["bash", "scripts/launch_multinode.sh", *args]
    # Each node in its own session, so that a failure kills the whole tree (launcher, torchrun, ranks).
    node1 = subprocess.Popen(cmd, cwd=ROOT, env={**env, "NODE_RANK": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    node0 = subprocess.Popen(cmd, cwd=ROOT, env={**env, "NODE_RANK": "0"}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out0, _ = node0.communicate(timeout=400)
        out1, _ = node1.communicate(timeout=120)
    finally:
        for node in (node0, node1):
            if node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    r = subprocess.CompletedProcess(cmd, node0.returncode, out0, "")
    assert r.returncode == 0 and node1.returncode == 0, (r.stdout + r.stderr)[-3000:] + out1[-2000:]
    assert "node 1/2" in out1 and "2 process(es), DeepSpeed ZeRO-3" in r.stdout + r.stderr
    ref, got = _rows(single), _rows(tmp_path)
    assert [abs(a["loss"] - b["loss"]) < LOSS_TOL for a, b in zip(ref, got)] == [True] * 6


def test_zero3_stop_and_resume_is_bit_identical(traj, tmp_path):
    """ZeRO-3 resume (the engine's sharded optimizer state, every rank's RNG, the data position):
    stopped at step 3 and resumed, it ends bit-identical to the uninterrupted ZeRO-3 run above."""
    if "zero3" not in _RUNS:
        pytest.fail("run together with test_two_processes_match_one[zero3] (its uninterrupted run is the reference)")
    _launch("zero3", _args(traj, tmp_path) + ["stop_at_step=3"])
    assert (tmp_path / "checkpoints" / "step_000003" / "COMPLETE").exists()
    log = _launch("zero3", _args(traj, tmp_path) + ["resume=auto"])
    assert "resumed from" in log and "step_000003" in log
    name = "checkpoints/step_000006/model.safetensors"
    a, b = load_file(str(_RUNS["zero3"] / name)), load_file(str(tmp_path / name))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert [r["loss"] for r in _rows(_RUNS["zero3"])] == [r["loss"] for r in _rows(tmp_path)]
