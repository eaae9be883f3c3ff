"""Load compressed-tensors INT4 MoE checkpoints: the INT4 runtime (`load_int4`) and BF16 restore.

Replaces loading through transformers' compressed-tensors path, which dequantizes every expert to
bf16 at load (4x the memory, bf16 matmuls). Here the routed experts stay packed: each experts
module of the transformers model keeps its router, gating and biases, loses its fused
`gate_up_proj`/`down_proj` parameters, gains `gate_up_int4`/`down_int4` (qat.int4.Int4Weight), and
runs through the `qat_int4` experts implementation registered with transformers. So `generate()`,
caches and our rollout loop all work unchanged, on int4 kernels.

The one idea: the loader is export_int4 run backwards with the same name oracle
(`qat.layout.hub_layout`, i.e. transformers' own conversion mapping), so whatever layout we
write, or any compressed-tensors producer writes for these families (llm-compressor,
Kimi-K2-Thinking), is read back without per-family code.

    from qat import load_int4, restore_bf16
    model = load_int4("out/int4", dtype=torch.bfloat16)   # packed experts, int4 kernels
    model = restore_bf16("out/int4")                       # dense experts (q * scale), to train on
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .files import INDEX_FILE, PROVENANCE_KEY, SINGLE_FILE, verify_export
from .int4 import Int4Linear, Int4Weight, dequantize_int4, register_experts_implementation
from .layout import RowSlice, hub_layout, skeleton

log = logging.getLogger(__name__)

VERIFY = ("hash", "size", "none")


# --- the checkpoint's quantization scheme ------------------------------------------------------


def int4_scheme(quantization_config: dict[str, Any] | None, where: str) -> dict[str, Any]:
    """The weights args of the checkpoint's INT4 config group, validated: pack-quantized, 4-bit int,
    symmetric, group strategy. Raises ValueError naming the field and value otherwise."""
    if not quantization_config:
        raise ValueError(f"{where}: config.json has no quantization_config; this is not a compressed-tensors "
                         f"checkpoint (load a dense model with transformers' from_pretrained instead)")
    qc = quantization_config
    if qc.get("quant_method") != "compressed-tensors":
        raise ValueError(f"{where}: quantization_config.quant_method={qc.get('quant_method')!r}; only "
                         f"'compressed-tensors' checkpoints are read by load_int4")
    groups = qc.get("config_groups") or {}
    if not groups:
        raise ValueError(f"{where}: quantization_config.config_groups is empty")
    # Mixed configs (e.g. FP8 attention + INT4 experts) are out of scope: every group must be ours.
    schemes = []
    for gname, group in groups.items():
        fmt = group.get("format") or qc.get("format")
        w = group.get("weights") or {}
        checks = [("format", fmt, "pack-quantized"), ("weights.num_bits", w.get("num_bits"), 4),
                  ("weights.type", w.get("type"), "int"), ("weights.symmetric", w.get("symmetric"), True),
                  ("weights.strategy", w.get("strategy"), "group")]
        for field, value, want in checks:
            if value != want:
                raise ValueError(f"{where}: quantization_config.config_groups.{gname}.{field}={value!r}; load_int4 "
                                 f"reads symmetric INT4 group weights ({field}={want!r}) only")
        if w.get("actorder") not in (None, "static", False):
            raise ValueError(f"{where}: config_groups.{gname}.weights.actorder={w.get('actorder')!r}: activation "
                             f"reordering (g_idx) is not supported; export without actorder")
        if group.get("input_activations") or group.get("output_activations"):
            raise ValueError(f"{where}: config_groups.{gname} quantizes activations; load_int4 runs weight-only INT4")
        schemes.append(w)
    sizes = {w.get("group_size") for w in schemes}
    if len(sizes) != 1 or not isinstance(next(iter(sizes)), int):
        raise ValueError(f"{where}: config groups use group sizes {sorted(map(str, sizes))}; one integer group_size "
                         f"is required")
    return schemes[0]


# --- reading safetensors by name ---------------------------------------------------------------


class _Checkpoint:
    """Tensors of a (sharded) safetensors checkpoint by name, files opened lazily."""

    def __init__(self, path: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        index = path / INDEX_FILE
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (path / SINGLE_FILE).exists():
            with safe_open(str(path / SINGLE_FILE), framework="pt") as f:
                weight_map = {k: SINGLE_FILE for k in f.keys()}
        else:
            raise ValueError(f"{path}: neither {INDEX_FILE} nor {SINGLE_FILE} found; not a safetensors checkpoint")
        for fname in set(weight_map.values()):
            if not (path / fname).exists():
                raise ValueError(f"{path}: {fname} is named in {INDEX_FILE} but missing; the checkpoint is incomplete")
        self.path, self.weight_map = path, weight_map
        self._handles: dict[str, Any] = {}
        self.used: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.weight_map

    def get(self, key: str) -> torch.Tensor:
        fname = self.weight_map[key]
        if fname not in self._handles:
            self._handles[fname] = self._safe_open(str(self.path / fname), framework="pt")
        self.used.add(key)
        return self._handles[fname].get_tensor(key)

    def close(self) -> None:
        self._handles.clear()


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    # setattr of a Parameter re-registers the parameter; of a tensor over a buffer, replaces the buffer
    setattr(module, attr, nn.Parameter(value, requires_grad=False) if attr in dict(module.named_parameters(recurse=False))
            else value)


# --- the loader --------------------------------------------------------------------------------


def _load(path: str | os.PathLike, *, dtype: torch.dtype | None, device: str | torch.device, backend: str,
          verify: str, dequantize: bool) -> nn.Module:
    from transformers import AutoConfig, GenerationConfig

    where = "load_int4" if not dequantize else "restore_bf16"
    d = Path(path)
    if not (d / "config.json").exists():
        raise ValueError(f"{where}: {str(d)!r} has no config.json; point it at an INT4 export directory")
    if verify not in VERIFY:
        raise ValueError(f"{where}: verify={verify!r}; choose one of {VERIFY}")
    if verify != "none":
        verify_export(d, hashes=verify == "hash")
    config = AutoConfig.from_pretrained(str(d))
    qc = getattr(config, "quantization_config", None)
    scheme = int4_scheme(qc if isinstance(qc, dict) else getattr(qc, "to_dict", lambda: None)(), f"{where}({d})")
    group_size = scheme["group_size"]
    del config.quantization_config
    if hasattr(config, PROVENANCE_KEY):
        delattr(config, PROVENANCE_KEY)
    if dtype is None:
        dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else torch.float32
    device = torch.device(device)

    model = skeleton(config, dtype)
    if device.type != "cpu":  # the real buffers; parameters are still meta and are placed as they load
        for module in model.modules():
            for key, buf in list(module.named_buffers(recurse=False)):
                setattr(module, key, buf.to(device))
    ckpt = _Checkpoint(d)
    state = model.state_dict(keep_vars=True)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    layout = hub_layout(model, shapes)

    num_int4, num_dense_fallback = 0, 0
    for name, where_ in layout.items():
        target = state[name]
        if isinstance(where_, list):  # a fused expert tensor, one hub tensor per expert (and per gate/up)
            first = where_[0]
            base = first.hub_key[: -len(".weight")]
            if f"{base}.weight_packed" in ckpt:
                packed, scale, in_features = _assemble_packed(ckpt, where_, shapes[name], name)
                module_name, _, attr = name.rpartition(".")
                module = model.get_submodule(module_name)
                if getattr(module, "is_transposed", False):
                    raise ValueError(f"{where}: {name} is stored transposed; INT4 experts need output-major storage")
                if dequantize:
                    w = dequantize_int4(packed, scale, group_size, dtype, in_features)
                    setattr(module, attr, nn.Parameter(w.to(device), requires_grad=True))
                else:
                    delattr(module, attr)
                    setattr(module, attr.replace("_proj", "_int4"),
                            Int4Weight(packed.to(device), scale.to(device), group_size, in_features, backend))
                num_int4 += 1
            else:
                parts = []
                for s in where_:
                    if s.hub_key not in ckpt:
                        raise ValueError(f"{where}: {s.hub_key} (part of {name}) is missing from the checkpoint in {d}")
                    parts.append((s, ckpt.get(s.hub_key)))
                w = torch.empty(shapes[name], dtype=dtype)
                for s, t in parts:
                    w[s.expert, s.r0:s.r1] = t
                _set_tensor(model, name, w.to(device))
            continue
        hub_key = where_
        if hub_key in ckpt:
            t = ckpt.get(hub_key)
            _set_tensor(model, name, (t.to(dtype) if t.is_floating_point() else t).to(device))
        elif name.endswith(".weight") and f"{hub_key[: -len('.weight')]}.weight_packed" in ckpt:
            # A dense Linear that another producer quantized too (e.g. attention in llm-compressor's default).
            base = hub_key[: -len(".weight")]
            module_name = name[: -len(".weight")]
            module = model.get_submodule(module_name)
            if not isinstance(module, nn.Linear):
                raise ValueError(f"{where}: {base} is INT4 in the checkpoint but {module_name} is a "
                                 f"{type(module).__name__}, not a Linear; cannot run it")
            packed, scale = ckpt.get(f"{base}.weight_packed"), ckpt.get(f"{base}.weight_scale")
            in_features = int(ckpt.get(f"{base}.weight_shape")[1]) if f"{base}.weight_shape" in ckpt else module.in_features
            if dequantize:
                _set_tensor(model, name, dequantize_int4(packed, scale, group_size, dtype, in_features).to(device))
            else:
                bias = None
                if module.bias is not None:
                    bias_key = layout[f"{module_name}.bias"]
                    bias = ckpt.get(bias_key).to(dtype).to(device)
                weight = Int4Weight(packed[None].to(device), scale[None].to(device), group_size, in_features, backend)
                model.set_submodule(module_name, Int4Linear(weight, bias))
                state.pop(f"{module_name}.bias", None)
            num_dense_fallback += 1
        elif not target.is_meta:
            pass  # a computed buffer the checkpoint need not hold
    ckpt.close()
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise ValueError(f"{where}: {len(leftover)} tensors of {type(model).__name__} are not in the checkpoint "
                         f"{d}: {leftover[:8]}")
    unused = sorted(set(ckpt.weight_map) - ckpt.used)
    if unused:
        log.warning("%s: %d checkpoint tensors were not used: %s", where, len(unused), unused[:8])
    if num_int4 == 0 and num_dense_fallback == 0:
        raise ValueError(f"{where}: no INT4 tensor (weight_packed) found in {d} for {type(model).__name__}")
    if not dequantize and num_int4:
        _use_int4_experts(model)
    if (d / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(d))
    for p in model.parameters():
        p.requires_grad_(dequantize)
    model.eval()
    log.info("%s: %s with %d INT4 expert tensors (%d INT4 dense Linears) from %s", where, type(model).__name__,
             num_int4, num_dense_fallback, d)
    return model


def _assemble_packed(ckpt: _Checkpoint, slices: list[RowSlice], shape: tuple[int, ...], name: str):
    """Per-expert hub tensors -> packed [E, O, I/8] int32 and scale [E, O, G] of one fused tensor."""
    E, O = shape[0], shape[1]
    packed = scale = None
    in_features = None
    for s in slices:
        base = s.hub_key[: -len(".weight")]
        for suffix in ("weight_packed", "weight_scale"):
            if f"{base}.{suffix}" not in ckpt:
                raise ValueError(f"{base}.{suffix} (part of {name}) is missing from the checkpoint")
        p, sc = ckpt.get(f"{base}.weight_packed"), ckpt.get(f"{base}.weight_scale")
        if f"{base}.weight_shape" in ckpt:
            rows, cols = (int(v) for v in ckpt.get(f"{base}.weight_shape"))
        else:
            rows, cols = p.shape[0], p.shape[1] * 8
        if rows != s.r1 - s.r0 or p.shape[0] != rows:
            raise ValueError(f"{base}: weight_shape {[rows, cols]} / weight_packed {list(p.shape)} do not fit "
                             f"rows {s.r0}:{s.r1} of {name} {list(shape)}")
        if packed is None:
            in_features = cols
            packed = torch.empty(E, O, p.shape[1], dtype=torch.int32)
            scale = torch.empty(E, O, sc.shape[1], dtype=sc.dtype)
        if cols != in_features or p.dtype != torch.int32:
            raise ValueError(f"{base}: weight_packed {p.dtype} {list(p.shape)} (in {cols}) differs from the other "
                             f"experts of {name} ({in_features} inputs, int32)")
        packed[s.expert, s.r0:s.r1] = p
        scale[s.expert, s.r0:s.r1] = sc
    return packed, scale, in_features


def load_int4(path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              backend: str = "auto", verify: str = "hash") -> nn.Module:
    """The INT4 runtime: a transformers causal LM whose routed experts stay packed INT4.

    Reads an export_int4 directory or any compressed-tensors pack-quantized (symmetric INT4, group)
    MoE checkpoint of a family transformers fuses (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE,
    DeepSeek-V3/Kimi-K2). dtype: the dense weights' and activations' dtype (default: the
    checkpoint's); on CPU, bf16 runs the fast int4 kernel, fp32 runs exact but slower. backend:
    "auto" (the device's int4 kernel where the shape fits, else dequantize per expert), "cpu",
    "cuda", "dequant". verify: "hash" checks every file against export_complete.json, "size" only
    sizes, "none" skips (a foreign checkpoint has no marker and is not checked).
    """
    return _load(path, dtype=dtype, device=device, backend=backend, verify=verify, dequantize=False)


def restore_bf16(path: str | os.PathLike, *, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", verify: str = "hash") -> nn.Module:
    """An INT4 checkpoint back to a dense, trainable transformers model (export in reverse).

    Experts become q * scale (exact in float32; bf16 by default, which equals the bf16 weights the
    INT4 model represents), everything else is loaded as is; no fake quant is attached (call
    qat.prepare to continue QAT). Save it with save_pretrained for a dense checkpoint.
    """
    return _load(path, dtype=dtype, device=device, backend="dequant", verify=verify, dequantize=True)


def expert_weight_bytes(model: nn.Module) -> int:
    """Resident bytes of the INT4 expert weights (packed codes and scales) of a load_int4 model."""
    return sum(m.nbytes for m in model.modules() if isinstance(m, Int4Weight))


@torch.no_grad()
def convert_int4(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """A prepared (fake-quant) model -> the INT4 runtime, in place, without a checkpoint on disk.

    Every fake-quantized expert tensor is replaced by its packed INT4 codes and scales (from the
    model's own quantizers, as export_int4 writes them) and the fake quant is removed: the model
    computes what load_int4 of its export computes. Works for every family the fake quant does,
    GPT-OSS's transposed experts included (which the compressed-tensors export cannot express).
    Per-expert nn.Linear targets become Int4Linear. Returns the model.
    """
    from .fake_quant import get_config, iter_quantized, remove_fake_quant
    from .int4 import pack_int4

    if get_config(model) is None:
        raise ValueError("convert_int4: the model has no fake quant; call qat.prepare(model, QuantConfig()) first "
                         "(or export_int4 + load_int4 for round-to-nearest)")
    targets = list(iter_quantized(model))
    for cfg in {id(fq.cfg): fq.cfg for *_, fq in targets}.values():
        if cfg.bits != 4:
            raise ValueError(f"convert_int4: QuantConfig.bits={cfg.bits}; the INT4 runtime runs 4-bit codes only")
    num_experts = 0
    for name, module, attr, fq in targets:
        weight = getattr(module, attr)
        codes, scale = fq.quantize(weight)
        packed = pack_int4(codes).to(weight.device)
        scale = scale.to(fq.cfg.torch_scale_dtype).to(weight.device)
        if isinstance(module, nn.Linear):
            int4 = Int4Weight(packed[None], scale[None], fq.cfg.group_size, codes.shape[-1], backend)
            parent_name, _, child = name.rsplit(".", 1)[0].rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            bias = module.bias.detach() if module.bias is not None else None
            setattr(parent, child, Int4Linear(int4, bias))
            continue
        delattr(module, attr)
        setattr(module, attr.replace("_proj", "_int4"),
                Int4Weight(packed, scale, fq.cfg.group_size, codes.shape[-1], backend))
        num_experts += 1
    remove_fake_quant(model)
    if num_experts:
        _use_int4_experts(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _use_int4_experts(model: nn.Module) -> None:
    """Routes the model's fused experts through the INT4 forward (registered with transformers)."""
    name = register_experts_implementation()
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(name)
    else:  # transformers without the setter: the experts read the config attribute
        model.config._experts_implementation = name
