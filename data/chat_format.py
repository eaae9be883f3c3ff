"""The K2-style chat format of our tiny tokenizer, in one place: its special tokens, its Jinja
template, its Python renderer and its parser (and the parser of Qwen3/Hermes-style output).

The one idea: the format's structure lives entirely in special tokens, so every piece of free
text (a message, a thought, a tool's JSON arguments) sits on its own between two of them; why
that matters for the tokenizer is in `data.tokenizer`.

The K2-style format (after Kimi K2 Thinking's chat template), one block per message:

    <|im_system|>tool_declare<|im_middle|>[...tools as JSON...]<|im_end|>     (if tools)
    <|im_system|>system<|im_middle|>{content}<|im_end|>
    <|im_user|>user<|im_middle|>{content}<|im_end|>
    <|im_assistant|>assistant<|im_middle|><think>{reasoning}</think>{content}
        <|tool_calls_section_begin|>
          <|tool_call_begin|>functions.{name}:{k}<|tool_call_argument_begin|>{arguments JSON}<|tool_call_end|>
        <|tool_calls_section_end|><|im_end|>
    <|im_tool|>tool<|im_middle|>## Return of functions.{name}:{k}\n{content}<|im_end|>

(no whitespace between blocks; the tool-call section only when the step calls tools). `k`
counts tool calls over the whole conversation from 0, as K2 does, so the tool result names the
call it answers without relying on the record's ids. Reasoning is rendered for the assistant
steps after the last user message (the turn in progress); earlier, completed turns keep an
empty `<think></think>`. The generation prompt is `<|im_assistant|>assistant<|im_middle|>`;
the model then emits the body and ends every step with `<|im_end|>`.

`render_parts`/`render_text` below render this format in Python (the fast path `data.render`
tokenizes, with loss masks); `TINY_CHAT_TEMPLATE` is the same format for
`tokenizer.apply_chat_template`, and a test keeps the two equal character for character;
`parse_text` reads a generated assistant turn back. Free text that happens to contain a special token's text (a tool
printing "<|im_end|>") stays text in `data.render`; `apply_chat_template` does the same only
with `sanitize_control_tokens=True` (tested to give the same tokens).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from data.messages import AssistantStep, ToolCall, parse_arguments

IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_TOOL = "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_tool|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_TOOL, IM_MIDDLE, IM_END, THINK, END_THINK,
                  SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END]
SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

# The same format as `data.render.TinyRenderer`, for apply_chat_template. Every tag strips the
# template's own whitespace, so the output is exactly the blocks above.
TINY_CHAT_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1, k=0) -%}"
    "{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- if tools -%}<|im_system|>tool_declare<|im_middle|>{{ tools | tojson }}<|im_end|>{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}<|im_system|>system<|im_middle|>{{ m.content }}<|im_end|>"
    "{%- elif m.role == 'user' -%}<|im_user|>user<|im_middle|>{{ m.content }}<|im_end|>"
    "{%- elif m.role == 'assistant' -%}<|im_assistant|>assistant<|im_middle|><think>"
    "{%- if loop.index0 > ns.last_user and m.reasoning_content -%}{{ m.reasoning_content }}{%- endif -%}"
    "</think>{{ m.content or '' }}"
    "{%- if m.tool_calls -%}<|tool_calls_section_begin|>"
    "{%- for c in m.tool_calls -%}<|tool_call_begin|>functions.{{ c.function.name }}:{{ ns.k }}<|tool_call_argument_begin|>"
    "{%- if c.function.arguments is string -%}{{ c.function.arguments }}{%- else -%}{{ c.function.arguments | tojson }}{%- endif -%}"
    "<|tool_call_end|>{%- set ns.k = ns.k + 1 -%}{%- endfor -%}"
    "<|tool_calls_section_end|>{%- endif -%}<|im_end|>"
    "{%- elif m.role == 'tool' -%}"
    "{%- set t = namespace(k=0, idx=-1, name='') -%}"
    "{%- for p in messages[:loop.index0] -%}{%- if p.role == 'assistant' and p.tool_calls -%}"
    "{%- for c in p.tool_calls -%}{%- if c.id == m.tool_call_id -%}{%- set t.idx = t.k -%}{%- set t.name = c.function.name -%}{%- endif -%}"
    "{%- set t.k = t.k + 1 -%}{%- endfor -%}{%- endif -%}{%- endfor -%}"
    "<|im_tool|>tool<|im_middle|>## Return of functions.{{ t.name }}:{{ t.idx }}{{ '\\n' }}{{ m.content }}<|im_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


def _arguments_json(args: Any) -> str:
    # as the templates' `tojson` filter does (json.dumps defaults, ensure_ascii=False)
    return args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def _call_numbers(messages: Sequence[dict]) -> list[tuple[str, int]]:
    """(name, k) of each tool message: the K2 global call number of the call it answers."""
    out, k, latest = [], 0, {}
    for m in messages:
        if m["role"] == "assistant":
            latest = {}
            for c in m.get("tool_calls") or []:
                latest[c["id"]] = (c["function"]["name"], k)
                k += 1
        elif m["role"] == "user":
            latest = {}
        if m["role"] == "tool":
            if m.get("tool_call_id") not in latest:
                raise ValueError(f"tool message answers tool_call_id={m.get('tool_call_id')!r}, which no call of the "
                                 "latest assistant step has; validate records with data.schema.validate_record")
            out.append(latest[m["tool_call_id"]])
    return out


def render_parts(messages: Sequence[dict], tools: list | None = None, *, add_generation_prompt: bool = False,
                 keep: Sequence[int] | None = None) -> tuple[list[str], list[bool]]:
    """The tiny K2-style format as pieces: (parts, is_special) where each part is a structural
    special token or a piece of free text (see `render_text`)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    idx = range(len(messages)) if keep is None else keep
    if keep is not None:  # "last user" is judged within what is rendered
        last_user = max((i for i in keep if messages[i]["role"] == "user"), default=-1)
    numbers = iter(_call_numbers(messages))
    call_k = {}  # message index -> first call number of that assistant message, or tool (name, k)
    k = 0
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            call_k[i] = k
            k += len(m.get("tool_calls") or [])
        elif m["role"] == "tool":
            call_k[i] = next(numbers)
    parts: list[str] = []
    special: list[bool] = []

    def sp(*toks):
        parts.extend(toks)
        special.extend([True] * len(toks))

    def tx(text):
        parts.append(text)
        special.append(False)

    if tools:
        sp(IM_SYSTEM), tx("tool_declare"), sp(IM_MIDDLE), tx(json.dumps(tools, ensure_ascii=False)), sp(IM_END)
    for i in idx:
        m = messages[i]
        role = m["role"]
        if role == "system":
            sp(IM_SYSTEM), tx("system"), sp(IM_MIDDLE), tx(m["content"]), sp(IM_END)
        elif role == "user":
            sp(IM_USER), tx("user"), sp(IM_MIDDLE), tx(m["content"]), sp(IM_END)
        elif role == "assistant":
            sp(IM_ASSISTANT), tx("assistant"), sp(IM_MIDDLE, THINK)
            if i > last_user and m.get("reasoning_content"):
                tx(m["reasoning_content"])
            sp(END_THINK), tx(m.get("content") or "")
            calls = m.get("tool_calls")
            if calls:
                sp(SECTION_BEGIN)
                for j, c in enumerate(calls):
                    fn = c["function"]
                    sp(CALL_BEGIN), tx(f"functions.{fn['name']}:{call_k[i] + j}"), sp(ARG_BEGIN)
                    tx(_arguments_json(fn["arguments"])), sp(CALL_END)
                sp(SECTION_END)
            sp(IM_END)
        elif role == "tool":
            name, kk = call_k[i]
            sp(IM_TOOL), tx("tool"), sp(IM_MIDDLE), tx(f"## Return of functions.{name}:{kk}\n" + m["content"])
            sp(IM_END)
        else:
            raise ValueError(f"messages[{i}].role: unknown role {role!r}; expected system, user, assistant or tool")
    if add_generation_prompt:
        sp(IM_ASSISTANT), tx("assistant"), sp(IM_MIDDLE)
    return parts, special


