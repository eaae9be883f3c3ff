"""The training job in one process on the tiny model: it learns, writes what it promises, and
refuses bad settings with messages that name them. Real components throughout (tiny Qwen3-MoE,
the data pipeline, qat.prepare, accelerate); each run is a few seconds on 2 CPU cores."""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from data.schema import write_jsonl
from qat.jobs import compose
from tests.fixtures import make_records
from train.recipe import TrainRecipe, run, validate_config

ROOT = Path(__file__).resolve().parents[2]
CONF = str(ROOT / "conf")
TINY = ["experiment=tiny_cpu_smoke", "threads=2", "progress_bar=false"]


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "traj.jsonl"
    write_jsonl(make_records(80), path)
    return path


def _cfg(*overrides):
    return compose("train", overrides)


def _run(traj, out, *overrides) -> tuple[TrainRecipe, list[dict]]:
    cfg = _cfg(*TINY, f"data.path={traj}", f"output_dir={out}", *overrides)
    recipe = run(cfg)
    rows = [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return recipe, rows


def test_tiny_model_learns_and_writes_its_outputs(traj, tmp_path):
    from transformers import AutoModelForCausalLM

    from qat import QuantConfig

    out = tmp_path / "run"
    recipe, rows = _run(traj, out, "max_steps=30", "qat_schedule.start_step=10", "qat.observer=mse", "qat_schedule.refresh_every=5",
                        "checkpoint.every=10", "checkpoint.keep_last=2", "eval.every=10")
    losses = [r["loss"] for r in rows]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]
    # QAT is visible in the log: SQNR per expert tensor group, and when the fake quant is on.
    qat_rows = [r for r in rows if "qat/sqnr_db/gate_up_proj" in r]
    assert qat_rows and all(10.0 < r["qat/sqnr_db/down_proj"] < 40.0 for r in qat_rows)
    assert [r["qat/fake_quant"] for r in qat_rows if r["step"] in (5, 15)] == [0, 1]
    for key in ("aux_loss", "lr", "grad_norm", "tokens_per_s", "tokens_seen"):
        assert key in rows[-1], key
    assert (out / "loss_curve.png").stat().st_size > 1000

    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_000020", "step_000030"]  # keep_last=2
    final = out / "checkpoints" / "step_000030"
    assert QuantConfig.from_dict(json.loads((final / "qat_config.json").read_text())).observer == "mse"
    # The HF dir holds the model's own weights only; observer state (mse clip ratios) sits beside it.
    from safetensors.torch import load_file

    observers = load_file(str(final / "qat_state.safetensors"))
    assert observers and all(".weight_fake_quant." in k and k.endswith("clip_ratio") for k in observers)
    loaded = AutoModelForCausalLM.from_pretrained(final)
    trained = recipe._unwrapped().state_dict()
    for name, w in loaded.state_dict().items():
        assert torch.equal(w, trained[name]), name
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 30 and state["fake_quant_enabled"] is True


def test_experts_only_training_freezes_the_rest(traj, tmp_path):
    recipe, rows = _run(traj, tmp_path / "run", "max_steps=2", "checkpoint.every=0", "eval.every=0",
                        r"trainable=mlp\.experts\.", "optim.warmup_steps=0")
    from train.models import build_model

    # The same seed builds the same initial weights: compare what moved.
    torch.manual_seed(0)
    model = recipe._unwrapped()
    final = Path(tmp_path / "run" / "checkpoints" / "step_000002")
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(final).state_dict()
    cfg = OmegaConf.to_container(recipe.cfg.model, resolve=True)
    from accelerate.utils import set_seed

    set_seed(0)
    init = build_model(cfg, vocab_size=len(recipe.tokenizer)).state_dict()
    moved = {k for k in init if not torch.equal(init[k], trained[k])}
    assert moved and all(".mlp.experts." in k for k in moved), sorted(moved)[:5]
    assert any("gate_up_proj" in k for k in moved) and any("down_proj" in k for k in moved)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".mlp.experts." not in n)


def test_activation_checkpointing_gives_the_same_losses(traj, tmp_path):
    _, plain = _run(traj, tmp_path / "a", "max_steps=3", "checkpoint.every=0", "eval.every=0")
    recipe, ckpt = _run(traj, tmp_path / "b", "max_steps=3", "checkpoint.every=0", "eval.every=0",
                        "activation_checkpointing=true")
    assert recipe._unwrapped().is_activation_checkpointing  # on, not silently ignored
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], abs=1e-6)


def test_adamw_8bit_trains(traj, tmp_path):
    _, rows = _run(traj, tmp_path / "run", "optim=adamw_8bit", "max_steps=4", "checkpoint.every=0", "eval.every=0",
                   "optim.warmup_steps=0")
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]


@pytest.mark.parametrize("override, message", [
    ("precision=fp64", "precision='fp64'"),
    ("optim.name=sgd", "optim.name='sgd'"),
    ("optim.scheduler=cosin", "optim.scheduler='cosin'"),
    ("max_steps=0", "max_steps=0"),
    ("micro_batch_size=-1", "micro_batch_size=-1"),
    ("trainable='['", "trainable='\\['"),
    ("eval.val_fraction=1.5", "eval.val_fraction=1.5"),
    ("qat_schedule.start_step=-3", "qat_schedule.start_step=-3"),
])
def test_bad_values_are_named(traj, override, message):
    cfg = _cfg(*TINY, f"data.path={traj}", override)
    with pytest.raises(ValueError, match=message):
        validate_config(cfg)


def test_missing_data_path_says_how_to_fix():
    with pytest.raises(ValueError, match="data.path is not set.*data.path="):
        validate_config(_cfg(*TINY))


def test_trainable_matching_nothing_is_named(traj, tmp_path):
    cfg = _cfg(*TINY, f"data.path={traj}", f"output_dir={tmp_path}", "trainable=no_such_param")
    recipe = TrainRecipe(cfg)
    with pytest.raises(ValueError, match="trainable='no_such_param' matches no parameter"):
        recipe.setup()
    recipe.accelerator.end_training()
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_init_from_a_checkpoint_with_another_vocab_than_the_preset(traj, tmp_path):
    """The pipeline's QAT stage: model.path=<BF16 checkpoint> (tokenizer and vocab from it, not the preset)."""
    _, bf16 = _run(traj, tmp_path / "bf16", "qat=none", "max_steps=6", "checkpoint.every=0", "eval.every=0")
    ckpt = tmp_path / "bf16" / "checkpoints" / "step_000006"
    recipe, qat_rows = _run(traj, tmp_path / "qat", f"model.path={ckpt}", "qat_schedule.start_step=0", "max_steps=1",
                            "checkpoint.every=0", "eval.every=0")
    assert recipe._unwrapped().config.vocab_size == len(recipe.tokenizer) == 512 != 2048  # preset says 2048
    # It starts from the trained weights: its first loss is far below a fresh model's.
    assert qat_rows[0]["loss"] < bf16[0]["loss"] - 0.3
