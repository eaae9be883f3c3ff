"""load_int4 (the INT4 runtime) and restore_bf16 on exports of tiny models, and on a checkpoint
that compressed-tensors itself produced."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qat import QuantConfig, prepare
from qat.export import export_int4
from qat.int4 import Int4Linear, Int4Weight
from qat.load import expert_weight_bytes, load_int4, restore_bf16
from train.models import build_model, load_preset

torch.set_num_threads(1)


def tiny(family="qwen3_moe", dtype="float32", **overrides):
    torch.manual_seed(0)
    preset = load_preset(f"tiny_{family}", vocab_size=128, num_hidden_layers=2, **overrides)
    preset["dtype"] = dtype
    # A plain random model: the copy circuit's large attention logits would dwarf the experts' share of
    # the logits, which is what these runtime checks compare (the circuit has its own tests).
    preset["copy_circuit"] = None
    return build_model(preset).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    prepare(model, QuantConfig())
    with torch.no_grad():
        fq = model(ids).logits
    out = tmp_path_factory.mktemp("int4")
    export_int4(model, out)
    return model, out, ids, ref, fq


def test_load_int4_matches_fake_quant_logits(exported):
    model, out, ids, ref, fq = exported
    m = load_int4(out)
    with torch.no_grad():
        logits = m(ids).logits
    quant_effect = (fq - ref).abs().max().item()
    diff = (logits - fq).abs().max().item()
    print(f"qwen3_moe fp32: load_int4 vs fake quant max|diff| = {diff:.2e}; fake quant vs float {quant_effect:.2e}")
    assert diff < 1e-4 and diff < 1e-3 * quant_effect


def test_experts_stay_packed_and_run_on_the_cpu_kernel(exported):
    model, out, *_ = exported
    m = load_int4(out)
    names = [n for n, _ in m.named_parameters()]
    assert not any(n.endswith(("gate_up_proj", "down_proj")) and ".experts." in n for n in names)
    weights = [w for w in m.modules() if isinstance(w, Int4Weight)]
    assert len(weights) == 2 * model.config.num_hidden_layers and all(w.backend == "cpu" for w in weights)
    assert m.config._experts_implementation == "qat_int4"
    dense_bf16 = sum(p.numel() * 2 for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    assert expert_weight_bytes(m) / dense_bf16 == pytest.approx((0.5 + 2 / 32) / 2)


def test_generate_greedy_equals_fake_quant_model(exported):
    model, out, ids, *_ = exported
    m = load_int4(out)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(m.generate(ids[:1], **kwargs), model.generate(ids[:1], **kwargs))


def test_bf16_runtime_is_within_bf16_rounding():
    model = tiny(dtype="bfloat16")
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits.float()
    prepare(model, QuantConfig())
    with torch.no_grad():
        fq = model(ids).logits.float()
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        export_int4(model, d)
        m = load_int4(d)
        assert m.dtype == torch.bfloat16
        with torch.no_grad():
            logits = m(ids).logits.float()
    diff, quant_effect = (logits - fq).abs().max().item(), (fq - ref).abs().max().item()
    print(f"qwen3_moe bf16: load_int4 vs fake quant max|diff| = {diff:.2e}; fake quant vs bf16 {quant_effect:.2e}")
    # bf16 kernels accumulate in another order: a few bf16 ulps of the largest logit, well under the quantization effect
    assert diff <= 4 * 2**-8 * fq.abs().max().item() and diff < 0.5 * quant_effect


def test_restore_bf16_is_export_in_reverse(exported, tmp_path):
    model, out, ids, _, fq = exported
    dense = restore_bf16(out, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(dense(ids).logits, fq)  # q * scale exactly, the same forward
    assert all(p.requires_grad for p in dense.parameters())
    dense(ids, labels=ids).loss.backward()  # trainable
    assert dense.model.layers[0].mlp.experts.gate_up_proj.grad is not None
    # Round trip: RTN absmax of q * scale finds the same codes and scales (K2 grid: max |q| is 7).
    dense.zero_grad()
    export_int4(dense, tmp_path)
    for f in ("model.safetensors",):
        with safe_open(str(out / f), "pt") as a, safe_open(str(tmp_path / f), "pt") as b:
            assert set(a.keys()) == set(b.keys())
            assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    bf16 = restore_bf16(out)
    assert bf16.dtype == torch.bfloat16 and not hasattr(bf16.config, "quantization_config")


def test_load_errors(exported, tmp_path):
    _, out, *_ = exported
    with pytest.raises(ValueError, match="no config.json"):
        load_int4(tmp_path)
    with pytest.raises(ValueError, match="verify="):
        load_int4(out, verify="sometimes")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    cfg.pop("agentic_qat_export")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    (bad / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="weights.symmetric=False"):
        load_int4(bad)
    (out / "model.safetensors").rename(out / "moved.safetensors")
    try:
        with pytest.raises(ValueError, match="missing"):
            load_int4(out)
    finally:
        (out / "moved.safetensors").rename(out / "model.safetensors")


def _compressed_tensors_checkpoint(model, path):
    """A checkpoint as a compressed-tensors producer writes it, made with compressed-tensors' own
    scale computation (absmax / 7.5), rounding and packing: the routed experts and, as
    llm-compressor's defaults do, attention q_proj; no export_int4 code involved."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    model.save_pretrained(path)  # transformers writes the hub layout: one dense Linear per expert
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        dense = {k: f.get_tensor(k) for k in f.keys()}
    out, decompressed = {}, {}
    for key, w in dense.items():
        if not (".experts." in key or key.endswith("self_attn.q_proj.weight")):
            out[key] = w
            continue
        w = w.to(torch.bfloat16)
        groups = w.unflatten(-1, (-1, 32))
        scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        sd = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                   scheme)
        base = key[: -len(".weight")]
        out.update({f"{base}.{k}": v for k, v in sd.items()})
        decompressed[key] = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    (path / "model.safetensors").unlink()
    save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump()}},
        "ignore": ["lm_head", "re:.*self_attn\\.(k|v|o)_proj$", "re:.*mlp\\.gate$"],
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return decompressed


