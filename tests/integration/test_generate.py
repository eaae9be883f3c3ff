"""`python -m sandbox_env.generate` end to end: the real CLI on a handful of tasks, datasets on
disk that validate, the summary, and resume (a rerun skips finished task ids)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import sandbox_env.config  # noqa: F401  registers the generate/evaluate/serve/sandbox schemas
from data.schema import read_trajectories
from qat.jobs import VERSION_BASE
from sandbox_env.generate import generate

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["tasks.splits.train=2", "tasks.splits.heldout=1", "progress=false", "corpus.people=60", "corpus.companies=20", "corpus.places=20"]
pytestmark = pytest.mark.integration


def config(out_dir, *overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=VERSION_BASE):
        cfg = compose("generate", overrides=[f"out_dir={out_dir}", *SMALL, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_generate_cli_end_to_end_then_resume(tmp_path):
    out = tmp_path / "gen"
    cmd = [sys.executable, "-m", "sandbox_env.generate", f"out_dir={out}", *SMALL, "workers=2", "policy.mistake_rate=0.3"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "success" in p.stdout and "all" in p.stdout  # the table

    summary = json.loads((out / "summary.json").read_text())
    n_tags = 7  # conf/tasks/default.yaml
    assert summary["ran_tasks"] == 3 * n_tags and summary["errors"] == []
    assert len(list((out / "shards").glob("*.json"))) == 3 * n_tags
    total = summary["groups"]["all"]
    assert total["tasks"] == 3 * n_tags and total["success_rate"] >= 0.9 and total["mean_tool_calls"] >= 1

    train, heldout = read_trajectories(out / "train"), read_trajectories(out / "heldout")
    assert len(train) == sum(v["kept"] for k, v in summary["groups"].items() if k.endswith("/train"))
    assert len(heldout) == sum(v["kept"] for k, v in summary["groups"].items() if k.endswith("/heldout"))
    assert all(r["verdict"]["correct"] and r["task"]["split"] == "train" for r in train)
    assert all(r["task"]["split"] == "heldout" for r in heldout)
    assert {r["task"]["id"] for r in train}.isdisjoint({r["task"]["id"] for r in heldout})
    assert {r["task"]["family"] for r in train} == {"arith", "dates", "primes", "strings", "files", "retrieval"}
    assert sum(r["metadata"]["mistakes"] for r in train + heldout) > 0  # mistake_rate=0.3 shows up
    if (out / "rejected").exists():
        assert all(not r["verdict"]["correct"] for r in read_trajectories(out / "rejected"))
    (index,) = (out / "cache").glob("corpus-*/index.sqlite")
    built = index.stat().st_mtime_ns
    assert "all" in (out / "summary.txt").read_text()

    # resume: the same command again runs nothing and writes the same datasets
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads((out / "summary.json").read_text())
    assert again["ran_tasks"] == 0 and again["skipped_done"] == 3 * n_tags
    assert [r["task"]["id"] for r in read_trajectories(out / "train")] == [r["task"]["id"] for r in train]
    assert index.stat().st_mtime_ns == built  # the corpus index was reused, not rebuilt


def test_resume_runs_only_missing_tasks_and_refuses_other_settings(tmp_path):
    out = tmp_path / "gen"
    cfg = config(out, "tasks=compute", "workers=0")
    first = generate(cfg)
    reasons = [json.loads(p.read_text())["attempts"][-1]["verdict"]["reason"] for p in (out / "shards").glob("*.json")]
    assert first["ran_tasks"] == 12 and first["groups"]["all"]["success_rate"] == 1.0, (first["errors"], reasons)
    # an interrupted run: two shards missing
    shards = sorted((out / "shards").glob("*.json"))
    for s in shards[:2]:
        s.unlink()
    second = generate(cfg)
    assert second["ran_tasks"] == 2 and second["skipped_done"] == 10
    assert {p.name for p in (out / "shards").glob("*.json")} == {s.name for s in shards}
    # more tasks: only the new ones run
    third = generate(config(out, "tasks=compute", "workers=2", "tasks.splits.train=3"))
    assert third["ran_tasks"] == 4 and third["written"]["train"] == 12
    with pytest.raises(ValueError, match="holds a run with different settings \\(seed\\)"):
        generate(config(out, "tasks=compute", "seed=1"))
    with pytest.raises(ValueError, match="lacks \\['python'\\], which family 'arith' needs"):
        generate(config(tmp_path / "other", "tasks=compute", "tools=[shell]"))
    with pytest.raises(ValueError, match="retrieval hops must be an int >= 1"):
        generate(config(tmp_path / "other", "tasks=retrieval", "tasks.families.retrieval.hops=0"))
    assert not (tmp_path / "other").exists()  # refused before anything was written


def test_rejection_sampling_with_an_openai_compatible_server(tmp_path):
    """A served model (a local HTTP server here) answers each task wrong first, right second:
    with attempts=2 every task is kept from its second episode and the first goes to `rejected`."""
    from sandbox_env.tasks import get_family
    from tests.fixtures import start_fake_openai_server

    answers = {get_family("dates").make("train", i).prompt: get_family("dates").make("train", i).answer for i in range(3)}
    asked: dict[str, int] = {}

    def reply(body):
        prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
        asked[prompt] = asked.get(prompt, 0) + 1
        value = answers[prompt] if asked[prompt] % 2 == 0 else "1999-01-01"
        msg = {"role": "assistant", "content": f"Answer: {value}", "reasoning_content": f"try {asked[prompt]}"}
        return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "message": msg, "finish_reason": "stop"}]}

    srv = start_fake_openai_server(reply)
    try:
        out = tmp_path / "gen"
        s = generate(config(out, "policy=openai", "policy.model=m", f"policy.base_url=http://127.0.0.1:{srv.server_address[1]}/v1",
                            "policy.max_retries=0", "tasks=compute", "~tasks.families.arith", "~tasks.families.primes",
                            "~tasks.families.strings", "tasks.splits.train=3", "tasks.splits.heldout=0", "attempts=2", "workers=0"))
    finally:
        srv.shutdown()
        srv.server_close()
    assert s["groups"]["all"]["kept"] == 3 and s["groups"]["all"]["attempts"] == 6
    kept, rejected = read_trajectories(out / "train"), read_trajectories(out / "rejected")
    assert sorted(r["task"]["prompt"] for r in kept) == sorted(answers)
    assert all(r["verdict"]["correct"] and r["metadata"]["attempt"] == 1 and r["metadata"]["policy"] == "openai:m" for r in kept)
    assert len(rejected) == 3 and all(not r["verdict"]["correct"] and r["metadata"]["attempt"] == 0 for r in rejected)
    assert all(r["verdict"]["answer"] == "1999-01-01" and r["verdict"]["reason"] for r in rejected)
