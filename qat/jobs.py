"""How every Hydra job of the project starts: one version base, one conf dir, typed schemas.

Each job (`python -m train`, `train.ptq`, `train.upcycle`, `qat.export`, `sandbox_env.generate |
evaluate | serve`, `scripts/pipeline.py`) is `job("<primary>")(fn)`: `fn(cfg)` runs on
conf/<primary>.yaml composed with its overrides. Tests and benchmarks compose with `compose()`,
so they see exactly what the job sees.

The one idea: a config's dataclass is its schema and the single source of its defaults. A module
registers it with `register_schema("<primary>", Dataclass)` (as `<primary>_schema` in Hydra's
ConfigStore), and the primary YAML names it first in its defaults list; every group option then
merges into a typed node, so a misspelled key or a value of the wrong type fails at composition
with Hydra's error naming the key. The YAML files carry only what differs from the dataclass.

`qat/` imports nothing of ours, so this module can serve `train/` and `sandbox_env/` alike.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

VERSION_BASE = "1.3"
"""Hydra's version_base for every app and every compose() of the project."""
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
"""The project's Hydra config dir (conf/)."""


def register_schema(primary: str, node: Any, *, group: str | None = None) -> str:
    """Stores `node` (a dataclass) in Hydra's ConfigStore as `<primary>_schema` (in `group` if given),
    the name a primary config's defaults list uses; returns that name. Idempotent."""
    from hydra.core.config_store import ConfigStore

    name = f"{primary}_schema"
    ConfigStore.instance().store(name=name, node=node, group=group)
    return name


def job(primary: str) -> Callable[[Callable[[Any], Any]], Callable[[], None]]:
    """Decorator: `main = job("train")(fn)` makes `main()` the Hydra app over conf/<primary>.yaml
    (command-line overrides, multirun, --cfg job ... as any Hydra app)."""

    def wrap(fn: Callable[[Any], Any]) -> Callable[[], None]:
        @functools.wraps(fn)
        def main() -> None:
            import hydra

            hydra.main(version_base=VERSION_BASE, config_path=CONF_DIR, config_name=primary)(fn)()

        return main

    return wrap


def compose(primary: str, overrides: Iterable[str] = ()) -> Any:
    """conf/<primary>.yaml composed with `overrides`, as the job would see it (a DictConfig, no run dir)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base=VERSION_BASE):
        return hydra_compose(config_name=primary, overrides=list(overrides))
