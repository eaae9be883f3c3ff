"""Every shipped config composes, for every primary config (conf/*.yaml: train, generate, export,
evaluate, pipeline, whichever exist), so that no config rots when another one changes.

For each primary config: compose it as shipped, then once per option of every config group its
defaults list uses (model=..., qat=..., data=..., experiment=..., ...), and resolve the result.
Train compositions also pass the job's own validation, and become the typed TrainConfig. Every
config group is used by some primary config (no config that nothing composes), and a primary
config with a schema refuses a misspelled key or a wrong type at composition. The launch configs (conf/accelerate/*.yaml,
conf/deepspeed/*.json) are not Hydra groups; they are checked for what the job relies on.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import qat.export  # noqa: F401  registers export_schema
import sandbox_env.config  # noqa: F401  registers generate/evaluate/serve_schema and sandbox/sandbox_schema
import train
import train.ptq
import train.upcycle  # noqa: F401  registers upcycle_schema
from qat.jobs import compose


def _register_pipeline_schema() -> None:
    """scripts/pipeline.py is a script, not a package module: importing it registers pipeline_schema."""
    spec = importlib.util.spec_from_file_location("pipeline_script", Path(__file__).resolve().parents[2] / "scripts" / "pipeline.py")
    module = sys.modules["pipeline_script"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_register_pipeline_schema()

CONF = Path(__file__).resolve().parents[2] / "conf"
PRIMARIES = sorted(p.stem for p in CONF.glob("*.yaml"))
NOT_HYDRA_GROUPS = {"accelerate", "deepspeed"}
APPENDED_GROUPS = {"evaluate": ["eval"]}  # groups a primary takes with `+group=option` (+eval=quick)


def _groups_used(primary: str) -> list[str]:
    """Config groups named in a primary config's defaults list (including `experiment: null`)."""
    groups = []
    for entry in OmegaConf.to_container(OmegaConf.load(CONF / f"{primary}.yaml")).get("defaults", []):
        if isinstance(entry, dict):
            for key in entry:
                name = key.split()[-1]  # "override hydra/job_logging" / "optional x" -> the group
                if not name.startswith("hydra") and (CONF / name).is_dir():
                    groups.append(name)
    return groups + APPENDED_GROUPS.get(primary, [])


def _cases():
    cases = []
    for primary in PRIMARIES:
        cases.append((primary, None))
        for group in _groups_used(primary):
            for option in sorted((CONF / group).glob("*.yaml")):
                plus = "+" if group in APPENDED_GROUPS.get(primary, []) else ""
                cases.append((primary, f"{plus}{group}={option.stem}"))
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
    return compose(primary, overrides)


def test_primaries_exist():
    assert "train" in PRIMARIES
    assert {"model", "qat", "optim", "logger", "data", "experiment"} <= set(_groups_used("train"))


@pytest.mark.parametrize("primary, override", _cases(), ids=lambda x: str(x))
def test_config_composes(primary, override):
    cfg = _compose(primary, [override] if override else [])
    assert _resolved(cfg)  # broken interpolations fail here
    if primary == "train":
        from train.config import TrainConfig
        from train.recipe import validate_config

        full = _compose(primary, ([override] if override else []) + ["data.path=trajs.jsonl"])
        validate_config(full)
        assert OmegaConf.get_type(full) is TrainConfig
        if full.qat is not None:
            OmegaConf.to_object(full.qat)  # a valid QuantConfig (its __post_init__ checks the values)


def test_every_group_is_composed_by_a_primary_config():
    used = {g for p in PRIMARIES for g in _groups_used(p)}
    groups = {d.name for d in CONF.iterdir() if d.is_dir()} - NOT_HYDRA_GROUPS
    assert groups <= used, f"config groups that no primary config composes: {sorted(groups - used)}"


def test_every_shipped_yaml_opens_with_a_comment():
    for path in sorted(CONF.rglob("*.yaml")):
        assert path.read_text().startswith("# "), f"{path.relative_to(CONF)}: open with what it runs and how"


@pytest.mark.parametrize("override, key", [
    ("optim.lrr=1e-3", "optim.lrr"),          # a misspelled key
    ("qat.group_sise=64", "qat.group_sise"),
    ("max_steps=many", "max_steps"),          # a value of the wrong type
    ("qat.bits=four", "qat.bits"),
    ("data.packing=maybe", "data.packing"),
])
def test_train_schema_refuses_bad_keys_and_types_at_composition(override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as e:
        _compose("train", [override])
    assert key in str(e.value) + str(e.value.__cause__)


def test_bf16_is_qat_none_and_keeps_the_schedule_apart():
    cfg = _compose("train", ["qat=none", "experiment=tiny_cpu_smoke"])
    assert cfg.qat is None and cfg.qat_schedule.start_step == 10  # the schedule is ignored, not an error
    assert OmegaConf.to_object(_compose("train", []).qat) == __import__("qat").QuantConfig()  # k2_int4 = the defaults


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