def test_reads_a_checkpoint_compressed_tensors_produced(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny()
    decompressed = _compressed_tensors_checkpoint(model, tmp_path)
    m = load_int4(tmp_path)  # no export marker: a foreign checkpoint, read without verification
    q_proj = m.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, Int4Linear)
    # The runtime's weights are compressed-tensors' own dequantization (which rounds to bf16).
    gu = m.model.layers[1].mlp.experts.gate_up_int4
    I = model.config.moe_intermediate_size
    for e in (0, 5):
        w = gu.dequantize(e).to(torch.bfloat16)
        assert torch.equal(w[:I], decompressed[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"])
        assert torch.equal(w[I:], decompressed[f"model.layers.1.mlp.experts.{e}.up_proj.weight"])
    assert torch.equal(q_proj.weight_int4.dequantize(0).to(torch.bfloat16),
                       decompressed["model.layers.0.self_attn.q_proj.weight"])
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    with torch.no_grad():
        ours, theirs, dense = m(ids).logits, hf(ids).logits.float(), model(ids).logits
    diff, quant_effect = (ours - theirs).abs().max().item(), (theirs - dense).abs().max().item()
    print(f"compressed-tensors checkpoint: load_int4 vs transformers max|diff| = {diff:.2e}; vs float {quant_effect:.2e}")
    assert diff < 0.1 * quant_effect


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_convert_int4_in_memory(family, tmp_path):
    from qat import get_config
    from qat.load import convert_int4

    model = tiny(family)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(ids).logits
    prepare(model, QuantConfig())
    with torch.no_grad():
        fq = model(ids).logits
    if family == "qwen3_moe":
        export_int4(model, tmp_path)
    convert_int4(model)
    assert get_config(model) is None and not any("fake_quant" in n for n, _ in model.named_modules())
    assert all(w.backend == "cpu" for w in model.modules() if isinstance(w, Int4Weight))
    with torch.no_grad():
        logits = model(ids).logits
    diff, quant_effect = (logits - fq).abs().max().item(), (fq - ref).abs().max().item()
    print(f"{family}: convert_int4 vs fake quant {diff:.2e}; fake quant vs float {quant_effect:.2e}")
    assert diff < 1e-4 and diff < 1e-3 * quant_effect
    if family == "qwen3_moe":  # the same weights as the export, loaded back
        with torch.no_grad():
            assert torch.equal(load_int4(tmp_path)(ids).logits, logits)


def test_sharded_export_loads_the_same(exported, tmp_path):
    model, out, ids, _, fq = exported
    export_int4(model, tmp_path, max_shard_size="300KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with torch.no_grad():
        assert torch.equal(load_int4(tmp_path)(ids).logits, load_int4(out)(ids).logits)
