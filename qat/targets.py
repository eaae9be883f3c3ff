"""Which parameters of a model are quantized: the one matcher that prepare, the export and the PTQ
baselines share.

QuantConfig.targets is a list of regular expressions searched in parameter names (by default the
routed experts' fused `experts.gate_up_proj` / `experts.down_proj`). The one idea: a target is an
expert weight, never anything else. A fused 3D tensor of a module that is not an nn.Linear (the
transformers v5 experts) or the weight of an nn.Linear (models that keep one Linear per expert);
a pattern that reaches an attention matrix, a router or a bias is a configuration error, raised
before anything is changed, so fake quant, export and PTQ can never disagree on what INT4 covers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .config import QuantConfig


@dataclass(frozen=True)
class Target:
    """One quantized parameter: `getattr(module, attr)`, named `name` in the model."""

    name: str
    module: nn.Module
    attr: str
    transposed: bool
    """Stored input-major ([E, I, O], GPT-OSS's experts): quantization groups run along dim -2."""

    @property
    def param(self) -> torch.Tensor:
        return getattr(self.module, self.attr)


def is_expert_weight(module: nn.Module, attr: str, param: torch.Tensor) -> bool:
    """A fused 3D expert tensor (of a module that is not a Linear) or an nn.Linear's weight."""
    if isinstance(module, nn.Linear):
        return attr == "weight"
    return param.ndim == 3


def match_targets(model: nn.Module, cfg: QuantConfig) -> list[Target]:
    """The parameters of `model` that cfg.targets selects, in module order.

    Raises ValueError if a match is not an expert weight (naming it), or if nothing matches
    (listing candidate expert tensors). Works on meta parameters (a skeleton model) too.
    """
    patterns = [re.compile(p) for p in cfg.targets]
    targets = []
    for mod_name, module in model.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            full = f"{mod_name}.{attr}" if mod_name else attr
            if not any(p.search(full) for p in patterns):
                continue
            if not is_expert_weight(module, attr, param):
                raise ValueError(
                    f"QuantConfig.targets matched {full} (shape {list(param.shape)}), which is neither a fused 3D "
                    f"expert weight nor an nn.Linear weight; narrow the targets so they match expert weights only"
                )
            transposed = bool(getattr(module, "is_transposed", False)) and param.ndim == 3
            targets.append(Target(full, module, attr, transposed))
    if not targets:
        candidates = [n for n, p in model.named_parameters() if "expert" in n or p.ndim == 3][:20]
        raise ValueError(
            f"QuantConfig.targets {list(cfg.targets)} matched no parameter of {type(model).__name__}. "
            f"Candidate expert tensors: {candidates or 'none (is this a MoE model?)'}"
        )
    return targets


def unmatched_patterns(targets: list[Target], cfg: QuantConfig) -> list[str]:
    """Patterns of cfg.targets that selected none of `targets` (a typo, or a family without them)."""
    return [p for p in cfg.targets if not any(re.search(p, t.name) for t in targets)]
