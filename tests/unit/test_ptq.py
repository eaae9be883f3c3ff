"""PTQ baselines: the same expert tensors, quantize -> dequantize, against their references."""

import tempfile

import pytest
import torch

from qat import QuantConfig, prepare
from qat.export import export_int4
from qat.load import restore_bf16
from qat.ptq import METHODS, apply_ptq
from train.models import build_model, load_preset

torch.set_num_threads(1)


def tiny(family="qwen3_moe", dtype="float32"):
    torch.manual_seed(0)
    preset = load_preset(f"tiny_{family}", vocab_size=128, num_hidden_layers=2)
    preset["dtype"] = dtype
    return build_model(preset).eval()


def expert_tensors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))}


def test_rtn_equals_fake_quant_and_export():
    model = tiny()
    fq_model = tiny()
    report = apply_ptq(model, "rtn")
    prepare(fq_model, QuantConfig())
    for name, module in fq_model.named_modules():
        if hasattr(module, "weight_fake_quant"):
            for attr, fq in module.weight_fake_quant.items():
                got = dict(model.named_parameters())[f"{name}.{attr}"]
                assert torch.equal(got, fq(getattr(module, attr)))
    assert len(report.tensors) == 4 and all(10 < s < 30 for s in report.sqnr_db.values())
    # RTN is what export_int4 of the untrained model gives: the restored weights are identical.
    with tempfile.TemporaryDirectory() as d:
        export_int4(tiny(), d)
        restored = restore_bf16(d, dtype=torch.float32)
    for n, w in expert_tensors(model).items():
        assert torch.equal(dict(restored.named_parameters())[n], w)


def test_only_expert_tensors_change():
    model = tiny("qwen2_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = apply_ptq(model, "nf4_b64")
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) == (n not in report.tensors), n
    assert not any("shared_expert" in n for n in report.tensors)


def test_mse_clipping_never_worse_than_absmax():
    a, b = tiny(), tiny()
    rtn, mse = apply_ptq(a, "rtn"), apply_ptq(b, "rtn_mse")
    for n in rtn.sqnr_db:
        assert mse.sqnr_db[n] >= rtn.sqnr_db[n] - 1e-6  # the search includes ratio 1.0 (absmax)
    assert mse.mean_sqnr_db > rtn.mean_sqnr_db


def test_nf4_matches_bitsandbytes_per_expert():
    from bitsandbytes import functional as bnbf

    model = tiny()
    w = model.model.layers[0].mlp.experts.down_proj.detach().clone()
    apply_ptq(model, "nf4_b32")
    got = model.model.layers[0].mlp.experts.down_proj
    for e in (0, 3):
        q, state = bnbf.quantize_4bit(w[e].contiguous(), blocksize=32, quant_type="nf4")
        assert torch.equal(got[e], bnbf.dequantize_4bit(q, state).reshape(w[e].shape))
    small, large = apply_ptq(tiny(), "nf4_b32"), apply_ptq(tiny(), "nf4_b64")
    assert small.mean_sqnr_db > large.mean_sqnr_db  # smaller blocks, finer scales


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_usable_bf16_model(method):
    model = tiny(dtype="bfloat16")
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        ref = model(ids).logits.float()
    report = apply_ptq(model, method)
    with torch.no_grad():
        out = model(ids).logits.float()
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert report.num_params == sum(p.numel() for n, p in model.named_parameters() if n in report.tensors)


def test_transposed_experts_gpt_oss():
    model, fq_model = tiny("gpt_oss"), tiny("gpt_oss")
    apply_ptq(model, "rtn")
    prepare(fq_model, QuantConfig())  # groups along the input dim of the [E, in, out] storage
    experts = fq_model.model.layers[0].mlp.experts
    want = experts.weight_fake_quant["gate_up_proj"](experts.gate_up_proj)
    assert torch.equal(model.model.layers[0].mlp.experts.gate_up_proj, want)


def test_errors():
    model = tiny()
    with pytest.raises(ValueError, match="method='gptq'"):
        apply_ptq(model, "gptq")
    prepare(model, QuantConfig())
    with pytest.raises(ValueError, match="fake quant"):
        apply_ptq(model, "rtn")
