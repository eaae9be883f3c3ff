"""The QAT training checkpoint format: written by the training job, read by the export and evaluation.

A training checkpoint of a fake-quant model is a Hugging Face model directory (config.json,
safetensors in the hub layout, tokenizer) that any transformers code loads as the dense model,
plus two files beside it:

    qat_config.json          QuantConfig.to_dict(): how the experts were fake-quantized
    qat_state.safetensors    observer state: mse clipping ratios, lsq learned scales
                             (keys `...weight_fake_quant.<attr>.clip_ratio` / `.scale`)

The one idea: the fake quant is data beside an ordinary checkpoint, not a format of its own. So
the dense weights stay loadable by everything, and the fake-quant model training optimised is
`prepare(from_pretrained(dir), saved config)` plus the saved observer state, bit for bit. This
module owns the format: `write_qat_checkpoint` (the trainer), `load_qat_checkpoint` (export,
evaluation), and `checkpoint_kind`, which tells the checkpoints the project makes apart by their files.

    write_qat_checkpoint(out_dir, model, quant_config, state_dict=sd, tokenizer=tok)
    model = load_qat_checkpoint("runs/x/checkpoints/step_000100")
    checkpoint_kind(path)   # "int4" | "fake_quant" | "hf"
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .fake_quant import prepare

log = logging.getLogger(__name__)

QAT_CONFIG_FILE = "qat_config.json"
"""A training checkpoint's QuantConfig (QuantConfig.to_dict()); its presence means "export the QAT
model": the job prepares the model with it and restores the observer state before exporting."""
QAT_STATE_FILE = "qat_state.safetensors"
"""The fake quantizers' observer state, apart from the model's own safetensors."""
OBSERVER_KEY = ".weight_fake_quant."
"""What every observer-state key contains (the quantizers live under `<experts>.weight_fake_quant`)."""


def write_qat_checkpoint(out_dir: str | os.PathLike, model: nn.Module, quant_config: QuantConfig | None, *,
                         state_dict: dict[str, torch.Tensor] | None = None, tokenizer: Any = None) -> None:
    """Writes `model` as a Hugging Face model dir in `out_dir`, with its QAT config and observer state.

    state_dict: the full state dict to save (default model.state_dict(); under ZeRO-3 the gathered
    one); its observer tensors go to qat_state.safetensors, the rest through save_pretrained.
    quant_config None (no QAT): a plain Hugging Face model dir.
    """
    out = Path(out_dir)
    state_dict = model.state_dict() if state_dict is None else state_dict
    hf_sd = {k: v for k, v in state_dict.items() if OBSERVER_KEY not in k}
    qat_sd = {k: v.contiguous() for k, v in state_dict.items() if OBSERVER_KEY in k}
    model.save_pretrained(out, state_dict=hf_sd, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if quant_config is not None:
        # exactly QuantConfig.to_dict(): `python -m qat.export` and evaluation read it back
        (out / QAT_CONFIG_FILE).write_text(json.dumps(quant_config.to_dict(), indent=2))
        if qat_sd:
            from safetensors.torch import save_file

            save_file(qat_sd, str(out / QAT_STATE_FILE))


def read_quant_config(path: str | os.PathLike) -> QuantConfig | None:
    """The QuantConfig a training checkpoint was trained with, or None if it has no fake quant."""
    f = Path(path) / QAT_CONFIG_FILE
    return QuantConfig.from_dict(json.loads(f.read_text())) if f.is_file() else None


def observer_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Fake-quant observer tensors saved with a training checkpoint, from any of its safetensors
    files (qat_state.safetensors; older checkpoints kept them in the model files)."""
    from safetensors import safe_open

    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                if OBSERVER_KEY in key:
                    state[key] = sf.get_tensor(key)
    return state


def load_qat_checkpoint(path: str | os.PathLike, dtype: Any = "auto") -> nn.Module:
    """A training checkpoint with fake quant (config.json + safetensors + qat_config.json), loaded
    as the fake-quant model training optimised: `prepare` with the saved QuantConfig, then the saved
    observer state (mse clipping ratios, lsq scales) on top."""
    from transformers import AutoModelForCausalLM

    src = Path(path)
    quant_config = read_quant_config(src)
    if quant_config is None:
        raise ValueError(f"checkpoint {str(src)!r} has no {QAT_CONFIG_FILE}: it is not a QAT training checkpoint "
                         f"(load it with transformers' from_pretrained)")
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
    prepare(model, quant_config)
    observers = observer_state(src)
    if observers:
        result = model.load_state_dict(observers, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"checkpoint {str(src)!r}: observer state does not fit the prepared model: "
                             f"{result.unexpected_keys[:5]}")
    log.info("QAT checkpoint %s: %d observer tensors restored", src, len(observers))
    return model


def checkpoint_kind(path: str | os.PathLike) -> str:
    """What a checkpoint directory holds, from the files present: "int4" when config.json has a
    compressed-tensors quantization_config (an INT4 export), "fake_quant" when a qat_config.json
    sits beside the weights (a QAT training checkpoint), "hf" otherwise (a dense model dir)."""
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"checkpoint path={str(p)!r} has no config.json; point it at a Hugging Face model dir, "
                         "a training checkpoint (runs/.../step_000100) or an INT4 export dir")
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors":
        return "int4"
    if (p / QAT_CONFIG_FILE).is_file():
        return "fake_quant"
    return "hf"
