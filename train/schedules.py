"""Learning-rate schedules (linear warmup, then cosine / linear decay / constant) and the QAT switch.

Kept as plain functions of the step so the schedule is a pure function: resuming at step k
gives the same learning rate as an uninterrupted run without replaying anything.

Why not `transformers.get_scheduler`: its warmups are step/warmup_steps, so the first optimizer
step runs at lr 0 (a wasted step) and every warmup step one notch lower than here ((step+1)/warmup);
after warmup its "cosine_with_min_lr" / "linear" values equal these. No name it offers reproduces
this schedule, and switching would change the loss of every run that warms up.
"""

from __future__ import annotations

import math

import torch

SCHEDULERS = ("cosine", "linear", "constant")


def lr_factor(step: int, *, scheduler: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if scheduler == "constant":
        return 1.0
    decay_steps = max(max_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if scheduler == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif scheduler == "linear":
        shape = 1.0 - progress
    else:
        raise ValueError(f"optim.scheduler={scheduler!r}: choose one of {SCHEDULERS}")
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


class _Factor:
    """Picklable lr_lambda (LambdaLR.state_dict keeps callable objects' attributes)."""

    def __init__(self, **kw):
        self.kw = kw

    def __call__(self, step: int) -> float:
        return lr_factor(step, **self.kw)


def build_scheduler(optimizer: torch.optim.Optimizer, *, scheduler: str, warmup_steps: int, max_steps: int,
                    min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    if scheduler not in SCHEDULERS:
        raise ValueError(f"optim.scheduler={scheduler!r}: choose one of {SCHEDULERS}")
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Factor(scheduler=scheduler, warmup_steps=warmup_steps, max_steps=max_steps, min_lr_ratio=min_lr_ratio)
    )


def fake_quant_on(step: int, start_step: int) -> bool:
    """QAT schedule: the fake quant is on for the optimizer step `step` (0-based) iff step >= start_step."""
    return step >= start_step
