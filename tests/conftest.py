"""Fixtures shared by every test: corpora, tokenizers and tiny models from tests/fixtures.py, built
once per session (training the tiny tokenizer takes about a second)."""

import pytest

from data.schema import write_jsonl
from tests.fixtures import make_records, qwen3_style_tokenizer, tiny_model_and_tokenizer, tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tok():
    """The tiny K2-style tokenizer trained on the probe corpus."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def qwen_tok():
    """A Qwen3-style tokenizer (ChatML, `<tool_call>` JSON, `<think>`), standing in for a real model's."""
    return qwen3_style_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():
    """(model, tokenizer): a tiny random-init Qwen3-MoE and its tokenizer; do not train it in place."""
    return tiny_model_and_tokenizer(seed=0)


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """60 hand-written trajectories as JSONL: the training jobs' data."""
    path = tmp_path_factory.mktemp("data") / "traj.jsonl"
    write_jsonl(make_records(60), path)
    return path
