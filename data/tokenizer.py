"""The tiny default model's tokenizer: byte-level BPE trained on our trajectories + a K2-style chat format.

Real models bring their own tokenizer and chat template; the tiny default model (trained from
scratch on a laptop) needs one too, and a small vocabulary (a few thousand tokens) trained on
the project's own data keeps its embedding cheap. The one idea: the chat format's structure
lives entirely in special tokens, so every piece of free text (a message, a thought, a tool's
JSON arguments) is tokenized on its own between two special tokens. That makes rendering a
prefix and rendering the whole give the same tokens (train/inference parity), and lets the
renderer compute loss masks from token ids alone.

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

Python rendering of this format (fast path, with loss masks) is in `data.render`; the Jinja
template below is the same format for `tokenizer.apply_chat_template`, and a test keeps the two
equal character for character. Free text that happens to contain a special token's text (a tool
printing "<|im_end|>") stays text in `data.render`; `apply_chat_template` does the same only
with `sanitize_control_tokens=True` (tested to give the same tokens).
"""

from __future__ import annotations

import os
import re
from typing import Iterable

IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_TOOL = "<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_tool|>"
IM_MIDDLE, IM_END = "<|im_middle|>", "<|im_end|>"
THINK, END_THINK = "<think>", "</think>"
SECTION_BEGIN, SECTION_END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
CALL_BEGIN, ARG_BEGIN, CALL_END = "<|tool_call_begin|>", "<|tool_call_argument_begin|>", "<|tool_call_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, IM_SYSTEM, IM_USER, IM_ASSISTANT, IM_TOOL, IM_MIDDLE, IM_END, THINK, END_THINK,
                  SECTION_BEGIN, SECTION_END, CALL_BEGIN, ARG_BEGIN, CALL_END]
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))

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


def _training_texts(records_or_texts: Iterable) -> Iterable[str]:
    """Free-text pieces to learn merges from: rendered records split at special tokens."""
    from data.render import render_text

    for x in records_or_texts:
        if isinstance(x, str):
            text = x
        elif isinstance(x, dict) and "messages" in x:
            text = render_text(x["messages"], x.get("tools"))
        else:
            raise TypeError(f"train_tokenizer: expected trajectory dicts or strings, got {type(x).__name__}")
        for piece in _SPECIAL_RE.split(text):
            if piece:
                yield piece


def train_tokenizer(records_or_texts: Iterable, vocab_size: int = 2048, min_frequency: int = 2):
    """Train a byte-level BPE tokenizer with the tiny K2-style format's special tokens.

    Returns a `transformers.PreTrainedTokenizerFast` with `chat_template` set; save it with
    `save_pretrained(dir)` and load it back with `AutoTokenizer.from_pretrained(dir)`. Every
    byte is in the base alphabet, so any text encodes and decodes back byte for byte."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(SPECIAL_TOKENS) + 1
    if vocab_size < floor:
        raise ValueError(f"train_tokenizer: vocab_size={vocab_size} is below {floor} (256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens + 1 merge); use vocab_size >= {floor}")
    tk = Tokenizer(models.BPE())
    # add_prefix_space=False and no normalizer: the text is not altered, so decode(encode(x)) == x.
    # Every digit is a token of its own (as in Llama 3 / Qwen tokenizers): a number then has one
    # tokenization wherever it appears (" 1729" in a question, "(1729" in code, "1729\n" in a tool
    # result), so copying it between question, code and tool output is a plain token copy. With
    # merged digit chunks the tiny model had to learn that "Ġ1 72 9" and "17 29" are one number,
    # and after 1.6M training tokens it still miscopied numbers into its code.
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(_training_texts(records_or_texts), trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=IM_END, pad_token=PAD,
                                  extra_special_tokens=[t for t in SPECIAL_TOKENS if t not in (IM_END, PAD)],
                                  clean_up_tokenization_spaces=False, model_max_length=1 << 30)
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def load_tokenizer(path: str | os.PathLike):
    """`AutoTokenizer.from_pretrained(path)`: our tiny tokenizer or a real model's."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))
