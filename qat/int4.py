"""INT4 weights as compressed-tensors stores them and as torch's int4 kernels run them.

Replaces dequantize-then-matmul: the INT4 runtime keeps routed-expert weights packed (half a byte
per weight plus one bf16 scale per group) and multiplies with torch's int4 weight-only kernels
(`_weight_int4pack_mm_for_cpu` on CPU, `_weight_int4pack_mm` on CUDA).

Two layouts hold the same codes q in [-8, 7]:
- the checkpoint layout, compressed-tensors "pack-quantized": int32 words `[..., O, I/8]`, 8 codes
  per word, input channel 8w+j in bits 4j..4j+3 (first code in the lowest nibble), stored as q + 8;
- the kernel layout: whatever `_convert_weight_to_int4pack[_for_cpu]` makes of nibbles q + 8.

The one idea: torch's int4 kernels are asymmetric, computing (u - 8) * scale + zero for a stored
nibble u in 0..15. Storing u = q + 8 (the very nibble compressed-tensors stores) with zero = 0
gives exactly q * scale, compressed-tensors' symmetric dequantization, so the kernel multiplies by
the checkpoint's weights with no requantization and no loss.

Legend: E experts, O output channels, I input channels, G = I / group_size groups, P = I / 8 words,
T tokens, K experts per token (top-k), H hidden size.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

CODES_PER_WORD = 8
KERNEL_GROUP_SIZES = (32, 64, 128, 256)
BACKENDS = ("auto", "cpu", "cuda", "dequant")
EXPERTS_IMPLEMENTATION = "qat_int4"
"""Name under which the INT4 experts forward is registered in transformers' ALL_EXPERTS_FUNCTIONS."""

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble j of a word lives at bits 4j..4j+3


# --- checkpoint layout (compressed-tensors pack-quantized) -------------------------------------


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed int4 codes (int8, [..., O, I], values in [-8, 7]) -> int32 words [..., O, I/8].

    Word w of a row holds input channels 8w..8w+7, channel 8w+j in bits 4j..4j+3, as q + 8.
    Bit for bit compressed-tensors' `pack_to_int32(codes, num_bits=4)`.
    """
    if codes.dtype != torch.int8:
        raise TypeError(f"pack_int4: codes must be int8, got {codes.dtype}")
    if codes.shape[-1] % CODES_PER_WORD != 0:
        raise ValueError(f"pack_int4: the input dim {codes.shape[-1]} must be a multiple of {CODES_PER_WORD}")
    if codes.numel():
        lo, hi = torch.aminmax(codes)
        if lo < -8 or hi > 7:
            raise ValueError(f"pack_int4: codes must lie in [-8, 7], got [{int(lo)}, {int(hi)}]")
    return pack_nibbles((codes + 8).view(torch.uint8))


def pack_nibbles(u: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 nibbles (0..15) [..., I] -> int32 words [..., I/8], nibble 2k low and 2k+1 high in byte k.

    On a little-endian host byte k of a word is bits 8k..8k+7, so channel j lands in bits 4j..4j+3
    (int32 words are the checkpoint's, read back with the same byte order by safetensors)."""
    if sys.byteorder != "little":  # pragma: no cover - no big-endian CPU runs torch's int4 kernels
        shifts = _SHIFTS.to(u.device)
        return (u.to(torch.int32).unflatten(-1, (-1, CODES_PER_WORD)) << shifts).sum(-1, dtype=torch.int32)
    high = torch.bitwise_left_shift(u[..., 1::2], 4)
    if out is None:
        out = torch.empty(high.shape, dtype=torch.uint8, device=u.device)
    torch.bitwise_or(u[..., 0::2], high, out=out)
    return out.view(torch.int32)


def unpack_int4(packed: torch.Tensor, in_features: int | None = None) -> torch.Tensor:
    """int32 words [..., O, P] -> signed int4 codes int8 [..., O, in_features] (default 8 P)."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack_int4: packed weights must be int32, got {packed.dtype}")
    u = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 0xF
    codes = (u - 8).to(torch.int8).flatten(-2)
    if in_features is not None:
        codes = codes[..., :in_features]
    return codes


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, group_size: int, dtype: torch.dtype,
                    in_features: int | None = None) -> torch.Tensor:
    """w = q * scale from the checkpoint layout; the product is formed in float32 (exact for a
    bf16/fp16 scale and |q| <= 8) and cast to dtype once."""
    codes = unpack_int4(packed, in_features)
    w = codes.float().unflatten(-1, (-1, group_size)) * scale.float().unsqueeze(-1)
    return w.flatten(-2).to(dtype)


# --- kernel layout and the matmul ----------------------------------------------------------------


def cpu_kernel_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Shapes `_weight_int4pack_mm_for_cpu` accepts: N % 16 == 0 and a supported group size."""
    return out_features % 16 == 0 and group_size in KERNEL_GROUP_SIZES and in_features % group_size == 0


def _cuda_inner_k_tiles(in_features: int) -> int | None:
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


