"""INT4 quantization-aware training of MoE routed experts, and real INT4 checkpoints.

    from qat import QuantConfig, prepare, set_fake_quant
    report = prepare(model, QuantConfig())   # fake-quant INT4 on routed-expert weights, in place
    set_fake_quant(model, enabled=False)     # schedules, PTQ baselines
    export_int4(model, out_dir, tokenizer)   # real INT4 checkpoint, compressed-tensors pack-quantized
    model = load_int4(out_dir)               # INT4 runtime: packed weights, int4 matmul kernels

`qat` imports nothing else of this project (torch, transformers, safetensors only).
"""

from .config import DEFAULT_TARGETS, QuantConfig, quant_config_from
from .fake_quant import (
    ExpertWeightFakeQuant,
    PrepareReport,
    bake_fake_quant,
    get_config,
    iter_quantized,
    prepare,
    quant_error_stats,
    refresh_observers,
    set_fake_quant,
)
from .targets import match_targets

# Export, runtime and PTQ load on first use: `import qat` stays light, and `python -m qat.export`
# does not find its own module already imported by the package.
_LAZY = {
    "export_checkpoint_int4": "export", "export_int4": "export",
    "ExportIntegrityError": "files", "verify_export": "files",
    "checkpoint_kind": "checkpoint", "load_qat_checkpoint": "checkpoint", "write_qat_checkpoint": "checkpoint",
    "convert_int4": "load", "expert_weight_bytes": "load", "load_int4": "load", "restore_bf16": "load",
    "apply_ptq": "ptq",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'qat' has no attribute {name!r}")

__all__ = [
    "DEFAULT_TARGETS",
    "ExportIntegrityError",
    "apply_ptq",
    "bake_fake_quant",
    "checkpoint_kind",
    "convert_int4",
    "expert_weight_bytes",
    "export_checkpoint_int4",
    "export_int4",
    "load_int4",
    "load_qat_checkpoint",
    "restore_bf16",
    "verify_export",
    "write_qat_checkpoint",
    "ExpertWeightFakeQuant",
    "PrepareReport",
    "QuantConfig",
    "quant_config_from",
    "get_config",
    "iter_quantized",
    "match_targets",
    "prepare",
    "quant_error_stats",
    "refresh_observers",
    "set_fake_quant",
]
