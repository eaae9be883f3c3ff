"""Every tiny model preset (each MoE family: Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3,
GPT-OSS with its transposed experts) trains two steps under the job with INT4 fake quant on, and
logs the load-balancing loss where the family has one (DeepSeek-V3 balances without it)."""

import json
import math
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from data.schema import write_jsonl
from qat.jobs import VERSION_BASE
from tests.fixtures import make_records
from train.models import list_presets
from train.recipe import run

pytestmark = pytest.mark.integration
CONF = str(Path(__file__).resolve().parents[2] / "conf")
TINY = [p for p in list_presets() if p.startswith("tiny_")]


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "traj.jsonl"
    write_jsonl(make_records(40), path)
    return path


@pytest.mark.parametrize("preset", TINY)
def test_tiny_preset_trains_with_qat(preset, traj, tmp_path):
    overrides = [f"model={preset}", f"data.path={traj}", f"output_dir={tmp_path}", "data.seq_len=128",
                 "data.tokenizer_vocab_size=512", "micro_batch_size=2", "max_steps=2", "checkpoint.every=0",
                 "eval.every=0", "progress_bar=false", "threads=2", "qat_schedule.start_step=0", "qat_schedule.log_every=1"]
    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        cfg = compose(config_name="train", overrides=overrides)
    recipe = run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert any(k.startswith("qat/sqnr_db/") for k in rows[-1]) and rows[-1]["qat/fake_quant"] == 1
    assert ("aux_loss" in rows[-1]) == (recipe.aux_coef > 0)
    assert (tmp_path / "checkpoints" / "step_000002" / "COMPLETE").exists()
