"""Our own checkpoints as the policy of the rollout loop: loading, a batched KV-cached engine, the policy.

`generate()` re-encodes the whole conversation at every assistant step; over a 300-call episode
that is quadratic work, and it decodes one episode at a time. This module replaces it with an
inference engine built for agent loops. The one idea: an episode's KV cache is kept between its
steps together with the exact token ids it covers, and each new prompt reuses the cache up to the
longest common prefix of those ids and the newly rendered prompt (the cache is cropped there and
only the rest is fed). Context management rewrites old tool outputs, thinking can be truncated and
tool-call arguments re-serialised by the loop, so the prompt is never assumed to extend the
previous one: the prefix is compared token by token, which keeps decoding exactly what recomputing
from scratch gives.

Many episodes advance together: each episode runs in its own thread and calls `policy.act`; the
engine's worker thread admits pending requests into one running batch (continuous batching) and
runs one batched forward per decode step. Rows are left-padded inside the batch (a row's pad
positions are masked out and its position ids count only its own tokens), so a row decodes the
same tokens alone or in a batch (greedy; up to float rounding of the batched matmuls). A row
leaves the batch the moment it stops, taking its cache back to its episode.

    loaded = load_policy_model("runs/qat/step_000100")     # BF16 dir, fake-quant ckpt or INT4 export
    engine = InferenceEngine(loaded.model, get_renderer(loaded.tokenizer))
    policy = LocalModelPolicy(engine, name="qat", sampling=SamplingConfig(temperature=0.0))
    record = run_episode(task, policy, env, budgets, token_counter=TokenCounter(loaded.tokenizer))

Shape legend: B batch rows, H key/value heads, S cached positions, D head dim, V vocabulary.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from sandbox_env.inference.sampling import SamplingConfig  # noqa: F401 - the engine's sampling settings

log = logging.getLogger(__name__)


@dataclass
class KVCache:
    """One episode's cache: per layer (k_1HSD, v_1HSD), and the token ids it covers (len == S)."""

    ids: list[int] = field(default_factory=list)
    layers: list[tuple[torch.Tensor, torch.Tensor]] | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    cache: KVCache | None = None  # reused and updated in place; None = no reuse (fresh each time)
    max_new_tokens: int = 512
    max_thinking_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    force_ids: list[int] = field(default_factory=list)  # emitted first, as if sampled (guided decoding)
    min_new_tokens: int = 0  # stop tokens are masked until this many tokens are generated (benchmarks)


@dataclass
class Result:
    token_ids: list[int]  # generated (incl. forced), ending with a stop token when `stopped`
    stopped: bool  # a stop token ended it (False: max_new_tokens)
    prefill_tokens: int  # prompt tokens fed (not covered by the reused cache)
    reused_tokens: int  # prompt tokens served from the cache
    forced_think_close: int  # 1 when the thinking budget closed the think block
    cache_tokens: int  # cache length after the step
    wall_s: float


class _Row:
    """A request in flight: its sampling state and where it sits in the running batch."""

    def __init__(self, req: Request, engine: InferenceEngine):
        self.req = req
        self.done = threading.Event()
        self.result: Result | None = None
        self.error: BaseException | None = None
        self.t0 = time.perf_counter()
        self.generated: list[int] = []
        self.fed: list[int] = []  # token ids the row's cache covers
        self.length = 0  # == len(self.fed)
        self.pad = 0  # left padding inside the batch
        self.force = list(req.force_ids)
        self.gen = None
        if req.temperature > 0:
            self.gen = torch.Generator().manual_seed(int(req.seed) & 0x7FFFFFFFFFFFFFFF)
        self.in_think = bool(req.prompt_ids) and req.prompt_ids[-1] == engine.think_open_id
        self.think_tokens = 0
        self.forced_close = 0
        self.prefill_tokens = 0
        self.reused_tokens = 0


