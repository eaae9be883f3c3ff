"""Every shipped generate config composes: conf/generate.yaml x conf/tasks/* x conf/policy/*,
and what it names (families, options, policy, budgets, sandbox) builds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import sandbox_env.config  # noqa: F401  registers the generate/evaluate/serve/sandbox schemas
from qat.jobs import VERSION_BASE
from sandbox_env import SandboxConfig
from sandbox_env.agent.rollout import Budgets
from sandbox_env.agent.teachers import build_policy
from sandbox_env.generate import format_table, summarize
from sandbox_env.tasks.corpus import Corpus, CorpusConfig
from sandbox_env.tasks.suite import build_families, family_specs, work_items

CONF = Path(__file__).resolve().parents[2] / "conf"
TASKS = sorted(p.stem for p in (CONF / "tasks").glob("*.yaml"))
POLICIES = sorted(p.stem for p in (CONF / "policy").glob("*.yaml"))


def compose_generate(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=VERSION_BASE):
        return compose("generate", overrides=list(overrides))


def test_shipped_yaml_open_with_a_comment():
    for p in [CONF / "generate.yaml", *(CONF / "tasks").glob("*.yaml"), *(CONF / "policy").glob("*.yaml")]:
        first = p.read_text().splitlines()[0]
        assert first.startswith("# "), p


@pytest.mark.parametrize("tasks", TASKS)
@pytest.mark.parametrize("policy", POLICIES)
def test_every_config_composes_and_builds(tasks, policy):
    cfg = OmegaConf.to_container(compose_generate(f"tasks={tasks}", f"policy={policy}", "policy.model=m" if policy == "openai" else "seed=0"), resolve=True)
    specs = family_specs(cfg["tasks"])
    corpus = Corpus.generate(CorpusConfig(**cfg["corpus"]))
    fams = build_families(specs, corpus)
    items = work_items(specs)
    assert len(items) == sum(sum(s["counts"].values()) for s in specs) > 0
    for tag, fam in fams.items():
        assert fam.make("train", 0, cfg["seed"]).id == f"{tag}-train-000000"
    assert build_policy(cfg["policy"]).name in ("scripted", "openai:m")
    Budgets(**cfg["budgets"])
    SandboxConfig(**cfg["sandbox"])


def test_openai_policy_needs_a_model():
    cfg = compose_generate("policy=openai")
    with pytest.raises(Exception, match="policy.model"):
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def test_long_horizon_config_asks_for_tens_of_calls():
    cfg = OmegaConf.to_container(compose_generate("tasks=long_horizon"), resolve=True)
    (spec,) = family_specs(cfg["tasks"])
    assert spec["family"] == "retrieval" and spec["options"]["hops"] >= 10  # 2 calls per hop


def test_family_specs_errors_name_the_setting():
    with pytest.raises(ValueError, match="tasks.families must be a non-empty mapping"):
        family_specs({"splits": {"train": 1}, "families": {}})
    with pytest.raises(ValueError, match="unknown split"):
        family_specs({"splits": {"test": 1}, "families": {"arith": {}}})
    with pytest.raises(ValueError, match="arith.train must be an int >= 0"):
        family_specs({"splits": {"train": -1}, "families": {"arith": {}}})
    specs = family_specs({"splits": {"train": 5, "heldout": 1}, "families": {"x": {"family": "retrieval", "hops": 2, "train": 9}}})
    assert specs == [{"tag": "x", "family": "retrieval", "options": {"hops": 2}, "counts": {"train": 9, "heldout": 1}}]


def test_summary_and_table():
    def row(tag, split, correct, calls):
        rec = {"verdict": {"correct": correct}, "metadata": {"tool_calls": calls, "steps": calls + 1, "invalid_tool_calls": 0,
                                                             "generated_tokens": 10, "budget_exhausted": None}}
        return {"tag": tag, "split": split, "attempts": [rec]}

    s = summarize([row("a", "train", True, 2), row("a", "train", False, 4), row("b", "heldout", True, 1)])
    assert s["a/train"]["tasks"] == 2 and s["a/train"]["kept"] == 1 and s["a/train"]["success_rate"] == 0.5
    assert s["a/train"]["mean_tool_calls"] == 3.0 and s["all"]["tasks"] == 3 and list(s)[-1] == "all"
    table = format_table(s)
    assert "a/train" in table and "0.5" in table and len(table.splitlines()) == 5
