"""A local checkpoint as the policy of the rollout loop: render the conversation, decode with the
`InferenceEngine` (the episode's KV cache kept between its steps), parse the turn back.

The one idea: the prompt is rendered by the same renderer as the training data, and the tokens a
step must produce are exactly the labelled tokens of that assistant message in the training render
(`assistant_body_ids`), so what the model learned and what it is asked to continue agree token
for token.
"""

from __future__ import annotations

import hashlib
from typing import Any

from sandbox_env.agent.types import AssistantStep, EpisodeState, Policy
from sandbox_env.inference.engine import InferenceEngine, KVCache, Request, Result, SamplingConfig


def assistant_body_ids(renderer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                       step: AssistantStep) -> list[int]:
    """The token ids a model must emit for `step` after `render_prompt(messages, tools)`: the
    labelled tokens of that assistant message in the training render (train/inference parity)."""
    msg = step.to_message(id_prefix="call_g")
    from data.render import TinyRenderer, render_text

    if isinstance(renderer, TinyRenderer):
        # The K2-style format tokenizes each block on its own (structure lives in special tokens), so the
        # message rendered alone, call numbers counted over the whole conversation, is the same tokens.
        msgs = list(messages) + [msg]
        ids = renderer.encode_text(render_text(msgs, None, keep=[len(msgs) - 1]))
        head = renderer.encode_text(render_text([], None, add_generation_prompt=True))
        assert ids[: len(head)] == head, "the assistant block does not start with the generation prompt"
        return ids[len(head):]
    docs = renderer.render_documents({"messages": list(messages) + [msg], "tools": tools or None})
    labels = docs[-1]["labels"]
    end = max(i for i, x in enumerate(labels) if x != -100) + 1
    start = end
    while start > 0 and labels[start - 1] != -100:
        start -= 1
    return list(labels[start:end])


class LocalModelPolicy:
    """A local checkpoint as the rollout policy (the `Policy` protocol of sandbox_env.agent.types).

    Each episode keeps its KV cache in `state.scratch["kv"]`. `tools_enabled=False` renders the
    prompt without tool declarations (the model must answer from its own knowledge). `guide`: a
    policy whose steps are forced through the model token by token (guided decoding) — the model
    runs every forward and keeps its cache, but emits the guide's tokens; this drives tiny random
    models through long, valid episodes in tests and benchmarks. Per-step counters go to
    `state.notes` (the record's metadata): prefill/reused/decode tokens, peak cache length, forced
    think closes, parse errors."""

    def __init__(self, engine: InferenceEngine, *, name: str = "local", sampling: SamplingConfig | None = None,
                 tools_enabled: bool = True, reuse_cache: bool = True, guide: Policy | None = None,
                 batched: bool = True):
        self.engine = engine
        self.renderer = engine.renderer
        self.name = name
        self.sampling = sampling or SamplingConfig()
        self.tools_enabled = tools_enabled
        self.reuse_cache = reuse_cache
        self.guide = guide
        self.batched = batched

    def request(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], state: EpisodeState) -> Request:
        shown_tools = tools if self.tools_enabled else None
        prompt = self.renderer.render_prompt(messages, shown_tools)
        cache = state.scratch.setdefault("kv", KVCache()) if self.reuse_cache else None
        max_new = self.sampling.max_new_tokens
        if state.tokens_left is not None:
            max_new = max(1, min(max_new, state.tokens_left + 8))  # + a few structural tokens the loop does not count
        force = []
        if self.guide is not None:
            force = assistant_body_ids(self.renderer, messages, shown_tools, self.guide.act(messages, tools, state))
            max_new = max(max_new, len(force))
        task_id = getattr(state.task, "id", "")
        return Request(prompt_ids=prompt, cache=cache, max_new_tokens=max_new,
                       max_thinking_tokens=state.max_thinking_tokens, temperature=self.sampling.temperature,
                       top_p=self.sampling.top_p, seed=_seed_of(task_id, state.seed, state.step), force_ids=force)

    def act(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]], state: EpisodeState) -> AssistantStep:
        req = self.request(messages, tools, state)
        res = self.engine.submit(req) if self.batched else self.engine.generate([req])[0]
        return self.to_step(res, state)

    def to_step(self, res: Result, state: EpisodeState) -> AssistantStep:
        parsed = self.renderer.parse_assistant(res.token_ids)
        n = state.notes
        n["prefill_tokens"] = n.get("prefill_tokens", 0) + res.prefill_tokens
        n["reused_tokens"] = n.get("reused_tokens", 0) + res.reused_tokens
        n["decode_tokens"] = n.get("decode_tokens", 0) + len(res.token_ids)
        n["max_cache_tokens"] = max(n.get("max_cache_tokens", 0), res.cache_tokens)
        n["forced_think_close"] = n.get("forced_think_close", 0) + res.forced_think_close
        n["unfinished_steps"] = n.get("unfinished_steps", 0) + (0 if res.stopped else 1)
        n["decode_s"] = round(n.get("decode_s", 0.0) + res.wall_s, 4)
        n["parse_errors"] = n.get("parse_errors", 0) + len(parsed.parse_errors)
        return parsed  # the parser's turn is the policy's step (its parse errors are counted above)


def _seed_of(task_id: str, seed: int, step: int) -> int:
    """A sampling seed per (task, episode seed, step): the same across models and batch compositions."""
    return int.from_bytes(hashlib.sha256(f"{task_id}|{seed}|{step}".encode()).digest()[:8], "big") >> 1
