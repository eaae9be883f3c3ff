"""INT4 quantization-aware training of MoE routed experts, and real INT4 checkpoints.

    from qat import QuantConfig, prepare, set_fake_quant
    report = prepare(model, QuantConfig())   # fake-quant INT4 on routed-expert weights, in place
    set_fake_quant(model, enabled=False)     # schedules, PTQ baselines

`qat` imports nothing else of this project (torch, transformers, safetensors only).
"""

from .config import DEFAULT_TARGETS, QuantConfig, quant_config_from
from .fake_quant import (
    ExpertWeightFakeQuant,
    PrepareReport,
    get_config,
    iter_quantized,
    prepare,
    quant_error_stats,
    refresh_observers,
    set_fake_quant,
)

__all__ = [
    "DEFAULT_TARGETS",
    "ExpertWeightFakeQuant",
    "PrepareReport",
    "QuantConfig",
    "quant_config_from",
    "get_config",
    "iter_quantized",
    "prepare",
    "quant_error_stats",
    "refresh_observers",
    "set_fake_quant",
]
