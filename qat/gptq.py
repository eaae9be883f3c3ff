"""GPTQ on fused MoE experts: per-expert Hessians from the tokens the router sends, on our INT grid.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers", arXiv:2210.17323) quantizes a weight matrix W [O, I] one input
column at a time and, after each column, moves the rounding error onto the columns not yet
quantized, in the direction that least changes the layer's output on calibration inputs X. The
objective is ||X W^T - X W_q^T||^2, whose Hessian H = 2 X^T X [I, I] is all the algorithm needs
(with 1% of its mean diagonal added, "dampening"). The column loop runs on the upper Cholesky
factor of H^-1, in lazy blocks of `block_size` columns so most of the update is one matmul.

Libraries run it per nn.Linear; transformers v5 MoE models keep every layer's routed experts as
two fused 3D tensors (`gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`; GPT-OSS transposed, with
biases), which no library handles, and the per-expert inputs exist only inside the experts call.
The one idea here: hook the experts module itself, whose call is `experts(hidden [N, H],
top_k_index [N, K], top_k_weights [N, K])` in every family, so the model's own router decides
which tokens each expert sees. Then, per expert: gate and up share the expert's input (one GPTQ
over the [2I, H] rows), and down sees act(gate) * up computed with the already-quantized gate/up
(the module's own `_apply_gate`). Layers run in order, each on the output of the already-quantized
layers before it, as GPTQ does.

The grid is QuantConfig's (K2 by default: codes in [-7, 7], scale = absmax / 7 per group of 32
input channels, rounded to bf16 before any code is computed), so the result is exactly
codes x scales of the export. Scales are chosen when the loop reaches a group, from the weights as
updated so far (GPTQ's grouping); with `act_order` (columns in decreasing order of H's diagonal)
all group scales come from the original weights first ("static groups"), so groups stay the 32
consecutive input channels that the export writes. Those scales are GPTQ's own: an export that
recomputed absmax from the GPTQ weights would move codes, so they are returned for the export.

Calibration must be plentiful per expert: an expert sees about tokens x top_k / num_experts of
them, and with fewer tokens than input channels H is rank-deficient, so GPTQ fits those tokens
at the expense of the rest (scripts/bench/gptq.py, a Qwen3-30B-A3B layer: ~250 tokens per expert
give 8x less output error than RTN on the calibration tokens and 10% more on held-out ones;
~4300 give half of RTN's error on held-out tokens).

Legend: E experts, O output channels, I input channels, G = I / group_size, N tokens, K top-k.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import numerics
from .config import QuantConfig

log = logging.getLogger(__name__)


@dataclass
class GPTQConfig:
    percdamp: float = 0.01
    """Dampening: this fraction of the mean of H's diagonal is added to the diagonal. Larger pulls
    GPTQ toward RTN: safer when experts see fewer calibration tokens than their input dim."""
    block_size: int = 32
    """Columns per lazy batch (rounded up to a multiple of group_size); speed only (on CPU 32 beats
    the reference code's 128 by 25%: the rank-1 updates inside a block are memory-bound)."""
    act_order: bool = False
    """Quantize columns in decreasing order of H's diagonal, with static groups (scales from the
    original weights): the paper's option for low bit widths."""
    min_tokens: int = 32
    """Experts that receive fewer calibration tokens fall back to RTN (their H would be mostly the
    dampening term); counted in the report."""
    experts_per_chunk: int = 8
    """Experts quantized at once (batched linear algebra); memory ~ 2 I^2 floats per expert."""

    def __post_init__(self) -> None:
        if not 0.0 < self.percdamp < 1.0:
            raise ValueError(f"GPTQConfig.percdamp={self.percdamp!r}: must be in (0, 1), e.g. 0.01")
        for name in ("block_size", "experts_per_chunk"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"GPTQConfig.{name}={v!r}: must be a positive integer")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"GPTQConfig.min_tokens={self.min_tokens!r}: must be an integer >= 0")


# --- the algorithm on one batch of matrices -----------------------------------------------------


