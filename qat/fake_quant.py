"""Fake-quant INT4 on the routed-expert weights of transformers MoE models: `prepare` and friends.

transformers v5 stores each layer's routed experts as fused 3D parameters
(`experts.gate_up_proj [E, 2I, H]`, `experts.down_proj [E, H, I]`; GPT-OSS transposed,
`[E, H, 2I]` / `[E, I, H]`, with biases) and runs them through one of several implementations
(eager loop, batched_mm, grouped_mm). torchao's QAT swaps nn.Linear only and silently leaves these
in full precision. Here the experts module itself is wrapped: its forward computes each target
tensor's fake quant ONCE, then runs the model's own experts implementation on a view of the module
whose weight attributes return the fake-quant tensors. Every implementation (and any registered
later) sees quantized weights, parameter names and the state dict stay those of the model, and
the eager path's per-expert indexing costs no extra quantization.

Models that keep one nn.Linear per expert are handled the same way at the Linear.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from . import numerics
from .config import QuantConfig
from .targets import match_targets, unmatched_patterns

log = logging.getLogger(__name__)

_QAT_ATTR = "_agentic_qat_config"
"""Attribute of a prepared model holding its QuantConfig (get_config reads it, remove_fake_quant drops it)."""


class ExpertWeightFakeQuant(nn.Module):
    """Fake quantizer of one expert weight tensor (3D fused experts or a 2D per-expert Linear).

    Holds the observer state: nothing for `absmax` (scales from the live weight every forward),
    per-group clipping ratios for `mse`, learned per-group scales for `lsq`, fixed per-group scales
    (a buffer in scale_dtype) for `static`. `transposed` says the storage is input-major
    ([E, I, O], GPT-OSS); quantization always groups along the input dim.
    """

    def __init__(self, cfg: QuantConfig, weight: torch.Tensor, transposed: bool, name: str = ""):
        super().__init__()
        self.cfg = cfg
        self.transposed = transposed
        self.name = name
        self.enabled = True
        w_OI = self.oriented(weight)
        numerics.check_groupable(name, tuple(weight.shape), w_OI.shape[-1], cfg.group_size)
        groups_shape = (*w_OI.shape[:-1], w_OI.shape[-1] // cfg.group_size)
        if cfg.observer == "mse":
            self.register_buffer("clip_ratio", torch.ones(groups_shape, dtype=torch.float32, device=weight.device))
            self.refresh(weight)
        elif cfg.observer == "lsq":
            init = numerics.absmax_scale(w_OI, cfg).float()
            self.scale = nn.Parameter(init.clamp_min(torch.finfo(torch.float32).tiny))
        elif cfg.observer == "static":
            self.register_buffer("scale", numerics.absmax_scale(w_OI.detach(), cfg))

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{self.name}: int{c.bits} g{c.group_size} grid={c.grid} observer={c.observer} transposed={self.transposed}"

    def oriented(self, w: torch.Tensor) -> torch.Tensor:
        return w.transpose(-1, -2) if self.transposed else w

    def scale_for(self, w_OI: torch.Tensor) -> torch.Tensor:
        """Scales [..., O, G] for the oriented weight, rounded to cfg.scale_dtype (returned as that dtype,
        except for lsq where a float32 tensor holding scale_dtype values carries the gradient)."""
        cfg = self.cfg
        if cfg.observer == "absmax":
            return numerics.absmax_scale(w_OI, cfg)
        if cfg.observer == "mse":
            return numerics.absmax_scale(w_OI, cfg, self.clip_ratio)
        if cfg.observer == "static":
            return self.scale
        s = self.scale.abs().clamp_min(torch.finfo(torch.float32).tiny)
        return s + (s.to(cfg.torch_scale_dtype).float() - s).detach()  # round to scale dtype, straight-through

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The fake-quant weight, in the storage layout of `weight`."""
        cfg = self.cfg
        w_OI = self.oriented(weight)
        scale = self.scale_for(w_OI)
        if cfg.observer == "lsq":
            factor = 1.0 / math.sqrt(cfg.group_size * cfg.qmax)
            out = numerics.fake_quant(w_OI, scale, cfg, clip_grad_mask=True, scale_grad_factor=factor)
        else:
            out = numerics.fake_quant(w_OI, scale, cfg, clip_grad_mask=cfg.observer != "absmax")
        return out.transpose(-1, -2) if self.transposed else out

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor):
        """(codes int8 [..., O, I], scale [..., O, G] in cfg.scale_dtype), oriented output-major."""
        w_OI = self.oriented(weight)
        scale = self.scale_for(w_OI).to(self.cfg.torch_scale_dtype)
        return numerics.codes_from_scale(w_OI, scale, self.cfg), scale

    @torch.no_grad()
    def refresh(self, weight: torch.Tensor) -> None:
        """mse observer: per group, the clipping ratio in cfg.mse_ratios with the least squared error."""
        if self.cfg.observer != "mse":
            return
        cfg = self.cfg
        w_OI = self.oriented(weight).detach()
        # One expert (leading index) at a time keeps the search's temporaries small on real sizes.
        flat_w = w_OI.reshape(-1, *w_OI.shape[-2:])
        flat_ratio = self.clip_ratio.view(-1, *self.clip_ratio.shape[-2:])
        for i in range(flat_w.shape[0]):
            w = flat_w[i].float()
            best_err = torch.full(flat_ratio.shape[1:], float("inf"), device=w.device)
            best_ratio = torch.ones_like(best_err)
            for r in cfg.mse_ratios:
                ratio = torch.full_like(best_err, r)
                codes, scale = numerics.quantize_groups(w, cfg, ratio)
                w_hat = numerics.dequantize_groups(codes, scale, cfg.group_size, torch.float32)
                err = (w - w_hat).pow(2).unflatten(-1, (-1, cfg.group_size)).sum(-1)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_ratio = torch.where(better, ratio, best_ratio)
            flat_ratio[i].copy_(best_ratio)


