"""Training throughput of our job (`python -m train`'s recipe) against TRL's SFTTrainer, side by side.

Same tiny MoE (train.models preset, same seed), same tokenizer, same packed rows from the data
pipeline, same micro-batch, AdamW with clipping, fp32 on CPU. Each framework runs in its own
subprocess, one after the other, so peak RSS (ru_maxrss) is each one's own. Tokens/s is the
median over steps after a warmup of the per-step wall time (rows x seq_len tokens per step);
TRL's step time is taken between its on_step_begin and on_step_end callbacks, ours is the
recipe's own per-step figure (metrics.jsonl `tokens_per_s`, the same span: fetch, forward,
backward, clip, optimizer step). The ratio ours/TRL is printed (target >= 1.0); a third row is
our job with INT4 fake quant on, TRL having no QAT to compare it with.

    .venv/bin/python scripts/bench/train_throughput.py                    # default: tiny_qwen3_moe, seq 512, batch 8
    .venv/bin/python scripts/bench/train_throughput.py --steps 30 --seq-len 256 --batch-size 4 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _tokens_per_s(step_times: list[float], tokens_per_step: int, warmup: int) -> float:
    steady = step_times[warmup:] or step_times
    return tokens_per_step / statistics.median(steady)


def worker_ours(a) -> dict:
    from hydra import compose, initialize_config_dir

    from qat.jobs import VERSION_BASE
    from train.recipe import run

    overrides = [f"model={a.preset}", f"data.path={a.data}", f"output_dir={a.out}", f"data.seq_len={a.seq_len}",
                 f"micro_batch_size={a.batch_size}", f"max_steps={a.steps}", f"threads={a.threads}",
                 "precision=fp32", "checkpoint.every=0", "eval.every=0", "eval.val_fraction=0", "progress_bar=false",
                 "log_every=1", f"data.tokenizer_vocab_size={a.vocab}", "optim.warmup_steps=2",
                 "qat=k2_int4" if a.qat else "qat=none", "qat_schedule.log_every=0"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=VERSION_BASE):
        cfg = compose(config_name="train", overrides=overrides)
    run(cfg)
    rows = [json.loads(x) for x in (Path(a.out) / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["tokens"] / r["tokens_per_s"] for r in rows]
    return {"step_times": step_times, "tokens_per_step": int(rows[0]["tokens"]), "mean_loss": statistics.mean(r["loss"] for r in rows)}


def worker_trl(a) -> dict:
    import torch
    from accelerate.utils import set_seed
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from data.pipeline import build_dataloader
    from data.schema import read_trajectories
    from data.tokenizer import load_tokenizer
    from train.models import build_model, load_preset

    torch.set_num_threads(a.threads)
    tok = load_tokenizer(Path(a.ours_out) / "tokenizer")  # the tokenizer our run trained: same vocab
    dl = build_dataloader(list(read_trajectories(a.data)), tok, seq_len=a.seq_len, batch_size=a.batch_size, seed=0)
    ids, masks = [], []
    for batch in dl:  # the same packed rows our job trains on
        ids += batch["input_ids"].tolist()
        masks += (batch["labels"] != -100).long().tolist()
    n = a.steps * a.batch_size
    while len(ids) < n:
        ids, masks = ids + ids, masks + masks
    ds = Dataset.from_dict({"input_ids": ids[:n], "completion_mask": masks[:n]})
    set_seed(0)
    model = build_model(load_preset(a.preset), vocab_size=len(tok))
    model.config.use_cache = False

    times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t0)

    args = SFTConfig(
        output_dir=a.out, per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=1, max_steps=a.steps,
        learning_rate=3e-4, lr_scheduler_type="cosine", warmup_steps=2, weight_decay=0.1, max_grad_norm=1.0,
        optim="adamw_torch", logging_steps=10**6, save_strategy="no", report_to=[], use_cpu=True, bf16=False,
        max_length=a.seq_len, packing=False, completion_only_loss=True, dataloader_drop_last=True, seed=0,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=[StepTimer()])
    out = trainer.train()
    return {"step_times": times, "tokens_per_step": a.batch_size * a.seq_len, "mean_loss": float(out.training_loss)}



def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny_qwen3_moe")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--records", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each run (median reported)")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--qat", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--ours-out", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        result = worker_ours(a) if a.worker == "ours" else worker_trl(a)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print("RESULT " + json.dumps(result))
        return

    from data.schema import write_jsonl
    from tests.fixtures import make_records

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    data = tmp / "traj.jsonl"
    write_jsonl(make_records(a.records), data)
    common = ["--preset", a.preset, "--steps", str(a.steps), "--seq-len", str(a.seq_len), "--batch-size",
              str(a.batch_size), "--vocab", str(a.vocab), "--threads", str(a.threads), "--data", str(data)]
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": str(a.threads), "TOKENIZERS_PARALLELISM": "false"}

    def launch(name, *extra):
        cmd = [sys.executable, __file__, *common, *extra]
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not lines:
            sys.exit(f"{name} failed (rc {r.returncode}):\n{r.stderr[-4000:]}")
        res = json.loads(lines[-1][len("RESULT "):])
        res["tokens_per_s"] = _tokens_per_s(res["step_times"], res["tokens_per_step"], a.warmup)
        return res

    # Interleaved repeats: a CPU shared with other work slows whichever run it overlaps; alternating
    # the runs and taking each one's median spreads that over all of them.
    runs = {"ours (python -m train)": [], "TRL SFTTrainer": [], "ours + INT4 fake quant": []}
    for rep in range(a.repeats):
        ours_out = tmp / f"ours{rep}"
        runs["ours (python -m train)"].append(launch("ours", "--worker", "ours", "--out", str(ours_out)))
        runs["TRL SFTTrainer"].append(launch("trl", "--worker", "trl", "--out", str(tmp / f"trl{rep}"),
                                             "--ours-out", str(ours_out)))
        runs["ours + INT4 fake quant"].append(launch("ours+qat", "--worker", "ours", "--qat",
                                                     "--out", str(tmp / f"ours_qat{rep}")))
    summary = {name: {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)} for name, rs in runs.items()}
    ours, trl, ours_qat = summary.values()

    print(f"\ntrain throughput: {a.preset}, seq_len {a.seq_len}, micro-batch {a.batch_size}, {a.steps} steps "
          f"(median after {a.warmup}), {a.repeats} interleaved repeats, {a.threads} threads, fp32 CPU, one process")
    print(f"{'run':<28}{'tokens/s':>12}{'peak RSS MiB':>15}")
    for name, r in summary.items():
        print(f"{name:<28}{r['tokens_per_s']:>12.0f}{r['peak_rss_mib']:>15.0f}")
    print(f"ratio ours / TRL tokens/s: {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}  (target >= 1.0)")
    print(f"ratio ours / TRL peak RSS: {ours['peak_rss_mib'] / trl['peak_rss_mib']:.2f}")
    print(f"QAT cost: ours+QAT / ours tokens/s = {ours_qat['tokens_per_s'] / ours['tokens_per_s']:.2f}")
    # A sanity check that both train the same model on the same tokens (row order differs).
    print(f"mean train loss over the run: ours {runs['ours (python -m train)'][0]['mean_loss']:.3f}, "
          f"TRL {runs['TRL SFTTrainer'][0]['mean_loss']:.3f}")

if __name__ == "__main__":
    main()
