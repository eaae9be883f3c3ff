"""Does a checkpoint copy from its context? Per-token NLL on held-out trajectories, split into
digits (values the model must copy from the question or a tool result) and everything else.

A model that has only learned the format predicts digits at chance, ln 10 = 2.30 nats; one that
copies drives them toward 0. The tiny model trained from scratch on CPU stays at chance (see the
README's status); this is the number to watch when trying to change that.

    .venv/bin/python scripts/copy_nll.py outputs/pipeline/runs/bf16/checkpoints/step_001000 \
        outputs/pipeline/trajectories/heldout --per-family 4 --show 1
"""

from __future__ import annotations

import argparse
import collections
import math

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="HF dir, training checkpoint or INT4 export (last positional: the data)")
    ap.add_argument("--per-family", type=int, default=4, help="trajectories per family tag")
    ap.add_argument("--show", type=int, default=0, help="print this many trajectories token by token ([nll] when > 1)")
    args = ap.parse_args(argv)
    *cks, data = args.checkpoints
    if not cks:
        ap.error("give at least one checkpoint and then the held-out trajectories")
    from data.render import get_renderer
    from data.schema import read_trajectories
    from sandbox_env.inference.loading import load_policy_model

    by_tag = collections.defaultdict(list)
    for rec in read_trajectories(data):
        tag = (rec.get("metadata") or {}).get("family_tag") or (rec.get("task") or {}).get("family", "?")
        if len(by_tag[tag]) < args.per_family:
            by_tag[tag].append(rec)
    sample = [r for recs in by_tag.values() for r in recs]
    for ck in cks:
        loaded = load_policy_model(ck)
        tok, renderer = loaded.tokenizer, get_renderer(loaded.tokenizer)
        digits = set(tok.convert_tokens_to_ids(list("0123456789")))
        nll = {"digits": [], "other": []}
        for i, rec in enumerate(sample):
            d = renderer.render_training(rec)
            ids = torch.tensor([d["input_ids"]])
            with torch.no_grad():
                lp = torch.log_softmax(loaded.model(input_ids=ids).logits[0, :-1].float(), -1)
            tgt = ids[0, 1:]
            tok_nll = (-lp[torch.arange(len(tgt)), tgt]).tolist()
            mask = [lab != -100 for lab in d["labels"][1:]]
            for t, n, m in zip(tgt.tolist(), tok_nll, mask):
                if m:
                    nll["digits" if t in digits else "other"].append(n)
            if i < args.show:
                toks = tok.convert_ids_to_tokens(tgt.tolist())
                print(" ".join(t + (f"[{n:.1f}]" if n > 1 else "") for t, n, m in zip(toks, tok_nll, mask) if m))
        mean = {k: sum(v) / max(len(v), 1) for k, v in nll.items()}
        print(f"{ck}: digits {mean['digits']:.3f} nats over {len(nll['digits'])} tokens (chance {math.log(10):.2f}), "
              f"other assistant tokens {mean['other']:.3f} over {len(nll['other'])}")


if __name__ == "__main__":
    main()