class _QuantizedView:
    """Stands in for an experts module inside its own forward: target attributes return the
    fake-quant tensors computed once for this call, everything else is the module's."""

    __slots__ = ("_module", "_overrides")

    def __init__(self, module: nn.Module, overrides: dict[str, torch.Tensor]):
        object.__setattr__(self, "_module", module)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_module"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_module"), name, value)


def _fake_quant_experts_forward(self, *args, **kwargs):
    quantizers = self.weight_fake_quant
    overrides = {attr: fq(getattr(self, attr)) for attr, fq in quantizers.items() if fq.enabled}
    base_forward = type(self).__mro__[1].forward
    if not overrides:
        return base_forward(self, *args, **kwargs)
    return base_forward(_QuantizedView(self, overrides), *args, **kwargs)


def _fake_quant_linear_forward(self, input):
    fq = self.weight_fake_quant["weight"]
    weight = fq(self.weight) if fq.enabled else self.weight
    return F.linear(input, weight, self.bias)


_SUBCLASSES: dict[type, type] = {}


def _with_fake_quant(module: nn.Module) -> None:
    """Swaps the module's class for a subclass whose forward applies the fake quant (once per call)."""
    cls = type(module)
    if cls not in _SUBCLASSES:
        forward = _fake_quant_linear_forward if isinstance(module, nn.Linear) else _fake_quant_experts_forward
        _SUBCLASSES[cls] = type(f"FakeQuant{cls.__name__}", (cls,), {"forward": forward, "_agentic_qat_base": cls})
    module.__class__ = _SUBCLASSES[cls]


@dataclass
class PrepareReport:
    """What prepare() did: the quantized parameter names and shapes, and what was left alone."""

    config: QuantConfig
    quantized: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    num_params: int = 0
    total_params: int = 0
    unmatched: list[str] = field(default_factory=list)
    """Target patterns that matched no parameter (a typo, or a family without such tensors)."""

    def summary(self) -> str:
        share = 100.0 * self.num_params / max(self.total_params, 1)
        c = self.config
        lines = [
            f"INT{c.bits} fake quant (group {c.group_size}, grid {c.grid}, observer {c.observer}, scales {c.scale_dtype}): "
            f"{len(self.quantized)} tensors, {self.num_params:,} of {self.total_params:,} parameters ({share:.1f}%)"
        ]
        lines += [f"  {n} {list(self.shapes[n])}" for n in self.quantized]
        if self.unmatched:
            lines.append(f"  patterns that matched nothing: {self.unmatched}")
        return "\n".join(lines)


def prepare(model: nn.Module, cfg: QuantConfig | None = None) -> PrepareReport:
    """Puts INT4 fake quant on the target (by default routed-expert) weights of `model`, in place.

    Raises ValueError if the model was prepared already, if no parameter matches cfg.targets
    (listing candidate names), if a match is not an expert weight, or if group_size does not
    divide a target's input dim.
    """
    cfg = cfg or QuantConfig()
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"prepare(model, cfg): cfg must be a qat.QuantConfig, got {type(cfg).__name__}")
    if getattr(model, _QAT_ATTR, None) is not None:
        raise ValueError("prepare() was already applied to this model; build a fresh model to prepare it again")
    targets = match_targets(model, cfg)
    report = PrepareReport(config=cfg, total_params=sum(p.numel() for p in model.parameters()))
    # Validate every target before touching the model, so a bad config leaves it unchanged.
    quantizers = [ExpertWeightFakeQuant(cfg, t.param.data, t.transposed, name=t.name) for t in targets]
    for t, fq in zip(targets, quantizers):
        if not hasattr(t.module, "weight_fake_quant"):
            t.module.weight_fake_quant = nn.ModuleDict()
            _with_fake_quant(t.module)
        t.module.weight_fake_quant[t.attr] = fq
        report.quantized.append(t.name)
        report.shapes[t.name] = tuple(t.param.shape)
        report.num_params += t.param.numel()
    report.unmatched = unmatched_patterns(targets, cfg)
    setattr(model, _QAT_ATTR, cfg)
    log.info(report.summary().splitlines()[0])
    return report


