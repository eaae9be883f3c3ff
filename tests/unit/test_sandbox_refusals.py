"""sandbox_env.Sandbox without starting one: configuration checks and the refusal to run without
bubblewrap. The sessions themselves (isolation, hostile code) are tested against real bubblewrap
in tests/integration/test_sandbox.py."""

import pytest

from sandbox_env import Sandbox, SandboxConfig


def test_missing_bwrap_refuses_to_start(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without bwrap
    with pytest.raises(RuntimeError, match="apt-get install bubblewrap"):
        Sandbox(SandboxConfig())


@pytest.mark.parametrize("field,value", [("timeout_s", 0), ("memory_mb", -1), ("max_processes", 1.5),
                                         ("isolation", "docker"), ("max_output_bytes", True),
                                         ("python", "python3")])
def test_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=field):
        SandboxConfig(**{field: value})
