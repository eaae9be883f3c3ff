"""The hand-set copy circuit (train/copy_circuit.py): it copies at init, its heads attend where the
construction says, and presets that cannot hold it are refused with the setting named."""

from __future__ import annotations

import math

import pytest
import torch

from train.copy_circuit import CopyCircuit, install_copy_circuit, positional_weights
from train.models import build_model, load_preset

V = 600
DEFAULT_CIRCUIT: dict = {}  # the circuit with its default settings


def _tiny(circuit: dict | None = DEFAULT_CIRCUIT, **config):
    torch.manual_seed(0)
    preset = load_preset("tiny_qwen3_moe", vocab_size=V, **config)
    preset["copy_circuit"] = {} if circuit is DEFAULT_CIRCUIT else circuit  # a fresh dict: the default is shared
    return build_model(preset).eval()


def _repeat(L: int, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(10, V, (batch, L), generator=g)
    ids = torch.cat([x, x], 1)
    second = ids.clone()
    second[:, : L + 1] = -100  # loss on the repeat, from its second token (its first has no cue)
    first = ids.clone()
    first[:, L:] = -100
    return ids, first, second


@torch.no_grad()
def _loss(model, ids, labels):
    return model(input_ids=ids, labels=labels, use_cache=False).loss.item()


def test_circuit_is_opt_in_and_the_preset_keeps_the_rope_theta_it_needs():
    preset = load_preset("tiny_qwen3_moe")
    assert preset["copy_circuit"] is None  # off the default path: model.copy_circuit={} turns it on
    assert preset["config"]["rope_parameters"]["rope_theta"] >= 1e7


@pytest.mark.parametrize("L", [24, 200])
def test_circuit_copies_a_repeated_random_sequence_at_init(L):
    ids, first, second = _repeat(L)
    with_circuit, plain = _tiny({}), _tiny(None)
    chance = math.log(V)
    # the repeat is predicted from context; fresh random tokens stay near chance
    assert _loss(with_circuit, ids, second) < 1.0
    assert _loss(with_circuit, ids, first) > chance - 0.5
    # without the circuit a fresh model is at chance on both halves
    assert _loss(plain, ids, second) > chance - 0.5


def test_circuit_survives_bf16_activations():
    ids, _, second = _repeat(200)
    model = _tiny({}).to(torch.bfloat16)
    assert _loss(model, ids, second) < 1.5


@torch.no_grad()
def test_heads_attend_where_the_construction_says():
    L = 150
    ids, _, _ = _repeat(L, batch=1)
    model = _tiny({})
    model.set_attn_implementation("eager")
    att = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    T = ids.shape[1]
    pos = torch.arange(T)
    for head, offset in ((0, 1), (1, 2)):  # layer 0: previous token, the token two back
        a = att[0][0, head]
        assert (a.argmax(-1)[offset:] == pos[offset:] - offset).all()
        assert a[pos[offset:], pos[offset:] - offset].min() > 0.9
    # layer 1, two-token match: in the repeat, position L + j attends to j + 1 (the token after the
    # earlier occurrence of the current token), whose value is the next token to predict
    a = att[1][0, 1]
    src = pos[L + 2:T - 1]
    hits = (a[src].argmax(-1) == src - L + 1).float().mean().item()
    assert hits > 0.95


def test_positional_weights_peak_at_the_offset_only():
    inv = 1.0 / (1e7 ** (torch.arange(0, 64, 2).float() / 64))
    w, margin = positional_weights(inv, 8, 4096)
    assert torch.isclose(w.sum(), torch.tensor(1.0)) and (w >= 0).all()
    assert margin > 0.1
    d = torch.arange(4096).double()
    S = (w.double()[None] * torch.cos((d[:, None] - 1) * inv[:8].double()[None])).sum(1)
    assert S.argmax().item() == 1
    assert (S[1] - torch.cat([S[:1], S[2:]])).min().item() == pytest.approx(margin, abs=1e-6)


def test_only_the_circuits_modules_change():
    torch.manual_seed(0)
    plain = _tiny(None)
    circ = _tiny({})
    changed = {n for (n, a), (_, b) in zip(plain.named_parameters(), circ.named_parameters()) if not torch.equal(a, b)}
    allowed = {"model.embed_tokens.weight", "lm_head.weight"} | {
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1)
        for m in ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight", "q_norm.weight", "k_norm.weight")}
    assert changed and changed <= allowed
    assert not any("mlp" in n or "layers.2" in n or "layers.3" in n for n in changed)


def test_a_checkpoint_keeps_its_weights(tmp_path):
    model = _tiny({})
    with torch.no_grad():
        model.model.layers[0].self_attn.q_norm.weight.fill_(0.5)  # as if training had moved it
    model.save_pretrained(tmp_path)
    preset = load_preset("tiny_qwen3_moe", vocab_size=V)
    preset.update(path=str(tmp_path), copy_circuit={})
    loaded = build_model(preset)
    assert torch.equal(loaded.model.layers[0].self_attn.q_norm.weight, model.model.layers[0].self_attn.q_norm.weight)


@pytest.mark.parametrize("change, match", [
    (dict(circuit={"code_dim": 64, "nope": 1}), "unknown keys \\['nope'\\]"),
    (dict(circuit={"code_dim": 128}), "hidden_size=256 is too small"),
    (dict(circuit={"position_pairs": 30}), "head_dim=64 cannot hold"),
    (dict(circuit={}, tie_word_embeddings=True), "untied embeddings"),
    (dict(circuit={}, num_hidden_layers=1), "at least 2 layers"),
    (dict(circuit=[1]), "must be a mapping"),
])
def test_bad_settings_are_refused_by_name(change, match):
    change = dict(change)
    circuit = change.pop("circuit")
    with pytest.raises(ValueError, match=match):
        _tiny(circuit, **change)


def test_other_families_are_refused():
    torch.manual_seed(0)
    preset = load_preset("tiny_mixtral", vocab_size=V)
    preset["copy_circuit"] = {}
    with pytest.raises(ValueError, match="model.copy_circuit is implemented for family qwen3_moe"):
        build_model(preset)
    with pytest.raises(ValueError, match="qwen3_moe"):
        install_copy_circuit(build_model(load_preset("tiny_mixtral", vocab_size=V)), CopyCircuit())