class InferenceEngine:
    """Batched, KV-cached decoding for many concurrent episodes (see the module docstring).

    `generate(requests)` runs a list of requests to completion (synchronous); `submit(request)` is
    the thread-safe form used by concurrent episodes: it blocks until that request is done, while a
    worker thread batches it with whatever else is pending. Statistics (decode tokens, forward
    passes, wall time inside forwards) accumulate in `stats`."""

    def __init__(self, model: Any, renderer: Any, *, max_batch_size: int = 16, think_open: str | None = None,
                 think_close: str | None = None):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"engine.max_batch_size must be a positive int, got {max_batch_size!r}")
        self.model = model
        self.renderer = renderer
        self.max_batch_size = max_batch_size
        tok = renderer.tokenizer
        self.stop_ids = {int(i) for i in renderer.stop_token_ids}
        think = getattr(renderer, "think", ("<think>", "</think>"))
        self.think_open_id = self._token_id(tok, think_open or think[0])
        self.think_close_id = self._token_id(tok, think_close or think[1])
        p = next(model.parameters())
        self.device = p.device
        self.stats = {"decode_tokens": 0, "prefill_tokens": 0, "reused_tokens": 0, "forwards": 0, "forward_s": 0.0,
                      "requests": 0, "max_batch": 0}
        self._queue: queue.Queue[_Row] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @staticmethod
    def _token_id(tok: Any, text: str) -> int | None:
        i = tok.convert_tokens_to_ids(text)
        return None if i is None or i == tok.unk_token_id else int(i)

    # -- public ---------------------------------------------------------------------------
    def generate(self, requests: Sequence[Request]) -> list[Result]:
        """Run `requests` together (up to max_batch_size at a time) in this thread. Not to be mixed
        with concurrent `submit` calls on the same engine (one model, one decoding thread)."""
        rows = [_Row(r, self) for r in requests]
        pending = list(rows)
        batch: list[_Row] = []
        state = None
        while pending or batch:
            while pending and len(batch) < self.max_batch_size:
                row = pending.pop(0)
                if self._admit(row):
                    state = self._join(state, batch, row)
            state = self._decode_step(state, batch)
        for r in rows:
            if r.error is not None:
                raise r.error
        return [r.result for r in rows]  # type: ignore[misc]

    def submit(self, request: Request) -> Result:
        """Thread-safe: enqueue `request`, wait for it, return its result."""
        row = _Row(request, self)
        with self._lock:
            if self._closed:
                raise RuntimeError("InferenceEngine.submit after close()")
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._serve, name="inference-engine", daemon=True)
                self._worker.start()
        self._queue.put(row)
        while not row.done.wait(1.0):
            if not self._worker.is_alive():  # never wait forever on a dead worker
                raise RuntimeError("the inference engine's worker thread died; see the log for its exception")
        if row.error is not None:
            raise row.error
        return row.result  # type: ignore[return-value]

    def close(self) -> None:
        """Stop the worker thread (idle engines cost nothing, but tests should not leak threads)."""
        with self._lock:
            self._closed = True
            worker = self._worker
        if worker is not None and worker.is_alive():
            self._queue.put(None)  # type: ignore[arg-type]
            worker.join(timeout=30)

    # -- worker ---------------------------------------------------------------------------
    def _serve(self) -> None:
        batch: list[_Row] = []
        state = None
        while True:
            try:
                # Block only when nothing is in flight; otherwise admit what is waiting and keep decoding.
                while len(batch) < self.max_batch_size:
                    row = self._queue.get(block=not batch)
                    if row is None:
                        for r in batch:
                            r.error = RuntimeError("engine closed")
                            r.done.set()
                        return
                    if self._admit(row):
                        try:
                            state = self._join(state, batch, row)
                        except BaseException as e:  # noqa: BLE001 - e.g. out of memory growing the batch: fail this request only
                            row.error = e
                            row.done.set()
            except queue.Empty:
                pass
            try:
                state = self._decode_step(state, batch)
            except BaseException as e:  # surface to every waiting episode, keep serving new ones
                log.exception("decode step failed")
                for r in batch:
                    r.error = e
                    r.done.set()
                batch.clear()
                state = None

    # -- mechanics ------------------------------------------------------------------------
    @torch.no_grad()
    def _forward(self, ids_BT: torch.Tensor, cache: Any, mask_BS: torch.Tensor | None, pos_BT: torch.Tensor):
        """One forward that appends to `cache` (a DynamicCache, or per-layer (k, v) tensors / None
        to start one); -> (last-position logits [B, V] float32, the cache)."""
        if not hasattr(cache, "layers"):
            cache = _make_cache(cache)
        t0 = time.perf_counter()
        out = self.model(input_ids=ids_BT.to(self.device), cache=cache, use_cache=True, logits_to_keep=1,
                         attention_mask=None if mask_BS is None else mask_BS.to(self.device),
                         position_ids=pos_BT.to(self.device))
        self.stats["forward_s"] += time.perf_counter() - t0
        self.stats["forwards"] += 1
        return out.logits[:, -1, :].float().cpu(), cache  # sampling runs on CPU with per-row CPU generators

    def _admit(self, row: _Row) -> bool:
        """Prefill one request (alone: prompts differ in length, and a prefill is one forward
        anyway). -> False when the request finished during prefill (forced stop)."""
        try:
            req = row.req
            prompt = list(req.prompt_ids)
            if not prompt:
                raise ValueError("Request.prompt_ids is empty; render a prompt first")
            self.stats["requests"] += 1
            layers, covered = None, 0
            if req.cache is not None and req.cache.layers is not None:
                # Longest common prefix, but feed at least one token: the next-token logits need a forward.
                k = common_prefix(req.cache.ids, prompt)
                k = min(k, len(prompt) - 1)
                if k > 0:
                    layers = [(kk[:, :, :k], vv[:, :, :k]) for kk, vv in req.cache.layers]
                    covered = k
            # Forced tokens that are all known can ride along with the prefill (one forward).
            n_force = len(row.force)
            feed = prompt[covered:] + row.force
            pos = torch.arange(covered, covered + len(feed)).unsqueeze(0)
            logits, cache = self._forward(torch.tensor([feed]), layers, None, pos)
            row.prefill_tokens = len(prompt) - covered
            row.reused_tokens = covered
            self.stats["prefill_tokens"] += row.prefill_tokens
            self.stats["reused_tokens"] += covered
            row.fed = prompt + row.force
            row.length = len(row.fed)
            row.cache = cache
            row.logits = logits[0]
            for t in row.force:
                self._account(row, t)
            row.force = []
            if n_force and (row.generated[-1] in self.stop_ids or len(row.generated) >= req.max_new_tokens):
                self._finish(row, _layers(cache))
                return False
            return True
        except BaseException as e:  # noqa: BLE001 - any failure belongs to the waiting request
            row.error = e
            row.done.set()
            return False

    def _account(self, row: _Row, tok: int) -> None:
        row.generated.append(tok)
        if tok == self.think_open_id:
            row.in_think, row.think_tokens = True, 0
        elif tok == self.think_close_id:
            row.in_think = False
        elif row.in_think:
            row.think_tokens += 1

    def _join(self, state, batch: list[_Row], row: _Row):
        """Add an admitted row to the running batch: left-pad the batch or the row to a common length."""
        if not batch:
            batch.append(row)
            row.pad = 0
            return {"cache": row.cache, "mask": torch.ones(1, row.length, dtype=torch.long)}
        S = state["mask"].shape[1]
        L = row.length
        grow = max(0, L - S)  # the batch is padded further left when the new row is longer
        S2 = S + grow
        layers = []
        for (k_BHSD, v_BHSD), (k_1HLD, v_1HLD) in zip(_layers(state["cache"]), _layers(row.cache)):
            layers.append((torch.cat([_pad_left(k_BHSD, grow), _pad_left(k_1HLD, S2 - L)], 0),
                           torch.cat([_pad_left(v_BHSD, grow), _pad_left(v_1HLD, S2 - L)], 0)))
        mask = torch.cat([_pad_left(state["mask"], grow, dim=1),
                          torch.cat([torch.zeros(1, S2 - L, dtype=torch.long), torch.ones(1, L, dtype=torch.long)], 1)], 0)
        for r in batch:
            r.pad += grow
        row.pad = S2 - L
        batch.append(row)
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        row.cache = None
        return {"cache": _make_cache(layers), "mask": mask}

    def _choose(self, row: _Row) -> int:
        req = row.req
        if row.in_think and req.max_thinking_tokens is not None and row.think_tokens >= req.max_thinking_tokens \
                and self.think_close_id is not None:
            row.forced_close = 1
            return self.think_close_id  # the think block ran over its budget: close it, the model goes on
        logits = row.logits
        if len(row.generated) < req.min_new_tokens:
            logits = logits.clone()
            logits[list(self.stop_ids)] = float("-inf")
        if req.temperature <= 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits / req.temperature, dim=-1)
        if req.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < req.top_p  # smallest set with mass >= top_p
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=row.gen))

    def _decode_step(self, state, batch: list[_Row]):
        """Choose each row's next token; finished rows leave; the rest run one batched forward."""
        if not batch:
            return None
        keep, finished = [], []
        for i, row in enumerate(batch):
            tok = self._choose(row)
            self._account(row, tok)
            self.stats["decode_tokens"] += 1
            if tok in self.stop_ids or len(row.generated) >= row.req.max_new_tokens:
                finished.append(i)
            else:
                keep.append(i)
        for i in finished:
            row = batch[i]
            # a copy, so the episode does not keep the whole batch's tensors alive
            self._finish(row, [(k[i:i + 1, :, row.pad:].clone(), v[i:i + 1, :, row.pad:].clone())
                               for k, v in _layers(state["cache"])])
        if finished:
            if not keep:
                batch.clear()
                return None
            idx = torch.tensor(keep)
            rows = [batch[i] for i in keep]
            trim = min(r.pad for r in rows)  # drop padding no remaining row needs
            state = {"cache": _make_cache([(k[idx, :, trim:], v[idx, :, trim:]) for k, v in _layers(state["cache"])]),
                     "mask": state["mask"][idx, trim:]}
            for r in rows:
                r.pad -= trim
            batch[:] = rows
        ids = torch.tensor([[r.generated[-1]] for r in batch])
        pos = torch.tensor([[r.length] for r in batch])
        mask = torch.cat([state["mask"], torch.ones(len(batch), 1, dtype=torch.long)], 1)
        # One row needs no mask (and gives the exact single-sequence computation).
        logits_BV, cache = self._forward(ids, state["cache"], None if len(batch) == 1 else mask, pos)
        for j, r in enumerate(batch):
            r.logits = logits_BV[j]
            r.fed.append(r.generated[-1])
            r.length += 1
        return {"cache": cache, "mask": mask}

    def _finish(self, row: _Row, kv) -> None:
        req = row.req
        if req.cache is not None:
            req.cache.ids = list(row.fed)
            req.cache.layers = kv
        row.result = Result(token_ids=list(row.generated), stopped=row.generated[-1] in self.stop_ids,
                            prefill_tokens=row.prefill_tokens, reused_tokens=row.reused_tokens,
                            forced_think_close=row.forced_close, cache_tokens=len(row.fed),
                            wall_s=time.perf_counter() - row.t0)
        row.done.set()


def _make_cache(layers: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Any:
    """A DynamicCache holding `layers`, filled through its public `update` (full-length layers for
    every model: a sliding-window model's masks still restrict attention, and cropping stays exact)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for i, (k, v) in enumerate(layers or ()):
        cache.update(k, v, i)
    return cache


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (keys, values) of a DynamicCache (its public iteration yields them per layer)."""
    return [(kv[0], kv[1]) for kv in cache]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _pad_left(x: torch.Tensor, n: int, dim: int = 2) -> torch.Tensor:
    if n <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim)
