"""The model's tools as JSON-schema functions: python, shell, search, open.

The rollout loop hands `ToolBox.schemas()` to the policy (OpenAI chat-completions "tools"
format, the same JSON that vLLM, SGLang and transformers chat templates take) and feeds each
tool call the model makes to `ToolBox.call(name, arguments)`. The one idea: a tool call is
model output, so anything can arrive (invalid JSON, a tool that does not exist, missing or
extra or mistyped arguments), and every such mistake becomes a ToolResult with ok=False and an
error written for the model (what was wrong and the expected schema) so it can correct
itself; `call` never raises.

    tb = ToolBox(sandbox=sb, index=idx)
    tb.call("python", '{"code": "print(2**100)"}').content   # '1267650600228229401496703205376\\n'
    tb.call("search", {"query": "Orvane bridge", "k": 3})
    tb.call("open", {"doc_id": "d17", "page": 2})
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

TOOL_NAMES = ("python", "shell", "search", "open")
MAX_SEARCH_K = 20

_SPECS: dict[str, dict] = {
    "python": {
        "description": (
            "Run Python 3 code in a persistent sandboxed interpreter (like a notebook: variables and "
            "imports persist between calls). Prints are returned, and the value of a final expression is "
            "shown. No network access. The current directory is the task's work directory."),
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "The Python code to run."}},
            "required": ["code"],
            "additionalProperties": False,
        },
    },
    "shell": {
        "description": (
            "Run a shell command (/bin/sh -c) in the sandbox's work directory and return its output and exit "
            "status. Standard Unix tools are available; there is no network access."),
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "The shell command line to run."}},
            "required": ["command"],
            "additionalProperties": False,
        },
    },
    "search": {
        "description": (
            "Search the document collection (BM25 keyword search). Returns the best matching documents "
            "with their doc_id, title and a snippet; use `open` with a doc_id to read a document."),
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Keywords to search for."},
                "k": {"type": "integer", "description": f"How many results to return (1 to {MAX_SEARCH_K}).",
                      "minimum": 1, "maximum": MAX_SEARCH_K},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
    "open": {
        "description": (
            "Open a document by its doc_id (from `search` results) and read its text, one page at a time. "
            "The result says which page of how many it is; ask for the next page to read on."),
        "parameters": {
            "type": "object",
            "properties": {
                "doc_id": {"type": "string", "description": "The document id, as shown by search."},
                "page": {"type": "integer", "description": "Page number, starting at 1 (default 1).",
                         "minimum": 1},
            },
            "required": ["doc_id"],
            "additionalProperties": False,
        },
    },
}

# Compact declarations: same names, parameters and types, one short line each. A tiny model pays
# for every token of the tool declarations in every sample (the full ones are ~450 tokens with the
# tiny tokenizer, most of a short trajectory); a large model reads the full ones.
_COMPACT_DESCRIPTIONS = {
    "python": "Run Python code in a persistent sandbox.",
    "shell": "Run a shell command in the work dir.",
    "search": "Search the documents; returns doc_id, title, snippet.",
    "open": "Read a document by doc_id.",
}


def _compact_spec(name: str) -> dict:
    params = _SPECS[name]["parameters"]
    props = {p: {"type": spec["type"]} for p, spec in params["properties"].items()}
    return {"description": _COMPACT_DESCRIPTIONS[name],
            "parameters": {"type": "object", "properties": props, "required": list(params["required"])}}


_JSON_TYPES = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
               "object": (dict,), "array": (list,)}


@dataclass
class ToolResult:
    """The result of one tool call: `content` goes back to the model as the tool message."""

    content: str
    ok: bool
    error: str | None = None
    """Short reason when ok is False (also contained in `content`, which the model sees)."""


def _example(name: str) -> str:
    props = _SPECS[name]["parameters"]["properties"]
    example = {p: ("..." if s["type"] == "string" else s.get("minimum", 1)) for p, s in props.items()}
    return json.dumps(example)


class ToolBox:
    """The tools of one episode, bound to its sandbox session and its search index."""

    def __init__(self, sandbox=None, index=None, tools: tuple[str, ...] | list[str] = TOOL_NAMES,
                 open_page_chars: int = 2000, search_k: int = 5, compact: bool = False):
        tools = tuple(tools)
        unknown = [t for t in tools if t not in _SPECS]
        if unknown:
            raise ValueError(f"ToolBox(tools=...) has unknown tool(s) {unknown}; choose from {list(TOOL_NAMES)}")
        if sandbox is None and any(t in tools for t in ("python", "shell")):
            raise ValueError(f"ToolBox(tools={list(tools)}) includes python/shell but sandbox=None; pass "
                             "sandbox=Sandbox(...) or drop those tools")
        if index is None and any(t in tools for t in ("search", "open")):
            raise ValueError(f"ToolBox(tools={list(tools)}) includes search/open but index=None; pass "
                             "index=SearchIndex(db_path) or drop those tools")
        if not isinstance(open_page_chars, int) or open_page_chars < 100:
            raise ValueError(f"ToolBox(open_page_chars={open_page_chars!r}) must be an int >= 100")
        if not isinstance(search_k, int) or not 1 <= search_k <= MAX_SEARCH_K:
            raise ValueError(f"ToolBox(search_k={search_k!r}) must be an int in [1, {MAX_SEARCH_K}]")
        self.sandbox, self.index, self.tools = sandbox, index, tools
        self.open_page_chars, self.search_k = open_page_chars, search_k
        self.compact = bool(compact)

    def schemas(self) -> list[dict]:
        """The tools in OpenAI chat-completions format (a fresh copy each call); `compact` gives one-line
        descriptions and bare parameter types (the calls they accept are the same)."""
        return [{"type": "function", "function": {"name": name, **(
            _compact_spec(name) if self.compact else json.loads(json.dumps(_SPECS[name])))}}
                for name in self.tools]

    def call(self, name: str, arguments: str | dict | None) -> ToolResult:
        """Runs one tool call. Never raises: every failure is a ToolResult(ok=False) for the model."""
        try:
            args = self._parse(name, arguments)
            if isinstance(args, ToolResult):
                return args
            return getattr(self, f"_tool_{name}")(**args)
        except Exception as e:  # noqa: BLE001 - a tool must never crash the rollout loop
            return _fail(f"Error: tool {name!r} failed internally ({type(e).__name__}: {e}).")

    # -- argument checking ----------------------------------------------------------------------
    def _parse(self, name: Any, arguments: Any) -> dict | ToolResult:
        if name not in self.tools:
            return _fail(f"Error: there is no tool named {name!r}. Available tools: {', '.join(self.tools)}.",
                         f"unknown tool {name!r}")
        schema = _SPECS[name]["parameters"]
        expected = f"Expected arguments: a JSON object like {_example(name)} (schema: {json.dumps(schema)})."
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return _fail(f"Error: the arguments of {name!r} are not valid JSON ({e.msg} at position {e.pos}). "
                             + expected, "invalid JSON arguments")
        if not isinstance(arguments, dict):
            return _fail(f"Error: the arguments of {name!r} must be a JSON object, got {type(arguments).__name__}. "
                         + expected, "arguments are not an object")
        arguments = dict(arguments)  # never modify the caller's (e.g. a trajectory's) dict
        props, problems = schema["properties"], []
        for key in schema["required"]:
            if key not in arguments:
                problems.append(f"missing required argument {key!r}")
        for key, value in arguments.items():
            if key not in props:
                problems.append(f"unexpected argument {key!r}")
                continue
            spec = props[key]
            types = _JSON_TYPES[spec["type"]]
            # bool is an int in Python but not in JSON schema; 3.0 is accepted as the integer 3
            if spec["type"] == "integer" and isinstance(value, float) and value.is_integer():
                arguments[key] = value = int(value)
            if not isinstance(value, types) or (isinstance(value, bool) and spec["type"] != "boolean"):
                article = "an" if spec["type"][0] in "aeiou" else "a"
                problems.append(f"argument {key!r} must be {article} {spec['type']}, got {json.dumps(value)[:60]}")
                continue
            lo, hi = spec.get("minimum"), spec.get("maximum")
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
                problems.append(f"argument {key!r} must be {rng}, got {value}")
        if problems:
            return _fail(f"Error: bad arguments for {name!r}: {'; '.join(problems)}. " + expected,
                         "; ".join(problems))
        return arguments

    # -- the tools ------------------------------------------------------------------------------
    def _tool_python(self, code: str) -> ToolResult:
        return self._run(self.sandbox.run_python(code))

    def _tool_shell(self, command: str) -> ToolResult:
        return self._run(self.sandbox.run_shell(command))

    @staticmethod
    def _run(r) -> ToolResult:
        content = r.output
        if r.exit_code not in (None, 0) or (r.error and r.error not in content):
            content = content + ("" if not content or content.endswith("\n") else "\n") + f"[{r.error}]"
        return ToolResult(content=content if content else "(no output)", ok=r.ok, error=r.error)

    def _tool_search(self, query: str, k: int | None = None) -> ToolResult:
        if not query.strip():
            return _fail("Error: the search query is empty; give some keywords.", "empty query")
        hits = self.index.search(query, k=k or self.search_k)
        if not hits:
            return ToolResult(f"No documents match {query!r}. Try other or fewer keywords.", ok=True)
        lines = [f"{i}. [doc_id: {h['id']}] {h['title']}\n   {h['snippet']}" for i, h in enumerate(hits, 1)]
        return ToolResult("\n".join(lines), ok=True)

    def _tool_open(self, doc_id: str, page: int = 1) -> ToolResult:
        doc = self.index.get(doc_id)
        if doc is None:
            return _fail(f"Error: there is no document with doc_id {doc_id!r}. Use search to find doc_ids.",
                         f"unknown doc_id {doc_id!r}")
        text, size = doc["text"], self.open_page_chars
        n_pages = max(1, -(-len(text) // size))
        if page > n_pages:
            return _fail(f"Error: document {doc_id!r} has {n_pages} page(s); page {page} does not exist.",
                         f"page {page} out of range 1..{n_pages}")
        body = text[(page - 1) * size: page * size]
        more = f" (call open with page={page + 1} to read on)" if page < n_pages else ""
        return ToolResult(f"[doc_id: {doc['id']}] {doc['title']} (page {page} of {n_pages}){more}\n\n{body}",
                          ok=True)


def _fail(message: str, error: str | None = None) -> ToolResult:
    return ToolResult(content=message, ok=False, error=error or message)
