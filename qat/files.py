"""The files of an INT4 export: sharded safetensors, the completion marker, and their verification.

An export is a directory a loader must be able to trust: `export_complete.json` is written last
and lists every other file with its size and sha256, and config.json carries a provenance key, so
a partial copy, an interrupted export or an altered file fails `verify_export` instead of loading
wrong weights. The one idea: the checksums are computed from the bytes in memory as they are
written, on a second thread, so the marker costs no extra pass over the files.

The shard writer writes safetensors files itself, byte for byte what `safetensors.torch.save_file`
writes (same header, same tensor order; tests/unit/test_export.py compares them), because it can
then write and hash each tensor's bytes in parallel from memory, without save_file's copy of every
tensor into a bytes object first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

MARKER = "export_complete.json"
"""Written last: every other file of the export with its size and sha256."""
PROVENANCE_KEY = "agentic_qat_export"
"""config.json key saying this directory came from export_int4 (so a missing marker is an error)."""
FORMAT_VERSION = 1
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def parse_size(size: int | str) -> int:
    """'5GB' / '500MB' / 1000 -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size={size!r}: use bytes or a size like '5GB', '500MB'")
    units = {None: 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    return int(float(m.group(1)) * units[m.group(2).upper() if m.group(2) else None])


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    buf = memoryview(bytearray(chunk))  # one buffer, refilled: no fresh pages per block
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(buf[:n])
    return h.hexdigest()


# --- safetensors, written from memory ---------------------------------------------------------

# safetensors' dtype names, in the order its serializer places tensors (larger dtypes first, then
# by name): the order of its Rust Dtype enum, reversed. A dtype missing here goes through save_file.
_ST_DTYPES = {
    torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.complex64: "C64", torch.float32: "F32",
    torch.uint32: "U32", torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16",
    torch.int16: "I16", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_ST_RANK = {dtype: i for i, dtype in enumerate(_ST_DTYPES)}


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor (little-endian, as safetensors stores them), no copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None,
                      pool: ThreadPoolExecutor | None = None) -> str:
    """Writes `tensors` (contiguous, CPU) as `safetensors.torch.save_file` would, returns the file's sha256.

    With `pool` (two workers or more) the bytes are hashed on one of its threads while this one
    writes them: the same memory read twice, at the same time.
    """
    if any(t.dtype not in _ST_RANK for t in tensors.values()) or sys.byteorder != "little":
        from safetensors.torch import save_file

        save_file(tensors, str(path), metadata=metadata)
        return sha256_file(path)
    order = sorted(tensors, key=lambda k: (_ST_RANK[tensors[k].dtype], k))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    head += b" " * (-len(head) % 8)  # safetensors aligns the data to 8 bytes with spaces
    parts = [struct.pack("<Q", len(head)) + head] + [_bytes_of(tensors[name]) for name in order]

    def digest() -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(p)  # releases the GIL for large buffers
        return h.hexdigest()

    hashed = pool.submit(digest) if pool is not None else None
    with open(path, "wb", buffering=0) as f:
        for p in parts:
            f.write(p)
    return hashed.result() if hashed is not None else digest()


class ShardWriter:
    """Collects tensors into a shard until max_bytes, then writes it; names it -of-N at the end.

    Each shard is written and hashed from memory at once (write_safetensors), so the marker's
    checksums (`hashes`, by final file name) cost no second pass over the files.
    """

    def __init__(self, out_dir: Path, max_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_bytes
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._hashes: dict[str, str] = {}
        self.hashes: dict[str, str] = {}
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self.peak_pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"export_int4: two tensors map to the same checkpoint name {name!r}")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes
        self.peak_pending_bytes = max(self.peak_pending_bytes, self.pending_bytes)

    def flush(self) -> None:
        if not self.pending:
            return
        tmp = f"shard-{len(self.files):05d}.safetensors.tmp"
        self._hashes[tmp] = write_safetensors(self.pending, self.out_dir / tmp, {"format": "pt"}, self._pool)
        self.files.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        self.flush()
        self._pool.shutdown()
        n = len(self.files)
        names = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (tmp, keys), final in zip(self.files, names):
            self.hashes[final] = self._hashes.pop(tmp)
            os.replace(self.out_dir / tmp, self.out_dir / final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            names.append(INDEX_FILE)
        return names


# --- the directory: cleared first, marked complete last, verified on load ------------------------


def clear_previous_export(out: Path, overwrite: bool) -> None:
    existing = [p for p in out.iterdir()] if out.exists() else []
    if not existing:
        return
    if not overwrite:
        raise ValueError(f"export_int4: out_dir {str(out)!r} is not empty; pass overwrite=True (job: overwrite=true) "
                         f"or choose an empty directory")
    # The marker goes first: from here on the directory reads as an incomplete export.
    (out / MARKER).unlink(missing_ok=True)
    for p in existing:
        if p.name == MARKER:
            continue
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def write_marker(out: Path, known_hashes: dict[str, str]) -> list[str]:
    """Writes the marker (atomically, last) over every file in `out`; returns the files it lists
    plus the marker. known_hashes: sha256 of files already hashed as they were written."""
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {str(p.relative_to(out)): {"bytes": p.stat().st_size,
                                            "sha256": known_hashes.get(str(p.relative_to(out))) or sha256_file(p)}
                  for p in files},
    }
    tmp = out / (MARKER + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MARKER)  # the marker appears whole or not at all
    return sorted(manifest["files"]) + [MARKER]


class ExportIntegrityError(ValueError):
    """The directory is an incomplete or altered export."""


def verify_export(path: str | os.PathLike, *, hashes: bool = True) -> bool:
    """Checks an export against its marker; True if verified, False if it is not one of ours.

    Raises ExportIntegrityError (a ValueError) if config.json says export_int4 wrote it but the
    marker is missing, or a listed file is missing, has another size, or (hashes=True) another sha256.
    """
    d = Path(path)
    cfg_file = d / "config.json"
    marker = d / MARKER
    ours = False
    if cfg_file.exists():
        try:
            ours = PROVENANCE_KEY in json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ExportIntegrityError(f"{cfg_file} is not valid JSON ({e}); the export is damaged, export again") from None
    if not marker.exists():
        if ours or (d / (MARKER + ".tmp")).exists():
            raise ExportIntegrityError(
                f"{d} is an incomplete INT4 export: {MARKER} (written last) is missing. The export was "
                f"interrupted or the copy is partial; run the export again")
        return False
    try:
        manifest = json.loads(marker.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportIntegrityError(f"{marker} is damaged ({e!r}); export again") from None
    for rel, meta in files.items():
        p = d / rel
        if not p.exists():
            raise ExportIntegrityError(f"{d}: {rel} is listed in {MARKER} but missing; the export is incomplete, "
                                       f"copy or export it again")
        size = p.stat().st_size
        if size != meta["bytes"]:
            raise ExportIntegrityError(f"{d}: {rel} has {size} bytes, {MARKER} says {meta['bytes']}: truncated or "
                                       f"altered; copy or export it again")
        if hashes and sha256_file(p) != meta["sha256"]:
            raise ExportIntegrityError(f"{d}: {rel} does not match its sha256 in {MARKER}: the file was altered; "
                                       f"copy or export it again")
    return True


def safetensors_files(src: Path) -> list[str]:
    """The safetensors files of a (sharded) checkpoint directory, in index order."""
    index = src / INDEX_FILE
    if index.exists():
        return list(dict.fromkeys(json.loads(index.read_text())["weight_map"].values()))
    if (src / SINGLE_FILE).exists():
        return [SINGLE_FILE]
    raise ValueError(f"export: input={str(src)!r} has neither {INDEX_FILE} nor {SINGLE_FILE}")
