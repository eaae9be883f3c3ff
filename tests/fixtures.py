"""Test fixtures shared by the unit and integration tests and the benchmarks: corpora built from
the probe conversations (data/probes.py), tiny tokenizers, a tiny random-init MoE.

Nothing under qat/, data/, sandbox_env/ or train/ imports this module.
"""

from __future__ import annotations

import copy
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
