"""The INT4 group quantization math, shared by the fake quant, the export and the runtime.

Everything here works on weights oriented output-major, input-last: `w_OI` or `w_EOI` (any number
of leading dims), grouped along the last (input) dim in groups of `group_size`. The one idea:
the scale is rounded to the export dtype (bf16) *before* the codes are computed, and the fake-quant
weight is `code * scale` with that rounded scale, so the fake-quant weight the model trains with is
bit for bit what a loader reconstructs from the exported codes and scales.

Legend: E experts, O output channels, I input channels, G = I / group_size groups, g group size.
Codes are computed in float32 whatever the weight dtype, so bf16 and fp32 weights of equal value
get equal codes.
"""

from __future__ import annotations

import torch

from .config import QuantConfig


def check_groupable(name: str, shape: tuple[int, ...], in_dim: int, group_size: int) -> None:
    if in_dim % group_size != 0:
        raise ValueError(
            f"QuantConfig.group_size={group_size} does not divide the input dim {in_dim} of {name} "
            f"(shape {list(shape)}); choose a group_size that divides it, or exclude the tensor from targets"
        )


def _absmax_scale_math(w_OI, group_size: int, divisor: float, scale_dtype: torch.dtype, clip_ratio=None):
    absmax = w_OI.unflatten(-1, (-1, group_size)).abs().amax(dim=-1).float()
    if clip_ratio is not None:
        absmax = absmax * clip_ratio
    return (absmax / divisor).to(scale_dtype)


def _fake_quant_math(w_OI, scale_OG, qmin: int, qmax: int, group_size: int):
    s = scale_OG.float()
    s = torch.where(s == 0, torch.ones_like(s), s).unsqueeze(-1)
    v = w_OI.float().unflatten(-1, (-1, group_size)) / s
    return (v.round().clamp(qmin, qmax) * s).flatten(-2).to(w_OI.dtype)


_COMPILED: dict[str, object] = {}


def _kernel(fn, cfg: QuantConfig, t: torch.Tensor):
    """Eager ops make ~10 passes over the weight; torch.compile fuses them into one read and one
    write (measured in scripts/bench/qat_overhead.py), bit-identical to eager. "auto" compiles
    on accelerators only, where it pays; on CPU the one-off compile costs tens of seconds."""
    use = cfg.kernel == "compiled" or (cfg.kernel == "auto" and t.device.type != "cpu")
    if not use:
        return fn
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


def absmax_scale(w_OI: torch.Tensor, cfg: QuantConfig, clip_ratio: torch.Tensor | None = None) -> torch.Tensor:
    """Per-group scale [..., O, G] in cfg.scale_dtype: absmax (times clip_ratio) / divisor."""
    w = w_OI.detach()
    return _kernel(_absmax_scale_math, cfg, w)(w, cfg.group_size, cfg.divisor, cfg.torch_scale_dtype, clip_ratio)


def safe_scale(scale_f32: torch.Tensor) -> torch.Tensor:
    # A zero scale means an all-zero group (or one too small for the scale dtype): its codes are 0.
    return torch.where(scale_f32 == 0, torch.ones_like(scale_f32), scale_f32)


def codes_from_scale(w_OI: torch.Tensor, scale_OG: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """Integer codes (int8, [..., O, I]) of w on the grid of cfg, for the given (rounded) scales."""
    g = cfg.group_size
    v = w_OI.detach().float().unflatten(-1, (-1, g)) / safe_scale(scale_OG.float()).unsqueeze(-1)
    return v.round_().clamp_(cfg.qmin, cfg.qmax).to(torch.int8).flatten(-2)


def dequantize_groups(codes_OI: torch.Tensor, scale_OG: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """w_hat = code * scale (computed in float32, exact for |code| <= 128 and a bf16/fp16 scale), cast to dtype."""
    w = codes_OI.float().unflatten(-1, (-1, group_size)) * scale_OG.float().unsqueeze(-1)
    return w.flatten(-2).to(dtype)


def quantize_groups(w_OI: torch.Tensor, cfg: QuantConfig, clip_ratio: torch.Tensor | None = None):
    """Round-to-nearest group quantization of w (absmax scales, optional per-group clip ratio).

    Returns (codes int8 [..., O, I], scale [..., O, G] in cfg.scale_dtype).
    """
    scale = absmax_scale(w_OI, cfg, clip_ratio)
    return codes_from_scale(w_OI, scale, cfg), scale


class FakeQuantSTE(torch.autograd.Function):
    """w -> code(w) * scale, with straight-through gradients.

    Forward: v = w / s, q = clamp(round(v), qmin, qmax), w_fq = q * s (float32 math, cast back).
    Backward w.r.t. w: identity where qmin <= v <= qmax, zero where clamped (identity everywhere if
    `clip_grad_mask` is False: the absmax observer never clips, up to scale rounding).
    Backward w.r.t. s (only when s requires grad, the LSQ observer): per group,
    sum(grad * (q - v)) inside the range, sum(grad * q) outside, times `scale_grad_factor`
    (LSQ's 1 / sqrt(group_size * qmax)). Nothing but w and s is saved: the backward recomputes v,
    so fake quant adds no activation memory.
    """

    @staticmethod
    def forward(ctx, w_OI, scale_OG, qmin, qmax, group_size, clip_grad_mask, scale_grad_factor, math_fn=_fake_quant_math):
        out = math_fn(w_OI, scale_OG, qmin, qmax, group_size)
        ctx.save_for_backward(w_OI, scale_OG)
        ctx.consts = (qmin, qmax, group_size, clip_grad_mask, scale_grad_factor)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        w_OI, scale_OG = ctx.saved_tensors
        qmin, qmax, group_size, clip_grad_mask, scale_grad_factor = ctx.consts
        need_w, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_w = grad_s = None
        if not (clip_grad_mask or need_s):
            return grad_out, None, None, None, None, None, None, None
        s = safe_scale(scale_OG.float()).unsqueeze(-1)
        v = w_OI.detach().float().unflatten(-1, (-1, group_size)) / s
        inside = (v >= qmin) & (v <= qmax)
        g = grad_out.float().unflatten(-1, (-1, group_size))
        if need_w:
            grad_w = (g * inside).flatten(-2).to(w_OI.dtype) if clip_grad_mask else grad_out
        if need_s:
            q = v.round().clamp(qmin, qmax)
            d = torch.where(inside, q - v, q)
            grad_s = ((g * d).sum(-1) * scale_grad_factor).to(scale_OG.dtype)
        return grad_w, grad_s, None, None, None, None, None, None


def fake_quant(w_OI: torch.Tensor, scale_OG: torch.Tensor, cfg: QuantConfig, *, clip_grad_mask: bool = True,
               scale_grad_factor: float = 1.0) -> torch.Tensor:
    """Differentiable fake quant of w_OI with the given scales (see FakeQuantSTE)."""
    math_fn = _kernel(_fake_quant_math, cfg, w_OI)
    return FakeQuantSTE.apply(w_OI, scale_OG, cfg.qmin, cfg.qmax, cfg.group_size, clip_grad_mask, scale_grad_factor, math_fn)


def sqnr_db(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when exact)."""
    w = w.detach().float()
    noise = (w - w_hat.detach().float()).pow(2).sum()
    signal = w.pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10.0 * torch.log10(signal / noise))
