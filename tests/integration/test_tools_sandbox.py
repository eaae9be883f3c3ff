"""ToolBox: the python and shell tools against a real sandbox (bubblewrap). The tools that need no
sandbox, and every kind of bad call, are in tests/unit/test_tools.py."""

import shutil

import pytest

from sandbox_env import Sandbox, SandboxConfig, ToolBox, ToolResult

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None,
                                 reason="bubblewrap (bwrap) is not installed: apt-get install bubblewrap")

@pytest.fixture(scope="module")
def index(search_index):
    return search_index


@pytest.fixture(scope="module")
def sandbox():
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap (bwrap) is not installed: apt-get install bubblewrap")
    with Sandbox(SandboxConfig(timeout_s=5.0)) as sb:
        yield sb


@pytest.fixture(scope="module")
def tb(sandbox, index):
    return ToolBox(sandbox=sandbox, index=index, open_page_chars=1000, search_k=5)


@needs_bwrap
def test_python_tool(tb):
    r = tb.call("python", '{"code": "big = 2**100\\nprint(big)"}')
    assert r == ToolResult(content="1267650600228229401496703205376\n", ok=True, error=None)
    r = tb.call("python", {"code": "big % 7"})  # state persists; dict arguments work too
    assert r.ok and r.content == f"{2**100 % 7}\n"
    r = tb.call("python", {"code": "undefined_name"})
    assert not r.ok and "NameError" in r.error and "Traceback" in r.content
    assert tb.call("python", {"code": "x = 1"}).content == "(no output)"


@needs_bwrap
def test_shell_tool(tb):
    r = tb.call("shell", {"command": "echo hello > f.txt && cat f.txt"})
    assert r.ok and r.content == "hello\n"
    r = tb.call("shell", {"command": "ls missing-file"})
    assert not r.ok and "missing-file" in r.content and "[the command exited with status 2]" in r.content