@torch.no_grad()
def gptq_quantize(w_EOI: torch.Tensor, h_EII: torch.Tensor, cfg: QuantConfig, *, percdamp: float = 0.01,
                  block_size: int = 32, act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ of E independent matrices W [E, O, I] with Hessians H [E, I, I] on the grid of `cfg`.

    Returns (codes int8 [E, O, I], scales [E, O, G] in cfg.scale_dtype); the quantized weights are
    numerics.dequantize_groups(codes, scales). Math in float32 (float64 if W is float64).
    """
    gs = cfg.group_size
    dtype = torch.promote_types(w_EOI.dtype, torch.float32)
    W = w_EOI.to(dtype).clone()
    H = h_EII.to(dtype).clone()
    E, O, I = W.shape
    numerics.check_groupable("gptq_quantize", tuple(W.shape), I, gs)
    diag = H.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0  # input channels no calibration token uses: RTN, no error flows through them
    diag.masked_fill_(dead, 1.0)
    static = act_order
    scale = numerics.absmax_scale(W, cfg) if static else torch.empty(E, O, I // gs, dtype=cfg.torch_scale_dtype)
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)  # [E, I]
        W = W.gather(-1, perm[:, None, :].expand(E, O, I))
        H = H.gather(-1, perm[:, None, :].expand(E, I, I)).gather(-2, perm[:, :, None].expand(E, I, I))
        group_of = perm // gs
        diag = H.diagonal(dim1=-2, dim2=-1)
    diag.add_(percdamp * diag.mean(-1, keepdim=True))
    # U, the upper Cholesky factor of H^-1 (H^-1 = U^T U): row i holds the error-propagation weights
    # of column i. With J the order reversal and J H J = L L^T, U = J L^-1 J: one Cholesky and one
    # triangular inverse, instead of the reference code's Cholesky, inverse and second Cholesky.
    L = torch.linalg.cholesky(H.flip(-1, -2))
    del H
    Hinv = torch.linalg.solve_triangular(L, torch.eye(I, dtype=dtype).expand_as(L), upper=False).flip(-1, -2)
    del L
    codes = torch.empty(E, O, I, dtype=torch.int8)
    B = -(-block_size // gs) * gs  # a whole number of groups per block: a group's scale sees its updated columns
    for i1 in range(0, I, B):
        i2 = min(i1 + B, I)
        W1 = W[..., i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if static:
                s = scale.gather(-1, group_of[:, None, col:col + 1].expand(E, O, 1)).squeeze(-1)
            else:
                if col % gs == 0:
                    scale[..., col // gs] = numerics.absmax_scale(W1[..., i:i + gs], cfg).squeeze(-1)
                s = scale[..., col // gs]
            s = s.to(dtype)
            w = W1[..., i]
            q = (w / numerics.safe_scale(s)).round_().clamp_(cfg.qmin, cfg.qmax).masked_fill_(s == 0, 0)
            err = (w - q * s) / Hinv1[:, i, i, None]
            W1[..., i:].addcmul_(err[..., None], Hinv1[:, None, i, i:], value=-1.0)
            Err1[..., i] = err
            codes[..., col] = q.to(torch.int8)
        W[..., i2:].baddbmm_(Err1, Hinv[:, i1:i2, i2:], alpha=-1.0)
    if act_order:
        codes = torch.empty_like(codes).scatter_(-1, perm[:, None, :].expand(E, O, I), codes)
    return codes, scale


# --- per-expert calibration inputs --------------------------------------------------------------


def _first_attr(experts: nn.Module) -> str:
    return "gate_up_proj" if experts.has_gate else "up_proj"


def expert_intermediate(experts: nn.Module, e: int, x_NH: torch.Tensor) -> torch.Tensor:
    """The input of expert e's down projection for tokens x: act(gate) * up (or act(up) for experts
    without a gate), with the module's current weights, bias and gating (GPT-OSS's included)."""
    attr = _first_attr(experts)
    w = getattr(experts, attr)[e]
    y = x_NH @ w if experts.is_transposed else x_NH @ w.T
    if experts.has_bias:
        y = y + getattr(experts, f"{attr}_bias")[e]
    # _apply_gate is transformers' per-model gating hook of fused experts (GPT-OSS's clamped GLU with
    # up + 1; act(gate) * up elsewhere): no public equivalent exists, and only it is the model's own gating.
    return experts._apply_gate(y) if experts.has_gate else experts.act_fn(y)


def _hessians(x_ND: torch.Tensor, token_ids: list[torch.Tensor], fn=None) -> torch.Tensor:
    """H_e = 2 X_e^T X_e / n_e [len(token_ids), D, D] in float32, X_e = x[token_ids[e]] (or fn(e, X_e))."""
    out = []
    for e, ids in enumerate(token_ids):
        x = x_ND[ids]
        if fn is not None:
            x = fn(e, x)
        x = x.float()
        out.append(x.T @ x * (2.0 / max(len(ids), 1)))
    return torch.stack(out)


class _Capture:
    """Forward hook on an experts module: keeps (hidden [N, H], top_k_index [N, K]) of each call,
    restricted to the real (non-padding) tokens of the batch being run."""

    def __init__(self):
        self.valid: torch.Tensor | None = None
        self.hidden: list[torch.Tensor] = []
        self.index: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs, output):
        hidden, index = (list(args) + list(kwargs.values()))[:2]
        assert hidden.shape[0] == self.valid.numel(), "experts saw another token count than the batch holds"
        self.hidden.append(hidden.detach()[self.valid])
        self.index.append(index.detach()[self.valid])


# --- the sequential pass over the model ---------------------------------------------------------


def _as_batch(item: Any) -> dict[str, torch.Tensor]:
    if isinstance(item, torch.Tensor):
        ids = item if item.ndim == 2 else item.unsqueeze(0)
        return {"input_ids": ids}
    if isinstance(item, dict) and "input_ids" in item:
        b = {k: item[k] for k in ("input_ids", "attention_mask", "position_ids") if item.get(k) is not None}
        if b["input_ids"].ndim == 1:
            b = {k: v.unsqueeze(0) for k, v in b.items()}
        return b
    raise ValueError(f"apply_ptq: calibration items must be token-id tensors or dicts with input_ids, got "
                     f"{type(item).__name__}")


def _layer_inputs(decoder: nn.Module, batches: list[dict]) -> tuple[list[torch.Tensor], list[list[tuple]]]:
    """Layer 0's hidden input per batch, and per batch and decoder layer the other arguments the
    model calls the layer with (masks, position embeddings). Each layer's forward is swapped for a
    recorder that returns its input, so this costs the embeddings and masks only."""
    layers = decoder.layers
    hidden, calls = [], []

    def recorder(hidden_states, *args, **kwargs):
        if not calls[-1]:
            hidden.append(hidden_states)
        calls[-1].append((args, kwargs))
        return hidden_states

    for layer in layers:
        layer.forward = recorder
    try:
        for b in batches:
            calls.append([])
            decoder(**b, use_cache=False)
            assert len(calls[-1]) == len(layers)
    finally:
        for layer in layers:
            del layer.forward
    return hidden, calls


@dataclass
class GPTQResult:
    """What gptq_experts did, for PTQReport: the scales the export needs, and the calibration's reach."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per quantized tensor, its scales [E, O, G] (scale dtype), oriented output-major."""
    rtn_fallback: list[str] = field(default_factory=list)
    """'<tensor>[<expert>]' of every expert that got fewer than min_tokens tokens (RTN instead)."""
    tokens_per_expert: dict[str, list[int]] = field(default_factory=dict)
    """Per experts module, calibration tokens routed to each expert."""
    calibration_tokens: int = 0
    sqnr_db: dict[str, float] = field(default_factory=dict)
    """Per quantized tensor, the weight SQNR (dB) of the GPTQ weights."""
    _power: dict[str, list[float]] = field(default_factory=dict)  # tensor -> [signal, noise]


