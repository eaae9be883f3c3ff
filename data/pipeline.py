"""Trajectories -> training batches: render, split, pack, collate, shard, resume.

`build_dataloader` turns a trajectories dataset (or a list of records) into batches of
`input_ids`, `labels` and `position_ids` for a transformers causal LM. Labels are aligned like
the inputs (the model shifts them); -100 means no loss.

The one idea is packing with per-document attention boundaries carried by `position_ids`:
documents (one per user turn, split to fit `seq_len`, see `data.render`) are packed into rows of
exactly `seq_len` tokens, and positions restart at 0 at every document start (the padding tail
too). transformers v5 turns such position ids into a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`) -- but only when the model is called with no
`attention_mask` *and no cache*, and its default `use_cache=True` builds a cache even in
training. So: call the model with `use_cache=False` or set `model.config.use_cache = False` (as
the tests prove: packed logits equal unpacked logits for sdpa and eager attention), or ask for `mask_4d=<dtype>` and the batch
carries an additive [B, 1, T, T] block-diagonal causal mask that works whatever `use_cache` is
(the dtype must be the model's compute dtype for sdpa). Flash attention reads position ids
directly.

Modes:
- map-style (default): all records are rendered once at build time; documents are packed once
  (best-fit decreasing, order seeded) and the rows are reshuffled every epoch, so `len(dl)` is
  fixed and known;
- padded (`packing=False`): one document per row, right-padded to the longest in the batch,
  with a 2D `attention_mask`;
- streaming (`streaming=True`): records are read lazily (datasets directory or JSONL), shuffled
  through a buffer, packed greedily as they come; `len()` is unknown.

Sharding: every rank computes the same global order and takes its slice of each global batch
(`batch_size` rows per rank), so ranks stay in lock step. `state_dict()` records the epoch and
the number of batches already yielded; `load_state_dict()` resumes exactly at the next batch.
"""

from __future__ import annotations

import bisect
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from data.render import IGNORE_INDEX, Renderer, SplitStats, get_renderer
from data.schema import ReadStats, iter_trajectories, read_trajectories, validate_record

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- packing


def pack_best_fit(lengths: Sequence[int], seq_len: int, order: Sequence[int]) -> list[list[int]]:
    """Best-fit decreasing bin packing of documents into rows of `seq_len` tokens.

    Documents are taken longest first (ties in `order`'s order, so a seeded shuffle decides
    them); each goes into the fullest row that still has room. Returns rows as document lists."""
    docs = sorted(order, key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    spaces: list[int] = []            # sorted distinct free-space values that have rows
    by_space: dict[int, list[int]] = {}
    for d in docs:
        n = lengths[d]
        if n > seq_len:
            raise ValueError(f"document of {n} tokens exceeds seq_len={seq_len}; render with max_len=seq_len")
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):
            space = spaces[k]
            r = by_space[space].pop()
            if not by_space[space]:
                del by_space[space]
                spaces.pop(k)
        else:
            r, space = len(rows), seq_len
            rows.append([])
        rows[r].append(d)
        left = space - n
        if left > 0:
            if left not in by_space:
                bisect.insort(spaces, left)
                by_space[left] = []
            by_space[left].append(r)
    return rows


@dataclass
class Doc:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray     # int32 [n]


