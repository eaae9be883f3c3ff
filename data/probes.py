"""Probe conversations: one hand-written trajectory of every shape the rollout loop makes.

A python-tool step, search + open, parallel tool calls, multi-turn conversations where K2-style
reasoning dropping matters, a final answer without tools, and non-ASCII text. Chat templates are
compared on them (`data.render.renders_alike`: two templates that render every prefix of every
probe alike are taken as the same format), and the tests build their corpora from them
(tests/fixtures.py).
"""

from __future__ import annotations

PYTHON_TOOL = {"type": "function", "function": {
    "name": "python", "description": "Run Python code in a sandbox; returns stdout.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}
SEARCH_TOOL = {"type": "function", "function": {
    "name": "search", "description": "Search the local corpus; returns titles and ids.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "k": {"type": "integer"}},
                   "required": ["query"]}}}
OPEN_TOOL = {"type": "function", "function": {
    "name": "open", "description": "Open a document by id.",
    "parameters": {"type": "object", "properties": {"id": {"type": "string"}}, "required": ["id"]}}}
SYSTEM = "You are a careful assistant. Think, use tools when they help, then answer as 'Answer: <x>'."


def tool_call(i: int, name: str, args: dict) -> dict:
    return {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args}}


def python_record(a: int = 2, b: int = 100) -> dict:
    val = a ** b
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"What is {a}**{b}?"},
            {"role": "assistant", "content": "", "reasoning_content": f"Big power; compute {a}**{b} with python.",
             "tool_calls": [tool_call(0, "python", {"code": f"print({a}**{b})"})]},
            {"role": "tool", "tool_call_id": "call_0", "name": "python", "content": f"{val}\n"},
            {"role": "assistant", "content": f"Answer: {val}", "reasoning_content": f"The tool printed {val}."},
        ],
        "tools": [PYTHON_TOOL],
        "task": {"family": "arith", "id": f"arith-train-{a:03d}{b:03d}", "split": "train",
                 "prompt": f"What is {a}**{b}?", "answer": str(val)},
        "verdict": {"correct": True, "answer": str(val), "reason": "exact match"},
        "metadata": {"policy": "scripted", "seed": a * 1000 + b, "steps": 2, "tool_calls": 1},
    }


def search_open_record(topic: str = "Ada Lovelace", year: int = 1843) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"In which year did {topic} publish the Notes?"},
            {"role": "assistant", "content": "Let me search.", "reasoning_content": "I should search the corpus.",
             "tool_calls": [tool_call(0, "search", {"query": f"{topic} notes", "k": 3})]},
            {"role": "tool", "tool_call_id": "call_0", "name": "search",
             "content": f"1. doc-17: {topic} (biography)\n2. doc-4: Analytical Engine\n3. doc-9: Babbage"},
            {"role": "assistant", "content": "", "reasoning_content": "doc-17 looks right; open it.",
             "tool_calls": [tool_call(1, "open", {"id": "doc-17"})]},
            {"role": "tool", "tool_call_id": "call_1", "name": "open",
             "content": f"{topic} translated Menabrea's paper and added notes, published in {year}."},
            {"role": "assistant", "content": f"Answer: {year}", "reasoning_content": f"The document says {year}."},
        ],
        "tools": [SEARCH_TOOL, OPEN_TOOL],
        "task": {"family": "lookup", "id": f"lookup-train-{year}", "split": "train",
                 "prompt": f"In which year did {topic} publish the Notes?", "answer": str(year)},
        "verdict": {"correct": True, "answer": str(year), "reason": "exact match"},
        "metadata": {"policy": "scripted", "seed": year, "steps": 3, "tool_calls": 2},
    }


def parallel_calls_record(x: int = 12, y: int = 30) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Compute {x}*{y} and {x}+{y}; reply with both."},
            {"role": "assistant", "content": "", "reasoning_content": "Two independent computations; call twice.",
             "tool_calls": [tool_call(0, "python", {"code": f"print({x}*{y})"}),
                            tool_call(1, "python", {"code": f"print({x}+{y})"})]},
            {"role": "tool", "tool_call_id": "call_0", "name": "python", "content": f"{x * y}\n"},
            {"role": "tool", "tool_call_id": "call_1", "name": "python", "content": f"{x + y}\n"},
            {"role": "assistant", "content": f"Answer: {x * y}, {x + y}", "reasoning_content": "Both printed."},
        ],
        "tools": [PYTHON_TOOL],
        "task": {"family": "arith", "id": f"arith-par-{x}-{y}", "split": "train", "prompt": "", "answer": ""},
        "verdict": {"correct": True, "answer": f"{x * y}, {x + y}", "reason": "exact match"},
        "metadata": {"policy": "scripted", "steps": 2, "tool_calls": 2},
    }


def multi_turn_record(n: int = 7) -> dict:
    """Two completed turns and a third in progress: reasoning of turns 1-2 must drop in turn 3."""
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Square {n}."},
            {"role": "assistant", "content": "", "reasoning_content": "Use python to square it.",
             "tool_calls": [tool_call(0, "python", {"code": f"print({n}*{n})"})]},
            {"role": "tool", "tool_call_id": "call_0", "name": "python", "content": f"{n * n}\n"},
            {"role": "assistant", "content": f"Answer: {n * n}", "reasoning_content": "Printed the square."},
            {"role": "user", "content": "Now cube it, no tools."},
            {"role": "assistant", "content": f"Answer: {n ** 3}", "reasoning_content": f"{n}^3 = {n ** 3}."},
            {"role": "user", "content": "Finally, its factorial's digit count, é à ü — 数字?"},
            {"role": "assistant", "content": "", "reasoning_content": "Factorial is big; python.",
             "tool_calls": [tool_call(1, "python", {"code": f"import math\nprint(len(str(math.factorial({n}))))"})]},
            {"role": "tool", "tool_call_id": "call_1", "name": "python",
             "content": f"{len(str(__import__('math').factorial(n)))}\n"},
            {"role": "assistant", "content": f"Answer: {len(str(__import__('math').factorial(n)))}",
             "reasoning_content": "Got the count."},
        ],
        "tools": [PYTHON_TOOL],
        "task": {"family": "chat", "id": f"chat-train-{n}", "split": "train", "prompt": "", "answer": ""},
        "verdict": {"correct": True, "answer": "", "reason": "multi-turn fixture"},
        "metadata": {"policy": "scripted", "steps": 4, "tool_calls": 2},
    }


def no_tool_record(q: str = "Say hi in French.", a: str = "Answer: Bonjour !") -> dict:
    return {
        "messages": [{"role": "user", "content": q},
                     {"role": "assistant", "content": a, "reasoning_content": "Easy, no tool needed."}],
        "task": {"family": "chat", "id": "chat-hi", "split": "train", "prompt": q, "answer": a},
        "verdict": {"correct": True, "answer": a, "reason": "ok"},
        "metadata": {},
    }


def probe_records() -> list[dict]:
    """One of each shape (fresh copies)."""
    return [python_record(), search_open_record(), parallel_calls_record(), multi_turn_record(),
            no_tool_record()]