def cuda_kernel_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Shapes `_weight_int4pack_mm` (tinygemm) accepts: N % 8 == 0, K % 32 == 0, a supported group size."""
    return (out_features % 8 == 0 and group_size in KERNEL_GROUP_SIZES and in_features % group_size == 0
            and _cuda_inner_k_tiles(in_features) is not None)


class Int4Weight(nn.Module):
    """A stack of E int4 weight matrices [E, O, I] with one scale per group, resident packed.

    backend "cpu": `_weight_int4pack_mm_for_cpu`; nibbles u = q + 8 in the kernel's layout
    (uint8 [E, O, I/2]) and scales [E, G, O] in the checkpoint's dtype. The kernel wants
    (scale, zero) pairs [G, O, 2]; the zeros are all 0, so the pair is built per call for the one
    expert in use rather than stored, which keeps resident memory at 0.5 + 2/group_size bytes per
    weight (0.5625 for group 32; 0.28 of bf16) for one strided copy of the scales per matmul.
    backend "cuda": `_weight_int4pack_mm` (tinygemm, bf16 activations); (scale, zero) pairs stored.
    backend "dequant": the checkpoint's int32 words; each call dequantizes the one expert it needs.
    "auto" picks the kernel of the device when the shape fits it, else "dequant".
    """

    def __init__(self, packed_EOP: torch.Tensor, scale_EOG: torch.Tensor, group_size: int, in_features: int,
                 backend: str = "auto"):
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"Int4Weight backend={backend!r}; choose one of {BACKENDS}")
        if packed_EOP.ndim != 3 or scale_EOG.ndim != 3:
            raise ValueError(f"Int4Weight: expected packed [E, O, I/8] and scale [E, O, G], got "
                             f"{list(packed_EOP.shape)} and {list(scale_EOG.shape)}")
        E, O, P = packed_EOP.shape
        if P * CODES_PER_WORD < in_features or in_features % group_size != 0 or \
                tuple(scale_EOG.shape) != (E, O, in_features // group_size):
            raise ValueError(
                f"Int4Weight: packed {list(packed_EOP.shape)}, scale {list(scale_EOG.shape)} do not describe "
                f"[{E}, {O}, {in_features}] weights in groups of {group_size}")
        self.num_experts, self.out_features, self.in_features, self.group_size = E, O, in_features, group_size
        device = packed_EOP.device
        if backend == "auto":
            if device.type == "cuda" and cuda_kernel_fits(O, in_features, group_size):
                backend = "cuda"
            elif device.type == "cpu" and cpu_kernel_fits(O, in_features, group_size):
                backend = "cpu"
            else:
                backend = "dequant"
        elif backend == "cpu" and not (device.type == "cpu" and cpu_kernel_fits(O, in_features, group_size)):
            raise ValueError(f"Int4Weight backend='cpu' needs CPU tensors with O % 16 == 0 and group_size in "
                             f"{KERNEL_GROUP_SIZES}; got device {device}, O={O}, group_size={group_size}")
        elif backend == "cuda" and not (device.type == "cuda" and cuda_kernel_fits(O, in_features, group_size)):
            raise ValueError(f"Int4Weight backend='cuda' needs CUDA tensors with O % 8 == 0, I % 32 == 0 and "
                             f"group_size in {KERNEL_GROUP_SIZES}; got device {device}, O={O}, I={in_features}")
        self.backend = backend
        self._scratch: dict[torch.dtype, torch.Tensor] = {}
        if backend == "cpu":
            w = torch.empty(E, O, in_features // 2, dtype=torch.uint8, device=device)
            for e in range(E):  # one expert at a time: the unpacked int32 temporary stays small
                u = unpack_int4(packed_EOP[e], in_features).to(torch.int32) + 8
                w[e] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1)
            self.register_buffer("weight_int4", w)
            self.register_buffer("scale_EGO", scale_EOG.transpose(1, 2).contiguous())
        elif backend == "cuda":
            tiles = _cuda_inner_k_tiles(in_features)
            ws = []
            for e in range(E):
                u = (unpack_int4(packed_EOP[e], in_features).to(torch.int32) + 8).to(torch.uint8)
                # tinygemm takes two nibbles per byte, the even input channel in the high nibble.
                ws.append(torch.ops.aten._convert_weight_to_int4pack((u[:, ::2] << 4) | u[:, 1::2], tiles))
            self.register_buffer("weight_int4", torch.stack(ws))
            s = scale_EOG.to(torch.bfloat16).transpose(1, 2)
            self.register_buffer("scale_zero_EGO2", torch.stack((s, torch.zeros_like(s)), -1).contiguous())
        else:
            self.register_buffer("weight_packed", packed_EOP.contiguous())
            self.register_buffer("scale_EOG", scale_EOG.contiguous())

    @classmethod
    def from_codes(cls, codes_EOI: torch.Tensor, scale_EOG: torch.Tensor, group_size: int,
                   backend: str = "auto") -> Int4Weight:
        return cls(pack_int4(codes_EOI), scale_EOG, group_size, codes_EOI.shape[-1], backend)

    def extra_repr(self) -> str:
        return (f"experts={self.num_experts}, out={self.out_features}, in={self.in_features}, "
                f"group_size={self.group_size}, backend={self.backend}")

    @property
    def nbytes(self) -> int:
        """Resident bytes of this weight stack (packed codes and scales)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _scale_zero(self, e: int, dtype: torch.dtype) -> torch.Tensor:
        # The kernel wants contiguous (scale, zero) pairs [G, O, 2] (it reads them by raw offset and
        # gives wrong results, no error, for a strided view). Rather than store the all-zero half for
        # every expert, one scratch pair tensor per dtype is refilled per call: a strided copy of
        # G x O scales (~50 us for [64, 1536]; torch.stack of the two would take ~10x longer).
        # Not thread-safe: one forward at a time per module, as transformers runs them.
        buf = self._scratch.get(dtype)
        if buf is None or buf.device != self.scale_EGO.device:
            buf = self._scratch[dtype] = torch.zeros((*self.scale_EGO.shape[1:], 2), dtype=dtype,
                                                     device=self.scale_EGO.device)
        buf[..., 0].copy_(self.scale_EGO[e])
        return buf

    def mm(self, x_TI: torch.Tensor, e: int) -> torch.Tensor:
        """x @ W_e^T for expert e: [T, I] -> [T, O], in x's dtype."""
        if self.backend == "cpu":
            if x_TI.dtype not in (torch.bfloat16, torch.float16, torch.float32):
                raise TypeError(f"INT4 CPU kernel: activations must be bf16, fp16 or fp32, got {x_TI.dtype}")
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                x_TI.contiguous(), self.weight_int4[e], self.group_size, self._scale_zero(e, x_TI.dtype))
        if self.backend == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(
                x_TI.to(torch.bfloat16).contiguous(), self.weight_int4[e], self.group_size, self.scale_zero_EGO2[e])
            return y.to(x_TI.dtype)
        return x_TI @ self.dequantize(e, x_TI.dtype).t()

    def dequantize(self, e: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [O, I] weight of expert e, q * scale, in dtype (exact in float32)."""
        if self.backend == "dequant":
            return dequantize_int4(self.weight_packed[e], self.scale_EOG[e], self.group_size, dtype,
                                   self.in_features)
        # The kernel layouts are opaque; an identity matmul reads the weight back exactly in float32
        # (each output is one code times one scale).
        eye = torch.eye(self.in_features, dtype=torch.float32 if self.backend == "cpu" else torch.bfloat16,
                        device=self.weight_int4.device)
        return self.mm(eye, e).t().to(dtype)


class Int4Linear(nn.Module):
    """An nn.Linear whose weight is INT4 (a dense layer that someone else's checkpoint quantized)."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None):
        super().__init__()
        if weight.num_experts != 1:
            raise ValueError(f"Int4Linear takes one weight matrix, got {weight.num_experts}")
        self.weight_int4 = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.weight_int4.mm(x.reshape(-1, x.shape[-1]), 0).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias if self.bias is not None else y


# --- the experts implementation -----------------------------------------------------------------


def _expert_proj(self: nn.Module, proj: str, x: torch.Tensor, e: int) -> torch.Tensor:
    """x @ W^T of projection `proj` ("gate_up", "up", "down") of expert e, INT4 if the module holds
    it packed (`<proj>_int4`), else its dense fused parameter (`<proj>_proj`, maybe transposed)."""
    packed = getattr(self, f"{proj}_int4", None)
    y = packed.mm(x, e) if packed is not None else (
        x @ getattr(self, f"{proj}_proj")[e] if self.is_transposed else x @ getattr(self, f"{proj}_proj")[e].t())
    if self.has_bias:
        y = y + getattr(self, f"{proj}_proj_bias")[e]
    return y


def _num_experts(self: nn.Module) -> int:
    down = getattr(self, "down_int4", None)
    return down.num_experts if down is not None else self.down_proj.shape[0]


def int4_experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers experts forward over INT4 weights: the eager loop of the model's own experts
    module (tokens grouped per hit expert, gate by the module's `_apply_gate`, biases if any),
    with each expert's two matmuls on the packed weights (`gate_up_int4`/`up_int4`, `down_int4`)."""
    final_TH = torch.zeros_like(hidden_states)
    num_experts = _num_experts(self)
    with torch.no_grad():
        # Out-of-range ids are expert-parallel sentinels (another rank's experts): skip them.
        hit = torch.unique(top_k_index)
        hit = hit[(hit >= 0) & (hit < num_experts)].tolist()
    for e in hit:
        token_idx, top_k_pos = torch.where(top_k_index == e)
        x = hidden_states[token_idx]
        if self.has_gate:
            h = self._apply_gate(_expert_proj(self, "gate_up", x, e))
        else:
            h = self.act_fn(_expert_proj(self, "up", x, e))
        y = _expert_proj(self, "down", h, e)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        y = y * top_k_weights[token_idx, top_k_pos, None]
        final_TH.index_add_(0, token_idx, y.to(final_TH.dtype))
    return final_TH


def register_experts_implementation() -> str:
    """Registers the INT4 experts forward with transformers (idempotent); returns its name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if EXPERTS_IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, int4_experts_forward)
    return EXPERTS_IMPLEMENTATION
