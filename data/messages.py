"""One shape of an assistant turn and its tool calls, shared by the parsers, the agent loop and the server.

On disk and on the wire a tool call is an OpenAI/HF message dict
(`{"id", "type": "function", "function": {"name", "arguments"}}`, in trajectories with arguments as
a JSON object); in memory it is always a `ToolCall`, converted at those two borders only
(`to_openai` / `from_openai`). The one idea: a call the model got wrong (invalid JSON, a missing
delimiter) is still a `ToolCall`, carrying the raw text it emitted and the parse `error`, so the
rollout loop can answer it with an error tool message the model may learn from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolCall:
    """One tool call. `arguments` is a dict, or the raw text a model emitted when it is not a JSON
    object (the loop reports that back to the model as a tool error); `error` says what the parser
    found wrong with the call, if anything."""

    name: str
    arguments: dict[str, Any] | str
    id: str | None = None
    error: str | None = None

    def to_openai(self, default_id: str, *, arguments_as_text: bool = False) -> dict[str, Any]:
        """The OpenAI/HF dict; `arguments_as_text` encodes a dict as JSON text (the chat-completions
        wire form), otherwise it stays an object (the trajectory form)."""
        args = self.arguments
        if arguments_as_text and not isinstance(args, str):
            args = json.dumps(args, ensure_ascii=False)
        return {"id": self.id or default_id, "type": "function", "function": {"name": self.name, "arguments": args}}

    @classmethod
    def from_openai(cls, call: dict[str, Any]) -> ToolCall:
        fn = call.get("function") or {}
        args = fn.get("arguments")
        return cls(name=fn.get("name") or "", arguments=args if args is not None else "", id=call.get("id"))


@dataclass
class AssistantStep:
    """One assistant turn: thinking, visible text, tool calls (none = final answer). A parsed turn
    also says whether generation reached the end-of-turn token (`finished`) and what was malformed
    in the turn as a whole (`errors`; a malformed call carries its own `error`)."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finished: bool = True
    errors: list[str] = field(default_factory=list)

    @property
    def parse_errors(self) -> list[str]:
        """Every parse problem of the turn: the calls' own, then the turn's."""
        return [c.error for c in self.tool_calls if c.error] + list(self.errors)

    def to_message(self, *, arguments_as_text: bool = False, id_prefix: str = "call_") -> dict[str, Any]:
        """The OpenAI/HF assistant message (`tool_calls` only when there are calls)."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or "",
                               "reasoning_content": self.reasoning_content or ""}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai(f"{id_prefix}{j}", arguments_as_text=arguments_as_text)
                                 for j, c in enumerate(self.tool_calls)]
        return msg


def parse_arguments(i: int, name: str, args_text: str, call_id: str) -> ToolCall:
    """A generated call's arguments text -> a `ToolCall` (with an `error` unless it is a JSON object)."""
    try:
        args = json.loads(args_text)
    except json.JSONDecodeError as e:
        return ToolCall(name, args_text, call_id, f"tool call {i} ({name!r}): arguments are not valid JSON ({e}): {args_text!r:.200}")
    if not isinstance(args, dict):
        return ToolCall(name, args_text, call_id, f"tool call {i} ({name!r}): arguments must be a JSON object, got {type(args).__name__}")
    return ToolCall(name, args, call_id)
