"""INT4 quantization-aware training of MoE routed experts, and real INT4 checkpoints.

    from qat import QuantConfig, prepare, set_fake_quant
    report = prepare(model, QuantConfig())   # fake-quant INT4 on routed-expert weights, in place
    set_fake_quant(model, enabled=False)     # schedules, PTQ baselines
    export_int4(model, out_dir, tokenizer)   # real INT4 checkpoint, compressed-tensors pack-quantized
    model = load_int4(out_dir)               # INT4 runtime: packed weights, int4 matmul kernels

`qat` imports nothing else of this project (torch, transformers, safetensors only).
"""

from .config import DEFAULT_TARGETS, QuantConfig, quant_config_from
from .export import ExportIntegrityError, export_checkpoint_int4, export_int4, verify_export
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
from .load import convert_int4, expert_weight_bytes, load_int4, restore_bf16
from .ptq import apply_ptq

__all__ = [
    "DEFAULT_TARGETS",
    "ExportIntegrityError",
    "apply_ptq",
    "convert_int4",
    "expert_weight_bytes",
    "export_checkpoint_int4",
    "export_int4",
    "load_int4",
    "restore_bf16",
    "verify_export",
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
