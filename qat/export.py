"""Real INT4 checkpoints: a transformers MoE model -> compressed-tensors "pack-quantized" directory.

Replaces "save the BF16 model and run a PTQ tool over it": the routed experts are written as the
INT4 codes and bf16 scales of the model's own fake quantizers (`fq.quantize`), so the checkpoint is
bit for bit the weights that QAT trained against. A model without fake quant is quantized with
round-to-nearest absmax (or the observer a QuantConfig names): the RTN baseline.

The one idea: the checkpoint layout is transformers' own (qat/layout.py: where transformers'
reverse conversion mapping puts every row of every fused expert tensor), and the packed codes of
those rows are written under those names, so transformers' `from_pretrained`, vLLM and SGLang see
the layout they already load.

Written (qat/files.py): sharded safetensors (+ index), config.json with the compressed-tensors
`quantization_config`, generation config, tokenizer with its chat template, and last of all
`export_complete.json` (every file's size and sha256), so a partial or altered export fails to load.
Memory: tensors go out shard by shard. export_int4 adds to the model it is given the shard being
filled and one chunk of quantization buffers; export_checkpoint_int4 (what the job runs when the
observer has no state, e.g. absmax) never builds the model: it reads, quantizes and writes the
checkpoint tensor by tensor, so its peak is about one shard.

    from qat import export_int4
    export_int4(model, "out/int4", tokenizer=tok)                # a model in memory (QAT or RTN)
    export_checkpoint_int4("runs/ckpt", "out/int4")              # RTN straight from the files
    python -m qat.export input=runs/ckpt output=runs/int4        # the Hydra job (conf/export.yaml)

Legend: E experts, O output channels, I input channels, G = I / group_size.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import QAT_CONFIG_FILE, load_qat_checkpoint, read_quant_config
from .config import QuantConfig, quant_config_from
from .fake_quant import Quantized, quantizers_for
from .files import (
    FORMAT_VERSION,
    MARKER,
    PROVENANCE_KEY,
    ShardWriter,
    clear_previous_export,
    parse_size,
    safetensors_files,
    write_marker,
)
from .int4 import pack_int4
from .jobs import register_schema
from .layout import RowSlice, hub_layout, skeleton
from .targets import match_targets

log = logging.getLogger(__name__)

__all__ = ["ExportReport", "export_checkpoint_int4", "export_from_checkpoint", "export_int4", "quantization_config_dict",
           "main"]


def quantization_config_dict(cfg: QuantConfig, ignore: list[str]) -> dict[str, Any]:
    """compressed-tensors `quantization_config` for symmetric INT4 group weights ("pack-quantized").

    `targets: ["Linear"]` as Kimi-K2-Thinking ships it: in the hub layout every routed expert is a
    Linear, and every other Linear (attention, shared experts, routers, lm_head) is in `ignore`.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        ct_version = version("compressed-tensors")
    except PackageNotFoundError:  # pragma: no cover - compressed-tensors is a dependency
        ct_version = None
    weights = {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": cfg.group_size,
        "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax", "observer_kwargs": {},
    }
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": "pack-quantized"}},
        "ignore": ignore,
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "version": ct_version,
    }


