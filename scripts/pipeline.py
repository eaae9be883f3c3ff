"""The main job: trajectories -> BF16 -> QAT -> INT4 export + PTQ baselines -> evaluation -> report.

Each stage is one of the project's own jobs run as a subprocess with Hydra overrides, exactly the
command a user would type (they are printed), so the pipeline is a readable list of commands and
nothing it does is hidden in this file. Every stage checks for its finished output first and skips
when it is there: a rerun after a crash continues where it stopped (the training job itself
resumes from its last checkpoint with resume=auto), and a rerun of a finished pipeline only prints
the report.

    bash scripts/pipeline.sh                                  # setup + the default pipeline (CPU)
    .venv/bin/python scripts/pipeline.py out_dir=outputs/small generate.train_per_family=50 \
        bf16.max_steps=40 qat.max_steps=10 sweep=[int4_g32] ptq=[rtn]
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from qat.jobs import job, register_schema

ROOT = Path(__file__).resolve().parents[1]

# The schema of conf/pipeline.yaml: names and types only. Its values live in the YAML, where each
# knob carries its trade-off (MISSING here = set there), so a misspelled key or a wrong type fails
# at composition, while the YAML stays the one place a user reads the main job's settings.


@dataclass
class TrainStage:
    max_steps: int = MISSING
    lr: float = MISSING
    overrides: list[str] = field(default_factory=list)


@dataclass
class GPTQStage:
    num_samples: int = MISSING
    overrides: list[str] = field(default_factory=list)


@dataclass
class GenerateStage:
    tasks: str = MISSING
    train_per_family: int = MISSING
    heldout_per_family: int = MISSING
    workers: int = MISSING
    style: str = MISSING
    overrides: list[str] = field(default_factory=list)


@dataclass
class SampledStage:
    seeds: list[int] = field(default_factory=list)
    temperature: float = MISSING
    models: list[str] | None = None


@dataclass
class EvaluateStage:
    tasks_per_family: int = MISSING
    kl_records: int = MISSING
    tools_disabled: Any = False  # false, true or a list of model names
    sampled: SampledStage = field(default_factory=SampledStage)
    overrides: list[str] = field(default_factory=list)
    int4_dtype: str | None = None


@dataclass
class PipelineConfig:
    out_dir: str = MISSING
    python: str | None = None
    threads: int | None = None
    compact_prompt: bool = MISSING
    model_preset: str = MISSING
    seq_len: int = MISSING
    micro_batch_size: int = MISSING
    train_overrides: list[str] = field(default_factory=list)
    bf16: TrainStage = field(default_factory=TrainStage)
    qat: TrainStage = field(default_factory=TrainStage)
    sweep: list[str] = field(default_factory=list)
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> QuantConfig fields (the train job checks them)
    ptq: list[str] = field(default_factory=list)
    gptq: GPTQStage = field(default_factory=GPTQStage)
    gptq_then_qat: list[str] = field(default_factory=list)
    generate: GenerateStage = field(default_factory=GenerateStage)
    evaluate: EvaluateStage = field(default_factory=EvaluateStage)


register_schema("pipeline", PipelineConfig)


class Pipeline:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.out = Path(cfg.out_dir).resolve()
        self.python = cfg.python or sys.executable
        self.env = dict(os.environ, WANDB_MODE=os.environ.get("WANDB_MODE", "offline"),
                        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
        self.timings: dict[str, float] = {}

    # --- plumbing -----------------------------------------------------------------------------
    def run(self, name: str, module: str, overrides: list[str], done: Path | None, label: str | None = None) -> None:
        if done is not None and done.exists():
            where = label or done.relative_to(self.out)
            print(f"[pipeline] {name}: done ({where}), skipped", flush=True)
            return
        cmd = [self.python, "-m", module, *overrides]
        if self.cfg.threads and module == "train":
            cmd.append(f"threads={self.cfg.threads}")
        print(f"\n[pipeline] {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=self.env)
        if proc.returncode != 0:
            raise SystemExit(f"[pipeline] stage {name!r} failed (exit {proc.returncode}); fix it and rerun: "
                             f"finished stages are skipped")
        self.timings[name] = time.perf_counter() - t0
        print(f"[pipeline] {name}: {self.timings[name]:.0f}s", flush=True)

    def final_checkpoint(self, run_dir: Path, max_steps: int) -> Path:
        return run_dir / "checkpoints" / f"step_{max_steps:06d}"

    # --- stages -------------------------------------------------------------------------------
    def base(self) -> None:
        """Builds the preset's pretrained base when the preset is made by sparse upcycling
        (`upcycle:` in conf/model/<preset>.yaml) and its directory is missing."""
        from train.models import load_preset

        preset = load_preset(self.cfg.model_preset)
        if preset.get("upcycle") is None:
            return
        path = Path(preset["path"])
        path = path if path.is_absolute() else ROOT / path
        self.run("base (upcycle)", "train.upcycle", [f"output={path}", *[f"{k}={_hydra_value(v)}" for k, v in
                                                                          preset["upcycle"].items()]],
                 done=path / "upcycle.json", label=str(path))

    def generate(self) -> Path:
        g = self.cfg.generate
        out = self.out / "trajectories"
        self.run("generate", "sandbox_env.generate", [
            f"out_dir={out}", f"tasks={g.tasks}", f"tasks.splits.train={g.train_per_family}",
            f"tasks.splits.heldout={g.heldout_per_family}", f"workers={g.workers}",
            f"compact_prompt={str(self.cfg.compact_prompt).lower()}", f"policy.style={g.style}", *g.overrides,
        ], done=out / "summary.json")
        return out

    def train(self, name: str, data: Path, qat: dict | None, init_from: Path | None, stage_cfg) -> Path:
        run_dir = self.out / "runs" / name
        final = self.final_checkpoint(run_dir, stage_cfg.max_steps)
        overrides = [
            f"data.path={data / 'train'}", f"output_dir={run_dir}", "resume=auto",
            f"model={self.cfg.model_preset}", f"data.seq_len={self.cfg.seq_len}",
            f"micro_batch_size={self.cfg.micro_batch_size}", f"max_steps={stage_cfg.max_steps}",
            # a checkpoint of the 373M default base is ~6 GB with its optimizer state: keep one, for resume
            f"optim.lr={stage_cfg.lr}", f"checkpoint.every={max(stage_cfg.max_steps // 2, 1)}", "checkpoint.keep_last=1",
            *self.cfg.train_overrides,
        ]
        if init_from is not None:
            overrides.append(f"model.path={init_from}")
        if qat is None:
            overrides.append("qat=none")
        else:
            overrides += ["qat=k2_int4", "qat_schedule.start_step=0", *[f"qat.{k}={v}" for k, v in qat.items()]]
        self.run(f"train {name}", "train", [*overrides, *stage_cfg.overrides], done=final / "COMPLETE")
        return final

    def export(self, name: str, checkpoint: Path, qat: dict | None = None) -> Path:
        out = self.out / "export" / name
        overrides = [f"input={checkpoint}", f"output={out}", "overwrite=true"]
        overrides += [f"qat.{k}={v}" for k, v in (qat or {}).items()]
        self.run(f"export {name}", "qat.export", overrides, done=out / "export_complete.json")
        return out

    def gptq(self, name: str, checkpoint: Path, data: Path, q: dict) -> Path:
        """GPTQ of the BF16 reference, calibrated on the training trajectories (never held-out tasks)."""
        g = self.cfg.gptq
        out = self.out / "export" / name
        overrides = [f"input={checkpoint}", f"output={out}", f"calibration={data / 'train'}", "overwrite=true",
                     f"num_samples={g.num_samples}", f"seq_len={self.cfg.seq_len}",
                     *[f"{k}={v}" for k, v in q.items()], *g.overrides]
        self.run(f"gptq {name}", "train.ptq", overrides, done=out / "ptq_report.json")
        return out

    def main(self) -> None:
        cfg = self.cfg
        t0 = time.perf_counter()
        self.out.mkdir(parents=True, exist_ok=True)
        self.base()
        data = self.generate()
        base = self.train("bf16", data, None, None, cfg.bf16)
        # The reference runs the QAT stage's exact schedule without fake quant, so BF16, QAT and PTQ
        # (which quantizes this reference) have all seen the same training; a QAT model is then
        # compared with a BF16 model that trained as long, and KL/top-1 measure quantization alone.
        # (Against the base run instead, KL would mostly measure the extra fine-tuning: an
        # undertrained model moves a lot in a few steps.)
        bf16 = self.train("bf16_final", data, None, base, cfg.qat)
        models: list[dict] = [{"name": "bf16", "path": str(bf16)}]
        unknown = sorted(set(cfg.ptq) - {"rtn", "gptq", "mse", "nf4_b32", "nf4_b64"})
        if unknown:
            raise SystemExit(f"[pipeline] ptq={list(cfg.ptq)}: unknown methods {unknown}; choose from rtn, gptq, mse, "
                             "nf4_b32, nf4_b64")
        for setting in cfg.sweep:
            q = dict(cfg.settings[setting])
            qat_ckpt = self.train(f"qat_{setting}", data, q, base, cfg.qat)
            if q["bits"] == 4:
                models.append({"name": f"qat_{setting}", "path": str(self.export(f"qat_{setting}", qat_ckpt))})
                if "rtn" in cfg.ptq:
                    models.append({"name": f"ptq_rtn_{setting}", "path": str(self.export(f"ptq_rtn_{setting}", bf16, q))})
            else:  # evaluated as fake quant: the QAT checkpoint carries its QuantConfig
                models.append({"name": f"qat_{setting}", "path": str(qat_ckpt)})
                if "rtn" in cfg.ptq:
                    models.append({"name": f"ptq_rtn_{setting}", "path": str(bf16), "ptq": "rtn", "ptq_config": q})
            if "gptq" in cfg.ptq:  # INT4: a real export with GPTQ's own scales; INT3/INT2: dense code x scale
                models.append({"name": f"ptq_gptq_{setting}", "path": str(self.gptq(f"ptq_gptq_{setting}", bf16, data, q))})
            if setting in cfg.gptq_then_qat:  # QAT started from the GPTQ solution (qat_schedule.init=gptq)
                ckpt = self.train(f"qat_from_gptq_{setting}", data, {**q, "init": "gptq",
                                                                     "init_samples": cfg.gptq.num_samples}, base, cfg.qat)
                models.append({"name": f"qat_from_gptq_{setting}",
                               "path": str(self.export(f"qat_from_gptq_{setting}", ckpt) if q["bits"] == 4 else ckpt)})
        int4_g32 = dict(cfg.settings["int4_g32"])
        for method in cfg.ptq:
            if method in ("rtn", "gptq"):
                continue  # done above for every setting
            if method == "mse":
                models.append({"name": "ptq_mse_int4_g32",
                               "path": str(self.export("ptq_mse_int4_g32", bf16, {**int4_g32, "observer": "mse"}))})
            else:
                models.append({"name": f"ptq_{method}", "path": str(bf16), "ptq": method})
        for m in models:  # INT4 exports decode with the activations their kernel is fast at
            if (Path(m["path"]) / "export_complete.json").exists() and cfg.evaluate.int4_dtype:
                m["dtype"] = cfg.evaluate.int4_dtype
        (self.out / "models.json").write_text(json.dumps(models, indent=2))
        eval_dir = self.evaluate(data, models)
        print(f"\n[pipeline] report: {eval_dir / 'report.md'} (plots: {eval_dir}/*.png)\n")
        print(self.headline(eval_dir))
        print(f"\n[pipeline] finished in {time.perf_counter() - t0:.0f}s; stage times: "
              + ", ".join(f"{k} {v:.0f}s" for k, v in self.timings.items()))

    def evaluate(self, data: Path, models: list[dict]) -> Path:
        e = self.cfg.evaluate
        out = self.out / "eval"
        names = {m["name"] for m in models}

        def only_ours(which):  # a list of names keeps those this run has (the sweep may leave some out)
            which = _plain(which)
            return [n for n in which if n in names] if isinstance(which, list) else which

        entries = ", ".join("{" + ", ".join(f"{k}: {_hydra_value(v)}" for k, v in m.items()) + "}" for m in models)
        self.run("evaluate", "sandbox_env.evaluate", [
            f"out_dir={out}", f"checkpoints=[{entries}]", "reference=bf16", f"tasks={self.cfg.generate.tasks}",
            f"tasks.splits.heldout={e.tasks_per_family}", f"compact_prompt={str(self.cfg.compact_prompt).lower()}",
            f"kl.trajectories={data / 'heldout'}", f"kl.max_records={e.kl_records}",
            f"tools_disabled={_hydra_value(only_ours(e.tools_disabled))}",
            f"sampled.seeds={_hydra_value(_plain(e.sampled.seeds))}", f"sampled.temperature={e.sampled.temperature}",
            f"sampled.models={_hydra_value(only_ours(e.sampled.models))}", *e.overrides,
        ], done=out / "report.json")
        return out

    def headline(self, eval_dir: Path) -> str:
        """The one table the pipeline exists to show: success on held-out tasks and agreement with BF16."""
        report = json.loads((eval_dir / "report.json").read_text())
        families = sorted({f for m in report["models"].values() for f in m["by_family"]})
        smp = next((m["sampled"] for m in report["models"].values() if "sampled" in m), None)
        smp_head = [f"sampled T={smp['temperature']:g} ({len(smp['seeds'])} seeds)"] if smp else []
        ref = report["reference"]
        head = ["model", "kind", "success (95% CI)", f"vs {ref}: McNemar p", *families, *smp_head, "invalid calls/ep.",
                f"KL vs {ref}", "top-1 agr.", "MB on disk"]
        rows = []
        for name, m in report["models"].items():
            kl = m.get("kl_vs_reference", {})
            s = m.get("sampled")
            o = m["overall"]
            pv = m.get("paired_vs_reference")
            rows.append([name, m["kind"], f"{_pct(o['success'])} [{100 * o['ci_low']:.0f}, {100 * o['ci_high']:.0f}]",
                         f"{100 * pv['success_diff']:+.1f} pts, p={pv['p_value']:.2f}" if pv else "-",
                         *[_pct(m["by_family"].get(f, {}).get("success")) for f in families],
                         *([f"{_pct(s['success_mean'])} ± {100 * s['success_std']:.1f}" if s else "-"] if smp else []),
                         f"{o['avg_invalid_tool_calls']:.2f}",
                         f"{kl['kl']:.2e}" if kl else "-", f"{kl['top1_agreement']:.4f}" if kl else "-",
                         f"{m['size_bytes'] / 2**20:.1f}"])
            if "no_tools" in m:
                nt = m["no_tools"]["overall"]
                rows.append([f"{name}/no-tools", m["kind"], f"{_pct(nt['success'])} [{100 * nt['ci_low']:.0f}, "
                             f"{100 * nt['ci_high']:.0f}]", "-",
                             *[_pct(m["no_tools"]["by_family"].get(f, {}).get("success")) for f in families],
                             *(["-"] if smp else []), "-", "-", "-", "-"])
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        table = "\n".join(lines)
        (eval_dir / "headline.md").write_text(
            f"{report['tasks']} held-out tasks per model ({report['split']} split), greedy unless noted; "
            f"KL and top-1 agreement teacher-forced on held-out teacher trajectories.\n\n{table}\n")
        return table


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _plain(v):
    """A config node as plain Python (lists, dicts, scalars)."""
    return OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v


def _hydra_value(v) -> str:
    """A Hydra override literal: strings quoted (paths contain characters the grammar reserves)."""
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_hydra_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_hydra_value(x) for x in v) + "]"
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


@job("pipeline")
def main(cfg: DictConfig) -> None:
    Pipeline(cfg).main()


if __name__ == "__main__":
    main()
