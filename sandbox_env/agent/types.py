"""The agent's types: one tool call, one assistant turn, the episode state, the policy interface.

Every component of the agent loop speaks these: teachers and the local model return an
`AssistantStep`, the loop runs its `ToolCall`s, task scripts build them. The turn and the call are
`data.messages`' (the chat parsers return them too): in memory a tool call is always a `ToolCall`,
and the OpenAI/HF message dict is its on-disk and on-the-wire form only. Stdlib only: the rollout
workers and the task families import this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from data.messages import AssistantStep, ToolCall

__all__ = ["AssistantStep", "EpisodeState", "Policy", "ToolCall"]


@dataclass
class EpisodeState:
    """What the loop tells the policy besides the messages. `scratch` is the policy's own
    per-episode memory; `notes` are counters the policy reports into the record's metadata."""

    task: Any  # sandbox_env.tasks.Task
    family: Any  # sandbox_env.tasks.TaskFamily
    seed: int
    step: int = 0
    max_thinking_tokens: int | None = None
    tokens_left: int | None = None
    scratch: dict[str, Any] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)


class Policy(Protocol):
    name: str

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], state: EpisodeState) -> AssistantStep: ...
