"""Where each tensor of a transformers MoE model goes in a hub checkpoint, and the model skeleton to ask.

The export writes, and the INT4 loader reads, checkpoints in the layout of the Hugging Face hub: one
Linear per expert (`model.layers.L.mlp.experts.E.gate_proj.weight`, Mixtral's
`block_sparse_moe.experts.E.w1`), which transformers v5 fuses into 3D tensors at load with the
family's conversion mapping. The one idea: we do not hard-code the inverse per family, we ask
transformers' `revert_weight_conversion` (what its `save_pretrained` uses) where every row of every
fused tensor goes, by reverting small index tensors. So transformers' `from_pretrained`, vLLM and
SGLang see the layout they already load, and our loader reads any producer's checkpoint of these
families without per-family code.

Legend: E experts, O output channels.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class RowSlice:
    """Rows r0:r1 of expert e of a fused [E, O, ...] tensor, stored under `hub_key`."""

    hub_key: str
    expert: int
    r0: int
    r1: int


def hub_layout(model: nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, str | list[RowSlice]]:
    """Hub name(s) of each named tensor, from transformers' own reverse conversion mapping.

    For a 3D tensor [E, O, ...] that the mapping un-fuses: the list of RowSlices (in hub key
    order); for anything else: its hub name (the same name unless the family renames it).
    """
    from transformers.core_model_loading import revert_weight_conversion

    probes, spans, next_id = {}, {}, 0
    for name, shape in shapes.items():
        if len(shape) == 3:
            n = shape[0] * shape[1]
            probes[name] = torch.arange(next_id, next_id + n, dtype=torch.int64).view(shape[0], shape[1], 1)
        else:
            n = 1
            probes[name] = torch.tensor([next_id], dtype=torch.int64)
        spans[name] = (next_id, n)
        next_id += n
    reverted = revert_weight_conversion(model, probes)
    starts = sorted(start for start, _ in spans.values())
    owner = {start: name for name, (start, _) in spans.items()}
    layout: dict[str, Any] = {}
    for hub_key, ids in reverted.items():
        ids = ids.reshape(-1)
        name = owner[starts[bisect.bisect_right(starts, int(ids[0])) - 1]]
        start, n = spans[name]
        if ids.numel() == n and torch.equal(ids, torch.arange(start, start + n)):
            layout[name] = hub_key  # renamed (or not), not split
            continue
        shape = shapes[name]
        local = ids - start
        e, rows = local // shape[1], local % shape[1]
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        if not (bool((e == e[0]).all()) and torch.equal(rows, torch.arange(r0, r1))):
            raise ValueError(f"transformers' conversion mapping splits {name} into {hub_key} in a way that is not "
                             f"one row range of one expert; this family's layout is not supported by export_int4")
        layout.setdefault(name, []).append(RowSlice(hub_key, int(e[0]), r0, r1))
    missing = set(shapes) - set(layout)
    assert not missing, f"revert_weight_conversion dropped {sorted(missing)[:5]}"
    return layout


def skeleton(config, dtype: torch.dtype | None = None) -> nn.Module:
    """The transformers model of `config` with meta parameters (names, shapes, no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    kwargs = {"dtype": dtype} if dtype is not None else {}
    # Parameters on the meta device, buffers real (include_buffers=False, said explicitly: the
    # default reads ACCELERATE_INIT_INCLUDE_BUFFERS), so computed non-persistent buffers such as
    # rotary inv_freq are correct without a checkpoint entry.
    with init_empty_weights(include_buffers=False), no_init_weights():
        return AutoModelForCausalLM.from_config(config, **kwargs)
