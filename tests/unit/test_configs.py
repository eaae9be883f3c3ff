"""Every shipped config composes, for every primary config (conf/*.yaml: train, generate, export,
evaluate, pipeline, whichever exist), so that no config rots when another one changes.

For each primary config: compose it as shipped, then once per option of every config group its
defaults list uses (model=..., qat=..., data=..., experiment=..., ...), and resolve the result.
Train compositions also pass the job's own validation. The launch configs (conf/accelerate/*.yaml,
conf/deepspeed/*.json) are not Hydra groups; they are checked for what the job relies on.
"""

import json
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[2] / "conf"
PRIMARIES = sorted(p.stem for p in CONF.glob("*.yaml"))
NOT_HYDRA_GROUPS = {"accelerate", "deepspeed"}


def _groups_used(primary: str) -> list[str]:
    """Config groups named in a primary config's defaults list (including `experiment: null`)."""
    groups = []
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / f"{primary}.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for key in entry:
                name = key.split()[-1]  # "override hydra/job_logging" / "optional x" -> the group
                if not name.startswith("hydra") and (CONF / name).is_dir():
                    groups.append(name)
    return groups


def _cases():
    cases = []
    for primary in PRIMARIES:
        cases.append((primary, None))
        for group in _groups_used(primary):
            for option in sorted((CONF / group).glob("*.yaml")):
                cases.append((primary, f"{group}={option.stem}"))
    return cases


def _resolved(cfg) -> dict:
    """The config with every interpolation resolved; required values (???) stand in as a marker,
    so an interpolation that points at one resolves too (a path the user must give is no rot)."""

    def fill(node):
        keys = range(len(node)) if OmegaConf.is_list(node) else list(node.keys())
        for k in keys:
            if OmegaConf.is_missing(node, k):
                node[k] = "<required>"
            else:
                child = node._get_node(k)
                if OmegaConf.is_config(child):
                    fill(child)

    fill(cfg)
    return OmegaConf.to_container(cfg, resolve=True)


def _compose(primary: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name=primary, overrides=overrides)


def test_primaries_exist():
    assert "train" in PRIMARIES
    assert {"model", "qat", "optim", "logger", "data", "experiment"} <= set(_groups_used("train"))


@pytest.mark.parametrize("primary, override", _cases(), ids=lambda x: str(x))
def test_config_composes(primary, override):
    cfg = _compose(primary, [override] if override else [])
    assert _resolved(cfg)  # broken interpolations fail here
    if primary == "train":
        from train.recipe import validate_config

        validate_config(_compose(primary, ([override] if override else []) + ["data.path=trajs.jsonl"]))


def _unused_group_options():
    """Options of groups that no primary config's defaults list names (e.g. conf/sandbox while its
    job inlines the settings): composed on their own, so they at least do not rot."""
    used = {g for p in PRIMARIES for g in _groups_used(p)}
    groups = sorted({d.name for d in CONF.iterdir() if d.is_dir()} - NOT_HYDRA_GROUPS - used)
    return [f"{g}/{p.stem}" for g in groups for p in sorted((CONF / g).glob("*.yaml"))]


@pytest.mark.parametrize("name", _unused_group_options())
def test_unused_group_options_compose_on_their_own(name):
    assert _resolved(_compose(name, []))


@pytest.mark.parametrize("path", sorted((CONF / "accelerate").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs(path):
    text = path.read_text()
    header = "".join(ln + "\n" for ln in text.splitlines() if ln.startswith("#"))
    assert text.startswith("# ") and ("accelerate launch" in header or "launch_multinode.sh" in header), header
    cfg = yaml.safe_load(text)
    assert cfg["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED")  # MULTI_CPU silently runs 1 process
    assert cfg["num_processes"] >= 1 and cfg["num_machines"] >= 1
    ds = (cfg.get("deepspeed_config") or {}).get("deepspeed_config_file")
    if cfg["distributed_type"] == "DEEPSPEED":
        assert ds and (CONF.parent / ds).is_file(), f"{path.name}: deepspeed_config_file {ds!r} missing"


@pytest.mark.parametrize("path", sorted((CONF / "deepspeed").glob("*.json")), ids=lambda p: p.stem)
def test_deepspeed_configs(path):
    cfg = json.loads(path.read_text())
    stage = cfg["zero_optimization"]["stage"]
    assert stage in (2, 3)
    # The job builds the optimizer and LR schedule itself, the same in every distributed mode.
    assert "optimizer" not in cfg and "scheduler" not in cfg
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert cfg[key] == "auto", f"{path.name}: {key} must be 'auto' (filled from the job config)"
    if stage == 3:
        assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
