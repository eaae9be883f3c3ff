"""What INT4 fake quant costs, measured side by side in one run.

(a) Training-step time of the tiny default MoE (conf/model/tiny_qwen3_moe.yaml) at 4096 tokens per
    step (batch 8 x 512), with fake quant on the routed experts over without.      target <= 1.10
(b) Fake-quant time of one real-size MoE layer's expert weights (Qwen3-30B-A3B: 128 experts,
    hidden 2048, expert intermediate 768; bf16) over a clone() of the same tensors, the
    memory-traffic floor: one read and one write.                                    target <= 2.5

    .venv/bin/python scripts/bench/qat_overhead.py            # both, ~2-4 minutes on 2 cores
    .venv/bin/python scripts/bench/qat_overhead.py --experts 32   # (b) on a quarter of the layer
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qat import QuantConfig, prepare, set_fake_quant
from qat.fake_quant import ExpertWeightFakeQuant
from train.models import build_model, load_preset


def timeit(fn, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_train_step(repeats: int) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(load_preset("tiny_qwen3_moe"))
    prepare(model, QuantConfig(kernel="eager"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (8, 512))

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    # Interleave on/off so drift on a shared machine hits both alike.
    on, off = [], []
    for _ in range(repeats):
        set_fake_quant(model, True)
        on.append(timeit(step, 1, warmup=0 if on else 1))
        set_fake_quant(model, False)
        off.append(timeit(step, 1, warmup=0 if off else 1))
    return statistics.median(on), statistics.median(off)


def bench_layer(num_experts: int, repeats: int, kernel: str) -> tuple[float, float]:
    hidden, inter = 2048, 768
    torch.manual_seed(0)
    gate_up = torch.randn(num_experts, 2 * inter, hidden, dtype=torch.bfloat16) * 0.02
    down = torch.randn(num_experts, hidden, inter, dtype=torch.bfloat16) * 0.02
    cfg = QuantConfig(kernel=kernel)
    fqs = [ExpertWeightFakeQuant(cfg, w, transposed=False) for w in (gate_up, down)]

    @torch.no_grad()
    def fake_quant():
        for fq, w in zip(fqs, (gate_up, down)):
            fq(w)

    def clone():
        gate_up.clone()
        down.clone()

    t_fq = timeit(fake_quant, repeats, warmup=2)
    t_clone = timeit(clone, repeats, warmup=2)
    return t_fq, t_clone


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128, help="experts in the real-size layer (128 = Qwen3-30B-A3B)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    if not args.skip_train:
        on, off = bench_train_step(args.repeats)
        rows.append(("(a) train step, tiny_qwen3_moe, 4096 tok", f"{on * 1e3:.0f} ms", f"{off * 1e3:.0f} ms", on / off, 1.10))
    for kernel in ("eager", "compiled"):
        t_fq, t_clone = bench_layer(args.experts, args.repeats, kernel)
        rows.append((f"(b) fake quant [{kernel}] vs clone, {args.experts}x(1536x2048 + 2048x768) bf16",
                     f"{t_fq * 1e3:.0f} ms", f"{t_clone * 1e3:.0f} ms", t_fq / t_clone, 2.5))
    print(f"\n{'measurement':<70} {'with':>9} {'baseline':>9} {'ratio':>7} {'target':>7}")
    for name, a, b, ratio, target in rows:
        ok = "ok" if ratio <= target else "MISS"
        print(f"{name:<70} {a:>9} {b:>9} {ratio:>7.2f} {'<=' + str(target):>7} {ok}")


if __name__ == "__main__":
    main()