@torch.no_grad()
def gptq_experts(model: nn.Module, targets: list, cfg: QuantConfig, calibration: Iterable,
                 gcfg: GPTQConfig) -> GPTQResult:
    """Runs GPTQ on every target (fused 3D expert tensor), layer by layer; writes the quantized
    weights (codes x scales) into the model and returns the scales. `targets`: qat.fake_quant.quantizers_for."""
    by_module: dict[int, dict[str, Any]] = {}
    for t in targets:
        if getattr(t.module, t.attr).ndim != 3:
            raise ValueError(f"apply_ptq(method='gptq'): {t.name} is a per-expert nn.Linear; GPTQ here runs on "
                             f"fused 3D experts (transformers v5), narrow QuantConfig.targets to those")
        by_module.setdefault(id(t.module), {})[t.attr] = t
    decoder = model.get_decoder()
    layers = list(decoder.layers)
    inside = {id(m) for layer in layers for m in layer.modules()}
    orphans = [t.name for t in targets if id(t.module) not in inside]
    if orphans:
        raise ValueError(f"apply_ptq(method='gptq'): {orphans[:3]} are not inside a decoder layer of "
                         f"{type(model).__name__}; GPTQ quantizes layer by layer")
    batches = [_as_batch(b) for b in calibration]
    if not batches:
        raise ValueError("apply_ptq(method='gptq'): calibration is empty; give token-id tensors or batches")
    device = next(model.parameters()).device
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    valid = [b["attention_mask"].bool().reshape(-1) if "attention_mask" in b
             else torch.ones(b["input_ids"].numel(), dtype=torch.bool, device=device) for b in batches]
    result = GPTQResult(calibration_tokens=int(sum(int(v.sum()) for v in valid)))
    was_training = model.training
    model.eval()  # no router jitter or dropout while calibrating
    try:
        hidden, calls = _layer_inputs(decoder, batches)
        for li, layer in enumerate(layers):
            here = [m for m in layer.modules() if id(m) in by_module]
            captures = [_Capture() for _ in here]
            handles = [m.register_forward_hook(cap, with_kwargs=True) for m, cap in zip(here, captures)]
            try:
                for b in range(len(batches) if here else 0):
                    for cap in captures:
                        cap.valid = valid[b]
                    layer(hidden[b], *calls[b][li][0], **calls[b][li][1])
            finally:
                for h in handles:
                    h.remove()
            for m, cap in zip(here, captures):
                quantize_experts(m, by_module[id(m)], torch.cat(cap.hidden), torch.cat(cap.index), cfg, gcfg, result)
            del captures
            # The next layer's input comes from this one with its experts quantized.
            hidden = [layer(hidden[b], *calls[b][li][0], **calls[b][li][1]) for b in range(len(batches))]
    finally:
        model.train(was_training)
    result.sqnr_db = {n: 10.0 * math.log10(sig / noise) if noise else float("inf")
                      for n, (sig, noise) in result._power.items()}
    if result.rtn_fallback:
        log.warning("GPTQ: %d expert tensors got fewer than min_tokens=%d calibration tokens and were quantized "
                    "with RTN: %s", len(result.rtn_fallback), gcfg.min_tokens, result.rtn_fallback[:8])
    return result


