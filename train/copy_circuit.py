"""A copy circuit set by hand in a freshly initialised model: the model can copy from its context at step 0.

Why. Almost every answer in our task families is a value copied from the context: the number in
the question into the program, the tool's printed result into `Answer:`, a name from a search
hit into `open`. Transformers copy with *induction heads* (Olsson et al. 2022, "In-context
learning and induction heads"): a previous-token head in one layer, and in a later layer a head
whose query is the current token and whose key is the previous token, so it attends to the
token *after* an earlier occurrence of the current token and copies it. These heads form
abruptly after a long plateau. On our 2-core CPU budget (about 2M training tokens) the tiny
model never left the plateau: after the full 1000-step run it predicted copied digits at
1.83 nats against 2.30 for a uniform guess (0.40 with this circuit), and curricula of copy drills
and repeated random sequences did not shorten the plateau (see the README's "copy circuit"). So
the tiny preset starts with the circuit already in place and training only has to learn *when*
to copy. Every weight stays trainable; nothing outside the attention of layers 0 and 1, the
embedding and the unembedding is touched.

How (for `qwen3_moe`: per-head q/k RMSNorm, rotary embeddings, grouped-query attention).
The residual stream gets a layout (dims of `hidden_size`):

    E  [0, c)           token code: a random c-dim code per token, written by the embedding
    P1 [c, c+k)         the previous token's code, projected to k dims (written by layer 0)
    P2 [c+k, c+2k)      the code of the token two back (written by layer 0)
    U  [c+2k, 2c+2k)    the copied token's code (written by layer 1, read by the unembedding)
    1  2c+2k            a constant, so that a head can form position-only queries and keys
    the rest            as initialised by transformers, for everything the model learns

Layer 0, query heads 0 and 1: positional heads. Their queries and keys are built from the
constant dim only, so the score depends on the distance alone; the rotary phases are chosen so
that it peaks at distance 1 (head 0) and 2 (head 1) over every distance up to 4096 (the weights
over the highest-frequency rotary pairs are solved for the largest margin). Their value is the
token code; their outputs write P1 and P2.

Layer 1, query heads 0 and 1: induction heads. The key is P1 + M·P2 (M a random rotation), in the
lowest-frequency rotary pairs, where the rotation over a 4096-token context stays small (hence
`rope_theta: 1.0e7` in the tiny preset). Head 0's query is the current token's code (a match
on one token), head 1's is the current and the previous token's codes (a match on two tokens).
Their value is the token code, written to U; the unembedding reads U with the same codes, so
the attended token's logit rises.

    from train.copy_circuit import CopyCircuit, install_copy_circuit
    install_copy_circuit(model, CopyCircuit())   # right after random init, before training

`conf/model/tiny_qwen3_moe.yaml` sets `copy_circuit: {}` (the defaults below); `build_model`
installs it when the model is built from a config (a checkpoint already holds its weights).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CopyCircuit:
    """Sizes and strengths of the circuit (the `copy_circuit:` keys of a model preset)."""

    code_dim: int = 64            # c: dims of the token code (E and U)
    key_dim: int = 32             # k: dims of the matched codes (P1, P2); uses k/2 low-frequency rotary pairs
    position_pairs: int = 8       # highest-frequency rotary pairs that make the positional heads
    position_sharpness: float = 3.0  # layer-0 q/k norm weight on those pairs: score margin 8*w^2*gap
    match_sharpness: float = 2.5  # layer-1 q/k norm weight on the content pairs
    unembed_scale: float = 0.12   # weight of the copied code in the unembedding
    max_distance: int = 4096      # the positional heads peak at offset 1 / 2 over distances up to this
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> CopyCircuit:
        cfg = dict(cfg or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(cfg) - names)
        if unknown:
            raise ValueError(f"model.copy_circuit has unknown keys {unknown}; valid keys: {sorted(names)}")
        return cls(**cfg)


def positional_weights(inv_freq: torch.Tensor, pairs: int, max_distance: int, offset: int = 1) -> tuple[torch.Tensor, float]:
    """Squared amplitudes w (summing to 1) over the first `pairs` rotary frequencies that maximise the
    smallest margin S(offset) - S(d), d != offset, of S(d) = sum_i w_i cos((d - offset) * theta_i);
    returns (w, margin). Solved by a few hundred Adam steps on a soft minimum (deterministic)."""
    theta = inv_freq[:pairs].double()
    d = torch.arange(0, max_distance, dtype=torch.float64)
    phases = torch.cos((d[:, None] - offset) * theta[None])  # [D, pairs]
    others = torch.cat([phases[:offset], phases[offset + 1:]])
    logits = torch.zeros(pairs, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    with torch.enable_grad():
        for _ in range(400):
            w = torch.softmax(logits, 0)
            margin = 1.0 - others @ w                      # S(offset) = sum w = 1
            loss = torch.logsumexp(-50.0 * margin, 0) / 50.0  # soft minimum of the margins
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = torch.softmax(logits.detach(), 0)
    return w.float(), float((1.0 - others @ w).min())


def _check(model: torch.nn.Module, spec: CopyCircuit) -> None:
    config = model.config
    where = "model.copy_circuit"
    if getattr(config, "model_type", None) != "qwen3_moe":
        raise ValueError(f"{where} is implemented for family qwen3_moe (per-head q/k RMSNorm, rotary embeddings); "
                         f"this model is {getattr(config, 'model_type', type(model).__name__)!r}: drop copy_circuit from the preset")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"{where} needs plain rotary embeddings (rope_type default), got {rope.get('rope_type')!r}")
    hd, hidden = config.head_dim, config.hidden_size
    need = 2 * spec.code_dim + 2 * spec.key_dim + 1
    if hidden < need:
        raise ValueError(f"{where}: hidden_size={hidden} is too small for code_dim={spec.code_dim} and "
                         f"key_dim={spec.key_dim} (needs 2*code_dim + 2*key_dim + 1 = {need})")
    if spec.key_dim % 2 or spec.position_pairs + spec.key_dim // 2 > hd // 2 or spec.code_dim > hd:
        raise ValueError(f"{where}: head_dim={hd} cannot hold position_pairs={spec.position_pairs} rotary pairs plus "
                         f"key_dim={spec.key_dim} (even) content dims, and a code of code_dim={spec.code_dim}")
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError(f"{where} needs untied embeddings (tie_word_embeddings: false): "
                         "the embedding writes the token code, the unembedding reads the copied code")
    if config.num_hidden_layers < 2 or config.num_attention_heads < 2:
        raise ValueError(f"{where} needs at least 2 layers and 2 attention heads "
                         f"(got {config.num_hidden_layers} layers, {config.num_attention_heads} heads)")


@torch.no_grad()
def install_copy_circuit(model: torch.nn.Module, spec: CopyCircuit | None = None) -> dict[str, Any]:
    """Writes the circuit into a freshly initialised qwen3_moe causal LM in place; returns the layout
    (residual slices, margins). Raises ValueError, naming the setting, if the model cannot hold it."""
    spec = spec or CopyCircuit()
    _check(model, spec)
    config = model.config
    hd, c, k = config.head_dim, spec.code_dim, spec.key_dim
    group = config.num_attention_heads // config.num_key_value_heads
    half = hd // 2
    E, P1, P2 = slice(0, c), slice(c, c + k), slice(c + k, c + 2 * k)
    U, one = slice(c + 2 * k, 2 * c + 2 * k), 2 * c + 2 * k
    g = torch.Generator().manual_seed(spec.seed)

    embed = model.get_input_embeddings().weight
    dev, H = embed.device, config.hidden_size
    codes = torch.randn(embed.shape[0], c, generator=g)
    # Unit-variance codes and an O(1) constant dominate the residual (the rest of the embedding keeps its
    # small init), so the circuit's attention patterns do not depend on what other modules add at init.
    embed[:, E] = codes.to(dev, embed.dtype)
    embed[:, c:one] = 0  # P1, P2 and U are written by the heads
    embed[:, one] = math.sqrt(c) / 4

    inv_freq = model.model.rotary_emb.inv_freq.float().cpu()
    n = spec.position_pairs
    w, margin = positional_weights(inv_freq, n, spec.max_distance)
    amp = w.sqrt()
    R = torch.linalg.qr(torch.randn(c, c, generator=g))[0][:k]      # [k, c]: code -> matched dims
    M = torch.linalg.qr(torch.randn(k, k, generator=g))[0]          # mixes P2 into the same key dims
    content = torch.tensor(list(range(half - k // 2, half)) + list(range(hd - k // 2, hd)))  # lowest frequencies
    heads = (0, 1)  # the circuit's query heads in layers 0 and 1

    def rows(head: int) -> slice:
        return slice(head * hd, (head + 1) * hd)

    def put(weight: torch.nn.Parameter, value: torch.Tensor, index) -> None:
        weight[index] = value.to(device=dev, dtype=weight.dtype)

    def put_kv(attn, key: torch.Tensor, value: torch.Tensor) -> None:
        for kv in {h // group for h in heads}:  # heads 0 and 1 may share one key/value head
            put(attn.k_proj.weight, key, rows(kv))
            put(attn.v_proj.weight, value, rows(kv))

    value = torch.zeros(hd, H)  # both layers' value: the token code
    value[:c, E] = torch.eye(c)

    # layer 0: positional heads 0 (offset 1, writes P1) and 1 (offset 2, writes P2); key from the constant
    attn = model.model.layers[0].self_attn
    key = torch.zeros(hd, H)
    key[:n, one] = amp
    put_kv(attn, key, value)
    for head, offset, dest in ((0, 1, P1), (1, 2, P2)):
        query = torch.zeros(hd, H)
        query[:n, one] = amp * torch.cos(offset * inv_freq[:n])
        query[half:half + n, one] = -amp * torch.sin(offset * inv_freq[:n])
        put(attn.q_proj.weight, query, rows(head))
        out = torch.zeros(H, hd)
        out[dest, :c] = R
        put(attn.o_proj.weight, out, (slice(None), rows(head)))
    for norm in (attn.q_norm, attn.k_norm):
        norm.weight[:n] = spec.position_sharpness
        norm.weight[half:half + n] = spec.position_sharpness

    # layer 1: induction heads 0 (one-token match) and 1 (two-token match); key = P1 + M P2, out to U
    attn = model.model.layers[1].self_attn
    key = torch.zeros(hd, H)
    key[content, P1] = torch.eye(k)
    key[content, P2] = M
    put_kv(attn, key, value)
    out = torch.zeros(H, hd)
    out[U, :c] = torch.eye(c)
    for head in heads:
        query = torch.zeros(hd, H)
        query[content, E] = R
        if head == 1:
            query[content, P1] = M
        put(attn.q_proj.weight, query, rows(head))
        put(attn.o_proj.weight, out, (slice(None), rows(head)))
    for norm in (attn.q_norm, attn.k_norm):
        norm.weight[content.to(norm.weight.device)] = spec.match_sharpness

    head_w = model.get_output_embeddings().weight
    put(head_w, spec.unembed_scale * codes, (slice(None), U))
    log.info("copy circuit installed: positional heads peak at offsets 1 and 2 by %.1f logits or more; "
             "code %d dims, match %d dims", 8 * spec.position_sharpness ** 2 * margin, c, k)
    return {"E": E, "P1": P1, "P2": P2, "U": U, "one": one, "position_margin": margin}
