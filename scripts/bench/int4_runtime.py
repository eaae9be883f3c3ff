"""INT4 runtime and export benchmark, all ratios measured side by side in one run.

One real-size Qwen3-30B-A3B MoE layer (128 experts, hidden 2048, expert intermediate 768, top-8),
random weights, in a one-layer Qwen3-MoE model saved as a hub-layout checkpoint:

  (a) decode, batch 1: time of the MoE block (router + experts) per token, INT4 runtime
      (qat.load_int4, bf16 activations, torch's int4 CPU kernel) over BF16 (the fastest of
      transformers' eager / batched_mm / grouped_mm experts implementations).   target >= 2.0x
  (b) resident expert-weight bytes, INT4 (packed codes + bf16 scales) over BF16.  target <= 0.30
  (c) export throughput (`python -m qat.export`'s streaming path: read, quantize, pack, write,
      hash) over a plain safetensors load + save of the same checkpoint files.    target >= 0.5
      Also shown: the export through a model in memory (from_pretrained + export_int4).
  (d) peak memory of the streaming export (256 MB shards) in a fresh process.

Peak memory stays under ~6 GB. Timings interleave the two contenders round by round, so load
from other processes hits both alike; medians are reported.

    .venv/bin/python scripts/bench/int4_runtime.py                 # ~2 minutes on 2 cores
    .venv/bin/python scripts/bench/int4_runtime.py --threads 4 --tokens 64
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_checkpoint(path: Path, vocab_size: int) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    cfg = Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
        num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(path, max_shard_size="2GB")  # hub layout: one Linear per expert


def plain_copy(src: Path, dst: Path) -> None:
    """The floor for any checkpoint rewrite: read every safetensors file, write it again."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for f in sorted(src.glob("*.safetensors")):
        save_file(load_file(str(f)), str(dst / f.name), metadata={"format": "pt"})


def export(src: Path, dst: Path) -> None:
    """What `python -m qat.export input=src output=dst overwrite=true` runs for a checkpoint without
    observer state: the streaming export (RTN absmax, K2 grid, group 32)."""
    from qat.export import export_checkpoint_int4

    export_checkpoint_int4(src, dst)


def export_via_model(src: Path, dst: Path) -> None:
    """The export of a model in memory (from_pretrained + export_int4): what QAT checkpoints with
    observer state (mse, lsq) take."""
    from transformers import AutoModelForCausalLM

    from qat.export import export_int4

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    export_int4(model, dst)
    del model


# Anonymous RSS, sampled every 10 ms: the process's own memory. File-backed RSS (the mmap'ed input
# checkpoint, page cache the kernel drops under pressure) is reported apart; VmHWM and ru_maxrss
# mix the two (and ru_maxrss even carries over the parent's peak into a forked child).
PEAK_RSS_SNIPPET = """
import sys, threading, time, torch
torch.set_num_threads(1)
from qat.export import export_checkpoint_int4
def status():
    return {l.split(":")[0]: int(l.split()[1]) // 1024 for l in open("/proc/self/status")
            if l.startswith(("RssAnon", "RssFile"))}
peak, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()
def sample():
    while not done.is_set():
        for k, v in status().items():
            peak[k] = max(peak[k], v)
        time.sleep(0.01)
base = status()["RssAnon"]
t = threading.Thread(target=sample)
t.start()
export_checkpoint_int4(sys.argv[1], sys.argv[2], max_shard_size=sys.argv[3])
done.set()
t.join()
print(base, peak["RssAnon"], peak["RssFile"])
"""


