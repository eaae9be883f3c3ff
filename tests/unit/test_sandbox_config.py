"""conf/sandbox/*.yaml compose (with Hydra) into valid SandboxConfigs; default.yaml is SandboxConfig()."""

import dataclasses
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sandbox_env import SandboxConfig

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")
PRESETS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "sandbox")) if f.endswith(".yaml"))


def _compose(name: str) -> SandboxConfig:
    with initialize_config_dir(config_dir=CONF, version_base=None):
        cfg = compose(overrides=[f"+sandbox={name}"])
    return SandboxConfig(**OmegaConf.to_container(cfg.sandbox, resolve=True))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes(name):
    cfg = _compose(name)
    assert isinstance(cfg, SandboxConfig)
    with open(os.path.join(CONF, "sandbox", f"{name}.yaml")) as f:
        assert f.readline().startswith("# "), "a config opens with a comment saying what it runs"


def test_default_yaml_is_the_dataclass_default():
    assert _compose("default") == SandboxConfig()
    fields = {f.name for f in dataclasses.fields(SandboxConfig)}
    assert set(OmegaConf.load(os.path.join(CONF, "sandbox", "default.yaml"))) == fields  # documents every field


def test_presets_differ_where_they_say():
    assert _compose("trusted").isolation == "none"
    strict = _compose("strict")
    assert strict.isolation == "bwrap" and strict.memory_mb < SandboxConfig().memory_mb


def test_unknown_field_is_refused():
    with pytest.raises(TypeError, match="timeout"):
        SandboxConfig(**{"timeout": 5})  # a typo in an override must not pass silently
