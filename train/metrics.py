"""Where the training job's numbers go: a JSONL file always, wandb when asked, a loss-curve PNG at the end.

The JSONL (`<run_dir>/metrics.jsonl`, one JSON object per logged step) is the record of truth: it
needs no service, survives a crash line by line, and is what the loss-curve plot and the tests
read. wandb is an optional mirror through accelerate's tracker (`Accelerator(log_with="wandb")`,
`init_trackers`, `accelerator.log`), offline by default so that no run ever needs a network
(`logger=wandb logger.mode=online` to sync live). Only the main process logs.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOGGER_BACKENDS = ("jsonl", "wandb")
WANDB_MODES = ("offline", "online", "disabled")


class MetricsLogger:
    """Appends metrics to `<run_dir>/metrics.jsonl`, and passes each row to `mirror(values, step=)`
    if given (the training job passes `accelerator.log`, which feeds its trackers: wandb)."""

    def __init__(self, run_dir: str | os.PathLike, *, resume_step: int | None = None,
                 mirror: Callable[..., Any] | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            # A resumed run re-does the steps after its checkpoint: drop the lines it will rewrite.
            kept = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in kept))
        self._file = open(self.path, "a")
        self._mirror = mirror

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": int(step)}
        for k, v in metrics.items():
            row[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._mirror is not None:
            self._mirror({k: v for k, v in row.items() if k != "step"}, step=int(step))

    def close(self) -> None:
        self._file.close()


def wandb_init_kwargs(logger_cfg: Mapping[str, Any], run_dir: str | os.PathLike) -> dict:
    """`init_kwargs` of `accelerator.init_trackers` for conf/logger/wandb.yaml (train.config.LoggerConfig):
    the run lives in <run_dir>/wandb, and the same id resumes the same run."""
    return {"wandb": {"mode": logger_cfg["mode"], "name": logger_cfg.get("name"), "id": logger_cfg.get("id"),
                      "tags": list(logger_cfg.get("tags") or []), "dir": str(run_dir), "resume": "allow"}}


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
