"""The schemas of sandbox_env's jobs (`generate`, `evaluate`, `serve`) as Hydra structured configs.

Each job's YAML (conf/generate.yaml, conf/evaluate.yaml, conf/serve.yaml) names its schema first in
its defaults list; the nested parts are the dataclasses the job builds from them (`Budgets`,
`CorpusConfig`, `SandboxConfig`, `SamplingConfig`), so a misspelled key or a value of the wrong
type fails when Hydra composes the config, naming the key, not minutes later inside a worker.
Defaults live here and in those dataclasses only; the YAML files carry what differs and say how
to run the job.

Importing this module registers the schemas (`register()`); the job entries and the tests that
compose these configs import it. It imports hydra, so `sandbox_env/__init__` does not import it:
`import sandbox_env` stays stdlib-only for the rollout workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sandbox_env.agent.rollout import Budgets
from sandbox_env.inference.sampling import SamplingConfig
from sandbox_env.sandbox.session import SandboxConfig
from sandbox_env.tasks.corpus import CorpusConfig

TOOLS = ["python", "shell", "search", "open"]


@dataclass
class TasksConfig:
    """conf/tasks/: tasks per split and the families (tag -> options; see sandbox_env.tasks.suite)."""

    splits: dict[str, int] = field(default_factory=dict)
    families: dict[str, Any] = field(default_factory=dict)


@dataclass
class GenerateJobConfig:
    """`python -m sandbox_env.generate`: tasks x teacher policy -> verified trajectories."""

    tasks: TasksConfig = field(default_factory=TasksConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    policy: dict[str, Any] = field(default_factory=dict)
    """conf/policy/: `kind` (scripted | openai) and that teacher's options (checked by build_policy)"""
    out_dir: str = "outputs/trajectories"
    cache_dir: str | None = None
    seed: int = 0
    workers: int = 2
    attempts: int = 1
    keep_rejected: bool = True
    progress: bool = True
    tools: list[str] = field(default_factory=lambda: list(TOOLS))
    compact_prompt: bool = False
    tokenizer: str | None = None
    budgets: Budgets = field(default_factory=lambda: Budgets(max_steps=64))
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


@dataclass
class EngineConfig:
    max_batch_size: int = 16
    concurrency: int = 8
    dtype: str | None = None
    device: str = "cpu"
    threads: int | None = None


@dataclass
class SampledConfig:
    seeds: list[int] = field(default_factory=list)
    temperature: float = 0.7
    models: list[str] | None = None


@dataclass
class HeavyConfig:
    n: int = 0
    mode: str = "vote"
    temperature: float = 0.7


@dataclass
class KLConfig:
    enabled: bool = True
    trajectories: str | None = None
    max_records: int = 32
    max_len: int = 2048
    per_layer: bool = True


@dataclass
class EvaluateJobConfig:
    """`python -m sandbox_env.evaluate`: checkpoints as agents on held-out tasks, and the report."""

    tasks: TasksConfig = field(default_factory=TasksConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    out_dir: str = "outputs/eval"
    cache_dir: str | None = None
    checkpoints: list[Any] = field(default_factory=list)
    """[{name, path, dtype?, tokenizer?, ptq?, ptq_config?}]"""
    paths: dict[str, Any] = field(default_factory=dict)
    """named paths the checkpoints interpolate (`${paths.bf16}`), as conf/eval/standard.yaml does"""
    reference: str | None = None
    seed: int = 0
    split: str = "heldout"
    tools: list[str] = field(default_factory=lambda: list(TOOLS))
    compact_prompt: bool = False
    tools_disabled: Any = False
    """false, true, or a list of checkpoint names"""
    progress: bool = True
    steps_needed: bool = True
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    budgets: Budgets = field(default_factory=lambda: Budgets(max_steps=32, max_thinking_tokens=512, max_total_tokens=8192,
                                                             context_budget=4096))
    engine: EngineConfig = field(default_factory=EngineConfig)
    sampled: SampledConfig = field(default_factory=SampledConfig)
    heavy: HeavyConfig = field(default_factory=HeavyConfig)
    kl: KLConfig = field(default_factory=KLConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)


@dataclass
class ServeJobConfig:
    """`python -m sandbox_env.serve`: one checkpoint as an OpenAI-compatible server."""

    checkpoint: str = "???"
    name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    dtype: str | None = None
    device: str = "cpu"
    threads: int | None = None
    max_batch_size: int = 8
    max_tokens: int = 1024
    max_thinking_tokens: int | None = None
    temperature: float = 0.0
    prefix_cache_entries: int = 16


def register() -> None:
    """Stores the schemas in Hydra's ConfigStore (idempotent): sandbox/sandbox_schema for
    conf/sandbox/*.yaml, and generate_schema, evaluate_schema, serve_schema."""
    from qat.jobs import register_schema

    register_schema("sandbox", SandboxConfig, group="sandbox")
    register_schema("generate", GenerateJobConfig)
    register_schema("evaluate", EvaluateJobConfig)
    register_schema("serve", ServeJobConfig)


register()
