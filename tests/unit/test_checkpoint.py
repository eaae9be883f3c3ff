"""qat/checkpoint.py: the QAT training-checkpoint format round-trips, and checkpoint_kind tells the kinds apart."""

import pytest
import torch

from qat import QuantConfig, checkpoint_kind, export_int4, load_qat_checkpoint, prepare, write_qat_checkpoint
from qat.checkpoint import QAT_STATE_FILE, observer_state, read_quant_config
from train.models import build_model, load_preset

torch.set_num_threads(1)


def tiny():
    torch.manual_seed(0)
    return build_model(load_preset("tiny_qwen3_moe", vocab_size=128, num_hidden_layers=2)).eval()


def test_write_then_load_is_the_same_fake_quant_model(tmp_path):
    model = tiny()
    cfg = QuantConfig(observer="mse")
    prepare(model, cfg)
    with torch.no_grad():  # observer state that differs from what a fresh prepare would search
        for name, buf in model.named_buffers():
            if name.endswith("clip_ratio"):
                buf.mul_(0.9)
    write_qat_checkpoint(tmp_path / "ckpt", model, cfg)
    assert checkpoint_kind(tmp_path / "ckpt") == "fake_quant"
    assert read_quant_config(tmp_path / "ckpt") == cfg
    assert (tmp_path / "ckpt" / QAT_STATE_FILE).exists() and observer_state(tmp_path / "ckpt")
    back = load_qat_checkpoint(tmp_path / "ckpt")
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_checkpoint_kinds(tmp_path):
    model = tiny()
    write_qat_checkpoint(tmp_path / "hf", model, None)  # no QAT: a plain Hugging Face dir
    assert checkpoint_kind(tmp_path / "hf") == "hf" and read_quant_config(tmp_path / "hf") is None
    with pytest.raises(ValueError, match="no qat_config.json"):
        load_qat_checkpoint(tmp_path / "hf")
    export_int4(model, tmp_path / "int4")
    assert checkpoint_kind(tmp_path / "int4") == "int4"
    with pytest.raises(ValueError, match="has no config.json"):
        checkpoint_kind(tmp_path / "nothing")
