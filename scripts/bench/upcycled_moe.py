"""Benchmark: the upcycled SmolLM2 MoE (4 experts, top-2) against the dense SmolLM2-135M it came from.

What it costs to make the default base an MoE: training tokens/s (forward + backward + AdamW step,
the training job's precision), decode tokens/s (KV-cached greedy decoding, batch 1 and batch 16)
and peak resident memory of each. Top-2 of 4 copies of the MLP makes 214M active parameters per
token against the dense model's 134.5M: a FLOP ratio of 1.6; the goal is an MoE cost per
training token at most 1.8x the dense model's.

Each (model, measurement) runs in its own child process, so peak RSS is that model's alone; the
two models alternate (dense, moe, dense, moe, ...) within one run so both see the same machine
state, and the ratios come from the same run.

    .venv/bin/python scripts/bench/upcycled_moe.py                 # builds outputs/base/smollm2_135m_moe4 if missing
    .venv/bin/python scripts/bench/upcycled_moe.py --threads 2 --seq 512 --steps 4 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def child(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    if args.model == "dense":
        from train.upcycle import load_dense, resolve_source

        model = load_dense(resolve_source(None))
    else:
        model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32)
    vocab = model.config.vocab_size
    out: dict = {"model": args.model, "params": sum(p.numel() for p in model.parameters())}
    if args.what == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(0, vocab, (args.batch, args.seq))
        times = []
        for step in range(args.steps + 1):  # the first step warms up (allocations, optimizer state)
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step:
                times.append(time.perf_counter() - t0)
        out["train_tokens_per_s"] = args.batch * args.seq / (sum(times) / len(times))
    else:
        model.eval().to(torch.bfloat16 if args.precision == "bf16" else torch.float32)
        for batch in (1, 16):
            ids = torch.randint(0, vocab, (batch, 256))
            with torch.no_grad():
                model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm up
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                dt = time.perf_counter() - t0
            out[f"decode_tokens_per_s_b{batch}"] = batch * args.new_tokens / dt
    out["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default=str(ROOT / "outputs/base/smollm2_135m_moe4"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--repeats", type=int, default=1, help="alternations of dense and moe per measurement")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "WHAT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.model, args.what = args.child
        print(json.dumps(child(args)))
        return
    if not (Path(args.base) / "upcycle.json").exists():
        subprocess.run([sys.executable, "-m", "train.upcycle", f"output={args.base}"], cwd=ROOT, check=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for what in ("train", "decode"):
        for _ in range(args.repeats):
            for model in ("dense", "moe"):
                cmd = [sys.executable, __file__, "--child", model, what, "--base", args.base, "--threads",
                       str(args.threads), "--seq", str(args.seq), "--batch", str(args.batch), "--steps",
                       str(args.steps), "--new-tokens", str(args.new_tokens), "--precision", args.precision]
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-3000:])
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results.setdefault((model, what), []).append(r)
                print(f"  {model:5s} {what:6s} {r}", flush=True)

    def mean(model, what, key):
        rs = results[(model, what)]
        return sum(r[key] for r in rs) / len(rs)

    rows = [("train tokens/s", "train", "train_tokens_per_s"), ("decode tokens/s, batch 1", "decode",
             "decode_tokens_per_s_b1"), ("decode tokens/s, batch 16", "decode", "decode_tokens_per_s_b16"),
            ("peak RSS GB (training)", "train", "peak_rss_gb"), ("peak RSS GB (decoding)", "decode", "peak_rss_gb")]
    print(f"\nSmolLM2-135M dense vs upcycled MoE (4 experts, top-2); {args.threads} threads, training at "
          f"batch {args.batch} x seq {args.seq} ({args.precision}), decoding {args.precision} after a 256-token prompt\n")
    print("| measure | dense | MoE | MoE / dense |\n|---|---|---|---|")
    for label, what, key in rows:
        d, m = mean("dense", what, key), mean("moe", what, key)
        print(f"| {label} | {d:.1f} | {m:.1f} | {m / d:.2f} |")
    cost = mean("dense", "train", "train_tokens_per_s") / mean("moe", "train", "train_tokens_per_s")
    print(f"\nMoE cost per training token: {cost:.2f}x the dense model's (goal <= 1.8x; FLOP ratio 1.6)")


if __name__ == "__main__":
    main()
