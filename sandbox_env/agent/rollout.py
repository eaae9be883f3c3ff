"""The rollout loop: one episode of plan -> call tool -> observe -> ... -> answer.

`run_episode(task, policy, env, budgets)` opens a fresh sandbox session, writes the task's
files, and alternates policy turns with real tool calls until the policy answers (a turn
without tool calls) or a budget runs out; then it verifies the answer and returns one
trajectory record in the schema of DESIGN.md ("On disk"). The same loop serves generation (a
teacher policy) and evaluation (a trained model as policy): they differ only in the policy.

Budgets, all enforced by the loop, never trusted to the policy:
- `max_steps`: assistant turns per episode.
- `max_thinking_tokens`: per turn; longer thinking is cut to exactly that many tokens and the
  cut is counted in metadata `thinking_truncated`.
- `max_total_tokens`: tokens the policy generates in the episode (thinking + text + tool-call
  names and arguments). A turn that does not fit has its thinking cut to fit; if its text and
  calls alone do not fit it is dropped and the episode ends with
  `budget_exhausted="max_total_tokens"`. So a record never holds more generated tokens.
- `context_budget`: before each turn, if the context (tool schemas + all messages) is longer,
  the content of every tool result except the last `keep_last_tool_outputs` is replaced by
  HIDDEN_PLACEHOLDER, as Kimi K2 does; the record keeps the managed context (what the model
  saw last), with the count in metadata `context_hidden`.

Tokens are counted with a tokenizer when one is given, else approximated as
ceil(characters / 4) per text field (the usual rule of thumb for English and code). A message
adds MESSAGE_OVERHEAD_TOKENS to the context count (role markers of a chat template).

Tool calls that are malformed (unknown tool, arguments that are not a JSON object, missing or
unknown argument names) go to the ToolBox like any other call, whose error text goes back to
the model as the tool message; they are counted in `invalid_tool_calls` and the episode goes on.
Arguments that are not a JSON object are recorded as {} with the raw text in the call's
`raw_arguments` (the schema wants a dict there).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

from sandbox_env.agent.types import AssistantStep, EpisodeState, Policy

HIDDEN_PLACEHOLDER = "[tool output hidden to save context]"
EMPTY_REPLY = "[empty reply]"  # stands in for a final turn with neither text nor tool calls
MESSAGE_OVERHEAD_TOKENS = 4
DEFAULT_TOOLS = ("python", "shell", "search", "open")
SYSTEM_PROMPT = (
    "You are a careful assistant that solves tasks by thinking and calling tools. The tools run in an "
    "isolated sandbox with no network; files you are told about are in its working directory. Think "
    "before each call and read each result before deciding the next step. Never guess a fact or a "
    "computation you can check with a tool. When you are done, reply without tool calls and end your "
    "reply with one line of the form `Answer: <value>`."
)
# With compact tool declarations (ToolEnv(compact=True)): the same instructions in few tokens.
COMPACT_SYSTEM_PROMPT = "Solve the task with the tools; check, never guess. End with a line `Answer: <value>`."


@dataclass
class Budgets:
    """Per-episode limits (see the module docstring for exact semantics)."""

    max_steps: int = 32
    max_thinking_tokens: int = 1024
    max_total_tokens: int = 32768
    context_budget: int = 16384
    keep_last_tool_outputs: int = 4

    def __post_init__(self):
        for name in ("max_steps", "max_thinking_tokens", "max_total_tokens", "context_budget"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"budgets.{name} must be a positive int, got {v!r}")
        k = self.keep_last_tool_outputs
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ValueError(f"budgets.keep_last_tool_outputs must be an int >= 0, got {k!r}")


class TokenCounter:
    """Counts and truncates text in tokens: with `tokenizer` (anything with
    `encode(text, add_special_tokens=False)` and `decode(ids)`, e.g. a transformers tokenizer)
    or, without one, ceil(len(text) / chars_per_token)."""

    def __init__(self, tokenizer: Any = None, chars_per_token: int = 4):
        self.tokenizer = tokenizer
        self.chars_per_token = chars_per_token

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def count(self, text: str | None) -> int:
        if not text:
            return 0
        if self.tokenizer is None:
            return math.ceil(len(text) / self.chars_per_token)
        return len(self._ids(text))

    def truncate(self, text: str, n: int) -> str:
        """The longest prefix of `text` with at most `n` tokens."""
        if self.count(text) <= n:
            return text
        if self.tokenizer is None:
            return text[: n * self.chars_per_token]
        ids = self._ids(text)[:n]
        out = self.tokenizer.decode(ids)
        while ids and self.count(out) > n:  # a decode can re-tokenize longer; shrink until it fits
            ids = ids[:-1]
            out = self.tokenizer.decode(ids)
        return out

    def call_tokens(self, name: str, arguments: Any) -> int:
        return self.count(name) + self.count(arguments if isinstance(arguments, str) else json.dumps(arguments))

    def message_tokens(self, m: dict[str, Any]) -> int:
        n = MESSAGE_OVERHEAD_TOKENS + self.count(m.get("content")) + self.count(m.get("reasoning_content"))
        for tc in m.get("tool_calls") or []:
            n += self.call_tokens(tc["function"]["name"], tc["function"]["arguments"])
        return n

    def context_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int:
        return self.count(json.dumps(tools)) + sum(self.message_tokens(m) for m in messages)


def manage_context(messages: list[dict[str, Any]], tools: list[dict[str, Any]], counter: TokenCounter, budgets: Budgets) -> int:
    """Hide old tool outputs in place when the context exceeds the budget; -> how many were hidden."""
    if counter.context_tokens(messages, tools) <= budgets.context_budget:
        return 0
    tool_idx = [i for i, m in enumerate(messages) if m["role"] == "tool"]
    keep = set(tool_idx[len(tool_idx) - budgets.keep_last_tool_outputs :]) if budgets.keep_last_tool_outputs else set()
    hidden = 0
    for i in tool_idx:
        if i not in keep and messages[i]["content"] != HIDDEN_PLACEHOLDER:
            messages[i]["content"] = HIDDEN_PLACEHOLDER
            hidden += 1
    return hidden


class ToolEnv:
    """Opens one sandbox session + ToolBox per episode. `index_path`: the SearchIndex (SQLite
    FTS5) for the search/open tools; opened lazily, once per process (SQLite connections must
    not cross a fork)."""

    def __init__(self, sandbox_config: Any = None, index_path: str | None = None, tools: tuple[str, ...] = DEFAULT_TOOLS,
                 compact: bool = False):
        tools = tuple(tools)
        unknown = set(tools) - set(DEFAULT_TOOLS)
        if unknown:
            raise ValueError(f"tools {sorted(unknown)} are unknown; choose from {list(DEFAULT_TOOLS)}")
        if index_path is None and {"search", "open"} & set(tools):
            raise ValueError(f"tools {tools} include search/open but no index_path was given; build the corpus index or drop those tools")
        self.sandbox_config = sandbox_config
        self.index_path = index_path
        self.tools = tools
        self.compact = bool(compact)
        self.system_prompt = COMPACT_SYSTEM_PROMPT if compact else SYSTEM_PROMPT
        self._index = None

    @contextmanager
    def session(self) -> Iterator[tuple[Any, Any]]:
        from sandbox_env.sandbox import Sandbox, SandboxConfig, SearchIndex, ToolBox

        if self.index_path is not None and self._index is None:
            self._index = SearchIndex(self.index_path)
        with Sandbox(self.sandbox_config or SandboxConfig()) as sb:
            yield sb, ToolBox(sandbox=sb, index=self._index, tools=self.tools, compact=self.compact)


def call_problem(name: str, arguments: Any, tools: list[dict[str, Any]]) -> str | None:
    """Why a tool call is malformed (unknown tool, arguments not a JSON object, missing or
    unknown argument names), or None when it is well-formed."""
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools}
    if name not in schemas:
        return f"unknown tool {name!r}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return f"arguments are not valid JSON ({e})"
    if not isinstance(arguments, dict):
        return "arguments are not a JSON object"
    props = schemas[name].get("properties", {})
    missing = [k for k in schemas[name].get("required", []) if k not in arguments]
    extra = [k for k in arguments if k not in props]
    if missing or extra:
        return f"missing arguments {missing}, unknown arguments {extra}"
    return None


def _record_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    """A tool call as the record stores it: arguments as a JSON object; arguments that are not
    one (malformed JSON from a model) are stored as {} with the raw text in `raw_arguments`."""
    parsed = arguments
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            parsed = None
    call: dict[str, Any] = {"id": call_id, "type": "function", "function": {"name": name, "arguments": parsed}}
    if not isinstance(parsed, dict):
        call["function"]["arguments"] = {}
        call["raw_arguments"] = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return call


def run_episode(
    task: Any,
    policy: Policy,
    env: ToolEnv,
    budgets: Budgets | None = None,
    *,
    family: Any = None,
    seed: int = 0,
    token_counter: TokenCounter | None = None,
    system_prompt: str | None = None,
) -> dict[str, Any]:
    """Run one episode of `task` with `policy` in a fresh session of `env`; -> trajectory record."""
    from sandbox_env.tasks import get_family

    budgets = budgets or Budgets()
    family = family or get_family(task.family)
    counter = token_counter or TokenCounter()
    t0 = time.perf_counter()
    meta = {"steps": 0, "tool_calls": 0, "invalid_tool_calls": 0, "tool_errors": 0, "context_hidden": 0,
            "thinking_truncated": 0, "empty_replies": 0, "generated_tokens": 0, "budget_exhausted": None}
    with env.session() as (sandbox, toolbox):
        family.setup(task, sandbox)
        tools = toolbox.schemas()
        system = system_prompt if system_prompt is not None else getattr(env, "system_prompt", SYSTEM_PROMPT)
        messages: list[dict[str, Any]] = [{"role": "system", "content": system}, {"role": "user", "content": task.prompt}]
        state = EpisodeState(task=task, family=family, seed=seed, max_thinking_tokens=budgets.max_thinking_tokens)
        final: str | None = None
        while True:
            if meta["steps"] >= budgets.max_steps:
                meta["budget_exhausted"] = "max_steps"
                break
            meta["context_hidden"] += manage_context(messages, tools, counter, budgets)
            tokens_left = budgets.max_total_tokens - meta["generated_tokens"]
            state.step, state.tokens_left = meta["steps"], tokens_left
            step: AssistantStep = policy.act(messages, tools, state)

            rest = counter.count(step.content) + sum(counter.call_tokens(c.name, c.arguments) for c in step.tool_calls)
            if rest > tokens_left:  # not even the text and calls fit: the turn is dropped
                meta["budget_exhausted"] = "max_total_tokens"
                break
            reasoning = step.reasoning_content or ""
            limit = min(budgets.max_thinking_tokens, tokens_left - rest)
            if counter.count(reasoning) > limit:
                reasoning = counter.truncate(reasoning, limit)
                meta["thinking_truncated"] += 1

            content = step.content or ""
            if not content and not step.tool_calls:  # a record's assistant turn needs text or calls
                content = EMPTY_REPLY
                meta["empty_replies"] += 1
            msg: dict[str, Any] = {"role": "assistant", "content": content, "reasoning_content": reasoning}
            # a nameless call from a model is still recorded (the schema needs a name) and answered with an error
            calls = [_record_call(f"call_{meta['tool_calls'] + j}", c.name or "<missing>", c.arguments) for j, c in enumerate(step.tool_calls)]
            if calls:
                msg["tool_calls"] = calls
            messages.append(msg)
            meta["steps"] += 1
            meta["generated_tokens"] += counter.count(reasoning) + rest
            if not calls:
                final = msg["content"]
                break
            for c, rc in zip(step.tool_calls, calls):
                meta["tool_calls"] += 1
                if call_problem(c.name, c.arguments, tools) is not None:
                    meta["invalid_tool_calls"] += 1
                result = toolbox.call(c.name, c.arguments)
                if not result.ok:
                    meta["tool_errors"] += 1
                content = result.content if result.content else f"Error: {result.error}"
                messages.append({"role": "tool", "tool_call_id": rc["id"], "name": rc["function"]["name"], "content": content})

    if final is None:
        verdict = {"correct": False, "answer": None, "reason": f"no final answer: budget {meta['budget_exhausted']} exhausted"}
    else:
        verdict = family.verify(task, final)
    meta.update(
        policy=policy.name,
        seed=seed,
        family_tag=family.tag,
        context_tokens=counter.context_tokens(messages, tools),
        wall_s=round(time.perf_counter() - t0, 4),
        budgets=asdict(budgets),
        **{k: v for k, v in state.notes.items() if k not in meta},
    )
    return {"messages": messages, "tools": tools, "task": task.to_record(), "verdict": verdict, "metadata": meta}