def quantize_experts(experts: nn.Module, targets: dict[str, Any], x_NH: torch.Tensor, index_NK: torch.Tensor,
                     cfg: QuantConfig, gcfg: GPTQConfig, result: GPTQResult) -> None:
    """GPTQ of one experts module's targets (first projection, then down), a chunk of experts at a time."""
    first, E = _first_attr(experts), getattr(experts, _first_attr(experts)).shape[0]
    K = index_NK.shape[-1]
    flat = index_NK.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E + 1)[:E]  # an index >= E is an expert-parallel sentinel
    starts = torch.cumsum(counts, 0) - counts
    token_ids = [order[int(starts[e]):int(starts[e] + counts[e])] // K for e in range(E)]
    prefix = next(iter(targets.values())).name.rsplit(".", 1)[0]
    result.tokens_per_expert[prefix] = counts.tolist()
    median = int(counts.median())
    if median < x_NH.shape[-1]:
        log.warning("GPTQ %s: a median of %d calibration tokens per expert for input dim %d: the Hessians are "
                    "rank-deficient and GPTQ fits these tokens at the expense of others (it can do worse than RTN "
                    "on held-out text, scripts/bench/gptq.py); give more calibration tokens, or raise percdamp",
                    prefix, median, x_NH.shape[-1])
    for t in targets.values():
        O, I = t.fq.oriented(getattr(experts, t.attr)[0]).shape
        result.scales[t.name] = torch.empty(E, O, I // cfg.group_size, dtype=cfg.torch_scale_dtype)
    for e0 in range(0, E, gcfg.experts_per_chunk):
        chunk = list(range(e0, min(E, e0 + gcfg.experts_per_chunk)))
        # The first projection sees the expert input; down sees act(gate) * up of the quantized first.
        for attr, fn in ((first, None), ("down_proj", lambda e, x, chunk=chunk: expert_intermediate(experts, chunk[e], x))):
            if attr not in targets:
                continue
            t = targets[attr]
            H = _hessians(x_NH, [token_ids[e] for e in chunk], fn)
            _quantize_chunk(t, chunk, H, [len(token_ids[e]) for e in chunk], cfg, gcfg, result)


def _quantize_chunk(t, chunk: list[int], H: torch.Tensor, n_tokens: list[int], cfg: QuantConfig,
                    gcfg: GPTQConfig, result: GPTQResult) -> None:
    param = getattr(t.module, t.attr)
    w_EOI = t.fq.oriented(param.data[chunk[0]:chunk[-1] + 1]).float()
    use = torch.tensor([n >= gcfg.min_tokens for n in n_tokens])
    codes, scale = numerics.quantize_groups(w_EOI, cfg)  # RTN, kept for experts below min_tokens
    if use.any():
        c, s = gptq_quantize(w_EOI[use], H[use], cfg, percdamp=gcfg.percdamp, block_size=gcfg.block_size,
                             act_order=gcfg.act_order)
        codes[use], scale[use] = c, s
    result.rtn_fallback += [f"{t.name}[{e}]" for e, u in zip(chunk, use.tolist()) if not u]
    w_hat = numerics.dequantize_groups(codes, scale, cfg.group_size, torch.float32)
    power = result._power.setdefault(t.name, [0.0, 0.0])
    power[0] += float(w_EOI.pow(2).sum())
    power[1] += float((w_EOI - w_hat).pow(2).sum())
    param.data[chunk[0]:chunk[-1] + 1] = t.fq.oriented(w_hat).to(param.dtype)
    result.scales[t.name][chunk[0]:chunk[-1] + 1] = scale
