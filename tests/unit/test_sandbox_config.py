"""conf/sandbox/*.yaml: the sandbox presets the generate and evaluate jobs compose (sandbox=default |
strict | trusted), typed by SandboxConfig, so a misspelled key fails when the job's config composes."""

import os

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import sandbox_env.config  # noqa: F401  registers the generate/evaluate/serve/sandbox schemas
from qat.jobs import compose
from sandbox_env import SandboxConfig

CONF = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf")
PRESETS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "sandbox")) if f.endswith(".yaml"))


def _sandbox(job: str, *overrides: str) -> SandboxConfig:
    cfg = compose(job, list(overrides))
    assert OmegaConf.get_type(cfg.sandbox) is SandboxConfig
    return SandboxConfig(**OmegaConf.to_container(cfg.sandbox, resolve=True))  # as the jobs build it


@pytest.mark.parametrize("job", ["generate", "evaluate"])
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_composes_in_the_jobs_that_build_sandboxes(job, name):
    assert isinstance(_sandbox(job, f"sandbox={name}"), SandboxConfig)


def test_the_default_is_the_dataclass_default():
    assert _sandbox("generate") == _sandbox("evaluate") == SandboxConfig()


def test_presets_differ_where_they_say():
    assert _sandbox("generate", "sandbox=trusted").isolation == "none"
    strict = _sandbox("evaluate", "sandbox=strict")
    assert strict.isolation == "bwrap" and strict.memory_mb < SandboxConfig().memory_mb
    assert _sandbox("generate", "sandbox=strict", "sandbox.timeout_s=3").timeout_s == 3.0


@pytest.mark.parametrize("override", ["sandbox.timeout=5", "sandbox.memory_mb=lots"])
def test_a_bad_key_or_type_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose("generate", [override])


def test_unknown_field_is_refused():
    with pytest.raises(TypeError, match="timeout"):
        SandboxConfig(**{"timeout": 5})  # a typo in code must not pass silently either
