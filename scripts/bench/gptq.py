"""What GPTQ costs and buys on one real-size MoE layer, against round-to-nearest, on this CPU.

One Qwen3-30B-A3B MoE block (transformers' own Qwen3MoeSparseMoeBlock: 128 experts, hidden 2048,
expert intermediate 768, top-8; bf16 weights, init N(0, 0.02)), fed synthetic calibration
activations: N tokens of hidden states with correlated channels and a few outlier channels, as
real pre-MLP hidden states have (random low-rank structure + noise, 8 channels x10). The block's
own router picks each token's experts. Measured, in one run:

- time of the per-layer GPTQ work of qat/gptq.py (`quantize_experts`: per-expert Hessians of the
  routed tokens, GPTQ of gate_up_proj, Hessians of act(gate) * up from the quantized gate/up, GPTQ
  of down_proj), and of RTN on the same tensors;
- output error of each projection on its calibration inputs, summed over experts, relative to
  the output's energy: sum_e ||X_e (W_e - W_e^q)^T||^2 / sum_e ||X_e W_e^T||^2 (down_proj's
  inputs come from each method's own quantized gate/up), and the error of the whole block's
  output (router-weighted sum of the experts) on the same tokens, and on as many held-out tokens
  of the same distribution (which GPTQ did not see).

    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/gptq.py                 # the full layer (~4 min)
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench/gptq.py --experts 16    # a subset, extrapolated

Measured on one thread of this 2-core CPU box (shared: load average ~2.5 from other jobs), torch
2.13 CPU, INT4 g32 K2 grid, default GPTQConfig (percdamp 0.01, block 32, no act-order):

  all 128 experts, 4096 calibration tokens (tokens per expert: min 140, median 254, max 427)
                               RTN        GPTQ  GPTQ/RTN
    time (s)                   2.7       122.6        45     (an earlier run, less loaded: 106 s)
    gate_up_proj rel. err  9.410e-03   9.017e-04     0.096
    down_proj rel. err     9.409e-03   1.665e-03     0.177
    block output rel. err  2.927e-02   3.630e-03     0.124
      on held-out tokens   2.931e-02   3.209e-02     1.095     <- worse than RTN: see below
    peak RSS 4.3 GB

  16 of 128 experts, 65536 calibration tokens (per expert: min 2591, median 4340, max 5257),
  time extrapolated x8 to the full layer
    time (s) x8 est.           5.0       246.4        49
    gate_up_proj rel. err  9.424e-03   1.826e-03     0.194
    down_proj rel. err     9.417e-03   7.569e-03     0.804
    block output rel. err  2.926e-02   1.136e-02     0.388
      on held-out tokens   2.929e-02   1.407e-02     0.480

GPTQ needs more calibration tokens per expert than the expert's input dim (2048 here): with ~250
it fits them (8x less block error than RTN) at the expense of every other token (10% more error
than RTN on held-out ones); with ~4300 it halves RTN's error on held-out tokens too. A MoE spreads
the calibration over its experts (tokens x top_k / num_experts each), so a 128-expert layer needs
~16x the tokens a dense layer does. `--percdamp 0.5` at 4096 tokens: held-out 0.78x RTN (2 experts).
Time: the per-expert Cholesky and column loop (~0.6 s per expert for gate_up_proj [1536, 2048])
and, with many tokens, the Hessians (2 n I^2 flops per expert).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from qat import QuantConfig, numerics
from qat.fake_quant import quantizers_for
from qat.gptq import GPTQConfig, GPTQResult, quantize_experts


def build_block(num_experts: int):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = Qwen3MoeConfig(hidden_size=2048, moe_intermediate_size=768, num_experts=num_experts,
                            num_experts_per_tok=8, norm_topk_prob=True)
    config._experts_implementation = "eager"  # a standalone block: the model would set this
    torch.manual_seed(0)
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block.to(torch.bfloat16).eval()


def activations(n_tokens: int, seed: int, hidden: int = 2048) -> torch.Tensor:
    """Hidden states from one fixed distribution (basis and outlier channels from seed 1); `seed`
    draws the tokens, so calibration and held-out tokens are different samples of it."""
    g = torch.Generator().manual_seed(1)
    basis, outliers = torch.randn(256, hidden, generator=g) / 16, torch.randperm(hidden, generator=g)[:8]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_tokens, 256, generator=g) @ basis + 0.3 * torch.randn(n_tokens, hidden, generator=g)
    x[:, outliers] *= 10.0
    return x.to(torch.bfloat16)


@torch.no_grad()
def output_errors(block, weight, x, idx, topk_w):
    """Relative output error per projection (down on each method's own intermediate) and the
    block's output, for expert weights weight(attr, e) -> [O, I]."""
    experts = block.experts
    num = {"gate_up_proj": 0.0, "down_proj": 0.0}
    den = dict(num)
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32)
    for e in range(experts.gate_up_proj.shape[0]):
        tok, k = torch.where(idx == e)
        if len(tok) == 0:
            continue
        X = x[tok].float()
        w_gu, w_d = weight("gate_up_proj", e).float(), weight("down_proj", e).float()
        h = experts._apply_gate(X @ w_gu.T)
        for attr, inp, wq in (("gate_up_proj", X, w_gu), ("down_proj", h, w_d)):
            w0 = ORIGINAL[attr][e].float()
            num[attr] += float((inp @ (w0 - wq).T).pow(2).sum())
            den[attr] += float((inp @ w0.T).pow(2).sum())
        out.index_add_(0, tok, (h @ w_d.T) * topk_w[tok, k, None].float())
    return {a: num[a] / den[a] for a in num}, out


