"""The evaluation report: markdown tables (report.md), report.json and the plots, from the
evaluation's numbers (`sandbox_env.eval.evaluate`) and statistics (`sandbox_env.eval.metrics`).

The one idea: every figure in the report is computed once, in `evaluate`/`metrics`, and stored in
report.json; this module only lays them out, so the markdown, the JSON and the plots cannot disagree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sandbox_env.eval.metrics import group_by_family, summarize_episodes


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.4g}"
        return "" if x is None else str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)


FAMILY_COLUMNS = ("model", "episodes", "success", "95% CI", "avg steps", "avg tool calls", "avg invalid calls",
                  "budget exhausted", "avg gen tokens", "avg hidden outputs")


def family_rows(summaries: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """summaries: model name -> summarize_episodes(...) of one family."""
    return [[name, s["episodes"], s["success"], f"[{s['ci_low']:.2f}, {s['ci_high']:.2f}]", s["avg_steps"],
             s["avg_tool_calls"], s["avg_invalid_tool_calls"], s["budget_exhausted"], s["avg_generated_tokens"],
             s["avg_context_hidden"]] for name, s in summaries.items()]


# ----------------------------------------------------------------------------- plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def plot_success_by_model(summaries: dict[str, dict[str, Any]], path: str) -> None:
    """Bar per model (all families pooled) with its Wilson interval."""
    plt = _plt()
    names = list(summaries)[::-1]  # horizontal bars, the first model on top: long names stay readable
    s = [summaries[n]["success"] for n in names]
    err = [[v - summaries[n]["ci_low"] for n, v in zip(names, s)], [summaries[n]["ci_high"] - v for n, v in zip(names, s)]]
    fig, ax = plt.subplots(figsize=(7, 1.0 + 0.32 * len(names)))
    ax.barh(names, s, xerr=err, capsize=3, color=[_bits_color(n) for n in names])
    for y, v in enumerate(s):
        ax.text(0.01, y, f"{100 * v:.0f}%", va="center", fontsize=8, color="white" if v > 0.08 else "black")
    ax.set_xlim(0, 1)
    ax.set_xlabel("success rate (95% Wilson CI)")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title("Task success by model")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _bits_color(name: str) -> str:
    """One colour per precision group, so BF16 / INT4 / INT3 / INT2 rows read as panels."""
    for tag, color in (("int4", "#4c72b0"), ("int3", "#dd8452"), ("int2", "#c44e52"), ("nf4", "#8172b3")):
        if tag in name:
            return color
    return "#55a868"


def plot_success_by_steps(points: dict[str, dict[int, tuple[int, int]]], path: str) -> None:
    """points: model -> {steps needed: (correct, episodes)}; one line per model."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, by in points.items():
        xs = sorted(by)
        ax.plot(xs, [by[x][0] / by[x][1] for x in xs], marker="o", label=name)
    ax.set_xticks(sorted({x for by in points.values() for x in by}))
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("steps needed (scripted reference solution)")
    ax.set_ylabel("success rate")
    ax.set_title("Success by number of steps needed")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_kl_per_layer(per_layer: dict[str, list[float]], path: str, reference: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    # KL is never negative and spans decades: a log axis, with exact zeros (identical layers) drawn at
    # the smallest positive value seen so they stay on the plot.
    positive = [x for kls in per_layer.values() for x in kls if x > 0]
    floor = min(positive) if positive else 1e-12
    layers = max(len(k) for k in per_layer.values())
    for name, kls in per_layer.items():
        ax.plot(range(1, len(kls) + 1), [max(x, floor) for x in kls], marker="o", markersize=3, label=name)
    step = max(1, layers // 10)
    ax.set_xticks(range(1, layers + 1, step))
    ax.set_xlabel("decoder layer (logit lens; last = output)")
    ax.set_ylabel(f"KL({reference} || model), nats/token")
    ax.set_yscale("log")
    ax.set_title("Per-layer divergence from the reference")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(report: dict[str, Any], all_records: dict[str, list[dict[str, Any]]], needed: dict[str, int],
                 out: Path) -> None:
    models = report["models"]
    ref = report["reference"]
    md = ["# Evaluation report\n", (f"{report['tasks']} {report['split']} tasks per model, seed {report['seed']}, "
                                     f"sampling {report['sampling']}, budgets {report['budgets']}. "
                                     f"Reference for KL: `{ref}`.\n")]
    md.append("## All families\n")
    overall = {n: summarize_episodes(r) for n, r in all_records.items()}
    md.append(markdown_table(FAMILY_COLUMNS, family_rows(overall)) + "\n")
    fams = sorted({f for recs in all_records.values() for f in group_by_family(recs)})
    for fam in fams:
        md.append(f"## {fam}\n")
        rows = {n: summarize_episodes(group_by_family(r).get(fam, [])) for n, r in all_records.items()}
        md.append(markdown_table(FAMILY_COLUMNS, family_rows(rows)) + "\n")
    md.append("## Agreement with the reference (teacher-forced, assistant tokens)\n")
    if report.get("kl_source"):
        md.append(f"Trajectories: {report['kl_source']}.\n")
    kl_rows = [[n, m["kind"], m["kl_vs_reference"]["tokens"], m["kl_vs_reference"]["kl"],
                m["kl_vs_reference"]["top1_agreement"], m["kl_vs_reference"]["nll"], m["kl_vs_reference"]["nll_reference"]]
               for n, m in models.items() if "kl_vs_reference" in m]
    md.append(markdown_table(("model", "kind", "tokens", f"KL({ref} || model)", "top-1 agreement", "NLL", f"NLL {ref}"),
                             kl_rows) + "\n" if kl_rows else "(only one checkpoint, or kl.enabled=false)\n")
    paired = [[n, m["paired_vs_reference"]["tasks"], m["paired_vs_reference"]["success_diff"],
               m["paired_vs_reference"]["only_reference"], m["paired_vs_reference"]["only_model"],
               m["paired_vs_reference"]["p_value"]] for n, m in models.items() if "paired_vs_reference" in m]
    if paired:
        md.append(f"## Paired with `{ref}` on the same tasks (exact McNemar)\n")
        md.append(markdown_table(("model", "tasks", "success - reference", f"solved by {ref} only", "solved by model only",
                                  "p-value"), paired) + "\n")
    md.append("## Size and speed\n")
    md.append(markdown_table(("model", "kind", "weights on disk (MB)", "episodes/s", "decode tokens/s (wall, in the loop)",
                              "prefill tokens", "cache-reused tokens", "max batch"),
                             [[n, m["kind"], round(m["size_bytes"] / 2**20, 3), m["speed"]["episodes_per_s"],
                               m["speed"]["decode_tokens_per_s"], m["speed"]["prefill_tokens"],
                               m["speed"]["reused_tokens"], m["speed"]["max_batch"]] for n, m in models.items()]) + "\n")
    sampled = {n: m["sampled"] for n, m in models.items() if "sampled" in m}
    if sampled:
        md.append("## Sampled (temperature > 0, several seeds)\n")
        md.append(markdown_table(("model", "temperature", "seeds", "success per seed", "mean", "std"),
                                 [[n, d["temperature"], len(d["seeds"]), " / ".join(f"{x:.3f}" for x in d["success_per_seed"]),
                                   round(d["success_mean"], 4), round(d["success_std"], 4)] for n, d in sampled.items()]) + "\n")
    heavy = {n: m["heavy"] for n, m in models.items() if "heavy" in m}
    if heavy:
        md.append("## Heavy mode\n")
        md.append(markdown_table(("model", "family", "tasks", "N", "mode", "pass@1", "pass@N", "heavy accuracy"),
                                 [[n, f, d["tasks"], h["n"], h["mode"], d["pass@1"], d["pass@n"], d["heavy"]]
                                  for n, h in heavy.items() for f, d in h["by_family"].items()]) + "\n")
    plot_success_by_model(overall, str(out / "success_by_model.png"))
    if needed:
        points: dict[str, dict[int, list[int]]] = {}
        for n, recs in all_records.items():
            by: dict[int, list[int]] = {}
            for r in recs:
                s = needed.get(r["task"]["id"])
                if s is not None:
                    by.setdefault(s, [0, 0])
                    by[s][0] += bool(r["verdict"]["correct"])
                    by[s][1] += 1
            points[n] = {k: (v[0], v[1]) for k, v in by.items()}
        plot_success_by_steps(points, str(out / "success_by_steps.png"))
        report["success_by_steps_needed"] = {n: {str(k): list(v) for k, v in p.items()} for n, p in points.items()}
    per_layer = {n: m["kl_vs_reference"]["kl_per_layer"] for n, m in models.items()
                 if m.get("kl_vs_reference", {}).get("kl_per_layer")}
    if per_layer:
        plot_kl_per_layer(per_layer, str(out / "kl_per_layer.png"), ref)
    md.append("Plots: success_by_model.png, success_by_steps.png (x: steps the scripted reference solution needs), "
              "kl_per_layer.png (logit lens: each decoder layer's hidden state through the final norm and lm_head).\n")
    report["overall"] = overall
    (out / "report.md").write_text("\n".join(md))
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n".join(md))
    print(f"report: {out / 'report.md'}")
