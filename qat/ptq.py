"""Post-training quantization baselines on the routed experts, for the QAT comparison table.

Replaces running separate PTQ tools with their own model formats: each baseline quantizes the very
tensors QAT quantizes (QuantConfig.targets: the routed experts of a BF16/FP32 model), then writes
the dequantized weights back in place, so one evaluation loop scores every variant with the same
forward. The one idea: a baseline is "weights -> quantize -> dequantize" on expert tensors, nothing
else changes.

    rtn       round-to-nearest, absmax scales (K2 grid by default): what export_int4 of an untrained
              model gives, bit for bit
    rtn_mse   round-to-nearest with per-group clipping searched to minimise squared error
    nf4_b32   bitsandbytes NF4, blocksize 32, per expert (blocks run along the input dim, as groups)
    nf4_b64   the same, blocksize 64
    gptq      GPTQ with per-expert Hessians from the tokens the router sends each expert, on the
              same grid (qat/gptq.py); needs `calibration`. Written by hand: llm-compressor 0.14
              pins transformers<=5.17 / compressed-tensors 0.19, and handles no fused 3D experts.

GPTQ chooses its own scales, so recomputing absmax from its weights would move codes: its report
carries the scales, and `prepare_with_scales` puts them on the model as a "static" observer, so
`export_int4` writes exactly GPTQ's codes and scales.

    from qat.ptq import apply_ptq, prepare_with_scales
    report = apply_ptq(model, "rtn_mse")      # in place; report.sqnr_db per tensor
    report = apply_ptq(model, "gptq", QuantConfig(bits=4), calibration=[ids_BT, ...])
    prepare_with_scales(model, report); export_int4(model, out_dir)   # GPTQ's codes and scales
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import numerics
from .config import QuantConfig
from .fake_quant import PrepareReport, get_config, iter_quantized, prepare, quantizers_for
from .gptq import GPTQConfig

METHODS = ("rtn", "rtn_mse", "nf4_b32", "nf4_b64")
"""Methods that need nothing but the weights (what `ptq:` in an evaluation entry accepts)."""
CALIBRATED_METHODS = ("gptq",)
"""Methods that need calibration data: `apply_ptq(..., calibration=...)`, or `python -m train.ptq`."""


@dataclass
class PTQReport:
    method: str
    tensors: list[str] = field(default_factory=list)
    sqnr_db: dict[str, float] = field(default_factory=dict)
    num_params: int = 0
    quant_config: QuantConfig | None = None
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    """gptq: the scales it chose per tensor ([E, O, G], scale dtype, output-major), for the export."""
    rtn_fallback: list[str] = field(default_factory=list)
    """gptq: '<tensor>[<expert>]' of experts with fewer than min_tokens calibration tokens (RTN instead)."""
    tokens_per_expert: dict[str, list[int]] = field(default_factory=dict)
    """gptq: calibration tokens the router sent to each expert, per experts module."""
    calibration_tokens: int = 0

    @property
    def mean_sqnr_db(self) -> float:
        return sum(self.sqnr_db.values()) / max(len(self.sqnr_db), 1)


def _nf4_roundtrip(w_OI: torch.Tensor, blocksize: int) -> torch.Tensor:
    """bitsandbytes NF4 quantize -> dequantize of one [O, I] matrix (float32 in, float32 out).
    Blocks are `blocksize` consecutive elements of the row-major matrix: with I % blocksize == 0,
    exactly one group of `blocksize` input channels of one output row, like our INT4 groups."""
    from bitsandbytes import functional as bnbf

    q, state = bnbf.quantize_4bit(w_OI.contiguous(), blocksize=blocksize, quant_type="nf4")
    return bnbf.dequantize_4bit(q, state).to(torch.float32).reshape(w_OI.shape)


@torch.no_grad()
def apply_ptq(model: nn.Module, method: str, quant_config: QuantConfig | None = None, *,
              calibration: Iterable | None = None, gptq: GPTQConfig | None = None) -> PTQReport:
    """Quantize-dequantizes the target expert weights of `model` in place with a PTQ baseline.

    method: one of METHODS or CALIBRATED_METHODS. quant_config: targets, bits, group size and grid
    for the rtn methods and gptq (default QuantConfig(), K2's); the NF4 methods use its targets
    only. The model must not carry fake quant (apply PTQ to the BF16/FP32 model, not to a prepared
    one). gptq only: `calibration`, an iterable of token-id tensors ([T] or [B, T]) or batches
    (dicts with input_ids and optionally attention_mask / position_ids); `gptq`, its settings.
    """
    if method not in METHODS + CALIBRATED_METHODS:
        raise ValueError(f"apply_ptq: method={method!r}; choose one of {METHODS + CALIBRATED_METHODS}")
    if get_config(model) is not None:
        raise ValueError("apply_ptq: the model carries fake quant (qat.prepare); apply PTQ to a model without it")
    if method == "gptq" and calibration is None:
        raise ValueError("apply_ptq: method='gptq' needs calibration=<token-id tensors or batches> "
                         "(training data, never held-out tasks)")
    cfg = quant_config or QuantConfig()
    if method == "rtn_mse":
        cfg = dataclasses.replace(cfg, observer="mse")
    elif method in ("rtn", "gptq"):  # gptq takes the grid from cfg and chooses its own scales
        cfg = dataclasses.replace(cfg, observer="absmax")
    if method.startswith("nf4"):
        blocksize = int(method.split("_b")[1])
        cfg = dataclasses.replace(cfg, group_size=blocksize, observer="absmax")
    targets, _, _ = quantizers_for(model, cfg, "apply_ptq")  # what the export quantizes; checks group sizes
    report = PTQReport(method=method, quant_config=cfg)
    if method == "gptq":
        from .gptq import gptq_experts

        result = gptq_experts(model, targets, cfg, calibration, gptq or GPTQConfig())
        report.scales, report.rtn_fallback, report.sqnr_db = result.scales, result.rtn_fallback, result.sqnr_db
        report.tokens_per_expert, report.calibration_tokens = result.tokens_per_expert, result.calibration_tokens
        report.tensors = [t.name for t in targets]
        report.num_params = sum(getattr(t.module, t.attr).numel() for t in targets)
        return report
    for t in targets:
        param = getattr(t.module, t.attr)
        w_OI = t.fq.oriented(param.data).float()
        if method.startswith("nf4"):
            flat = w_OI.reshape(-1, *w_OI.shape[-2:])
            w_hat = torch.stack([_nf4_roundtrip(flat[i], blocksize) for i in range(flat.shape[0])]).reshape(w_OI.shape)
        else:
            codes, scale = t.fq.quantize(param.data)
            w_hat = numerics.dequantize_groups(codes, scale, cfg.group_size, torch.float32)
        report.sqnr_db[t.name] = numerics.sqnr_db(w_OI, w_hat)
        param.data.copy_(t.fq.oriented(w_hat).to(param.dtype))
        report.tensors.append(t.name)
        report.num_params += param.numel()
    return report


def prepare_with_scales(model: nn.Module, report: PTQReport) -> PrepareReport:
    """Fake quant on `model` holding the scales a PTQ method chose (report.scales), so that its
    forward is unchanged and export_int4 writes exactly the method's codes and scales.

    `model` is the one apply_ptq quantized: its expert weights are codes x scales already. The
    quantizers get observer "static" (scales held fixed) with report.scales loaded into them.
    """
    if not report.scales:
        raise ValueError(f"prepare_with_scales: the {report.method!r} report carries no scales; only methods "
                         f"that choose their own scales (gptq) need this, export the others directly")
    cfg = dataclasses.replace(report.quant_config, observer="static")
    prep = prepare(model, cfg)
    set_scales(model, report.scales)
    return prep


@torch.no_grad()
def set_scales(model: nn.Module, scales: dict[str, torch.Tensor]) -> int:
    """Loads per-tensor scales ([..., O, G], output-major) into the quantizers of a prepared model
    whose observer holds scales ("static", or "lsq" to start learning from them); returns how many."""
    n = 0
    for name, _, _, fq in iter_quantized(model):
        if name not in scales:
            continue
        if fq.cfg.observer not in ("static", "lsq"):
            raise ValueError(f"set_scales: QuantConfig.observer={fq.cfg.observer!r} computes its scales from the "
                             f"weights; use observer='static' (fixed) or 'lsq' (learned) to hold given scales")
        fq.scale.copy_(scales[name].to(fq.scale.dtype))
        n += 1
    return n
