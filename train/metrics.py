"""Where the training job's numbers go: a JSONL file always, wandb when asked, a loss-curve PNG at the end.

The JSONL (`<run_dir>/metrics.jsonl`, one JSON object per logged step) is the record of truth: it
needs no service, survives a crash line by line, and is what the loss-curve plot and the tests
read. wandb is an optional mirror, offline by default so that no run ever needs a network
(`logger=wandb logger.mode=online` to sync live). Only the main process logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


class MetricsLogger:
    """Appends metrics to `<run_dir>/metrics.jsonl` and mirrors them to wandb if configured."""

    def __init__(self, run_dir: str | os.PathLike, *, backend: str = "jsonl", wandb_cfg: Mapping[str, Any] | None = None,
                 config: Mapping[str, Any] | None = None, resume_step: int | None = None):
        if backend not in ("jsonl", "wandb"):
            raise ValueError(f"logger.backend={backend!r}: choose jsonl or wandb")
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # A resumed run re-does the steps after its checkpoint: drop the lines it will rewrite.
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self._file = open(self.path, "a")
        self._wandb = None
        if backend == "wandb":
            wandb_cfg = dict(wandb_cfg or {})
            mode = wandb_cfg.get("mode", "offline")
            if mode not in WANDB_MODES:
                raise ValueError(f"logger.mode={mode!r}: choose one of {WANDB_MODES}")
            import wandb

            self._wandb = wandb.init(
                project=wandb_cfg.get("project", "agentic-qat"), name=wandb_cfg.get("name"), mode=mode,
                dir=str(self.path.parent), config=dict(config or {}), resume="allow",
                id=wandb_cfg.get("id"), tags=list(wandb_cfg.get("tags") or []),
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step)}
        for k, v in metrics.items():
            row[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Rows of a metrics.jsonl file; a torn last line (a crash mid-write) is skipped."""
    rows = []
    for ln in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss_curve(metrics_path: str | os.PathLike, out_png: str | os.PathLike, *, qat_start_step: int | None = None) -> Path:
    """Train loss (and held-out loss, if logged) against step; a dashed line where fake quant starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), float) and math.isfinite(r["loss"])]
    held = [(r["step"], r["eval/loss"]) for r in rows if isinstance(r.get("eval/loss"), float)]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if held:
        ax.plot(*zip(*held), "o-", label="held-out loss", lw=1.2)
    if qat_start_step is not None and train and qat_start_step <= train[-1][0]:
        ax.axvline(qat_start_step, ls="--", c="gray", label=f"fake quant on (step {qat_start_step})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return out_png
