"""`python -m data.report <dataset> [--out DIR] [--tokenizer DIR] [--seq-len N]`: what a trajectories dataset holds.

Before training on generated data, look at it: how many records survived validation, how
long they are in tokens, what share of tokens carries loss (thinking, tool calls, answers) versus
context (system, user, tool results), and how many tool calls a trajectory makes. The report
renders every record exactly as training will (same renderer, same splitting at `--seq-len`), so
its figures are the training job's. Without `--tokenizer`, a tiny K2-style tokenizer is trained
on the dataset itself (as the tiny default model would).

Writes `report.md` (the table), `report.json` (the figures) and `report.png` (histograms of
tokens per trajectory, loss-token share per trajectory and tool calls per trajectory) to `--out`
(default: `<dataset>_report/`), and prints the table.
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from data.render import IGNORE_INDEX, SplitStats, get_renderer
from data.schema import read_trajectories


def _dist(xs) -> dict:
    a = np.asarray(xs, dtype=np.float64)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "min": float(a.min()), "p50": float(np.percentile(a, 50)),
            "p90": float(np.percentile(a, 90)), "max": float(a.max())}


def compute_report(records, tokenizer, seq_len: int | None = None) -> dict:
    """Figures of a list of records, rendered by `get_renderer(tokenizer)` (split at `seq_len`)."""
    r = get_renderer(tokenizer)
    stats = SplitStats()
    tokens, loss_share, calls, steps = [], [], [], []
    families, correct = collections.Counter(), collections.Counter()
    for rec in records:
        # length as rendered whole (one document per turn); loss share as training sees it (split)
        whole = r.render_documents(rec, as_numpy=True, stats=stats if seq_len is None else None)
        docs = whole if seq_len is None else r.render_documents(rec, max_len=seq_len, as_numpy=True, stats=stats)
        n = sum(len(d["input_ids"]) for d in docs)
        n_loss = sum(int((d["labels"] != IGNORE_INDEX).sum()) for d in docs)
        tokens.append(sum(len(d["input_ids"]) for d in whole))
        loss_share.append(n_loss / n if n else 0.0)
        msgs = rec["messages"]
        calls.append(sum(len(m.get("tool_calls") or []) for m in msgs))
        steps.append(sum(1 for m in msgs if m["role"] == "assistant"))
        fam = (rec.get("task") or {}).get("family", "<none>")
        families[fam] += 1
        v = (rec.get("verdict") or {}).get("correct")
        correct[fam] += bool(v)
    return {
        "records": len(records), "tokenizer_vocab": len(tokenizer), "seq_len": seq_len,
        "families": {f: {"records": n, "correct": correct[f]} for f, n in sorted(families.items())},
        "tokens_per_trajectory": _dist(tokens), "loss_share_per_trajectory": _dist(loss_share),
        "loss_share_overall": stats.label_tokens / stats.tokens if stats.tokens else 0.0,
        "tool_calls_per_trajectory": _dist(calls), "assistant_steps_per_trajectory": _dist(steps),
        "render": stats.as_dict(),
        "_series": {"tokens": tokens, "loss_share": loss_share, "tool_calls": calls},
    }


def format_table(rep: dict) -> str:
    def row(name, d, fmt="{:.0f}"):
        if not d.get("n"):
            return f"| {name} | - | - | - | - | - |"
        return "| " + " | ".join([name] + [fmt.format(d[k]) for k in ("mean", "min", "p50", "p90", "max")]) + " |"

    rs = rep["render"]
    lines = [f"records: {rep['records']}" + (f" (skipped {rep['skipped']})" if rep.get("skipped") else ""),
             f"tokenizer vocab: {rep['tokenizer_vocab']}; seq_len: {rep['seq_len']}",
             f"loss-token share (all tokens): {rep['loss_share_overall']:.3f}",
             f"documents: {rs['docs']} turns -> {rs['pieces']} training documents; {rs['split_docs']} split, "
             f"{rs['dropped_steps']} steps dropped ({rs['dropped_step_tokens']} tokens) of {rs['steps']}",
             "", "| per trajectory | mean | min | p50 | p90 | max |", "| --- | --- | --- | --- | --- | --- |",
             row("tokens (unsplit)", rep["tokens_per_trajectory"]),
             row("loss-token share (as trained)", rep["loss_share_per_trajectory"], "{:.3f}"),
             row("tool calls", rep["tool_calls_per_trajectory"], "{:.2f}"),
             row("assistant steps", rep["assistant_steps_per_trajectory"], "{:.2f}"),
             "", "| task family | records | correct |", "| --- | --- | --- |"]
    lines += [f"| {f} | {v['records']} | {v['correct']} |" for f, v in rep["families"].items()]
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = rep["_series"]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].hist(s["tokens"], bins=30)
    ax[0].set(title="tokens per trajectory (unsplit)", xlabel="tokens", ylabel="trajectories")
    ax[1].hist(s["loss_share"], bins=30, range=(0, 1))
    ax[1].set(title="loss-token share per trajectory", xlabel="share of tokens with loss")
    mx = max(s["tool_calls"] or [0])
    ax[2].hist(s["tool_calls"], bins=np.arange(mx + 2) - 0.5)
    ax[2].set(title="tool calls per trajectory", xlabel="tool calls")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m data.report", description=__doc__.split("\n\n")[0])
    p.add_argument("dataset", help="trajectories: a datasets directory (write_trajectories) or a .jsonl file")
    p.add_argument("--out", help="output directory (default: <dataset>_report)")
    p.add_argument("--tokenizer", help="tokenizer directory (AutoTokenizer); default: train a tiny one on the data")
    p.add_argument("--seq-len", type=int, default=None, help="split documents as training with this seq_len would")
    p.add_argument("--vocab-size", type=int, default=2048, help="vocab of the tokenizer trained when --tokenizer is absent")
    a = p.parse_args(argv)
    src = Path(a.dataset)
    records = read_trajectories(src, on_error="skip")
    if a.tokenizer:
        from data.tokenizer import load_tokenizer

        tok = load_tokenizer(a.tokenizer)
    else:
        from data.tokenizer import train_tokenizer

        tok = train_tokenizer(records, vocab_size=a.vocab_size)
    rep = compute_report(records, tok, seq_len=a.seq_len)
    rep["skipped"] = records.stats.skipped
    rep["skipped_errors"] = records.stats.errors
    out = Path(a.out) if a.out else src.parent / (src.name.removesuffix(".jsonl") + "_report")
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rep)
    (out / "report.md").write_text(table + "\n")
    plot(rep, out / "report.png")
    (out / "report.json").write_text(json.dumps({k: v for k, v in rep.items() if k != "_series"}, indent=2))
    print(table)
    print(f"\nwrote {out / 'report.md'}, {out / 'report.json'}, {out / 'report.png'}")
    return rep


if __name__ == "__main__":
    main()