def render_text(messages: Sequence[dict], tools: list | None = None, *, add_generation_prompt: bool = False,
                keep: Sequence[int] | None = None) -> str:
    """The tiny K2-style format as text (see `data.tokenizer`). `keep` renders only those message
    indices, while tool-call numbers stay those of the full list (so a split piece shows the
    model the same call names as the whole conversation does)."""
    return "".join(render_parts(messages, tools, add_generation_prompt=add_generation_prompt, keep=keep)[0])


# ----------------------------------------------------------------------------- parsing


def parse_text(text: str) -> AssistantStep:
    """A generated K2-style assistant turn (the text after the generation prompt) -> the turn.

    Malformed tool calls come back as `ToolCall`s with an `error` (and the raw text), problems of
    the turn as a whole in `errors`, so the rollout loop can answer them with an error tool message."""
    out = AssistantStep(finished=text.endswith(IM_END))
    if out.finished:
        text = text[: -len(IM_END)]
    if text.startswith(THINK):
        body = text[len(THINK):]
        if END_THINK in body:
            out.reasoning_content, text = body.split(END_THINK, 1)
        else:  # generation stopped inside the thinking
            out.reasoning_content, text = body, ""
            out.errors.append("generation ended inside <think> (no </think>)")
    if SECTION_BEGIN not in text:
        out.content = text
    else:
        out.content, section = text.split(SECTION_BEGIN, 1)
        if SECTION_END in section:
            section = section.split(SECTION_END, 1)[0]
        else:
            out.errors.append(f"tool-call section not closed ({SECTION_END} missing)")
        for i, chunk in enumerate(section.split(CALL_BEGIN)[1:]):
            if ARG_BEGIN not in chunk or CALL_END not in chunk:
                out.tool_calls.append(ToolCall("", chunk, f"call_{i}", f"tool call {i}: malformed ({ARG_BEGIN} or {CALL_END} missing)"))
                continue
            head, rest = chunk.split(ARG_BEGIN, 1)
            args = rest.split(CALL_END, 1)[0]
            m = re.fullmatch(r"functions\.(.+):(\d+)", head.strip())
            name, call_id = (m.group(1), head.strip()) if m else (head.strip(), f"call_{i}")
            out.tool_calls.append(parse_arguments(i, name, args, call_id))
    for k in (IM_END, IM_ASSISTANT, IM_USER, IM_SYSTEM, IM_TOOL):
        if k in out.content:
            out.errors.append(f"unexpected {k!r} inside the generated content")
    return out


