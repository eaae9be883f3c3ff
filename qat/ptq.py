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

GPTQ through llm-compressor is not here: llm-compressor 0.14.0.1 (the newest on PyPI when this was
written) pins transformers<=5.17 and compressed-tensors==0.19, below this project's 5.24 / 0.20.1.

    from qat.ptq import apply_ptq
    report = apply_ptq(model, "rtn_mse")      # in place; report.sqnr_db per tensor
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from . import numerics
from .config import QuantConfig
from .fake_quant import get_config

METHODS = ("rtn", "rtn_mse", "nf4_b32", "nf4_b64")


@dataclass
class PTQReport:
    method: str
    tensors: list[str] = field(default_factory=list)
    sqnr_db: dict[str, float] = field(default_factory=dict)
    num_params: int = 0

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
def apply_ptq(model: nn.Module, method: str, quant_config: QuantConfig | None = None) -> PTQReport:
    """Quantize-dequantizes the target expert weights of `model` in place with a PTQ baseline.

    method: one of METHODS. quant_config: targets, group size and grid for the rtn methods
    (default QuantConfig(), K2's); the NF4 methods use its targets only. The model must not carry
    fake quant (apply PTQ to the BF16/FP32 model, not to a prepared one).
    """
    from .export import _targets  # the same target matching as the export

    if method not in METHODS:
        raise ValueError(f"apply_ptq: method={method!r}; choose one of {METHODS} (GPTQ: see qat/ptq.py docstring)")
    if get_config(model) is not None:
        raise ValueError("apply_ptq: the model carries fake quant (qat.prepare); apply PTQ to a model without it")
    cfg = quant_config or QuantConfig()
    if method == "rtn_mse":
        cfg = dataclasses.replace(cfg, observer="mse")
    elif method == "rtn":
        cfg = dataclasses.replace(cfg, observer="absmax")
    if method.startswith("nf4"):
        blocksize = int(method.split("_b")[1])
        cfg = dataclasses.replace(cfg, group_size=blocksize, observer="absmax")
    targets, _, _ = _targets(model, cfg)  # validates group size against every target
    report = PTQReport(method=method)
    for t in targets:
        param = getattr(t.module, t.attr)
        w_OI = t.fq._oriented(param.data).float()
        if method.startswith("nf4"):
            flat = w_OI.reshape(-1, *w_OI.shape[-2:])
            w_hat = torch.stack([_nf4_roundtrip(flat[i], blocksize) for i in range(flat.shape[0])]).reshape(w_OI.shape)
        else:
            codes, scale = t.fq.quantize(param.data)
            w_hat = numerics.dequantize_groups(codes, scale, cfg.group_size, torch.float32)
        report.sqnr_db[t.name] = numerics.sqnr_db(w_OI, w_hat)
        param.data.copy_(t.fq._oriented(w_hat).to(param.dtype))
        report.tensors.append(t.name)
        report.num_params += param.numel()
    return report
