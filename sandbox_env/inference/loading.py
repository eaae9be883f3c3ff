"""Any checkpoint the project makes, loaded as a model to decode: a HF dir (BF16/FP32), a QAT
training checkpoint (fake quant, exactly as trained) or an INT4 export (packed weights, int4
kernels); optionally with a calibration-free PTQ baseline applied in memory.

The one idea: the kind of a checkpoint is read from the files it holds (`checkpoint_kind`), so
evaluation, serving and the pipeline take a path and never a flag that could disagree with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qat.checkpoint import checkpoint_kind  # the one detector of checkpoint kinds (evaluate imports it from here)
from qat.config import DTYPES


@dataclass
class LoadedModel:
    """A checkpoint ready to decode: the model (eval mode), its tokenizer, and what kind it was."""

    model: Any
    tokenizer: Any
    kind: str  # "hf" (BF16/FP32 HF dir), "fake_quant" (QAT training checkpoint), "int4" (compressed-tensors)
    path: str


def load_policy_model(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
                      tokenizer_path: str | Path | None = None, ptq: str | None = None,
                      ptq_config: dict | None = None) -> LoadedModel:
    """Load any checkpoint the project makes as an evaluation model.

    - "hf": `AutoModelForCausalLM.from_pretrained`.
    - "fake_quant": the same, then `qat.prepare` with the saved QuantConfig and the saved observer
      state, so the evaluated model is exactly the fake-quant model training optimised; its
      fake-quant weights are then baked in (`qat.bake_fake_quant`: the same forward, computed once).
    - "int4": `qat.load.load_int4` (packed INT4 experts, int4 kernels).
    `dtype`: "float32" | "bfloat16" | "float16" | None (as saved). `ptq`: a `qat.ptq` method
    ("rtn", "rtn_mse", "nf4_b32", ...) applied in memory to the routed experts of an "hf"
    checkpoint: the post-training-quantization baselines of the comparison (kind "ptq:<method>")."""
    from transformers import AutoModelForCausalLM

    from data.tokenizer import load_tokenizer

    if dtype is None or dtype == "auto":
        torch_dtype = None  # as saved
    elif isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {list(DTYPES)} or null")
        torch_dtype = DTYPES[dtype]
    else:
        torch_dtype = dtype
    kind = checkpoint_kind(path)
    p = Path(path)
    if kind == "int4":
        from qat.load import load_int4

        model = load_int4(str(p), dtype=torch_dtype, device=device)
    else:
        if kind == "fake_quant":
            from qat import bake_fake_quant
            from qat.checkpoint import load_qat_checkpoint

            model = load_qat_checkpoint(p, dtype=torch_dtype or "auto").to(device)
            # The same forward with the fake-quant weights computed once, not at every decode step.
            bake_fake_quant(model)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype or "auto").to(device)
    if ptq:
        if kind != "hf":
            raise ValueError(f"ptq={ptq!r} applies to a dense HF checkpoint, but {str(p)!r} is a {kind} checkpoint; "
                             "point path at the BF16 model the baseline quantizes")
        from qat.ptq import METHODS, apply_ptq

        if ptq not in METHODS:
            raise ValueError(f"ptq={ptq!r} is not a calibration-free qat.ptq method; choose one of {list(METHODS)} "
                             f"(GPTQ: evaluate the checkpoint `python -m train.ptq` writes)")
        from qat import QuantConfig

        apply_ptq(model, ptq, QuantConfig(**ptq_config) if ptq_config else None)
        kind = f"ptq:{ptq}"
    model.eval()
    tok_dir = Path(tokenizer_path) if tokenizer_path else p
    if not any((tok_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"checkpoint {str(p)!r} has no tokenizer files; pass tokenizer_path= (the training "
                         "run's tokenizer dir)")
    return LoadedModel(model, load_tokenizer(tok_dir), kind, str(p))


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.bin) of a checkpoint dir: its size on disk as a model."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())
