"""The tiny default model's tokenizer: byte-level BPE trained on our trajectories, with the K2-style
chat format of `data.chat_format`.

Real models bring their own tokenizer and chat template; the tiny default model (trained from
scratch on a laptop) needs one too, and a small vocabulary (a few thousand tokens) trained on
the project's own data keeps its embedding cheap. The one idea: the format's structure is special
tokens only, so every piece of free text is tokenized on its own between two of them. Rendering a
prefix and rendering the whole then give the same tokens (train/inference parity), and the
renderer computes loss masks from token ids alone.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from data.chat_format import IM_END, PAD, SPECIAL_RE, SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, render_text


def _training_texts(records_or_texts: Iterable) -> Iterable[str]:
    """Free-text pieces to learn merges from: rendered records split at special tokens."""
    for x in records_or_texts:
        if isinstance(x, str):
            text = x
        elif isinstance(x, dict) and "messages" in x:
            text = render_text(x["messages"], x.get("tools"))
        else:
            raise TypeError(f"train_tokenizer: expected trajectory dicts or strings, got {type(x).__name__}")
        for piece in SPECIAL_RE.split(text):
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
