"""Teachers: the policies that write the training trajectories.

Every policy implements one method, `act(messages, tools, state) -> AssistantStep`: given the
conversation so far (OpenAI/HF message dicts, as the model would see it after context
management), the tool schemas and the episode state, return the next assistant turn
(thinking, visible text, tool calls). The loop runs the calls and appends their results; a turn
without tool calls ends the episode. That one interface is what lets a scripted teacher, a
served large model (OpenAI-compatible API) and, later, the trained local checkpoint drive the
same loop and produce comparable trajectories.

- `ScriptedTeacher`: runs the task family's script. The script is a generator that reads the
  real tool results from the conversation (search hits, python output, shell output) and
  decides from them; it never sees the reference answer. With `mistake_rate > 0` it sometimes
  makes a recoverable mistake (a typo'd doc id, a python error, a bad argument name), reads
  the error the tool returned and corrects itself.
- `OpenAITeacher`: chat completions with tool calling against any OpenAI-compatible server
  (vLLM, SGLang, ...); `reasoning_content` is kept when the server returns it.
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

from sandbox_env.agent.types import AssistantStep, EpisodeState, Policy, ToolCall


def _tool_results_since_last_assistant(messages: list[dict[str, Any]]) -> list[str]:
    results: list[str] = []
    for m in reversed(messages):
        if m["role"] == "assistant":
            break
        if m["role"] == "tool":
            results.append(m.get("content") or "")
    return results[::-1]


class ScriptedTeacher:
    """Runs `state.family.script(task, ScriptContext)`, feeding it the tool results it gets
    back. Deterministic given the task and the episode seed."""

    name = "scripted"
    STYLES = ("full", "brief")

    def __init__(self, mistake_rate: float = 0.0, style: str = "full"):
        """`style`: "full" thinks in whole paragraphs and explains the final answer; "brief" keeps
        only the first sentence of each thought (which names what the step does, with the values it
        copies) and ends with the bare `Answer:` line. The calls and answers are the same; brief
        trajectories have about half the assistant tokens, which is what a tiny model trained on a
        CPU can afford (conf/pipeline.yaml uses it)."""
        if not 0.0 <= mistake_rate <= 1.0:
            raise ValueError(f"policy.mistake_rate must be in [0, 1], got {mistake_rate!r}")
        if style not in self.STYLES:
            raise ValueError(f"policy.style must be one of {list(self.STYLES)}, got {style!r}")
        self.mistake_rate = mistake_rate
        self.style = style

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], state: EpisodeState) -> AssistantStep:
        gen = state.scratch.get("script")
        if gen is None:
            from sandbox_env.tasks.scripting import ScriptContext

            rng = random.Random(f"scripted|{state.task.id}|{state.seed}")
            gen = state.family.script(state.task, ScriptContext(rng, self.mistake_rate, state.notes, tools))
            state.scratch["script"] = gen
            return self._styled(next(gen))
        try:
            return self._styled(gen.send(_tool_results_since_last_assistant(messages)))
        except StopIteration:
            raise RuntimeError(f"the scripted teacher of {state.family.tag!r} ended without a final answer") from None

    def _styled(self, step: AssistantStep) -> AssistantStep:
        if self.style == "full":
            return step
        thinking = _first_sentence(step.reasoning_content)
        content = step.content
        if not step.tool_calls:  # the final answer: just its `Answer:` line
            answer = [ln for ln in content.splitlines() if ln.startswith("Answer:")]
            content = answer[-1] if answer else content
        return AssistantStep(thinking, content, step.tool_calls)


# A sentence ends at . or ? followed by whitespace, outside quotes ("... at 1.5 ..." or a quoted
# document sentence do not end it).
_SENTENCE_END = re.compile(r'[.?](?=\s|$)')


def _first_sentence(text: str) -> str:
    text = (text or "").strip()
    in_quote = False
    for i, ch in enumerate(text):
        if ch == '"':
            in_quote = not in_quote
        elif not in_quote and _SENTENCE_END.match(text, i):
            return text[: i + 1]
    return text


_THINK_RE = re.compile(r"^\s*<think>(.*?)</think>\s*", re.DOTALL)


def to_openai_messages(messages: list[dict[str, Any]], send_reasoning: bool = False) -> list[dict[str, Any]]:
    """Record messages -> chat-completions request messages: tool-call arguments become JSON
    text (the API's form); thinking is dropped from history unless `send_reasoning`."""
    out = []
    for m in messages:
        m2 = {k: v for k, v in m.items() if k in ("role", "content", "tool_call_id", "name")}
        if m["role"] == "assistant":
            m2.pop("name", None)
            if send_reasoning and m.get("reasoning_content"):
                m2["reasoning_content"] = m["reasoning_content"]
            if m.get("tool_calls"):
                m2["tool_calls"] = [
                    {
                        "id": tc["id"],
                        "type": "function",
                        "function": {
                            "name": tc["function"]["name"],
                            "arguments": tc["function"]["arguments"]
                            if isinstance(tc["function"]["arguments"], str)
                            else json.dumps(tc["function"]["arguments"]),
                        },
                    }
                    for tc in m["tool_calls"]
                ]
        out.append(m2)
    return out


class OpenAITeacher:
    """A served model as the policy, through the OpenAI chat-completions API with tools.

    `base_url` e.g. "http://localhost:8000/v1" (vLLM/SGLang); `extra_body` passes server
    options (e.g. {"chat_template_kwargs": {"thinking": true}}). When the server puts thinking
    inline as `<think>...</think>` at the start of `content`, it is moved to reasoning."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        temperature: float = 0.6,
        max_tokens: int | None = None,
        timeout_s: float = 300.0,
        max_retries: int = 2,
        send_reasoning: bool = False,
        extra_body: dict[str, Any] | None = None,
    ):
        if not base_url:
            raise ValueError("policy.base_url is empty; set it to the server's API root, e.g. policy.base_url=http://localhost:8000/v1")
        if not model:
            raise ValueError("policy.model is empty; set it to the served model name, e.g. policy.model=moonshotai/Kimi-K2-Thinking")
        import openai  # imported here: only this policy needs the package

        self.name = f"openai:{model}"
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.send_reasoning = send_reasoning
        self.extra_body = dict(extra_body or {})
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], state: EpisodeState) -> AssistantStep:
        kwargs: dict[str, Any] = {"model": self.model, "messages": to_openai_messages(messages, self.send_reasoning), "temperature": self.temperature}
        if tools:
            kwargs["tools"] = tools
        limits = [x for x in (self.max_tokens, state.tokens_left) if x is not None]
        if limits:
            kwargs["max_tokens"] = max(1, min(limits))
        if self.extra_body:
            kwargs["extra_body"] = self.extra_body
        resp = self.client.chat.completions.create(**kwargs)
        msg = resp.choices[0].message
        extra = getattr(msg, "model_extra", None) or {}
        # vLLM/SGLang/DeepSeek say `reasoning_content`; newer vLLM says `reasoning`.
        reasoning = getattr(msg, "reasoning_content", None) or extra.get("reasoning_content") or extra.get("reasoning") or ""
        content = msg.content or ""
        if not reasoning:
            m = _THINK_RE.match(content)
            if m:
                reasoning, content = m.group(1).strip(), content[m.end():]
        calls = [ToolCall(tc.function.name, tc.function.arguments, tc.id) for tc in (msg.tool_calls or [])]
        return AssistantStep(reasoning_content=reasoning, content=content, tool_calls=calls)


def build_policy(cfg: dict[str, Any]) -> Policy:
    """A policy from its config group (conf/policy/*.yaml): `kind` plus that kind's options."""
    cfg = dict(cfg)
    kind = cfg.pop("kind", None)
    if kind == "scripted":
        return ScriptedTeacher(**cfg)
    if kind == "openai":
        return OpenAITeacher(**cfg)
    raise ValueError(f"policy.kind must be 'scripted' or 'openai', got {kind!r}; pick one with policy=scripted or policy=openai")