class ChunkedQuantizer:
    """Codes and scales of an expert tensor, a few experts at a time, packed as they come.

    For the absmax and mse observers this is fq.quantize's math op for op (same float32 ops in the
    same order, so bit-identical; tests/unit/test_export.py checks it against fq.quantize), run on
    chunks of about 16M weights into reused buffers: 5-8x faster than quantizing a whole
    [E, O, I] tensor at once on CPU, where fresh multi-GB temporaries cost more in page faults
    than the arithmetic, and peak memory is one chunk. Other observers (lsq: learned scales) go
    through fq.quantize whole.
    """

    CHUNK_ELEMENTS = 1 << 24

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def _buf(self, key: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        n = math.prod(shape)
        b = self._bufs.get(key)
        if b is None or b.numel() < n or b.dtype != dtype or b.device != device:
            b = self._bufs[key] = torch.empty(n, dtype=dtype, device=device)
        return b[:n].view(shape)

    # v + ROUND_MAGIC, in float32, lands in [2^23, 2^24) where the spacing is 1: the addition itself
    # rounds v half-to-even (ROUND_MAGIC is even), and the low byte of the float's bit pattern is
    # 8 + round(v) (the pattern of 1.5 * 2^23 ends in 0x00). One add replaces round, the +8 offset
    # and the float -> int conversion.
    ROUND_MAGIC = 1.5 * 2**23 + 8

    def quantize(self, w: torch.Tensor, cfg: QuantConfig, clip_ratio: torch.Tensor | None):
        """(packed int32 [..., O, I/8], scale [..., O, G]) of one expert tensor w [..., O, I]."""
        gs, shape = cfg.group_size, tuple(w.shape)
        x = self._buf("x", shape, torch.float32, w.device)
        x.copy_(w)
        a = self._buf("a", shape, torch.float32, w.device)
        torch.abs(x, out=a)
        absmax = a.unflatten(-1, (-1, gs)).amax(dim=-1)
        if clip_ratio is not None:
            absmax = absmax * clip_ratio
        scale = (absmax / cfg.divisor).to(cfg.torch_scale_dtype)
        s = scale.float()
        s = torch.where(s == 0, torch.ones_like(s), s)  # an all-zero group: codes 0
        x.unflatten(-1, (-1, gs)).div_(s.unsqueeze(-1))
        # clamp before rounding: the bounds are integers, so clamp(round(v)) == round(clamp(v))
        x.clamp_(cfg.qmin, cfg.qmax)
        if sys.byteorder != "little":  # pragma: no cover
            return pack_int4(x.round_().to(torch.int8)), scale
        x.add_(self.ROUND_MAGIC)
        u = self._buf("u", shape, torch.uint8, w.device)
        u.copy_(x.view(torch.int32))  # integer narrowing keeps the low byte: 8 + q, a nibble
        # Byte k of the packed row = nibble 2k | nibble 2k+1 << 4: viewing the nibbles as int16
        # pairs (little-endian: even channel in the low byte), p | p >> 4 has exactly that low byte.
        p = u.view(torch.int16)
        packed = torch.bitwise_right_shift(p, 4).bitwise_or_(p).to(torch.uint8)
        return packed.view(torch.int32), scale

    def chunks(self, t: Quantized):
        """Yields (e0, e1, packed int32 [e1-e0, O, I/8], scale [e1-e0, O, G]) for a 3D tensor, or
        (-1, -1, packed [O, I/8], scale [O, G]) for a 2D one."""
        fq, cfg = t.fq, t.fq.cfg
        weight = getattr(t.module, t.attr).detach()
        fast = cfg.observer in ("absmax", "mse") and not fq.transposed
        if not fast:
            codes, scale = fq.quantize(weight)
            packed = pack_int4(codes)
            if weight.ndim == 3:
                yield 0, weight.shape[0], packed, scale.to(cfg.torch_scale_dtype)
            else:
                yield -1, -1, packed, scale.to(cfg.torch_scale_dtype)
            return
        clip = getattr(fq, "clip_ratio", None) if cfg.observer == "mse" else None
        if weight.ndim == 2:
            yield (-1, -1, *self.quantize(weight, cfg, clip))
            return
        E = weight.shape[0]
        step = max(1, self.CHUNK_ELEMENTS // max(1, weight[0].numel()))
        for e0 in range(0, E, step):
            e1 = min(E, e0 + step)
            yield (e0, e1, *self.quantize(weight[e0:e1], cfg, None if clip is None else clip[e0:e1]))


# --- the export --------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What export_int4 wrote."""

    out_dir: str
    source: str
    """"fake_quant" (the model's own quantizers) or "rtn_<observer>" (a model without fake quant)."""
    quantized: list[str] = field(default_factory=list)
    """Model parameter names written as INT4."""
    num_int4_tensors: int = 0
    """Per-expert hub tensors written (each with weight_packed, weight_scale, weight_shape)."""
    files: list[str] = field(default_factory=list)
    total_bytes: int = 0
    peak_shard_bytes: int = 0
    seconds: float = 0.0


@torch.no_grad()
def export_int4(model: nn.Module, out_dir: str | os.PathLike, tokenizer: Any = None, *,
                quant_config: QuantConfig | None = None, max_shard_size: int | str = "5GB",
                overwrite: bool = False) -> ExportReport:
    """Writes `model` as a compressed-tensors pack-quantized INT4 checkpoint in `out_dir`.

    The routed experts (the model's fake-quantized tensors if it was prepared, else the tensors
    `quant_config.targets` matches, RTN-quantized) become per-expert `weight_packed` (int32),
    `weight_scale` (bf16, [O, I/group]) and `weight_shape` ([O, I]) under the hub's names;
    everything else is written unchanged in its dtype. Returns an ExportReport.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    targets, cfg, source = quantizers_for(model, quant_config)
    if cfg.bits != 4:
        raise ValueError(f"export_int4: QuantConfig.bits={cfg.bits}; the pack-quantized export writes 4-bit codes "
                         f"only, set bits=4")
    if cfg.grid not in ("k2", "full"):  # pragma: no cover - QuantConfig validates this
        raise ValueError(f"QuantConfig.grid={cfg.grid!r}")
    state = model.state_dict(keep_vars=True)
    by_name = {t.name: t for t in targets}
    # Observer state (clip ratios, learned scales) lives under the experts' `weight_fake_quant`: it
    # is training state, not part of the checkpoint a loader reads.
    skip_prefixes = tuple(t.name.rsplit(".", 1)[0] + ".weight_fake_quant." for t in targets)
    names, seen = [], {}
    for name, tensor in state.items():
        if name.startswith(skip_prefixes) or ".weight_fake_quant." in name:
            continue
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else None
        if key is not None and key in seen and name not in by_name:
            log.info("export_int4: %s is tied to %s; written once", name, seen[key])
            continue
        if key is not None:
            seen[key] = name
        names.append(name)
    missing = sorted(set(by_name) - set(names))
    assert not missing, f"quantized tensors not in the state dict: {missing[:5]}"
    layout = hub_layout(model, {n: tuple(state[n].shape) for n in names})
    for t in targets:
        if t.fq.transposed or isinstance(layout[t.name], str) and state[t.name].ndim == 3:
            raise ValueError(
                f"export_int4: {t.name} (shape {list(state[t.name].shape)}) has no per-expert layout in "
                f"transformers' conversion mapping for model_type {model.config.model_type!r}, so compressed-"
                f"tensors' per-Linear pack-quantized format cannot express it; supported: families whose hub "
                f"checkpoints keep one Linear per expert (Qwen3-MoE, Qwen2-MoE, Mixtral, OLMoE, DeepSeek-V3)")

    ignore = _ignore_list(model, names, set(by_name), {n: tuple(state[n].shape) for n in names}, layout)

    clear_previous_export(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, parse_size(max_shard_size))
    quantizer = ChunkedQuantizer()
    report = ExportReport(out_dir=str(out), source=source)
    for name in names:
        tensor = state[name].detach()
        where = layout[name]
        if name in by_name:
            t = by_name[name]
            slices = where if isinstance(where, list) else [RowSlice(where, -1, 0, state[name].shape[-2])]
            by_expert: dict[int, list[RowSlice]] = {}
            for s in slices:
                by_expert.setdefault(s.expert, []).append(s)
            for e0, e1, packed, scale in quantizer.chunks(t):
                in_features = packed.shape[-1] * 8
                for e in range(e0, e1) if e0 >= 0 else [-1]:
                    for s in by_expert.get(e, []):
                        rows = slice(s.r0, s.r1)
                        p_, sc_ = (packed[e - e0, rows], scale[e - e0, rows]) if e >= 0 else (packed[rows], scale[rows])
                        prefix = s.hub_key[: -len(".weight")] if s.hub_key.endswith(".weight") else s.hub_key
                        writer.add(f"{prefix}.weight_packed", p_)
                        writer.add(f"{prefix}.weight_scale", sc_)
                        writer.add(f"{prefix}.weight_shape",
                                   torch.tensor([s.r1 - s.r0, in_features], dtype=torch.int64))
                        report.num_int4_tensors += 1
            report.quantized.append(name)
        elif isinstance(where, list):  # a dense fused tensor the mapping un-fuses (e.g. an excluded down_proj)
            for s in where:
                writer.add(s.hub_key, tensor[s.expert, s.r0:s.r1])
        else:
            writer.add(where, tensor)
    report.files = writer.close()
    report.total_bytes, report.peak_shard_bytes = writer.total_bytes, writer.peak_pending_bytes

    generation_config = getattr(model, "generation_config", None)
    extra = [lambda: generation_config.save_pretrained(out)] if generation_config is not None else []
    if tokenizer is not None:
        extra.append(lambda: tokenizer.save_pretrained(out))
    _finish(out, model, cfg, ignore, source, extra, report, start, writer.hashes)
    return report


def _ignore_list(model: nn.Module, names: list[str], quantized: set[str], shapes: dict[str, tuple[int, ...]],
                 layout: dict[str, Any]) -> list[str]:
    """Hub names of the modules that stay high precision: every module with a 2D weight that is not
    quantized (attention, routers, shared experts, dense MLPs, lm_head), except embeddings."""
    embeddings = {n for n, m in model.named_modules() if isinstance(m, nn.Embedding)}
    ignore = []
    for name in names:
        if name in quantized or not name.endswith(".weight") or len(shapes[name]) != 2:
            continue
        module_name = name[: -len(".weight")]
        if module_name in embeddings:
            continue
        hub = layout[name]
        ignore.append(hub[: -len(".weight")] if isinstance(hub, str) else module_name)
    if "lm_head" not in ignore:
        ignore.append("lm_head")
    return ignore


def _finish(out: Path, model: nn.Module, cfg: QuantConfig, ignore: list[str], source: str, extra_writers,
            report: ExportReport, start: float, known_hashes: dict[str, str]) -> None:
    """config.json, generation config, tokenizer, then the marker (last)."""
    config = json.loads(model.config.to_json_string(use_diff=False))
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config_dict(cfg, ignore)
    config[PROVENANCE_KEY] = {"format_version": FORMAT_VERSION, "marker": MARKER, "source": source,
                              "qat_config": cfg.to_dict()}
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for write in extra_writers:
        write()
    report.files = write_marker(out, known_hashes)
    report.seconds = time.perf_counter() - start
    log.info("export: %d tensors as INT4 (%d per-expert), %.1f MB in %d files, %.1fs -> %s",
             len(report.quantized), report.num_int4_tensors, report.total_bytes / 1e6, len(report.files),
             report.seconds, out)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "added_tokens.json")


@torch.no_grad()
def export_checkpoint_int4(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
                           quant_config: QuantConfig | None = None, max_shard_size: int | str = "5GB",
                           overwrite: bool = False, dtype: torch.dtype | None = None,
                           source: str = "rtn_absmax", workers: int | None = None) -> ExportReport:
    """RTN INT4 export straight from a hub-layout safetensors checkpoint, tensor by tensor.

    What export_int4 writes for the same model without fake quant (bit for bit), without building
    the model: the checkpoint already holds one tensor per expert under its hub name (transformers'
    save_pretrained writes that layout), each is read, quantized, packed and written, so peak
    memory is one shard. For observers without state only (absmax); use export_int4 on a prepared
    model for QAT checkpoints with observer state. dtype: cast floating tensors (as
    from_pretrained(dtype=...) would) before quantizing and writing; None keeps the saved dtypes.
    """
    from safetensors import safe_open
    from transformers import AutoConfig

    start = time.perf_counter()
    src, out = Path(src_dir), Path(out_dir)
    cfg = quant_config or QuantConfig()
    if cfg.bits != 4:
        raise ValueError(f"export: QuantConfig.bits={cfg.bits}; the pack-quantized export writes 4-bit codes only")
    if cfg.observer != "absmax":
        raise ValueError(f"export_checkpoint_int4: QuantConfig.observer={cfg.observer!r}; streaming export runs "
                         f"RTN absmax only, use export_int4(model, ...) for other observers")
    files = safetensors_files(src)
    config = AutoConfig.from_pretrained(str(src))
    if getattr(config, "quantization_config", None):
        raise ValueError(f"export: input={str(src)!r} is already quantized (config.json has quantization_config)")
    saved_dtype = config.dtype if isinstance(getattr(config, "dtype", None), torch.dtype) else None
    model = skeleton(config, dtype or saved_dtype)  # its config.json records the dtype written
    state = model.state_dict(keep_vars=True)
    names = list(state)
    shapes = {n: tuple(t.shape) for n, t in state.items()}
    layout = hub_layout(model, shapes)
    quantized = {t.name for t in match_targets(model, cfg)}  # what export_int4 of the built model quantizes
    hub_quantized: dict[str, str] = {}
    for n in quantized:
        where = layout[n]
        if isinstance(where, str):
            if len(shapes[n]) != 2:
                raise ValueError(f"export: {n} {list(shapes[n])} has no per-expert hub layout for model_type "
                                 f"{config.model_type!r}; compressed-tensors' per-Linear format cannot express it")
            hub_quantized[where] = n
        else:
            hub_quantized.update({s.hub_key: n for s in where})
    for n in quantized:
        in_features = shapes[n][-1]
        if in_features % cfg.group_size:
            raise ValueError(f"QuantConfig.group_size={cfg.group_size} does not divide the input dim {in_features} "
                             f"of {n}; choose a group_size that divides it")
    ignore = _ignore_list(model, names, quantized, shapes, layout)
    expected = set(hub_quantized)
    for n in names:
        where = layout[n]
        if n not in quantized:
            expected.update([where] if isinstance(where, str) else [s.hub_key for s in where])

    clear_previous_export(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, parse_size(max_shard_size))
    report = ExportReport(out_dir=str(out), source=source)
    seen = set()
    # Quantization is elementwise work on independent tensors: with torch single-threaded, a
    # second Python thread (torch ops release the GIL) quantizes the next tensor meanwhile. Results
    # are written in checkpoint order, at most a few tensors ahead.
    if workers is None:
        workers = max(1, min(4, (os.cpu_count() or 1) // max(1, torch.get_num_threads())))
    local = threading.local()

    def quantize(tensor):
        if not hasattr(local, "quantizer"):
            local.quantizer = ChunkedQuantizer()
        return local.quantizer.quantize(tensor, cfg, None)

    queue: collections.deque = collections.deque()

    def drain(keep: int) -> None:
        while len(queue) > keep:
            key, shape, result = queue.popleft()
            packed, scale = result.result() if workers > 1 else result
            base = key[: -len(".weight")]
            writer.add(f"{base}.weight_packed", packed)
            writer.add(f"{base}.weight_scale", scale)
            writer.add(f"{base}.weight_shape", torch.tensor(list(shape), dtype=torch.int64))
            report.num_int4_tensors += 1

    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        for fname in files:
            with safe_open(str(src / fname), framework="pt") as f:
                for key in f.keys():
                    if key not in expected:
                        if ".weight_fake_quant." in key:
                            continue  # observer state of a training checkpoint
                        raise ValueError(f"export: {fname} holds {key}, which {type(model).__name__} does not have; "
                                         f"is input={str(src)!r} a checkpoint of this config?")
                    seen.add(key)
                    tensor = f.get_tensor(key)
                    if dtype is not None and tensor.is_floating_point():
                        tensor = tensor.to(dtype)
                    if key in hub_quantized:
                        result = pool.submit(quantize, tensor) if pool is not None else quantize(tensor)
                        queue.append((key, tuple(tensor.shape), result))
                        drain(2 * workers)
                    else:
                        drain(0)
                        writer.add(key, tensor)
        drain(0)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    missing = sorted(expected - seen)
    tied = {layout[n] for n in names if isinstance(layout[n], str)} & set(missing)
    if missing and not (getattr(config, "tie_word_embeddings", False) and set(missing) <= tied):
        raise ValueError(f"export: input={str(src)!r} lacks {len(missing)} tensors of {type(model).__name__}: "
                         f"{missing[:5]}")
    report.quantized = sorted(quantized)
    report.files = writer.close()
    report.total_bytes, report.peak_shard_bytes = writer.total_bytes, writer.peak_pending_bytes

    def copy_side_files():
        for name in ("generation_config.json", *TOKENIZER_FILES):
            if (src / name).exists():
                shutil.copyfile(src / name, out / name)

    _finish(out, model, cfg, ignore, report.source, [copy_side_files], report, start, writer.hashes)
    return report


# --- the Hydra job -----------------------------------------------------------------------------


@dataclass
class ExportJobConfig:
    """conf/export.yaml, the `python -m qat.export` job: a checkpoint -> a compressed-tensors INT4 checkpoint."""

    input: str = "???"
    """Checkpoint dir (config.json + safetensors [+ qat_config.json]). Required."""
    output: str = "???"
    """Export dir; must be empty unless overwrite=true. Required."""
    overwrite: bool = False
    """true deletes what is in `output` first (the marker goes first)."""
    dtype: str | None = None
    """null = as saved; bfloat16 halves the dense part of the export."""
    max_shard_size: str = "5GB"
    """Smaller shards = lower peak memory while exporting."""
    stream: bool = True
    """absmax: quantize tensor by tensor from the files (peak memory one shard); false builds the model
    first (always so for mse/lsq observer state)."""
    qat: QuantConfig = field(default_factory=QuantConfig)
    """Used only when the input has no qat_config.json (round-to-nearest, the RTN baseline)."""


register_schema("export", ExportJobConfig)



def export_from_checkpoint(cfg: Any) -> ExportReport:
    """The `python -m qat.export` job (conf/export.yaml): checkpoint dir -> INT4 checkpoint dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = dict(cfg)  # a plain dict or Hydra's DictConfig
    src, dst = cfg.get("input"), cfg.get("output")
    for key, value in (("input", src), ("output", dst)):
        if value in (None, "", "???"):
            raise ValueError(f"export: {key} is required, e.g. python -m qat.export input=runs/ckpt output=runs/int4")
    src = Path(str(src))
    if not (src / "config.json").exists():
        raise ValueError(f"export: input={str(src)!r} has no config.json; point it at a training checkpoint or a "
                         f"Hugging Face model directory")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: "auto"}
    dtype_name = cfg.get("dtype")
    if dtype_name not in dtypes:
        raise ValueError(f"export: dtype={dtype_name!r}; choose one of {[k for k in dtypes if k]} or null (as saved)")
    dtype = dtypes[dtype_name]
    quant_config = read_quant_config(src)
    qat_checkpoint = quant_config is not None
    if not qat_checkpoint:
        quant_config = quant_config_from(cfg.get("qat") or {})
    common = dict(max_shard_size=cfg.get("max_shard_size") or "5GB", overwrite=bool(cfg.get("overwrite")))
    stream = cfg.get("stream", True)
    if stream not in (True, False):
        raise ValueError(f"export: stream={stream!r}; true or false")
    if stream and quant_config.observer == "absmax":
        # Absmax has no observer state: the codes follow from the saved weights alone, so the
        # checkpoint is quantized tensor by tensor without building the model.
        log.info("export: streaming %s (%s)", src, "QAT checkpoint" if qat_checkpoint else "round-to-nearest INT4")
        return export_checkpoint_int4(src, dst, quant_config=quant_config,
                                      dtype=None if dtype == "auto" else dtype,
                                      source="fake_quant" if qat_checkpoint else "rtn_absmax", **common)
    if qat_checkpoint:
        model = load_qat_checkpoint(src, dtype=dtype)
        quant_config = None
    else:
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=dtype)
        log.info("export: no %s in %s: round-to-nearest INT4 with %s", QAT_CONFIG_FILE, src, quant_config)
    tokenizer = None
    if any((src / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(str(src))
    return export_int4(model, str(dst), tokenizer, quant_config=quant_config, **common)


def main() -> None:  # pragma: no cover - exercised by the integration test through a subprocess
    from .jobs import job

    @job("export")
    def _main(cfg) -> None:
        report = export_from_checkpoint(cfg)
        print(json.dumps({k: v for k, v in report.__dict__.items() if k != "quantized"}, indent=2))

    _main()


if __name__ == "__main__":
    main()
