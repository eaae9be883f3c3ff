"""Task families with verifiers, and their registry.

`get_family(name, **options)` builds a family; `conf/tasks/*.yaml` lists which families a
generate run uses, with their options (e.g. `hops` for retrieval). See `base.py` for the task
model, the split rule and the final-answer convention (`Answer: <value>` on the last line).
"""

from __future__ import annotations

from typing import Any

from sandbox_env.tasks.arith import ArithFamily
from sandbox_env.tasks.base import (
    ANSWER_PREFIX,
    SPLITS,
    Task,
    TaskFamily,
    extract_answer,
    format_final,
    normalize,
    parse_number,
    split_bucket,
)
from sandbox_env.tasks.dates import DatesFamily
from sandbox_env.tasks.files import FilesFamily
from sandbox_env.tasks.primes import PrimesFamily
from sandbox_env.tasks.retrieval import RetrievalFamily
from sandbox_env.tasks.strings import StringsFamily

FAMILIES: dict[str, type[TaskFamily]] = {
    f.name: f for f in (ArithFamily, DatesFamily, PrimesFamily, StringsFamily, RetrievalFamily, FilesFamily)
}


def family_names() -> list[str]:
    return sorted(FAMILIES)


def get_family(name: str, **options: Any) -> TaskFamily:
    """The family registered as `name`, built with `options` (`tag` names the variant in task
    ids; retrieval also takes `hops`, `corpus` or `corpus_config`)."""
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; choose from {family_names()} (conf/tasks/*.yaml, key `family`)")
    try:
        return FAMILIES[name](**options)
    except TypeError as e:
        raise ValueError(f"task family {name!r} does not take options {sorted(options)}: {e}") from None


__all__ = [
    "ANSWER_PREFIX", "FAMILIES", "SPLITS", "Task", "TaskFamily", "extract_answer", "family_names", "format_final",
    "get_family", "normalize", "parse_number", "split_bucket",
]