def parse_hermes(text: str, *, end_of_turn: str, think: tuple[str, str] = ("<think>", "</think>"),
                 call: tuple[str, str] = ("<tool_call>", "</tool_call>")) -> AssistantStep:
    """A generated Qwen3/Hermes-style assistant turn (ChatML): `<think>..</think>` then content, then
    `<tool_call>{"name": .., "arguments": {..}}</tool_call>`s; malformed calls as in `parse_text`."""
    out = AssistantStep(finished=text.endswith(end_of_turn))
    if out.finished:
        text = text[: -len(end_of_turn)]
    o, c = think
    if c in text:
        r, text = text.split(c, 1)
        out.reasoning_content = r.split(o, 1)[-1].strip("\n")
        text = text.lstrip("\n")
    co, cc = call
    if co not in text:
        out.content = text
        return out
    out.content, rest = text.split(co, 1)
    out.content = out.content.rstrip("\n")
    for i, chunk in enumerate((co + rest).split(co)[1:]):
        if cc not in chunk:
            out.tool_calls.append(ToolCall("", chunk, f"call_{i}", f"tool call {i}: {cc!r} missing"))
            continue
        body = chunk.split(cc, 1)[0].strip()
        try:
            obj = json.loads(body)
            name, args = obj["name"], obj.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            out.tool_calls.append(ToolCall("", body, f"call_{i}", f"tool call {i}: not a JSON object with a name ({e})"))
            continue
        out.tool_calls.append(parse_arguments(i, name, json.dumps(args), f"call_{i}"))
    return out
