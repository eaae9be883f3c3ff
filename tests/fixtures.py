"""Test fixtures shared by the unit and integration tests and the benchmarks: corpora built from
the probe conversations (data/probes.py), tiny tokenizers, a tiny random-init MoE.

Nothing under qat/, data/, sandbox_env/ or train/ imports this module.
"""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import torch

from data.probes import (  # noqa: F401
    OPEN_TOOL,
    PYTHON_TOOL,
    SEARCH_TOOL,
    SYSTEM,
    multi_turn_record,
    no_tool_record,
    parallel_calls_record,
    probe_records,
    python_record,
    search_open_record,
    tool_call,
)


def make_records(n: int, seed: int = 0) -> list[dict]:
    """`n` records cycling through all shapes with varied numbers (deterministic for `seed`)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 5
        if kind == 0:
            rec = python_record(rng.randint(2, 9), rng.randint(10, 300))
        elif kind == 1:
            rec = search_open_record(rng.choice(["Ada Lovelace", "Alan Turing", "Grace Hopper"]), rng.randint(1800, 2000))
        elif kind == 2:
            rec = parallel_calls_record(rng.randint(1, 999), rng.randint(1, 999))
        elif kind == 3:
            rec = multi_turn_record(rng.randint(3, 60))
        else:
            rec = no_tool_record(f"Say hi #{i} in French.", f"Answer: Bonjour {i} !")
        out.append(copy.deepcopy(rec))
    return out


def long_record(steps: int = 12, output_lines: int = 20) -> dict:
    """One turn with many python steps and long tool outputs: for splitting at step boundaries."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tabulate squares, step by step."}]
    for s in range(steps):
        msgs.append({"role": "assistant", "content": f"Block {s}.", "reasoning_content": f"Next block {s}.",
                     "tool_calls": [tool_call(s, "python", {"code": f"for i in range({s * 100}, {s * 100 + output_lines}): print(i, i*i)"})]})
        msgs.append({"role": "tool", "tool_call_id": f"call_{s}", "name": "python",
                     "content": "".join(f"{i} {i * i}\n" for i in range(s * 100, s * 100 + output_lines))})
    msgs.append({"role": "assistant", "content": "Answer: done", "reasoning_content": "All blocks printed."})
    return {"messages": msgs, "tools": [PYTHON_TOOL],
            "task": {"family": "arith", "id": "long", "split": "train", "prompt": "", "answer": ""},
            "verdict": {"correct": True, "answer": "done", "reason": "fixture"}, "metadata": {"steps": steps + 1}}


def tiny_tokenizer(vocab_size: int = 1024, n_records: int = 50):
    """A tiny K2-style tokenizer trained on the fixtures (about a second on one core)."""
    from data.tokenizer import train_tokenizer

    return train_tokenizer(make_records(n_records) + [long_record()], vocab_size=vocab_size)


def qwen3_style_tokenizer(vocab_size: int = 1024):
    """Our byte-level BPE with Qwen3's chat tokens and the Qwen3-style *inference* template
    (data/templates/qwen3_training.jinja without its generation markers): stands in for a real
    model's tokenizer, which tests cannot download."""
    from data.render import TEMPLATES_DIR, strip_generation_markers

    tok = tiny_tokenizer(vocab_size)
    tok.add_special_tokens({"extra_special_tokens": ["<|im_start|>"]}, replace_extra_special_tokens=False)
    tok.add_tokens(["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"])
    tok.chat_template = strip_generation_markers((TEMPLATES_DIR / "qwen3_training.jinja").read_text())
    return tok


_TINY_TOKENIZERS: dict[int, Any] = {}


def tiny_model_and_tokenizer(seed: int = 0, *, vocab_size: int = 512, layers: int = 2, hidden: int = 64,
                             experts: int = 4, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny Qwen3-MoE (the `tiny_qwen3_moe` preset, shrunk) and the tiny
    K2-style tokenizer trained on the probe corpus: for tests, benchmarks and smoke runs.
    Expert widths are multiples of 32, so qat.prepare and INT4 export apply. No copy circuit (it needs
    a hidden size of at least 193: train/copy_circuit.py)."""
    from train.models import build_model, load_preset

    if vocab_size not in _TINY_TOKENIZERS:  # training the tokenizer takes a second; do it once
        _TINY_TOKENIZERS[vocab_size] = tiny_tokenizer(vocab_size=vocab_size, n_records=20)
    tok = _TINY_TOKENIZERS[vocab_size]
    torch.manual_seed(seed)
    model = build_model(dict(load_preset("tiny_qwen3_moe"), copy_circuit=None), vocab_size=len(tok), hidden_size=hidden,
                        intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=experts)
    return model.to(dtype).eval(), tok


# ----------------------------------------------------------------------------- agent-loop helpers


def greedy_by_recompute(model, prompt: list[int], n: int, stop_ids) -> list[int]:
    """Greedy decoding by re-running the whole sequence for every token (no cache at all): the
    reference the engine's cached, batched decoding must equal token for token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
            if t in stop_ids:
                break
    return out


class ScriptedSteps:
    """A policy that plays a fixed list of steps (the last one repeats) and remembers what it was shown."""

    name = "test"

    def __init__(self, *steps):
        self.steps, self.seen = list(steps), []

    def act(self, messages, tools, state):
        self.seen.append(json.loads(json.dumps(messages)))
        return self.steps[min(state.step, len(self.steps) - 1)]


SEARCH_LONG_TEXT = " ".join(f"Sentence {i} of the long chronicle of Orvane." for i in range(200))
SEARCH_DOCS = [
    {"id": "doc-1", "title": "The Orvane Bridge", "text": "Built in 1821 by the engineer Tessaly Marr."},
    {"id": "doc-2", "title": "Chronicle of Orvane", "text": SEARCH_LONG_TEXT},
]
"""A two-document corpus for the search and open tools (one long enough to paginate)."""


def openai_completion(message: dict, finish: str = "stop") -> dict:
    """A chat-completions response carrying `message`, as an OpenAI-compatible server sends it."""
    return {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def start_fake_openai_server(replies):
    """A local HTTP server answering every POST with the next of `replies` (the last one repeats),
    or with `replies(body)` when it is a function; `server.requests` records (path, body). Stop it
    with shutdown() and server_close()."""
    import http.server
    import threading

    class Server(http.server.ThreadingHTTPServer):
        requests: list

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self.server.requests.append((self.path, body))
            reply = replies(body) if callable(replies) else replies[min(len(self.server.requests) - 1, len(replies) - 1)]
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *a):
            pass

    srv = Server(("127.0.0.1", 0), Handler)
    srv.requests = []
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _family_variants():
    from sandbox_env.tasks import family_names

    return [(n, {}) for n in family_names() if n != "retrieval"] + [("retrieval", {"hops": 1}), ("retrieval", {"hops": 3})]


FAMILY_VARIANTS = _family_variants()
"""(family name, options) of every task family, retrieval single- and multi-hop."""
FAMILY_IDS = [f"{n}{kw.get('hops', '')}" for n, kw in FAMILY_VARIANTS]


def family_in(world, name: str, kw: dict):
    """The family `name` with options `kw`, retrieval over the `world` fixture's corpus."""
    from sandbox_env.tasks import get_family

    return get_family(name, corpus=world[0], **kw) if name == "retrieval" else get_family(name, **kw)
