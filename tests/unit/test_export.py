"""export_int4: the compressed-tensors pack-quantized checkpoint it writes, bit for bit."""

import json

import pytest
import torch
from safetensors import safe_open

from qat import QuantConfig, prepare
from qat.export import export_int4, quantization_config_dict
from qat.files import MARKER, ExportIntegrityError, verify_export
from qat.int4 import dequantize_int4, unpack_int4
from train.models import build_model, load_preset

torch.set_num_threads(1)


def tiny(family="qwen3_moe", **overrides):
    torch.manual_seed(0)
    cfg = dict(vocab_size=128, num_hidden_layers=2)
    cfg.update(overrides)
    model = build_model(load_preset(f"tiny_{family}", **cfg))
    return model.eval()


def read_all(path):
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            tensors.update({k: sf.get_tensor(k) for k in sf.keys()})
    return tensors


@pytest.fixture(scope="module")
def qwen3_export(tmp_path_factory):
    model = tiny()
    prepare(model, QuantConfig(observer="mse"))  # a stateful observer: its clip ratios must reach the export
    out = tmp_path_factory.mktemp("int4")
    report = export_int4(model, out)
    return model, out, report


def test_files_and_tensor_layout(qwen3_export):
    model, out, report = qwen3_export
    assert sorted(report.files) == sorted(["config.json", "generation_config.json", "model.safetensors", MARKER])
    t = read_all(out)
    cfg = model.config
    E, H, I = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert report.num_int4_tensors == cfg.num_hidden_layers * E * 3
    for layer in range(cfg.num_hidden_layers):
        assert f"model.layers.{layer}.mlp.experts.gate_up_proj" not in t
        for e in range(E):
            for proj, (O, In) in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
                p = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                assert t[f"{p}.weight_packed"].dtype == torch.int32
                assert t[f"{p}.weight_packed"].shape == (O, In // 8)
                assert t[f"{p}.weight_scale"].dtype == torch.bfloat16
                assert t[f"{p}.weight_scale"].shape == (O, In // 32)
                assert t[f"{p}.weight_shape"].tolist() == [O, In]
                assert f"{p}.weight" not in t
    # Everything else is the model's own tensor, unchanged; no observer state leaks out.
    assert not any("fake_quant" in k or "clip_ratio" in k for k in t)
    for name, value in model.state_dict().items():
        if "experts" in name:
            continue
        assert t[name].dtype == value.dtype and torch.equal(t[name], value), name


def test_export_is_the_fake_quant_bit_for_bit(qwen3_export):
    model, out, _ = qwen3_export
    t = read_all(out)
    I = model.config.moe_intermediate_size
    for layer_idx, layer in enumerate(model.model.layers):
        experts = layer.mlp.experts
        w_gu = experts.weight_fake_quant["gate_up_proj"](experts.gate_up_proj)  # what training computes with
        w_d = experts.weight_fake_quant["down_proj"](experts.down_proj)
        for e in range(experts.gate_up_proj.shape[0]):
            p = f"model.layers.{layer_idx}.mlp.experts.{e}"
            for proj, ref in (("gate_proj", w_gu[e, :I]), ("up_proj", w_gu[e, I:]), ("down_proj", w_d[e])):
                w_hat = dequantize_int4(t[f"{p}.{proj}.weight_packed"], t[f"{p}.{proj}.weight_scale"], 32,
                                        torch.float32)
                assert torch.equal(w_hat, ref), f"{p}.{proj}"
                codes = unpack_int4(t[f"{p}.{proj}.weight_packed"])
                assert codes.min() >= -7 and codes.max() <= 7  # K2 grid


def test_quantization_config_is_valid_compressed_tensors(qwen3_export):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers.utils.quantization_config import CompressedTensorsConfig

    model, out, _ = qwen3_export
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == "pack-quantized" and parsed.quantization_status == "compressed"
    w = parsed.config_groups["group_0"].weights
    assert (w.num_bits, w.type, w.symmetric, w.strategy, w.group_size) == (4, "int", True, "group", 32)
    CompressedTensorsConfig.from_dict(qc)
    ignore = set(qc["ignore"])
    assert "lm_head" in ignore and "model.layers.0.self_attn.q_proj" in ignore and "model.layers.1.mlp.gate" in ignore
    assert not any("experts" in i for i in ignore)
    assert config["architectures"] == ["Qwen3MoeForCausalLM"]


def test_mixtral_uses_hub_names():
    model = tiny("mixtral")
    prepare(model, QuantConfig())
    import pathlib
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        export_int4(model, d)
        t = read_all(pathlib.Path(d))
        qc = json.loads((pathlib.Path(d) / "config.json").read_text())["quantization_config"]
    H, F = model.config.hidden_size, model.config.intermediate_size
    assert t["model.layers.0.block_sparse_moe.experts.3.w1.weight_packed"].shape == (F, H // 8)  # gate
    assert t["model.layers.0.block_sparse_moe.experts.3.w3.weight_packed"].shape == (F, H // 8)  # up
    assert t["model.layers.0.block_sparse_moe.experts.3.w2.weight_packed"].shape == (H, F // 8)  # down
    assert "model.layers.0.block_sparse_moe.gate.weight" in t and "model.layers.0.mlp.gate.weight" not in t
    assert "model.layers.0.block_sparse_moe.gate" in qc["ignore"]


def test_unprepared_model_exports_rtn_equal_to_absmax_fake_quant(tmp_path):
    model = tiny()
    rtn = export_int4(model, tmp_path / "rtn", quant_config=QuantConfig(grid="full"))
    assert rtn.source == "rtn_absmax"
    prepare(model, QuantConfig(grid="full"))
    qat = export_int4(model, tmp_path / "fq")
    assert qat.source == "fake_quant"
    a, b = read_all(tmp_path / "rtn"), read_all(tmp_path / "fq")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    codes = unpack_int4(a["model.layers.0.mlp.experts.0.gate_proj.weight_packed"])
    assert codes.min() == -8  # the full grid reaches -8


def test_shards_index_and_streaming(tmp_path):
    model = tiny()
    report = export_int4(model, tmp_path, max_shard_size="400KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    t = read_all(tmp_path)
    assert set(index["weight_map"]) == set(t)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    # Peak new memory is one shard, not the model: at most the limit plus one tensor.
    biggest = max(v.numel() * v.element_size() for v in t.values())
    assert report.peak_shard_bytes <= 400_000 + biggest
    assert report.total_bytes > 4 * 400_000


def test_marker_detects_partial_and_altered_exports(tmp_path):
    model = tiny()
    export_int4(model, tmp_path)
    assert verify_export(tmp_path) is True
    shard = tmp_path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    shard.write_bytes(bytes(data))
    with pytest.raises(ExportIntegrityError, match="sha256"):
        verify_export(tmp_path)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(ExportIntegrityError, match="truncated"):
        verify_export(tmp_path)
    shard.unlink()
    with pytest.raises(ExportIntegrityError, match="missing"):
        verify_export(tmp_path)
    (tmp_path / MARKER).unlink()
    with pytest.raises(ExportIntegrityError, match="incomplete INT4 export"):
        verify_export(tmp_path)


def test_out_dir_must_be_empty_unless_overwrite(tmp_path):
    model = tiny()
    (tmp_path / "stale.safetensors").write_bytes(b"x")
    with pytest.raises(ValueError, match="overwrite=True"):
        export_int4(model, tmp_path)
    export_int4(model, tmp_path, overwrite=True)
    assert not (tmp_path / "stale.safetensors").exists() and verify_export(tmp_path)


def test_errors_name_the_setting(tmp_path):
    model = tiny()
    with pytest.raises(ValueError, match="bits=8"):
        export_int4(model, tmp_path / "a", quant_config=QuantConfig(bits=8))
    with pytest.raises(ValueError, match="matched no parameter"):
        export_int4(model, tmp_path / "b", quant_config=QuantConfig(targets=[r"nothing_like_this"]))
    gpt = tiny("gpt_oss")
    with pytest.raises(ValueError, match="no per-expert layout"):
        export_int4(gpt, tmp_path / "c")
    prepare(model, QuantConfig())
    with pytest.raises(ValueError, match="quant_config=None"):
        export_int4(model, tmp_path / "d", quant_config=QuantConfig(group_size=64))


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<|im_end|>": 1, "hello": 2, "world": 3}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", eos_token="<|im_end|>")
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    return tok


def test_tokenizer_and_chat_template_are_written(tmp_path):
    from transformers import AutoTokenizer

    from qat.export import export_checkpoint_int4

    model, tok = tiny(), _tokenizer()
    report = export_int4(model, tmp_path / "m", tok)
    model.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    streamed = export_checkpoint_int4(tmp_path / "ckpt", tmp_path / "s")
    for out, rep in ((tmp_path / "m", report), (tmp_path / "s", streamed)):
        assert "tokenizer.json" in rep.files and verify_export(out)
        back = AutoTokenizer.from_pretrained(str(out))
        assert back.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False) == "hello<|im_end|>"


def test_quantization_config_dict_group_size():
    qc = quantization_config_dict(QuantConfig(group_size=64), ["lm_head"])
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 64 and qc["ignore"] == ["lm_head"]


@pytest.mark.parametrize("observer,grid,dtype", [("absmax", "k2", torch.float32), ("absmax", "full", torch.bfloat16),
                                                 ("mse", "k2", torch.bfloat16), ("lsq", "k2", torch.float32)])
def test_chunked_quantizer_is_fq_quantize_bit_for_bit(observer, grid, dtype, monkeypatch):
    from torch import nn

    from qat.export import ChunkedQuantizer
    from qat.fake_quant import ExpertWeightFakeQuant, Quantized
    from qat.int4 import pack_int4

    g = torch.Generator().manual_seed(5)
    w = (torch.randn(7, 48, 128, generator=g) * torch.rand(7, 48, 1, generator=g)).to(dtype)
    w[2, 3, 32:64] = 0  # an all-zero group: scale 0, codes 0
    module = nn.Module()
    module.gate_up_proj = nn.Parameter(w)
    cfg = QuantConfig(observer=observer, grid=grid)
    fq = ExpertWeightFakeQuant(cfg, w.data, False, "gate_up_proj")
    codes, scale = fq.quantize(w)
    monkeypatch.setattr(ChunkedQuantizer, "CHUNK_ELEMENTS", 3 * 48 * 128)  # chunks of 3 experts: 3, 3, 1
    chunks = list(ChunkedQuantizer().chunks(Quantized("gate_up_proj", module, "gate_up_proj", fq)))
    if observer != "lsq":
        assert [(c[0], c[1]) for c in chunks] == [(0, 3), (3, 6), (6, 7)]
    assert torch.equal(torch.cat([c[2] for c in chunks]), pack_int4(codes))
    assert torch.equal(torch.cat([c[3] for c in chunks]), scale)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_streaming_export_equals_model_export(family, tmp_path):
    from qat.export import export_checkpoint_int4

    model = tiny(family)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="300KB")  # sharded hub-layout input
    streamed = export_checkpoint_int4(tmp_path / "ckpt", tmp_path / "s", max_shard_size="500KB")
    direct = export_int4(model, tmp_path / "m", max_shard_size="500KB")
    a, b = read_all(tmp_path / "s"), read_all(tmp_path / "m")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert streamed.num_int4_tensors == direct.num_int4_tensors and verify_export(tmp_path / "s")
    ca, cb = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("s", "m"))
    assert ca["quantization_config"] == cb["quantization_config"] and ca["dtype"] == cb["dtype"]
    assert ca["architectures"] == cb["architectures"]


def test_streaming_export_errors(tmp_path):
    from qat.export import export_checkpoint_int4

    model = tiny()
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="observer='mse'"):
        export_checkpoint_int4(tmp_path / "ckpt", tmp_path / "a", quant_config=QuantConfig(observer="mse"))
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # the checkpoint holds a layer this config does not have
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not have"):
        export_checkpoint_int4(tmp_path / "ckpt", tmp_path / "b")


def test_streaming_export_casts_like_from_pretrained(tmp_path):
    from qat.export import export_checkpoint_int4

    model = tiny()
    model.save_pretrained(tmp_path / "ckpt")  # float32
    export_checkpoint_int4(tmp_path / "ckpt", tmp_path / "s", dtype=torch.bfloat16, workers=1)
    export_int4(model.to(torch.bfloat16), tmp_path / "m")
    a, b = read_all(tmp_path / "s"), read_all(tmp_path / "m")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["dtype"] == "bfloat16"