def collate_packed(rows: Sequence[Sequence[Doc]], seq_len: int, pad_id: int,
                   mask_4d: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Rows of documents -> [B, seq_len] tensors; positions restart at each document and at the pad tail."""
    B = len(rows)
    ids = np.full((B, seq_len), pad_id, dtype=np.int64)
    lab = np.full((B, seq_len), IGNORE_INDEX, dtype=np.int64)
    pos = np.zeros((B, seq_len), dtype=np.int64)
    seg = np.zeros((B, seq_len), dtype=np.int64)  # document number within the row, for the 4D mask
    for b, row in enumerate(rows):
        t = 0
        for k, d in enumerate(row):
            n = len(d.input_ids)
            ids[b, t:t + n] = d.input_ids
            lab[b, t:t + n] = d.labels
            pos[b, t:t + n] = np.arange(n)
            seg[b, t:t + n] = k
            t += n
        pos[b, t:] = np.arange(seq_len - t)
        seg[b, t:] = len(row)
    out = {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(lab), "position_ids": torch.from_numpy(pos)}
    if mask_4d is not None:
        s = torch.from_numpy(seg)
        allowed = (s[:, :, None] == s[:, None, :]) & torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
        m = torch.zeros(B, 1, seq_len, seq_len, dtype=mask_4d)
        out["attention_mask"] = m.masked_fill_(~allowed[:, None], torch.finfo(mask_4d).min)
    return out


def collate_padded(docs: Sequence[Doc], pad_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """One document per row, right-padded to the longest (rounded up to `pad_to_multiple_of`)."""
    T = max(len(d.input_ids) for d in docs)
    T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    B = len(docs)
    ids = np.full((B, T), pad_id, dtype=np.int64)
    lab = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    att = np.zeros((B, T), dtype=np.int64)
    for b, d in enumerate(docs):
        n = len(d.input_ids)
        ids[b, :n], lab[b, :n], att[b, :n] = d.input_ids, d.labels, 1
    pos = np.broadcast_to(np.arange(T), (B, T)).copy()
    return {"input_ids": torch.from_numpy(ids), "labels": torch.from_numpy(lab),
            "position_ids": torch.from_numpy(pos), "attention_mask": torch.from_numpy(att)}


# ----------------------------------------------------------------------------- loader


def _to_docs(renderer: Renderer, rec: dict, seq_len: int, stats: SplitStats) -> list[Doc]:
    return [Doc(np.asarray(d["input_ids"], dtype=np.int32), np.asarray(d["labels"], dtype=np.int32))
            for d in renderer.render_documents(rec, max_len=seq_len, stats=stats, as_numpy=True)]


class TrajectoryLoader:
    """Iterable of training batches with a known length (map-style), sharding and exact resume.

    Each `iter()` runs one epoch from the saved position, then advances the epoch."""

    def __init__(self, source, renderer: Renderer, *, seq_len: int, batch_size: int, packing: bool, seed: int,
                 shuffle: bool, rank: int, world_size: int, drop_last: bool, streaming: bool,
                 shuffle_buffer: int, on_error: str, mask_4d: torch.dtype | None):
        self.renderer, self.seq_len, self.batch_size = renderer, seq_len, batch_size
        self.packing, self.seed, self.shuffle, self.drop_last = packing, seed, shuffle, drop_last
        self.rank, self.world_size, self.streaming = rank, world_size, streaming
        self.shuffle_buffer, self.on_error, self.mask_4d = shuffle_buffer, on_error, mask_4d
        self.pad_id = self._pad_id(renderer.tokenizer)
        self.epoch, self.batches_done = 0, 0
        self.split_stats = SplitStats()
        self.read_stats: ReadStats | None = None
        self._source = source
        if not streaming:
            records = source
            if isinstance(source, (str, os.PathLike)):
                records = read_trajectories(source, on_error=on_error)
                self.read_stats = records.stats
            else:
                for i, r in enumerate(records):
                    validate_record(r, source="records", index=i)
            self.docs = [d for r in records for d in _to_docs(renderer, r, seq_len, self.split_stats)]
            if not self.docs:
                raise ValueError(f"no training documents: {len(records)} records gave none that fit seq_len={seq_len} "
                                 f"({self.split_stats.as_dict()}); raise seq_len or check the data")
            order = list(range(len(self.docs)))
            random.Random(seed).shuffle(order)
            lengths = [len(d.input_ids) for d in self.docs]
            self.rows = pack_best_fit(lengths, seq_len, order) if packing else [[i] for i in order]
            if self.split_stats.dropped_steps:
                log.warning("data: %d assistant steps (%d tokens) did not fit seq_len=%d and were dropped",
                            self.split_stats.dropped_steps, self.split_stats.dropped_step_tokens, seq_len)

    @staticmethod
    def _pad_id(tok) -> int:
        pid = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pid is None:
            raise ValueError("tokenizer has neither pad_token nor eos_token; set tokenizer.pad_token")
        return pid

    # -- stats
    def packing_efficiency(self) -> float:
        """Share of row tokens that are real document tokens (map-style)."""
        used = sum(len(self.docs[d].input_ids) for row in self.rows for d in row)
        return used / (len(self.rows) * self.seq_len) if self.packing else float("nan")

    # -- length and resume
    def __len__(self) -> int:
        if self.streaming:
            raise TypeError("a streaming TrajectoryLoader has no length; use streaming=False for len()")
        per_global = self.batch_size * self.world_size
        n = len(self.rows)
        return n // per_global if self.drop_last else -(-n // per_global)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batches_done": self.batches_done, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        for k in ("seed", "world_size", "batch_size"):
            if state.get(k, getattr(self, k)) != getattr(self, k):
                raise ValueError(f"data state was saved with {k}={state[k]} but this loader has {k}={getattr(self, k)}; "
                                 "resume with the same data settings")
        self.epoch, self.batches_done = int(state["epoch"]), int(state["batches_done"])

    # -- iteration
    def _collate(self, rows: list[list[Doc]]) -> dict[str, torch.Tensor]:
        if self.packing:
            return collate_packed(rows, self.seq_len, self.pad_id, self.mask_4d)
        return collate_padded([r[0] for r in rows], self.pad_id)

    def _global_batches(self) -> Iterator[list[list[Doc]]]:
        """Global batches (batch_size * world_size rows) of this epoch, the same on every rank."""
        per_global = self.batch_size * self.world_size
        if not self.streaming:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
            for s in range(0, len(order), per_global):
                chunk = order[s:s + per_global]
                if len(chunk) < per_global and self.drop_last:
                    return
                yield [[self.docs[d] for d in self.rows[r]] for r in chunk]
            return
        pending: list[list[Doc]] = []
        for row in self._stream_rows():
            pending.append(row)
            if len(pending) == per_global:
                yield pending
                pending = []
        if pending and not self.drop_last:
            yield pending

    def _stream_docs(self) -> Iterator[Doc]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        recs: Iterable[dict]
        if isinstance(self._source, (str, os.PathLike)):
            self.read_stats = ReadStats(str(self._source))
            recs = iter_trajectories(self._source, on_error=self.on_error, stats=self.read_stats)
        else:
            recs = (r for i, r in enumerate(self._source) if validate_record(r, source="records", index=i) is None)
        buf: list[Doc] = []
        self.split_stats = SplitStats()
        for rec in recs:
            for d in _to_docs(self.renderer, rec, self.seq_len, self.split_stats):
                if not self.shuffle:
                    yield d
                    continue
                buf.append(d)
                if len(buf) >= self.shuffle_buffer:
                    i = rng.randrange(len(buf))
                    buf[i], buf[-1] = buf[-1], buf[i]
                    yield buf.pop()
        rng.shuffle(buf)
        yield from buf

    def _stream_rows(self) -> Iterator[list[Doc]]:
        if not self.packing:
            for d in self._stream_docs():
                yield [d]
            return
        row, used = [], 0
        for d in self._stream_docs():
            n = len(d.input_ids)
            if used + n > self.seq_len:
                yield row
                row, used = [], 0
            row.append(d)
            used += n
        if row:
            yield row

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        skip = self.batches_done
        for i, g in enumerate(self._global_batches()):
            if i < skip:
                continue
            mine = g[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
            if not mine:  # last partial global batch without drop_last: an all-padding row, no loss
                mine = [[Doc(np.array([self.pad_id], np.int32), np.array([IGNORE_INDEX], np.int32))]]
            self.batches_done = i + 1
            yield self._collate(mine)
        self.epoch += 1
        self.batches_done = 0


def build_dataloader(path_or_records: Any, tokenizer, seq_len: int = 512, batch_size: int = 8, packing: bool = True,
                     seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, drop_last: bool = True,
                     *, streaming: bool = False, shuffle_buffer: int = 1024, on_error: str = "raise",
                     renderer: Renderer | None = None, training_template: str | None = None,
                     mask_4d: str | torch.dtype | None = None) -> TrajectoryLoader:
    """Batches for training from a trajectories dataset directory, a .jsonl file or a list of records.

    Yields dict(input_ids [B,T], labels [B,T], position_ids [B,T]) and, in padded mode, a 2D
    `attention_mask`; with `mask_4d` (a dtype such as "bfloat16"), an additive [B,1,T,T]
    `attention_mask` in packed mode. See the module docstring for packing, sharding and resume."""
    for name, v in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"build_dataloader: {name}={v!r}; expected a positive integer")
    if not 0 <= rank < world_size:
        raise ValueError(f"build_dataloader: rank={rank} is outside [0, world_size={world_size})")
    if isinstance(mask_4d, str):
        dt = getattr(torch, mask_4d, None)
        if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
            raise ValueError(f"build_dataloader: mask_4d={mask_4d!r}; expected a float dtype name such as 'bfloat16'")
        mask_4d = dt
    if mask_4d is not None and not packing:
        raise ValueError("build_dataloader: mask_4d is for packing=True; padded mode already gives a 2D attention_mask")
    if streaming and not isinstance(path_or_records, (str, os.PathLike)) and not hasattr(path_or_records, "__iter__"):
        raise TypeError(f"build_dataloader: streaming needs a path or an iterable of records, got {type(path_or_records)}")
    renderer = renderer or get_renderer(tokenizer, training_template=training_template)
    return TrajectoryLoader(path_or_records, renderer, seq_len=seq_len, batch_size=batch_size, packing=packing,
                            seed=seed, shuffle=shuffle, rank=rank, world_size=world_size, drop_last=drop_last,
                            streaming=streaming, shuffle_buffer=shuffle_buffer, on_error=on_error, mask_4d=mask_4d)


def split_heldout(records: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split: the same records every run with the same seed."""
    if not val_fraction or len(records) < 2:
        return records, []
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(records), generator=g).tolist()
    n_val = max(1, int(round(val_fraction * len(records))))
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val_idx], [records[i] for i in sorted(val_idx)]


def calibration_batches(records: Iterable[dict], tokenizer, *, num_samples: int, seq_len: int, batch_size: int,
                        seed: int) -> list[dict[str, torch.Tensor]]:
    """Up to `num_samples` rendered documents (one user turn each, split to fit seq_len) of
    `records`, shuffled by `seed`, as padded batches with input_ids and attention_mask (padding
    must not reach GPTQ's Hessians, so one document per row rather than packed rows)."""
    loader = build_dataloader(list(records), tokenizer, seq_len=seq_len, batch_size=batch_size, packing=False,
                              seed=seed, shuffle=True, drop_last=False)
    batches, rows = [], 0
    for b in loader:
        take = min(b["input_ids"].shape[0], num_samples - rows)
        batches.append({"input_ids": b["input_ids"][:take], "attention_mask": b["attention_mask"][:take]})
        rows += take
        if rows >= num_samples:
            break
    return batches
