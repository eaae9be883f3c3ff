"""`python -m train.ptq`: a dense checkpoint -> its GPTQ-quantized checkpoint, calibrated on training data.

The PTQ baseline a practitioner would run instead of QAT (qat/gptq.py), as a job: load the BF16
checkpoint, render calibration documents from the training trajectories with the training job's
own data pipeline (the same held-out split left out, so evaluation tasks never calibrate), run
GPTQ on the routed experts, and write

- bits=4: the INT4 compressed-tensors export, with GPTQ's own codes and scales (the model is
  prepared with a "static" observer holding them; recomputing absmax scales would move codes);
- bits=3 / 2: a dense HF checkpoint holding the quantized weights (code x scale), which
  `sandbox_env.evaluate` scores like any checkpoint (its size on disk is the dense one's).

plus `ptq_report.json` (per-tensor SQNR, tokens per expert, the experts that fell back to RTN).
It lives in train/ because it reads data/; qat/ imports nothing of ours.

    python -m train.ptq input=runs/bf16/checkpoints/step_000200 output=runs/gptq_int4 calibration=outputs/trajectories
    python -m train.ptq input=... output=runs/gptq_int2 calibration=... bits=2 gptq.act_order=true
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qat.checkpoint import checkpoint_kind
from qat.config import DTYPES
from qat.gptq import GPTQConfig
from qat.jobs import register_schema

log = logging.getLogger("train.ptq")


@dataclass
class PTQJobConfig:
    """conf/ptq.yaml, the `python -m train.ptq` job (registered as ptq_schema). The quantizer fields
    (bits, group_size, grid, scale_dtype, targets) are qat.QuantConfig's; null takes its default."""

    input: str = "???"
    """Dense HF checkpoint dir (config.json + safetensors + tokenizer). Required."""
    output: str = "???"
    """Must be empty unless overwrite=true. Required."""
    calibration: str = "???"
    """Trajectories (sandbox_env.generate): the TRAINING data, never held-out tasks. Required."""
    method: str = "gptq"
    """The calibrated method; rtn / rtn_mse / nf4 need no job (evaluate's `ptq:` entries)."""
    num_samples: int = 128
    """Calibration documents (one user turn each, <= seq_len tokens); each expert should see more tokens
    than its input dim (~tokens x top_k / experts), or GPTQ overfits them."""
    seq_len: int = 512
    batch_size: int = 8
    """Documents per forward; memory only."""
    val_fraction: float = 0.05
    """The training job's eval.val_fraction: its held-out records are left out here too."""
    seed: int = 0
    """The training job's seed (same held-out split)."""
    dtype: str | None = None
    """null = as saved."""
    overwrite: bool = False
    bits: int | None = None
    """4 -> INT4 export; 3 / 2 -> dense checkpoint of the fake-quant weights. null = QuantConfig's (4)."""
    group_size: int | None = None
    grid: str | None = None
    scale_dtype: str | None = None
    targets: list[str] | None = None
    """null = routed experts only."""
    gptq: GPTQConfig = field(default_factory=GPTQConfig)


register_schema("ptq", PTQJobConfig)


