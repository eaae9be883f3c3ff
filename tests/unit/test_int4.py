"""INT4 packing (compressed-tensors layout) and the int4 kernel wrapper, against references."""

import pytest
import torch

from qat.int4 import (
    Int4Linear,
    Int4Weight,
    dequantize_int4,
    int4_experts_forward,
    pack_int4,
    register_experts_implementation,
    unpack_int4,
)

torch.set_num_threads(1)


def _codes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)


def _scales(shape, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    return (torch.rand(shape, generator=g) * 0.05 + 1e-3).to(torch.bfloat16)


def test_pack_hand_packed_words():
    # q = -8..-1 stores nibbles 0..7, first code lowest: 0x76543210; q = 0..7 stores 8..15: 0xFEDCBA98.
    codes = torch.tensor([[-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7]], dtype=torch.int8)
    words = pack_int4(codes)
    assert words.dtype == torch.int32 and words.shape == (1, 2)
    assert words[0, 0].item() == 0x76543210
    assert words[0, 1].item() == 0xFEDCBA98 - (1 << 32)  # two's complement of the top bit
    one = torch.zeros(1, 8, dtype=torch.int8)
    one[0, 3] = 5  # channel 3 -> bits 12..15 hold 13; every other nibble holds 8
    assert pack_int4(one)[0, 0].item() == 0x8888D888 - (1 << 32)
    assert torch.equal(unpack_int4(words), codes)


@pytest.mark.parametrize("seed", range(5))
def test_pack_matches_compressed_tensors(seed):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = _codes((3, 48, 96), seed)
    ours = pack_int4(codes)
    theirs = pack_to_int32(codes, num_bits=4)
    assert torch.equal(ours, theirs)
    back = unpack_from_int32(ours, 4, torch.Size(codes.shape))
    assert torch.equal(back, codes)
    assert torch.equal(unpack_int4(theirs, 96), codes)


def test_pack_rejects_bad_input():
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_int4(torch.zeros(2, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(torch.full((2, 8), 9, dtype=torch.int8))


def _reference(codes, scale, gs):
    return codes.float() * scale.float().repeat_interleave(gs, -1)


@pytest.mark.parametrize("backend", ["cpu", "dequant"])
@pytest.mark.parametrize("group_size", [32, 64])
def test_int4_weight_matmul_matches_dequantized(backend, group_size):
    E, O, I = 3, 48, 128
    codes, scale = _codes((E, O, I), 7), _scales((E, O, I // group_size), 7)
    w = Int4Weight.from_codes(codes, scale, group_size, backend=backend)
    assert w.backend == backend
    ref_w = _reference(codes, scale, group_size)
    x = torch.randn(5, I, generator=torch.Generator().manual_seed(0))
    for e in range(E):
        # The weight read back is q * scale exactly; the matmul agrees up to float32 summation order.
        assert torch.equal(w.dequantize(e), ref_w[e])
        y = w.mm(x, e)
        ref = x @ ref_w[e].t()
        assert y.dtype == torch.float32
        torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
        yb = w.mm(x.bfloat16(), e)
        assert yb.dtype == torch.bfloat16
        torch.testing.assert_close(yb.float(), x.bfloat16().float() @ ref_w[e].t(), atol=0.05, rtol=0.02)


def test_int4_weight_resident_bytes_and_fallback():
    codes, scale = _codes((2, 64, 256), 1), _scales((2, 64, 8), 1)
    w = Int4Weight.from_codes(codes, scale, 32)
    assert w.backend == "cpu"
    # half a byte per weight plus one bf16 scale per 32: 0.5625 bytes, 0.28 of bf16
    assert w.nbytes == 2 * 64 * 256 // 2 + 2 * 64 * 8 * 2
    odd = Int4Weight.from_codes(_codes((2, 40, 64), 2), _scales((2, 40, 2), 2), 32)
    assert odd.backend == "dequant"  # O % 16 != 0: the CPU kernel cannot take it
    with pytest.raises(ValueError, match="backend='cpu'"):
        Int4Weight.from_codes(_codes((2, 40, 64), 2), _scales((2, 40, 2), 2), 32, backend="cpu")
    with pytest.raises(ValueError, match="do not describe"):
        Int4Weight(pack_int4(codes), scale[:, :, :4], 32, 256)


def test_int4_linear():
    codes, scale = _codes((1, 32, 64), 3), _scales((1, 32, 2), 3)
    bias = torch.randn(32)
    lin = Int4Linear(Int4Weight.from_codes(codes, scale, 32), bias)
    x = torch.randn(2, 3, 64)
    ref = torch.nn.functional.linear(x, _reference(codes, scale, 32)[0], bias)
    torch.testing.assert_close(lin(x), ref, atol=1e-5, rtol=1e-5)


def test_dequantize_int4_matches_compressed_tensors_decompress():
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    codes, scale = _codes((32, 64), 4), _scales((32, 2), 4)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=32))
    sd = {"weight_packed": pack_int4(codes), "weight_scale": scale, "weight_shape": torch.tensor([32, 64])}
    theirs = PackedQuantizationCompressor.decompress(sd, scheme)["weight"]
    ours = dequantize_int4(sd["weight_packed"], scale, 32, torch.float32)
    # compressed-tensors multiplies in the scale's dtype (bf16): equal to ours rounded to bf16.
    assert torch.equal(theirs, ours.to(torch.bfloat16))


def test_experts_forward_matches_transformers_eager():
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(hidden_size=64, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)
    cfg._experts_implementation = "eager"
    experts = Qwen3MoeExperts(cfg)
    codes_gu, s_gu = _codes((4, 64, 64), 5), _scales((4, 64, 2), 5)
    codes_d, s_d = _codes((4, 64, 32), 6), _scales((4, 64, 1), 6)
    with torch.no_grad():
        experts.gate_up_proj.copy_(_reference(codes_gu, s_gu, 32))
        experts.down_proj.copy_(_reference(codes_d, s_d, 32))
    x = torch.randn(6, 64)
    idx = torch.tensor([[0, 1], [1, 2], [3, 0], [2, 3], [1, 0], [0, 2]])
    weights = torch.rand(6, 2)
    ref = experts(x, idx, weights)
    experts.gate_up_int4 = Int4Weight.from_codes(codes_gu, s_gu, 32)
    experts.down_int4 = Int4Weight.from_codes(codes_d, s_d, 32)
    out = int4_experts_forward(experts, x, idx, weights)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # Registered as a transformers experts implementation, the module's own forward dispatches to it.
    cfg._experts_implementation = register_experts_implementation()
    del experts.gate_up_proj, experts.down_proj
    torch.testing.assert_close(experts(x, idx, weights), ref, atol=1e-5, rtol=1e-5)