ORIGINAL: dict[str, torch.Tensor] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experts", type=int, default=128, help="experts in the layer (128 = Qwen3-30B-A3B)")
    ap.add_argument("--tokens", type=int, default=4096, help="calibration tokens")
    ap.add_argument("--act-order", action="store_true")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--percdamp", type=float, default=GPTQConfig.percdamp)
    args = ap.parse_args()
    torch.set_num_threads(1)

    cfg = QuantConfig(bits=args.bits)
    gcfg = GPTQConfig(act_order=args.act_order, percdamp=args.percdamp)
    block = build_block(128)
    x, x_heldout = activations(args.tokens, seed=2), activations(args.tokens, seed=3)
    with torch.no_grad():
        _, topk_w, idx = block.gate(x)  # routed over all 128 experts: realistic tokens per expert
        _, topk_w_heldout, idx_heldout = block.gate(x_heldout)
    if args.experts < 128:
        # Keep the first experts only; routing indices >= their count read as absent (expert-parallel
        # sentinels), so each kept expert sees exactly the tokens it sees in the full layer.
        for a in ("gate_up_proj", "down_proj"):
            setattr(block.experts, a, torch.nn.Parameter(getattr(block.experts, a).data[:args.experts].clone()))
        block.experts.num_experts = args.experts
    ORIGINAL.update({a: getattr(block.experts, a).data.clone() for a in ("gate_up_proj", "down_proj")})

    def rtn(attr, e):
        w = ORIGINAL[attr][e].float()
        return numerics.dequantize_groups(*numerics.quantize_groups(w, cfg), cfg.group_size, w.dtype)

    t = time.perf_counter()
    for e in range(args.experts):
        rtn("gate_up_proj", e), rtn("down_proj", e)
    t_rtn = time.perf_counter() - t

    targets, _, _ = quantizers_for(block, cfg)
    result = GPTQResult()
    t = time.perf_counter()
    quantize_experts(block.experts, {tg.attr: tg for tg in targets}, x, idx, cfg, gcfg, result)
    t_gptq = time.perf_counter() - t

    def gptq(attr, e):
        return getattr(block.experts, attr)[e]

    def original(attr, e):
        return ORIGINAL[attr][e]

    def block_err(out, ref):
        return float((out - ref).pow(2).sum() / ref.pow(2).sum())

    _, ref = output_errors(block, original, x, idx, topk_w)
    err_rtn, out_rtn = output_errors(block, rtn, x, idx, topk_w)
    err_gptq, out_gptq = output_errors(block, gptq, x, idx, topk_w)
    held = [output_errors(block, w, x_heldout, idx_heldout, topk_w_heldout)[1] for w in (original, rtn, gptq)]

    n = args.experts
    scale = 128 / n
    tokens = sorted(result.tokens_per_expert["experts"])
    print(f"Qwen3-30B-A3B MoE layer, {n} of 128 experts, {args.tokens} calibration tokens, INT{args.bits} g32 "
          f"{cfg.grid} grid, act_order={args.act_order}, {torch.get_num_threads()} thread(s)")
    print(f"tokens per expert: min {tokens[0]}, median {tokens[len(tokens) // 2]}, max {tokens[-1]}; "
          f"RTN fallbacks: {len(result.rtn_fallback)}")
    print(f"{'':22}{'RTN':>12}{'GPTQ':>12}{'GPTQ/RTN':>10}")
    label = "time (s)" if n == 128 else f"time (s) x{scale:g} est."
    print(f"{label:22}{t_rtn * scale:12.1f}{t_gptq * scale:12.1f}{t_gptq / t_rtn:10.0f}")
    for a in ("gate_up_proj", "down_proj"):
        print(f"{a + ' rel. err':22}{err_rtn[a]:12.3e}{err_gptq[a]:12.3e}{err_gptq[a] / err_rtn[a]:10.3f}")
    rows = [("block output rel. err", block_err(out_rtn, ref), block_err(out_gptq, ref)),
            ("  on held-out tokens", block_err(held[1], held[0]), block_err(held[2], held[0]))]
    for label, r, g in rows:
        print(f"{label:22}{r:12.3e}{g:12.3e}{g / r:10.3f}")


if __name__ == "__main__":
    main()
