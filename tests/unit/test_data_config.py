"""conf/data/*.yaml: each opens with a comment and its keys are build_dataloader arguments."""

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from data.pipeline import build_dataloader
from tests.fixtures import make_records, tiny_tokenizer

CONFS = sorted((Path(__file__).parents[2] / "conf" / "data").glob("*.yaml"))
NOT_LOADER = {"path", "tokenizer_vocab_size"}


def test_there_are_data_configs():
    assert {p.stem for p in CONFS} >= {"packed", "padded"}


@pytest.mark.parametrize("path", CONFS, ids=[p.stem for p in CONFS])
def test_data_config_builds_a_loader(path, tmp_path):
    assert path.read_text().startswith("# ")
    cfg = OmegaConf.to_container(OmegaConf.load(path))
    params = set(inspect.signature(build_dataloader).parameters)
    assert set(cfg) - NOT_LOADER <= params, set(cfg) - NOT_LOADER - params
    kwargs = {k: v for k, v in cfg.items() if k not in NOT_LOADER}
    dl = build_dataloader(make_records(10), tiny_tokenizer(n_records=10), batch_size=2, **kwargs)
    b = next(iter(dl))
    assert b["input_ids"].shape[0] == 2 and ("attention_mask" in b) == (not cfg["packing"])