def get_config(model: nn.Module) -> QuantConfig | None:
    """The QuantConfig the model was prepared with, or None."""
    return getattr(model, _QAT_ATTR, None)


class Quantized(NamedTuple):
    """A quantized tensor with its quantizer: `getattr(module, attr)`, named `name`, quantized by `fq`."""

    name: str
    module: nn.Module
    attr: str
    fq: ExpertWeightFakeQuant


def iter_quantized(model: nn.Module) -> Iterator[Quantized]:
    """(parameter name, owning module, attribute name, quantizer) for every fake-quantized tensor."""
    for mod_name, module in model.named_modules():
        quantizers = getattr(module, "weight_fake_quant", None)
        if not isinstance(quantizers, nn.ModuleDict):
            continue
        for attr, fq in quantizers.items():
            yield Quantized((f"{mod_name}.{attr}" if mod_name else attr), module, attr, fq)


def quantizers_for(model: nn.Module, quant_config: QuantConfig | None,
                   what: str = "export_int4") -> tuple[list[Quantized], QuantConfig, str]:
    """The tensors to quantize and how, for the export and the PTQ baselines: the model's own fake
    quantizers if it was prepared (source "fake_quant"), else fresh quantizers of quant_config
    (default QuantConfig(): RTN absmax, K2 grid) on the tensors match_targets selects, the model left
    unprepared (source "rtn_<observer>"). Returns (tensors, config, source)."""
    prepared_cfg = get_config(model)
    if prepared_cfg is not None:
        if quant_config is not None and quant_config != prepared_cfg:
            raise ValueError(f"{what}: the model was prepared with a QuantConfig that differs from the "
                             f"quant_config passed; the export uses the model's fake quantizers, so pass "
                             f"quant_config=None (or the same config)")
        return list(iter_quantized(model)), prepared_cfg, "fake_quant"
    cfg = quant_config or QuantConfig()
    tensors = [Quantized(t.name, t.module, t.attr, ExpertWeightFakeQuant(cfg, t.param.data, t.transposed, t.name))
               for t in match_targets(model, cfg)]
    return tensors, cfg, f"rtn_{cfg.observer}"


def remove_fake_quant(model: nn.Module) -> None:
    """Undoes prepare: every quantizer is dropped and its module gets its own class back."""
    _require_prepared(model, "remove_fake_quant")
    for module in model.modules():
        if isinstance(getattr(module, "weight_fake_quant", None), nn.ModuleDict):
            delattr(module, "weight_fake_quant")
        base = getattr(type(module), "_agentic_qat_base", None)
        if base is not None:
            module.__class__ = base
    delattr(model, _QAT_ATTR)


@torch.no_grad()
def bake_fake_quant(model: nn.Module) -> int:
    """Writes every enabled fake-quant weight into its parameter, then removes the quantizers.

    The model then computes exactly what the fake-quant model computed (the forward used those very
    tensors), without quantizing its experts again on every call: for decoding a QAT checkpoint in
    evaluation or serving, where each step is one forward. Training, export and observer refreshes
    need the quantizers and the unquantized weights, so bake a copy, never the model being trained.
    Returns how many tensors were baked."""
    _require_prepared(model, "bake_fake_quant")
    n = 0
    for _, module, attr, fq in iter_quantized(model):
        if fq.enabled:
            weight = getattr(module, attr)
            weight.copy_(fq(weight))
            n += 1
    remove_fake_quant(model)
    return n


def _require_prepared(model: nn.Module, what: str) -> None:
    if get_config(model) is None:
        raise ValueError(f"{what}: the model has no fake quant; call qat.prepare(model, QuantConfig()) first")


def set_fake_quant(model: nn.Module, enabled: bool) -> int:
    """Turns the fake quant of every quantized tensor on or off; returns how many were switched."""
    _require_prepared(model, "set_fake_quant")
    n = 0
    for _, _, _, fq in iter_quantized(model):
        fq.enabled = bool(enabled)
        n += 1
    return n


@torch.no_grad()
def refresh_observers(model: nn.Module) -> int:
    """Re-searches the mse observers' clipping ratios on the current weights; returns how many."""
    _require_prepared(model, "refresh_observers")
    n = 0
    for _, module, attr, fq in iter_quantized(model):
        if fq.cfg.observer == "mse":
            fq.refresh(getattr(module, attr))
            n += 1
    return n


@torch.no_grad()
def quant_error_stats(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per quantized tensor: SQNR (dB) of its fake-quant weight, and the share of codes at the grid's ends."""
    _require_prepared(model, "quant_error_stats")
    stats = {}
    for name, module, attr, fq in iter_quantized(model):
        w = getattr(module, attr)
        codes, scale = fq.quantize(w)
        w_hat = numerics.dequantize_groups(codes, scale, fq.cfg.group_size, torch.float32)
        w_OI = fq.oriented(w)
        stats[name] = {
            "sqnr_db": numerics.sqnr_db(w_OI, w_hat),
            "clipped_frac": float(((codes == fq.cfg.qmin) | (codes == fq.cfg.qmax)).float().mean()),
        }
    return stats
