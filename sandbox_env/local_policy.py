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

import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sandbox_env.policies import AssistantStep, EpisodeState, Policy, ToolCall

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, None: None, "auto": None}


# ----------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    """A checkpoint ready to decode: the model (eval mode), its tokenizer, and what kind it was."""

    model: Any
    tokenizer: Any
    kind: str  # "hf" (BF16/FP32 HF dir), "fake_quant" (QAT training checkpoint), "int4" (compressed-tensors)
    path: str


def checkpoint_kind(path: str | Path) -> str:
    """What a checkpoint directory holds, from the files present: "int4" when config.json has a
    compressed-tensors quantization_config, "fake_quant" when a qat_config.json sits beside the
    weights (a training checkpoint), "hf" otherwise."""
    p = Path(path)
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"checkpoint path={str(p)!r} has no config.json; point it at a Hugging Face model dir, "
                         "a training checkpoint (runs/.../step_000100) or an INT4 export dir")
    qc = json.loads(cfg_file.read_text()).get("quantization_config") or {}
    if qc.get("quant_method") == "compressed-tensors":
        return "int4"
    if (p / "qat_config.json").is_file():
        return "fake_quant"
    return "hf"


def load_policy_model(path: str | Path, *, dtype: str | torch.dtype | None = None, device: str = "cpu",
                      tokenizer_path: str | Path | None = None, ptq: str | None = None,
                      ptq_config: dict | None = None) -> LoadedModel:
    """Load any checkpoint the project makes as an evaluation model.

    - "hf": `AutoModelForCausalLM.from_pretrained`.
    - "fake_quant": the same, then `qat.prepare` with the saved QuantConfig and the saved observer
      state, so the evaluated model is exactly the fake-quant model training optimised.
    - "int4": `qat.load.load_int4` (packed INT4 experts, int4 kernels).
    `dtype`: "float32" | "bfloat16" | "float16" | None (as saved). `ptq`: a `qat.ptq` method
    ("rtn", "rtn_mse", "nf4_b32", ...) applied in memory to the routed experts of an "hf"
    checkpoint: the post-training-quantization baselines of the comparison (kind "ptq:<method>")."""
    from transformers import AutoModelForCausalLM

    from data.tokenizer import load_tokenizer

    if isinstance(dtype, str) or dtype is None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; choose one of {[k for k in DTYPES if k]} or null")
        torch_dtype = DTYPES[dtype]
    else:
        torch_dtype = dtype
    kind = checkpoint_kind(path)
    p = Path(path)
    if kind == "int4":
        from qat.load import load_int4

        model = load_int4(str(p), dtype=torch_dtype, device=device)
    else:
        if kind == "fake_quant":
            from qat.export import load_qat_checkpoint

            model = load_qat_checkpoint(p, dtype=torch_dtype or "auto").to(device)
        else:
            model = AutoModelForCausalLM.from_pretrained(str(p), dtype=torch_dtype or "auto").to(device)
    if ptq:
        if kind != "hf":
            raise ValueError(f"ptq={ptq!r} applies to a dense HF checkpoint, but {str(p)!r} is a {kind} checkpoint; "
                             "point path at the BF16 model the baseline quantizes")
        from qat.ptq import METHODS, apply_ptq

        if ptq not in METHODS:
            raise ValueError(f"ptq={ptq!r} is not a calibration-free qat.ptq method; choose one of {list(METHODS)} "
                             f"(GPTQ: evaluate the checkpoint `python -m train.ptq` writes)")
        from qat import QuantConfig

        apply_ptq(model, ptq, QuantConfig(**ptq_config) if ptq_config else None)
        kind = f"ptq:{ptq}"
    model.eval()
    tok_dir = Path(tokenizer_path) if tokenizer_path else p
    if not any((tok_dir / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"checkpoint {str(p)!r} has no tokenizer files; pass tokenizer_path= (the training "
                         "run's tokenizer dir)")
    return LoadedModel(model, load_tokenizer(tok_dir), kind, str(p))


def checkpoint_bytes(path: str | Path) -> int:
    """Bytes of the weight files (*.safetensors, *.bin) of a checkpoint dir: its size on disk as a model."""
    p = Path(path)
    return sum(f.stat().st_size for f in p.iterdir() if f.suffix in (".safetensors", ".bin") and f.is_file())


# ----------------------------------------------------------------------------- the engine


@dataclass
class SamplingConfig:
    """How tokens are chosen. temperature 0 = greedy (argmax)."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    """per assistant step; the episode's max_total_tokens budget lowers it further"""

    def __post_init__(self):
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be a positive int, got {self.max_new_tokens!r}")


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
                k = _common_prefix(req.cache.ids, prompt)
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
    """A DynamicCache holding `layers` (full-length layers for every model: a sliding-window model's
    masks still restrict attention, and cropping stays exact)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers) if layers else DynamicCache()


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
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


# ----------------------------------------------------------------------------- the policy


def assistant_body_ids(renderer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                       step: AssistantStep) -> list[int]:
    """The token ids a model must emit for `step` after `render_prompt(messages, tools)`: the
    labelled tokens of that assistant message in the training render (train/inference parity)."""
    msg: dict[str, Any] = {"role": "assistant", "content": step.content or "", "reasoning_content": step.reasoning_content or ""}
    if step.tool_calls:
        msg["tool_calls"] = [{"id": c.id or f"call_g{j}", "type": "function",
                              "function": {"name": c.name, "arguments": c.arguments}}
                             for j, c in enumerate(step.tool_calls)]
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
    """A local checkpoint as the rollout policy (the `Policy` protocol of sandbox_env.policies).

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
        errors = [c["error"] for c in parsed["tool_calls"] if "error" in c] + ([parsed["error"]] if "error" in parsed else [])
        n["parse_errors"] = n.get("parse_errors", 0) + len(errors)
        calls = []
        for c in parsed["tool_calls"]:
            fn = c["function"]
            calls.append(ToolCall(name=fn.get("name") or "", arguments=fn.get("arguments") if fn.get("arguments") is not None else "",
                                  id=c.get("id")))
        return AssistantStep(reasoning_content=parsed.get("reasoning_content") or "", content=parsed.get("content") or "",
                             tool_calls=calls)


def _seed_of(task_id: str, seed: int, step: int) -> int:
    """A sampling seed per (task, episode seed, step): the same across models and batch compositions."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{task_id}|{seed}|{step}".encode()).digest()[:8], "big") >> 1


# ----------------------------------------------------------------------------- tiny models


_TINY_TOKENIZERS: dict[int, Any] = {}


def tiny_model_and_tokenizer(seed: int = 0, *, vocab_size: int = 512, layers: int = 2, hidden: int = 64,
                             experts: int = 4, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny Qwen3-MoE (the `tiny_qwen3_moe` preset, shrunk) and the tiny
    K2-style tokenizer trained on data.testing's fixtures: for tests, benchmarks and smoke runs.
    Expert widths are multiples of 32, so qat.prepare and INT4 export apply. No copy circuit (it needs
    a hidden size of at least 193: train/copy_circuit.py)."""
    from data.testing import tiny_tokenizer
    from train.models import build_model, load_preset

    if vocab_size not in _TINY_TOKENIZERS:  # training the tokenizer takes a second; do it once
        _TINY_TOKENIZERS[vocab_size] = tiny_tokenizer(vocab_size=vocab_size, n_records=20)
    tok = _TINY_TOKENIZERS[vocab_size]
    torch.manual_seed(seed)
    model = build_model(dict(load_preset("tiny_qwen3_moe"), copy_circuit=None), vocab_size=len(tok), hidden_size=hidden,
                        intermediate_size=2 * hidden, moe_intermediate_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=experts)
    return model.to(dtype).eval(), tok
