"""qat/files.py: the shard writer writes what safetensors writes, byte for byte, and hashes it right."""

import hashlib
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

from qat.files import ShardWriter, parse_size, write_safetensors


def _tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(5, 7, generator=g)
    t = {
        "model.layers.10.mlp.experts.3.gate_proj.weight_packed": torch.randint(-2**31, 2**31 - 1, (4, 2), dtype=torch.int32),
        "model.layers.2.mlp.experts.3.gate_proj.weight_scale": base.to(torch.bfloat16),
        "model.layers.2.mlp.experts.3.gate_proj.weight_shape": torch.tensor([4, 16], dtype=torch.int64),
        "a.scalar": torch.tensor(3.5),
        "a.empty": torch.empty(0, 3),
        "z.slice": base[1:3].contiguous(),  # a view with a storage offset
        "ümlaut.name": torch.ones(2, dtype=torch.float16),
    }
    for dtype in (torch.float64, torch.uint8, torch.int8, torch.int16, torch.bool, torch.uint16, torch.uint32,
                  torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64):
        t[f"d.{str(dtype)}"] = (base * 3).to(dtype)
    return t


@pytest.mark.parametrize("threads", [0, 2])
def test_write_safetensors_is_save_file_byte_for_byte(tmp_path, threads):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    pool = ThreadPoolExecutor(threads) if threads else None
    digest = write_safetensors(tensors, tmp_path / "ours.safetensors", {"format": "pt"}, pool)
    ours, ref = (tmp_path / "ours.safetensors").read_bytes(), (tmp_path / "ref.safetensors").read_bytes()
    assert ours == ref
    assert digest == hashlib.sha256(ours).hexdigest()
    back = load_file(str(tmp_path / "ours.safetensors"))
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8)), k


def test_shard_writer_shards_and_hashes(tmp_path):
    w = ShardWriter(tmp_path, parse_size("1KB"))
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each: 2 per shard
    for k, v in tensors.items():
        w.add(k, v)
    names = w.close()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + ["model.safetensors.index.json"]
    for name in names[:-1]:
        assert w.hashes[name] == hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    back = {}
    for name in names[:-1]:
        back.update(load_file(str(tmp_path / name)))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], v) for k, v in tensors.items())
    with pytest.raises(ValueError, match="same checkpoint name 't0'"):
        w2 = ShardWriter(tmp_path / "x", 10**6)
        w2.add("t0", tensors["t0"])
        w2.add("t0", tensors["t0"])
