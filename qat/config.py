"""QuantConfig: what the INT4 fake quant does, validated where it is built.

One dataclass carries every numeric choice of the quantizer (bits, group size, grid, scale dtype,
observer, which tensors), so that training, export and the runtime read the same object and can
never disagree. Defaults are Kimi K2 Thinking's: symmetric INT4, group size 32, codes in [-7, 7]
with scale = absmax / 7 rounded to bf16, dynamic absmax per forward, routed experts only.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

GRIDS = ("k2", "full")
OBSERVERS = ("absmax", "mse", "lsq", "static")
KERNELS = ("auto", "eager", "compiled")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""The project's one map from a config's dtype name to the torch dtype (model, export, runtime, scales)."""
SCALE_DTYPES = DTYPES  # the scale dtypes QuantConfig accepts: every one of them

# Routed experts only. Fused v5 experts (`mlp.experts.gate_up_proj`, `down_proj`, or `up_proj`
# for non-gated experts) and models that keep one nn.Linear per expert (`experts.3.w1.weight`).
# `(^|\.)experts\.` does not match `shared_experts.` / `shared_expert.`: those stay high precision.
DEFAULT_TARGETS = (
    r"(^|\.)experts\.(gate_up_proj|up_proj|down_proj)$",
    r"(^|\.)experts\.\d+\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$",
)


@dataclass
class QuantConfig:
    bits: int = 4
    """Bits per code, 2..8. Export to compressed-tensors supports 4 (and 8 unpacked is not ours)."""
    group_size: int = 32
    """Consecutive input channels sharing one scale (K2: 32). Must divide every target's input dim."""
    grid: str = "k2"
    """"k2": codes in [-(2^(b-1)-1), 2^(b-1)-1], scale = absmax/(2^(b-1)-1) (K2's [-7, 7]);
    "full": codes in [-2^(b-1), 2^(b-1)-1], scale = absmax/(2^(b-1)-0.5) ([-8, 7], /7.5)."""
    scale_dtype: str = "bfloat16"
    """dtype the scales are rounded to inside the fake quant: the export's weight_scale dtype."""
    observer: str = "absmax"
    """"absmax": dynamic per forward (K2). "mse": per-group clipping ratio searched to minimise
    quantization MSE, refreshed by refresh_observers(). "lsq": learned scales (LSQ gradients).
    "static": scales held fixed, absmax of the weights at prepare unless set (qat.ptq.set_scales:
    a PTQ method's own scales, e.g. GPTQ's, so the export writes exactly its codes)."""
    targets: tuple[str, ...] = DEFAULT_TARGETS
    """Regexes (re.search) over parameter names; default: routed experts only."""
    kernel: str = "auto"
    """How the fake quant runs, never what it computes: "eager" (torch ops), "compiled"
    (torch.compile fuses it into one pass; bit-identical), "auto" (compiled on GPU, eager on CPU)."""
    mse_ratios: tuple[float, ...] = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))
    """Clipping ratios the mse observer searches (1.0 .. 0.5)."""

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = (self.targets,)
        self.targets = tuple(self.targets)
        self.mse_ratios = tuple(float(r) for r in self.mse_ratios)
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"QuantConfig.bits={self.bits!r}: must be an integer in 2..8 (4 for INT4)")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"QuantConfig.group_size={self.group_size!r}: must be a positive integer (K2 uses 32)")
        if self.grid not in GRIDS:
            raise ValueError(f"QuantConfig.grid={self.grid!r}: choose one of {GRIDS}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"QuantConfig.scale_dtype={self.scale_dtype!r}: choose one of {tuple(SCALE_DTYPES)}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"QuantConfig.observer={self.observer!r}: choose one of {OBSERVERS}")
        if self.kernel not in KERNELS:
            raise ValueError(f"QuantConfig.kernel={self.kernel!r}: choose one of {KERNELS}")
        if not self.targets:
            raise ValueError("QuantConfig.targets is empty: give at least one regex over parameter names")
        for pattern in self.targets:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"QuantConfig.targets: {pattern!r} is not a valid regex ({e})") from None
        if not self.mse_ratios or any(not 0.0 < r <= 1.0 for r in self.mse_ratios):
            raise ValueError(f"QuantConfig.mse_ratios={self.mse_ratios!r}: each ratio must be in (0, 1]")

    # --- the integer grid ---------------------------------------------------------------------
    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def qmin(self) -> int:
        return -self.qmax if self.grid == "k2" else -(2 ** (self.bits - 1))

    @property
    def divisor(self) -> float:
        """absmax / divisor = scale: 7 for K2's INT4 grid, 7.5 for the full [-8, 7] grid."""
        return float(self.qmax) if self.grid == "k2" else self.qmax + 0.5

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        d["mse_ratios"] = list(self.mse_ratios)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"QuantConfig: unknown field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def quant_config_from(cfg: Mapping[str, Any]) -> QuantConfig:
    """QuantConfig from a mapping of its fields (e.g. conf/export.yaml's `qat:`); null values take the default.

    The training job's QAT schedule is a separate node (qat_schedule: train/config.py); the keys
    it once shared with conf/qat/*.yaml are still skipped here, so old configs keep loading."""
    schedule_keys = {"enabled", "start_step", "refresh_every", "log_every", "init", "init_samples"}
    d = {k: v for k, v in dict(cfg).items() if k not in schedule_keys and v is not None}
    return QuantConfig.from_dict(d)
