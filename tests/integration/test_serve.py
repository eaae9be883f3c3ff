"""The OpenAI-compatible server answers the real `openai` client with tool calls, and the generation
job's OpenAI teacher completes a real sandbox episode against it.

The model is a tiny Qwen3-MoE trained for a few seconds to reproduce one scripted trajectory (so it
emits a real tool call and then the right answer); the tokenizer is the tiny K2-style one.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

pytestmark = pytest.mark.integration


def _train_on(model, renderer, record, max_steps=400):
    d = renderer.render_training(record)
    ids, labels = torch.tensor([d["input_ids"]]), torch.tensor([d["labels"]])
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(max_steps):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.005:
            break
    model.eval()
    return loss.item()


@pytest.fixture(scope="module")
def served():
    from data.render import get_renderer
    from sandbox_env.agent.rollout import ToolEnv, run_episode
    from sandbox_env.agent.teachers import ScriptedTeacher
    from sandbox_env.inference.loading import LoadedModel
    from sandbox_env.inference.server import ChatService, make_server
    from sandbox_env.tasks import get_family
    from tests.fixtures import tiny_model_and_tokenizer

    torch.set_num_threads(1)
    fam = get_family("arith")
    task = fam.make("heldout", 0, 0)
    env = ToolEnv(tools=("python",))
    record = run_episode(task, ScriptedTeacher(mistake_rate=0.0), env, family=fam)
    assert record["verdict"]["correct"]
    model, tok = tiny_model_and_tokenizer(seed=0, layers=1)
    loss = _train_on(model, get_renderer(tok), record)
    assert loss < 0.05, loss
    service = ChatService(LoadedModel(model, tok, "hf", "tiny"), name="tiny-agent", max_batch_size=4)
    server = make_server(service, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield {"url": f"http://{host}:{port}/v1", "record": record, "task": task, "family": fam, "env": env}
    server.shutdown()
    server.server_close()
    service.engine.close()


def test_openai_client_gets_tool_calls(served):
    import openai

    from sandbox_env.agent.teachers import to_openai_messages

    client = openai.OpenAI(base_url=served["url"], api_key="EMPTY", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == ["tiny-agent"]
    rec = served["record"]
    resp = client.chat.completions.create(model="tiny-agent", messages=to_openai_messages(rec["messages"][:2]),
                                          tools=rec["tools"], temperature=0.0, max_tokens=400)
    choice = resp.choices[0]
    want = rec["messages"][2]["tool_calls"][0]["function"]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == want["name"]
    assert json.loads(call.function.arguments) == want["arguments"]  # arguments arrive as JSON text
    assert (choice.message.model_extra or {}).get("reasoning_content") == rec["messages"][2]["reasoning_content"]
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens > 0
    # the same conversation again: served from the prefix cache
    again = client.chat.completions.create(model="tiny-agent", messages=to_openai_messages(rec["messages"][:2]),
                                           tools=rec["tools"], temperature=0.0, max_tokens=400)
    assert again.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    assert again.usage.prompt_tokens_details.cached_tokens == resp.usage.prompt_tokens - 1
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="tiny-agent", messages=[{"role": "robot", "content": "hi"}])


def test_openai_teacher_runs_an_episode_against_the_server(served):
    from sandbox_env.agent.rollout import run_episode
    from sandbox_env.agent.teachers import OpenAITeacher

    teacher = OpenAITeacher(base_url=served["url"], model="tiny-agent", temperature=0.0, send_reasoning=True,
                            max_retries=0, timeout_s=120)
    rec = run_episode(served["task"], teacher, served["env"], family=served["family"])
    assert rec["metadata"]["tool_calls"] == 1 and rec["metadata"]["invalid_tool_calls"] == 0
    assert rec["verdict"]["correct"], rec["messages"][-1]


def test_serve_cli_starts_on_a_free_port_and_lists_the_model(tmp_path):
    import re
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from tests.fixtures import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(seed=0, layers=1)
    model.save_pretrained(tmp_path / "ck")
    tok.save_pretrained(tmp_path / "ck")
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen([sys.executable, "-m", "sandbox_env.serve", f"checkpoint={tmp_path / 'ck'}", "port=0",
                             "name=cli-model", "threads=1"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        url, t0 = None, time.time()
        while url is None and time.time() - t0 < 120:
            line = proc.stdout.readline()
            m = re.search(r"on (http://127\.0\.0\.1:\d+/v1)", line or "")
            url = m.group(1) if m else None
            assert proc.poll() is None or url, "server exited early"
        assert url, "the server never printed its address"
        body = json.loads(urllib.request.urlopen(f"{url}/models", timeout=30).read())
        assert body["data"][0]["id"] == "cli-model"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
