"""Chat rendering with loss masks: trajectories -> training tokens, messages -> rollout prompts.

One renderer interface, two kinds, picked by `get_renderer(tokenizer)`:

- `TinyRenderer`: the K2-style format of `data.tokenizer` (our tiny default model). Rendered in
  Python (fast), tokenized once per document; loss masks come from the special tokens alone.
- `ChatTemplateRenderer`: a real model's own chat template through `apply_chat_template`, with
  assistant masks from `{% generation %}` markers. A template without markers is matched to a
  shipped training variant in `data/templates/` (proven to render the same tokens without the
  markers), or the user passes one.

The one idea is train/inference parity: a training document is cut so that, for every assistant
step it labels, the tokens before that step are exactly `render_prompt(messages_before_step,
tools)` (what the rollout loop feeds the model) and the labelled tokens are exactly what the
model must emit, up to and including the end-of-step token. Reasoning follows K2 Thinking: kept
for every step of the turn in progress (from the last user message on), dropped from earlier,
completed turns. So a multi-turn record cannot be one sequence (turn 1's reasoning is visible
while turn 1 is in progress, gone once turn 2 starts): it becomes one *document* per user turn,
each holding the earlier turns without reasoning as unlabelled context. `render_training`
returns the documents concatenated, with `doc_lens` so packing restarts positions (and
attention) at each.

A document longer than `max_len` is split at step boundaries (a step = one assistant message
and the tool results answering it; never cut inside a message, never a result without its
call). Each piece keeps the tool declarations, the system message and the turn's user message,
then the previous step whole (the call and results the first labelled step reacts to), then as
much older history as fits (most recent steps first, then earlier turns), then the labelled
steps. A piece may end right after an assistant's tool call, without its results: so a call
whose output is huge is still learned; the step after it, which must see that output, is the
one dropped. A step that cannot fit with its required context is dropped and counted in
`SplitStats` (`dropped_steps`, and the tokens of the assistant messages lost).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data import chat_format as T
from data.chat_format import render_parts, render_text  # noqa: F401 - re-exported: the renderers' text form
from data.messages import AssistantStep

IGNORE_INDEX = -100
TEMPLATES_DIR = Path(__file__).parent / "templates"
_GEN_MARKER_RE = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


@dataclass
class SplitStats:
    """Counts of what rendering kept, split and dropped (summed over records)."""

    records: int = 0
    docs: int = 0             # one per user turn with at least one assistant step
    split_docs: int = 0       # docs longer than max_len, cut into pieces
    pieces: int = 0           # documents emitted (unsplit docs + pieces)
    steps: int = 0            # assistant steps seen
    dropped_steps: int = 0    # steps that did not fit with the bare prefix: no loss on them
    dropped_step_tokens: int = 0
    label_tokens: int = 0     # loss tokens emitted
    tokens: int = 0           # tokens emitted

    def add(self, other: SplitStats) -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _steps(messages: Sequence[dict], start: int, end: int) -> list[list[int]]:
    """Group message indices start..end-1 into steps: an assistant message + its tool results."""
    steps: list[list[int]] = []
    for i in range(start, end):
        if messages[i]["role"] == "assistant" or not steps:
            steps.append([i])
        else:
            steps[-1].append(i)
    return steps


class Renderer:
    """Interface shared by both kinds; subclasses implement `_encode`, `render_prompt`, `parse_assistant`."""

    tokenizer: Any
    stop_token_ids: list[int]

    # -- subclass API
    def _encode(self, messages: Sequence[dict], keep: Sequence[int], tools, labelled: set[int]
                ) -> tuple[list[int], list[int]]:
        """Tokens of messages[keep] (a training render, no generation prompt) and their labels:
        loss on the assistant messages in `labelled`, -100 elsewhere."""
        raise NotImplementedError

    def render_prompt(self, messages: Sequence[dict], tools: list | None = None) -> list[int]:
        raise NotImplementedError

    def parse_assistant(self, text_or_ids) -> dict:
        raise NotImplementedError

    # -- shared
    def render_documents(self, record: dict, max_len: int | None = None,
                         stats: SplitStats | None = None, as_numpy: bool = False) -> list[dict]:
        """One document per user turn (split to fit `max_len`); each a dict(input_ids, labels)
        of lists (of int64 numpy arrays with `as_numpy`)."""
        msgs, tools = record["messages"], record.get("tools")
        st = SplitStats(records=1)
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        head_sys = [0] if msgs[0]["role"] == "system" else []
        out = []
        for t, u in enumerate(users):
            end = users[t + 1] if t + 1 < len(users) else len(msgs)
            steps = _steps(msgs, u + 1, end)
            if not steps:
                continue
            st.docs += 1
            st.steps += len(steps)
            keep = list(range(end))
            labelled = {s[0] for s in steps}
            ids, labels = self._encode(msgs, keep, tools, labelled)
            if max_len is None or len(ids) <= max_len:
                out.append({"input_ids": ids, "labels": labels})
                continue
            st.split_docs += 1
            hist = [list(range(users[h], users[h + 1])) for h in range(t)]
            out.extend(self._split(msgs, tools, head_sys, hist, u, steps, max_len, st, (ids, labels, keep)))
        for d in out:
            d["input_ids"] = np.asarray(d["input_ids"], dtype=np.int64)
            d["labels"] = np.asarray(d["labels"], dtype=np.int64)
        st.pieces = len(out)
        st.tokens = sum(len(d["input_ids"]) for d in out)
        st.label_tokens = sum(int(np.count_nonzero(d["labels"] != IGNORE_INDEX)) for d in out)
        if not as_numpy:
            out = [{"input_ids": d["input_ids"].tolist(), "labels": d["labels"].tolist()} for d in out]
        if stats is not None:
            stats.add(st)
        return out

    def _unit_lengths(self, msgs, tools, head_sys, hist, u, steps, full):
        """Token lengths: the bare prefix (tools, system, user), each step's assistant message
        alone, each whole step (assistant + tool results), each earlier turn. Measured as what
        adding the unit to the bare prefix adds (blocks start and end at message boundaries, so
        lengths add; `_split` re-checks each piece anyway)."""
        head = head_sys + [u]
        n_head = len(self._encode(msgs, head, tools, set())[0])

        def extra(keep):
            return len(self._encode(msgs, keep, tools, set())[0]) - n_head

        return (n_head, [extra(head + s[:1]) for s in steps], [extra(head + s) for s in steps],
                [extra(head_sys + h + [u]) for h in hist])

    def _build_piece(self, msgs, tools, keep, labelled, full):
        return self._encode(msgs, keep, tools, labelled)

    def _split(self, msgs, tools, head_sys, hist, u, steps, max_len, st, full) -> list[dict]:
        """Pieces of one over-long turn. A piece labels a run of steps j..k: their assistant
        messages and the tool results between them; the results of step k are left out (nothing
        after them in the piece needs them). Step j > 0 needs step j-1 whole (the call and the
        results it reacts to) as context; more history is added most recent first while it fits."""
        n_head, a_len, s_len, hist_len = self._unit_lengths(msgs, tools, head_sys, hist, u, steps, full)
        t_len = [s - a for s, a in zip(s_len, a_len)]
        pieces, j = [], 0
        while j < len(steps):
            used = n_head + a_len[j] + (s_len[j - 1] if j else 0)
            if used > max_len:
                st.dropped_steps += 1
                st.dropped_step_tokens += a_len[j]
                j += 1
                continue
            run, k = [j], j + 1
            while k < len(steps) and used + t_len[k - 1] + a_len[k] <= max_len:
                run.append(k)
                used += t_len[k - 1] + a_len[k]
                k += 1
            ctx = [j - 1] if j else []
            for p in range(j - 2, -1, -1):
                if used + s_len[p] > max_len:
                    break
                ctx.insert(0, p)
                used += s_len[p]
            ctx_hist = []
            if len(ctx) == j:  # earlier turns only if the whole turn so far is there
                for h in range(len(hist) - 1, -1, -1):
                    if used + hist_len[h] > max_len:
                        break
                    ctx_hist.insert(0, h)
                    used += hist_len[h]
            while True:
                keep = (head_sys + [i for h in ctx_hist for i in hist[h]] + [u]
                        + [i for p in ctx for i in steps[p]]
                        + [i for q in run[:-1] for i in steps[q]] + steps[run[-1]][:1])
                ids, labels = self._build_piece(msgs, tools, keep, {steps[q][0] for q in run}, full)
                if len(ids) <= max_len:
                    break
                # lengths did not add exactly (a template joins neighbours): shed context, then steps
                if ctx_hist:
                    ctx_hist.pop(0)
                elif len(ctx) > 1:
                    ctx.pop(0)
                elif len(run) > 1:
                    run.pop()
                else:
                    break
            if len(ids) > max_len:
                st.dropped_steps += 1
                st.dropped_step_tokens += a_len[j]
                j += 1
                continue
            pieces.append({"input_ids": ids, "labels": labels})
            j = run[-1] + 1
        return pieces

    def render_training(self, record: dict, max_len: int | None = None,
                        stats: SplitStats | None = None) -> dict:
        """All documents of `record` concatenated: dict(input_ids, labels, doc_lens, num_docs).

        A single-turn record that fits is one document (`doc_lens == [len(input_ids)]`). Several
        documents must never attend to each other: give each its own positions (`doc_lens`)."""
        docs = self.render_documents(record, max_len=max_len, stats=stats)
        return {"input_ids": [t for d in docs for t in d["input_ids"]],
                "labels": [t for d in docs for t in d["labels"]],
                "doc_lens": [len(d["input_ids"]) for d in docs], "num_docs": len(docs)}

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


class TinyRenderer(Renderer):
    """The K2-style format of `data.tokenizer`, rendered in Python; masks from special-token ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        tid = tokenizer.convert_tokens_to_ids
        self.ids = {t: tid(t) for t in T.SPECIAL_TOKENS}
        missing = [t for t, i in self.ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"TinyRenderer: tokenizer lacks the K2-style special tokens {missing}; "
                             "train one with data.tokenizer.train_tokenizer")
        self.stop_token_ids = [self.ids[T.IM_END]]
        self._block_open = np.array([self.ids[t] for t in (T.IM_SYSTEM, T.IM_USER, T.IM_ASSISTANT, T.IM_TOOL)])

    def encode_text(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_parts(self, parts: Sequence[str], special: Sequence[bool]) -> list[int]:
        """Tokens of rendered parts. Fast path: the joined text in one call. If free text holds the
        text of a special token (a tool printing "<|im_end|>"), that text must stay text: the free
        parts are then encoded with special-token matching off, and the structure tokens added by id."""
        text = "".join(parts)
        if len(T.SPECIAL_RE.findall(text)) == sum(special):
            return self._backend.encode(text, add_special_tokens=False).ids
        free = [p for p, s in zip(parts, special) if not s]
        self._backend.encode_special_tokens = True
        try:
            enc = iter(self._backend.encode_batch(free, add_special_tokens=False))
        finally:
            self._backend.encode_special_tokens = False
        ids: list[int] = []
        for p, s in zip(parts, special):
            if s:
                ids.append(self.ids[p])
            else:
                ids.extend(next(enc).ids)
        return ids

    def labels_from_ids(self, ids, labelled_flags: Sequence[bool]) -> np.ndarray:
        """Labels of a rendered document: assistant block k (in order) is labelled if
        `labelled_flags[k]`, from after its `<|im_middle|>` through its `<|im_end|>`."""
        a = np.asarray(ids, dtype=np.int64)
        starts = np.flatnonzero(a == self.ids[T.IM_ASSISTANT])
        if len(starts) != len(labelled_flags):
            raise ValueError(f"rendered {len(starts)} assistant headers for {len(labelled_flags)} assistant messages: "
                             f"a message's text contains the special token {T.IM_ASSISTANT!r}")
        starts = starts[np.asarray(labelled_flags, dtype=bool)] if len(starts) else starts
        lab = np.full(len(a), IGNORE_INDEX, dtype=np.int64)
        if len(starts) == 0:
            return lab
        mids = np.flatnonzero(a == self.ids[T.IM_MIDDLE])
        ends = np.flatnonzero(a == self.ids[T.IM_END])
        e_i = np.searchsorted(ends, starts)
        if e_i[-1] >= len(ends):
            raise ValueError(f"assistant block at token {starts[-1]} has no {T.IM_END!r}")
        m, e = mids[np.searchsorted(mids, starts)] + 1, ends[e_i] + 1
        # difference array: +1 where a labelled span opens, -1 after it closes
        d = np.zeros(len(a) + 1, dtype=np.int64)
        np.add.at(d, m, 1)
        np.add.at(d, e, -1)
        inside = np.cumsum(d[:-1]) > 0
        lab[inside] = a[inside]
        return lab

    def _encode(self, messages, keep, tools, labelled):
        ids = np.asarray(self.encode_parts(*render_parts(messages, tools, keep=keep)), dtype=np.int64)
        flags = [i in labelled for i in keep if messages[i]["role"] == "assistant"]
        n_blocks = len(keep) + (1 if tools else 0)
        assert int(np.count_nonzero(ids == self.ids[T.IM_END])) == n_blocks, "free text became a special token"
        return ids, self.labels_from_ids(ids, flags)

    # Every block starts with a role token and ends with <|im_end|>, so the tokens of any subset of
    # messages are the concatenation of their blocks in the full render: split pieces are sliced
    # out of the full document instead of rendered and tokenized again.
    def _blocks(self, full, tools):
        ids, labels, keep = full
        opens = np.flatnonzero(np.isin(ids, self._block_open)).tolist() + [len(ids)]
        if tools:
            pre, opens = (0, opens[1]), opens[1:]
        else:
            pre = (0, 0)
        return pre, {i: (opens[j], opens[j + 1]) for j, i in enumerate(keep)}

    def _unit_lengths(self, msgs, tools, head_sys, hist, u, steps, full):
        pre, span = self._blocks(full, tools)
        n = {i: b - a for i, (a, b) in span.items()}
        n_head = pre[1] - pre[0] + sum(n[i] for i in head_sys + [u])
        return (n_head, [n[s[0]] for s in steps], [sum(n[i] for i in s) for s in steps],
                [sum(n[i] for i in h) for h in hist])

    def _build_piece(self, msgs, tools, keep, labelled, full):
        ids, labels, _ = full
        pre, span = self._blocks(full, tools)
        parts_i, parts_l = [ids[pre[0]:pre[1]]], [labels[pre[0]:pre[1]]]
        for i in keep:
            a, b = span[i]
            parts_i.append(ids[a:b])
            lab = labels[a:b]
            parts_l.append(lab if i in labelled else np.full(b - a, IGNORE_INDEX, dtype=np.int64))
        return np.concatenate(parts_i), np.concatenate(parts_l)

    def render_prompt(self, messages, tools=None):
        return self.encode_parts(*render_parts(messages, tools, add_generation_prompt=True))

    def parse_assistant(self, text_or_ids) -> AssistantStep:
        """Generated assistant text (or ids) after the generation prompt -> the turn (`chat_format.parse_text`)."""
        return T.parse_text(text_or_ids if isinstance(text_or_ids, str) else self.decode(text_or_ids))


def strip_generation_markers(template: str) -> str:
    """The inference variant of a training template: the same text without `{% generation %}` tags."""
    return _GEN_MARKER_RE.sub("", template)


def renders_alike(tokenizer, template_a: str, template_b: str, records: Sequence[dict] | None = None) -> bool:
    """Whether two chat templates render the same text for every prefix of probe conversations
    (all trajectory shapes of `data.probes`: tools, parallel calls, multi-turn reasoning
    dropping), with and without the generation prompt."""
    from data.probes import probe_records

    for rec in records if records is not None else probe_records():
        msgs, tools = rec["messages"], rec.get("tools")
        for j in range(1, len(msgs) + 1):
            for gen in (False, True):
                kw = dict(tools=tools, add_generation_prompt=gen, tokenize=False)
                try:
                    a = tokenizer.apply_chat_template(msgs[:j], chat_template=template_a, **kw)
                    b = tokenizer.apply_chat_template(msgs[:j], chat_template=template_b, **kw)
                except Exception:  # noqa: BLE001 - a template that cannot render a probe is no match
                    return False
                if a != b:
                    return False
    return True


def find_training_template(template: str, tokenizer=None) -> str | None:
    """A shipped training variant (data/templates/*.jinja) for the inference `template`: one whose
    markers-stripped text is `template`, or (given the tokenizer) one that renders every probe
    conversation exactly as `template` does."""
    variants = [p.read_text() for p in sorted(TEMPLATES_DIR.glob("*.jinja"))]
    for t in variants:
        if strip_generation_markers(t).strip() == template.strip():
            return t
    if tokenizer is not None:
        for t in variants:
            if renders_alike(tokenizer, template, t):
                return t
    return None


class ChatTemplateRenderer(Renderer):
    """A real model's chat template. Prompts use the tokenizer's own (inference) template; training
    uses a variant with `{% generation %}` markers around what the model emits, so the assistant
    mask of `apply_chat_template` is the loss mask. Markers must wrap exactly the assistant
    messages after the last user message (the turn in progress), from after the role header
    through the end-of-turn token."""

    def __init__(self, tokenizer, training_template: str | None = None,
                 thinking_open: str = "<think>", thinking_close: str = "</think>",
                 call_open: str = "<tool_call>", call_close: str = "</tool_call>", end_of_turn: str | None = None):
        self.tokenizer = tokenizer
        tmpl = tokenizer.chat_template
        if not isinstance(tmpl, str) or not tmpl:
            raise ValueError("ChatTemplateRenderer: the tokenizer has no chat_template (a single string); set "
                             "tokenizer.chat_template or pass training_template=")
        if training_template is not None and Path(str(training_template)[:200]).suffix == ".jinja":
            training_template = Path(training_template).read_text()
        if training_template is None:
            training_template = tmpl if _GEN_MARKER_RE.search(tmpl) else find_training_template(tmpl, tokenizer)
        if training_template is None:
            raise ValueError("ChatTemplateRenderer: the tokenizer's chat template has no {% generation %} markers and "
                             f"no training variant in {TEMPLATES_DIR} matches it; pass training_template=<path.jinja> "
                             "(the template with {% generation %}...{% endgeneration %} around assistant output)")
        self.training_template = training_template
        self.think = (thinking_open, thinking_close)
        self.call = (call_open, call_close)
        self.end_of_turn = end_of_turn or tokenizer.eos_token or "<|im_end|>"
        eot = tokenizer.convert_tokens_to_ids(self.end_of_turn)
        if eot is None or eot == tokenizer.unk_token_id:
            raise ValueError(f"ChatTemplateRenderer: end_of_turn={self.end_of_turn!r} is not one token of the "
                             "tokenizer; pass end_of_turn= the template's end-of-turn token")
        self.stop_token_ids = [eot]

    def _encode(self, messages, keep, tools, labelled):
        sub = [messages[i] for i in keep]
        out = self.tokenizer.apply_chat_template(sub, tools=tools or None, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True,
                                                 chat_template=self.training_template)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        last_user = max((j for j, m in enumerate(sub) if m["role"] == "user"), default=-1)
        marked = [keep[j] for j, m in enumerate(sub) if m["role"] == "assistant" and j > last_user]
        runs, prev = [], 0
        for pos, bit in enumerate(mask):
            if bit and not prev:
                runs.append([pos, pos + 1])
            elif bit:
                runs[-1][1] = pos + 1
            prev = bit
        if len(runs) != len(marked):
            raise ValueError(f"training template marked {len(runs)} spans for {len(marked)} assistant messages of the "
                             "turn in progress; its {% generation %} markers must wrap each of them once")
        labels = [IGNORE_INDEX] * len(ids)
        for (a, b), i in zip(runs, marked):
            if i in labelled:
                labels[a:b] = ids[a:b]
        return ids, labels

    def render_prompt(self, messages, tools=None):
        return list(self.tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=True,
                                                       add_generation_prompt=True, return_dict=True)["input_ids"])

    def parse_assistant(self, text_or_ids) -> AssistantStep:
        """Qwen3/Hermes-style output (`chat_format.parse_hermes`)."""
        return T.parse_hermes(text_or_ids if isinstance(text_or_ids, str) else self.decode(text_or_ids),
                              end_of_turn=self.end_of_turn, think=self.think, call=self.call)


def get_renderer(tokenizer, training_template: str | None = None) -> Renderer:
    """The tiny K2-style renderer for our tokenizer, the chat-template renderer otherwise."""
    if getattr(tokenizer, "chat_template", None) == T.TINY_CHAT_TEMPLATE:
        return TinyRenderer(tokenizer)
    return ChatTemplateRenderer(tokenizer, training_template=training_template)