def peak_rss_mib(src: Path, dst: Path, shard: str) -> tuple[int, int, int]:
    """(anonymous RSS after imports, peak anonymous RSS, peak file-backed RSS) in MiB of a fresh
    process running the streaming export."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", PEAK_RSS_SNIPPET, str(src), str(dst), shard], capture_output=True,
                       text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    base, anon, file = (int(v) for v in r.stdout.split()[-3:])
    return base, anon, file


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def timed_cpu(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads): on a shared machine the CPU
    seconds are the figure other processes' load does not inflate."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: on a shared 2-core box the per-op thread barriers of "
                         "2 threads cost more than decode's small matmuls gain)")
    ap.add_argument("--tokens", type=int, default=48, help="decode steps timed per contender and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--export-rounds", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--workdir", default=None, help="where the checkpoints go (default: a temp dir)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from qat.int4 import Int4Weight
    from qat.load import load_int4

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        ckpt, copy, out = tmp / "bf16", tmp / "copy", tmp / "int4"
        print(f"building a one-layer Qwen3-30B-A3B-shaped checkpoint in {ckpt} ...", flush=True)
        build_checkpoint(ckpt, args.vocab)
        ckpt_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))

        # (c) export throughput vs plain load+save, interleaved
        plain_t, export_t, model_t = [], [], []
        for _ in range(args.export_rounds):  # every write goes to a fresh directory (removed untimed)
            for d in (copy, out):
                shutil.rmtree(d, ignore_errors=True)
            plain_t.append(timed_cpu(lambda: plain_copy(ckpt, copy)))
            gc.collect()
            model_t.append(timed_cpu(lambda: export_via_model(ckpt, out)))
            shutil.rmtree(out)
            gc.collect()
            export_t.append(timed_cpu(lambda: export(ckpt, out)))
            gc.collect()
        (plain_s, plain_cpu), (export_s, export_cpu), (model_s, model_cpu) = (
            min(t, key=lambda x: x[0]) for t in (plain_t, export_t, model_t))
        shutil.rmtree(copy)
        rss_base, rss_anon, rss_file = peak_rss_mib(ckpt, copy, "256MB")

        # (a) decode time of the MoE block, (b) resident expert bytes
        dense = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.bfloat16).eval()
        int4 = load_int4(out, dtype=torch.bfloat16)
        block_bf16, block_int4 = dense.model.layers[0].mlp, int4.model.layers[0].mlp
        experts = block_bf16.experts
        bf16_bytes = sum(p.numel() * p.element_size() for p in (experts.gate_up_proj, experts.down_proj))
        int4_bytes = sum(m.nbytes for m in block_int4.modules() if isinstance(m, Int4Weight))
        backends = {m.backend for m in block_int4.modules() if isinstance(m, Int4Weight)}

        g = torch.Generator().manual_seed(0)
        xs = [torch.randn(1, 1, 2048, generator=g).to(torch.bfloat16) for _ in range(args.tokens)]

        def run(block):
            with torch.inference_mode():
                for x in xs:
                    block(x)

        dense_impls = {}
        for impl in ("eager", "batched_mm", "grouped_mm"):
            dense.set_experts_implementation(impl)
            run(block_bf16)  # warm-up
            dense_impls[impl] = min(timed(lambda: run(block_bf16)) for _ in range(2))
        best = min(dense_impls, key=dense_impls.get)
        dense.set_experts_implementation(best)
        run(block_int4)
        t_bf16, t_int4 = [], []
        for _ in range(args.rounds):
            t_bf16.append(timed(lambda: run(block_bf16)))
            t_int4.append(timed(lambda: run(block_int4)))
        ms_bf16 = statistics.median(t_bf16) / args.tokens * 1e3
        ms_int4 = statistics.median(t_int4) / args.tokens * 1e3
        # the same tokens through both: the INT4 block computes what its weights say
        with torch.inference_mode():
            y_ref, y_q = block_bf16(xs[0]).float(), block_int4(xs[0]).float()
        rel = ((y_q - y_ref).norm() / y_ref.norm()).item()

    print()
    print(f"torch {torch.__version__}, {args.threads} threads, INT4 backend {sorted(backends)}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print("BF16 experts implementations, ms/token: " + ", ".join(f"{k} {v / args.tokens * 1e3:.2f}" for k, v in dense_impls.items()))
    print(f"(a) decode, batch 1, one MoE block: BF16 ({best}) {ms_bf16:.2f} ms/token, INT4 {ms_int4:.2f} ms/token "
          f"-> speed-up {ms_bf16 / ms_int4:.2f}x (target >= 2.0x)   [INT4 vs BF16 output rel. error {rel:.3f}]")
    print(f"(b) resident expert weights: BF16 {bf16_bytes / 2**20:.1f} MiB, INT4 {int4_bytes / 2**20:.1f} MiB "
          f"-> ratio {int4_bytes / bf16_bytes:.3f} (target <= 0.30)")
    print(f"(c) checkpoint {ckpt_bytes / 1e9:.2f} GB: plain load+save {plain_s:.2f} s ({ckpt_bytes / plain_s / 1e9:.2f} GB/s), "
          f"export {export_s:.2f} s ({ckpt_bytes / export_s / 1e9:.2f} GB/s) -> throughput ratio "
          f"{plain_s / export_s:.2f} (target >= 0.5)")
    print(f"    CPU seconds (this process, all threads): plain {plain_cpu:.2f}, export {export_cpu:.2f} -> ratio "
          f"{plain_cpu / export_cpu:.2f}")
    print(f"    via a model in memory (from_pretrained + export_int4, the path for mse/lsq observer state): "
          f"{model_s:.2f} s wall, {model_cpu:.2f} s CPU -> ratio {plain_s / model_s:.2f} wall, "
          f"{plain_cpu / model_cpu:.2f} CPU")
    print(f"(d) streaming export, 256 MB shards, fresh process: peak anonymous memory {rss_anon - rss_base} MiB above "
          f"the {rss_base} MiB after imports, for a {ckpt_bytes / 2**20:.0f} MiB checkpoint (plus up to {rss_file} MiB "
          f"of file-backed pages: the mmap'ed input, reclaimable)")


if __name__ == "__main__":
    main()