def _validate(cfg: dict[str, Any]) -> None:
    for key in ("input", "output", "calibration"):
        if cfg.get(key) in (None, "", "???"):
            raise ValueError(f"ptq: {key} is required, e.g. python -m train.ptq input=runs/bf16 output=runs/gptq_int4 "
                             f"calibration=outputs/trajectories")
    if cfg["method"] != "gptq":
        raise ValueError(f"ptq: method={cfg['method']!r}; this job runs gptq (the calibration-free baselines run "
                         f"in memory: `ptq: rtn` entries of sandbox_env.evaluate, or python -m qat.export)")
    if not (Path(str(cfg["input"])) / "config.json").exists():
        raise ValueError(f"ptq: input={cfg['input']!r} has no config.json; point it at a dense HF checkpoint")
    kind = checkpoint_kind(str(cfg["input"]))
    if kind != "hf":
        raise ValueError(f"ptq: input={cfg['input']!r} is a {'QAT training' if kind == 'fake_quant' else kind} checkpoint; "
                         f"PTQ starts from the BF16 model (a qat=none run); export QAT checkpoints with python -m qat.export")
    for key in ("num_samples", "seq_len", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise ValueError(f"ptq: {key}={cfg[key]!r}; must be a positive integer")
    if cfg.get("dtype") is not None and cfg["dtype"] not in DTYPES:
        raise ValueError(f"ptq: dtype={cfg['dtype']!r}; choose one of {list(DTYPES)} or null (as saved)")


def run(cfg: Any) -> dict[str, Any]:
    """The job: returns the summary it writes to <output>/ptq_report.json."""
    from omegaconf import DictConfig, OmegaConf
    from transformers import AutoModelForCausalLM

    from data.pipeline import calibration_batches, split_heldout
    from data.schema import read_trajectories
    from data.tokenizer import load_tokenizer
    from qat import QuantConfig
    from qat.export import export_int4
    from qat.gptq import GPTQConfig
    from qat.ptq import apply_ptq, prepare_with_scales

    cfg = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    _validate(cfg)
    src, out = Path(str(cfg["input"])), Path(str(cfg["output"]))
    qc = {k: cfg[k] for k in ("bits", "group_size", "grid", "scale_dtype") if cfg.get(k) is not None}
    if cfg.get("targets"):
        qc["targets"] = tuple(cfg["targets"])
    quant_config = QuantConfig(**qc)
    gptq_config = GPTQConfig(**(cfg.get("gptq") or {}))
    if out.exists() and any(out.iterdir()) and not cfg.get("overwrite"):
        raise ValueError(f"ptq: output={str(out)!r} is not empty; pass overwrite=true or choose an empty directory")

    tokenizer = load_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=DTYPES.get(cfg.get("dtype"), "auto")).eval()
    records = list(read_trajectories(str(cfg["calibration"])))
    train_records, held_out = split_heldout(records, float(cfg["val_fraction"]), int(cfg["seed"]))
    batches = calibration_batches(train_records, tokenizer, num_samples=cfg["num_samples"], seq_len=cfg["seq_len"],
                                  batch_size=cfg["batch_size"], seed=int(cfg["seed"]))
    log.info("ptq: calibrating on %d documents of %d training trajectories (%d held out) from %s",
             sum(b["input_ids"].shape[0] for b in batches), len(train_records), len(held_out), cfg["calibration"])
    report = apply_ptq(model, "gptq", quant_config, calibration=batches, gptq=gptq_config)

    if quant_config.bits == 4:
        prepare_with_scales(model, report)
        export_int4(model, out, tokenizer, overwrite=bool(cfg.get("overwrite")))
        written = "int4"
    else:
        # No packed format below 4 bits here: the dense weights are exactly code x scale.
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        written = "fake_quant_dense"
    summary = {
        "method": "gptq", "written": written, "input": str(src), "calibration": str(cfg["calibration"]),
        "quant_config": quant_config.to_dict(), "gptq": gptq_config.__dict__,
        "calibration_tokens": report.calibration_tokens, "mean_sqnr_db": report.mean_sqnr_db,
        "sqnr_db": report.sqnr_db, "rtn_fallback": report.rtn_fallback,
        "tokens_per_expert": report.tokens_per_expert,
    }
    (out / "ptq_report.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("ptq: GPTQ INT%d g%d -> %s (%s); mean weight SQNR %.2f dB, %d expert tensors fell back to RTN",
             quant_config.bits, quant_config.group_size, out, written, report.mean_sqnr_db, len(report.rtn_fallback))
    return summary


def main() -> None:  # pragma: no cover - exercised through a subprocess by the test
    from qat.jobs import job

    @job("ptq")
    def _main(cfg) -> None:
        summary = run(cfg)
        print(json.dumps({k: summary[k] for k in ("written", "calibration_tokens", "mean_sqnr_db")}, indent=2))

    _main()


if __name__ == "__main__":
    main()
