"""Numbers and pictures of an evaluation: success with confidence intervals, KL against the reference, plots.

Success rates of a few dozen episodes are noisy, so every rate carries a Wilson score interval
(honest at small n and at 0% / 100%, where the normal approximation collapses). Whether the INT4
model *acts* like BF16 is measured where it is decided: on the next-token distributions of the
assistant tokens of held-out trajectories, teacher-forced (both models read the same rendered
trajectory; at every position whose next token is an assistant token, compare the two
distributions). Reported: mean KL(ref || quantized), top-1 agreement, each model's NLL of the
actual tokens, and a per-layer "logit-lens" KL: the hidden state after decoder layer l of each
model, put through the model's final norm and lm_head, compared the same way (the last layer's
value is the output KL). It shows where in depth the quantized model drifts from the reference;
it is a probe of the residual stream, not a claim about what each layer computes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from data.render import IGNORE_INDEX


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (95% by default); (0, 0) when n == 0."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def mcnemar(reference: dict[str, bool], model: dict[str, bool]) -> dict[str, Any]:
    """Exact McNemar test of two models on the same tasks (task id -> solved): the two-sided binomial
    p-value of the discordant pairs (tasks one model solves and the other does not) under "either is
    equally likely to win a discordant task". A paired test separates models far better than two
    independent intervals: tasks both solve, or both fail, carry no information about the difference."""
    shared = sorted(set(reference) & set(model))
    only_ref = sum(reference[t] and not model[t] for t in shared)
    only_model = sum(model[t] and not reference[t] for t in shared)
    n, k = only_ref + only_model, min(only_ref, only_model)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0
    diff = (sum(model[t] for t in shared) - sum(reference[t] for t in shared)) / len(shared) if shared else 0.0
    return {"tasks": len(shared), "only_reference": only_ref, "only_model": only_model,
            "success_diff": round(diff, 4), "p_value": round(p, 4)}


def summarize_episodes(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Success (with Wilson 95% CI) and per-episode means of one group of episode records."""
    n = len(records)
    k = sum(bool(r["verdict"]["correct"]) for r in records)
    lo, hi = wilson_interval(k, n)

    def mean(key: str) -> float:
        return round(sum(float(r["metadata"].get(key) or 0) for r in records) / n, 3) if n else 0.0

    return {
        "episodes": n, "correct": k, "success": round(k / n, 4) if n else 0.0, "ci_low": round(lo, 4),
        "ci_high": round(hi, 4), "avg_steps": mean("steps"), "avg_tool_calls": mean("tool_calls"),
        "avg_invalid_tool_calls": mean("invalid_tool_calls"),
        "budget_exhausted": round(sum(r["metadata"].get("budget_exhausted") is not None for r in records) / n, 4) if n else 0.0,
        "avg_generated_tokens": mean("generated_tokens"), "avg_context_hidden": mean("context_hidden"),
        "avg_forced_think_close": mean("forced_think_close"),
    }


def group_by_family(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        out.setdefault(r["metadata"].get("family_tag") or r["task"]["family"], []).append(r)
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- teacher-forced KL


def _lens_logprobs(model: Any, out: Any, pos: torch.Tensor) -> list[torch.Tensor]:
    """Log-probs [N, V] at positions `pos` for every decoder layer's output: layers 1..L-1 through
    the final norm and lm_head; layer L is the model's own logits (its last hidden state is normed)."""
    hs = out.hidden_states
    norm = model.model.norm
    head = model.get_output_embeddings()
    res = []
    for h in hs[1:-1]:
        res.append(torch.log_softmax(head(norm(h[0, pos])).float(), -1))
    res.append(torch.log_softmax(out.logits[0, pos].float(), -1))
    return res


@torch.no_grad()
def teacher_forced_divergence(model: Any, reference: Any, renderer: Any, records: Sequence[dict[str, Any]], *,
                              max_len: int = 2048, per_layer: bool = True) -> dict[str, Any]:
    """KL(reference || model), top-1 agreement and NLLs on the assistant tokens of `records`
    (rendered with the training renderer, split to `max_len`). Both models must share the tokenizer."""
    n_tok = 0
    kl_sum = agree = nll_m = nll_r = 0.0
    layer_kl: list[float] | None = None
    for rec in records:
        for doc in renderer.render_documents(rec, max_len=max_len):
            ids = torch.tensor([doc["input_ids"]])
            labels = torch.tensor(doc["labels"])
            pos = torch.nonzero(labels[1:] != IGNORE_INDEX).flatten()  # position t predicts token t + 1
            if len(pos) == 0:
                continue
            target = labels[1:][pos]
            o_m = model(ids.to(_device(model)), output_hidden_states=per_layer)
            o_r = reference(ids.to(_device(reference)), output_hidden_states=per_layer)
            if per_layer:
                lm, lr = _lens_logprobs(model, o_m, pos.to(_device(model))), _lens_logprobs(reference, o_r, pos.to(_device(reference)))
            else:
                lm = [torch.log_softmax(o_m.logits[0, pos].float(), -1)]
                lr = [torch.log_softmax(o_r.logits[0, pos].float(), -1)]
            lm, lr = [x.cpu() for x in lm], [x.cpu() for x in lr]
            kls = [float((r.exp() * (r - m)).sum()) for m, r in zip(lm, lr)]
            layer_kl = kls if layer_kl is None else [a + b for a, b in zip(layer_kl, kls)]
            kl_sum += kls[-1]
            agree += float((lm[-1].argmax(-1) == lr[-1].argmax(-1)).sum())
            nll_m -= float(lm[-1].gather(1, target[:, None]).sum())
            nll_r -= float(lr[-1].gather(1, target[:, None]).sum())
            n_tok += len(pos)
    if n_tok == 0:
        raise ValueError("teacher_forced_divergence: the records hold no assistant tokens to compare; pass "
                         "trajectories with assistant messages (kl.trajectories)")
    return {"tokens": n_tok, "kl": kl_sum / n_tok, "top1_agreement": agree / n_tok, "nll": nll_m / n_tok,
            "nll_reference": nll_r / n_tok,
            "kl_per_layer": [x / n_tok for x in layer_kl] if per_layer and layer_kl else None}


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


# ----------------------------------------------------------------------------- tables
