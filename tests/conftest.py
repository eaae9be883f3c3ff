"""Fixtures shared by every test: corpora, tokenizers and tiny models from tests/fixtures.py, built
once per session (training the tiny tokenizer takes about a second).

Unit tests are the fast loop (`pytest -m "not integration"`): no subprocess, no sandbox. Every test
under tests/integration/ is marked `integration` here, by its path, and every other test runs with
process creation (subprocess, fork, posix_spawn, multiprocessing) switched off, so a unit test that
starts a sandbox or a subprocess fails at once and names where it belongs."""

import multiprocessing.util
import os
import platform
import subprocess
import traceback
from pathlib import Path

import pytest

from data.schema import write_jsonl
from tests.fixtures import (
    SEARCH_DOCS,
    make_records,
    qwen3_style_tokenizer,
    start_fake_openai_server,
    tiny_model_and_tokenizer,
    tiny_tokenizer,
)

INTEGRATION_DIR = Path(__file__).parent / "integration"

# The standard library runs `uname -p` once, on first use, and caches it (libraries such as openai
# ask for platform.platform()); ask now, so that no unit test is blamed for it.
platform.processor()


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if INTEGRATION_DIR in Path(item.path).parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(autouse=True)
def _no_processes_in_unit_tests(request, monkeypatch):
    """A unit test that starts a process fails; move it to tests/integration/ or mark it
    `integration`. The refusal is also checked after the test, since code that turns a tool's
    crash into an error message (the rollout loop does) would otherwise swallow it."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append("".join(traceback.format_stack(limit=12)[:-1]))
        raise RuntimeError(f"{request.node.nodeid} starts a process (subprocess, sandbox, fork or "
                           "multiprocessing): unit tests may not; move it to tests/integration/ or mark it "
                           "@pytest.mark.integration")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)
    monkeypatch.setattr(multiprocessing.util, "spawnv_passfds", refuse)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "spawnv", "spawnve", "spawnvp",
                 "spawnvpe", "execv", "execve"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    yield
    if attempts:
        pytest.fail(f"{request.node.nodeid} tried to start a process ({len(attempts)} times): unit tests may "
                    "not; move it to tests/integration/ or mark it @pytest.mark.integration. First attempt:\n"
                    + attempts[0], pytrace=False)


@pytest.fixture(scope="session")
def tiny_tok():
    """The tiny K2-style tokenizer trained on the probe corpus."""
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def qwen_tok():
    """A Qwen3-style tokenizer (ChatML, `<tool_call>` JSON, `<think>`), standing in for a real model's."""
    return qwen3_style_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm():
    """(model, tokenizer): a tiny random-init Qwen3-MoE and its tokenizer; do not train it in place."""
    return tiny_model_and_tokenizer(seed=0)


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """60 hand-written trajectories as JSONL: the training jobs' data."""
    path = tmp_path_factory.mktemp("data") / "traj.jsonl"
    write_jsonl(make_records(60), path)
    return path


@pytest.fixture(scope="session")
def tiny_policy(tiny_lm):
    """(model, tokenizer, renderer) of the tiny model: what the engine and the local policy take."""
    from data.render import get_renderer

    model, tok = tiny_lm
    return model, tok, get_renderer(tok)


@pytest.fixture(scope="module")
def search_index(tmp_path_factory):
    """An FTS5 index over tests.fixtures.SEARCH_DOCS."""
    from sandbox_env import SearchIndex

    return SearchIndex.build(tmp_path_factory.mktemp("tools") / "corpus.db", SEARCH_DOCS)


@pytest.fixture
def openai_server():
    """(server, replies): a fake OpenAI-compatible server; append responses to `replies`."""
    replies: list = []
    srv = start_fake_openai_server(replies)
    yield srv, replies
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(corpus, ToolEnv over its search index): the retrieval tasks' world, default size."""
    from sandbox_env.agent.rollout import ToolEnv
    from sandbox_env.tasks.corpus import CorpusConfig, ensure_corpus

    corpus, index_path = ensure_corpus(CorpusConfig(), tmp_path_factory.mktemp("corpus"))
    return corpus, ToolEnv(index_path=index_path)
