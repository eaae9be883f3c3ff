"""The task list of a job: conf/tasks (families, options, counts per split) as validated specs,
the families built from them, and the (family tag, split, index) work items with their ids.

Generation and evaluation both read conf/tasks through this module, so a held-out task means
the same task in both.
"""

from __future__ import annotations

from typing import Any

from sandbox_env.tasks import get_family

SPLITS = ("train", "heldout")


def family_specs(tasks_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """conf/tasks -> [{"tag", "family", "options", "counts": {split: n}}], validated."""
    splits = dict(tasks_cfg.get("splits") or {})
    fams = tasks_cfg.get("families")
    if not isinstance(fams, dict) or not fams:
        raise ValueError(f"tasks.families must be a non-empty mapping of tag -> options, got {fams!r}; see conf/tasks/default.yaml")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise ValueError(f"tasks.splits has unknown split(s) {bad}; use {list(SPLITS)}")
    specs = []
    for tag, opts in fams.items():
        opts = dict(opts or {})
        family = opts.pop("family", tag)
        counts = {s: opts.pop(s, splits.get(s, 0)) for s in SPLITS}
        for s, n in counts.items():
            if not isinstance(n, int) or n < 0:
                raise ValueError(f"task count for {tag}.{s} must be an int >= 0, got {n!r}; set tasks.splits.{s} or tasks.families.{tag}.{s}")
        specs.append({"tag": tag, "family": family, "options": opts, "counts": counts})
    return specs


def build_families(specs: list[dict[str, Any]], corpus: Any) -> dict[str, Any]:
    out = {}
    for s in specs:
        extra = {"corpus": corpus} if s["family"] == "retrieval" else {}
        out[s["tag"]] = get_family(s["family"], tag=s["tag"], **s["options"], **extra)
    return out


def work_items(specs: list[dict[str, Any]]) -> list[tuple[str, str, int]]:
    return [(s["tag"], split, i) for s in specs for split in SPLITS for i in range(s["counts"][split])]


def task_id(tag: str, split: str, index: int) -> str:
    return f"{tag}-{split}-{index:06d}"  # as TaskFamily.make names it
