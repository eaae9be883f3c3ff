"""The training job's config as dataclasses: the schema of conf/train.yaml and its groups.

`python -m train` composes conf/train.yaml onto `TrainConfig` (registered as `train_schema`, the
first entry of its defaults list), so every group option (model/, data/, qat/, optim/, logger/,
experiment/) merges into a typed node: a misspelled key or a wrong type fails at composition, with
Hydra's error naming the key. The defaults live here and only here; a YAML file says what differs.

The quantizer and its schedule are two nodes: `qat` is a `qat.QuantConfig` (what the fake quant
computes; `qat=none` sets it to null for the BF16 run), `qat_schedule` says when it runs during
training (from which step, observer refreshes, SQNR logging, GPTQ init); it is ignored when
`qat` is null. What a schema cannot say (ranges, choices, regexes, a required data path) is
checked by `train.recipe.validate_config`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from qat.config import QuantConfig
from qat.jobs import register_schema


@dataclass
class ModelConfig:
    """A model preset (conf/model/*.yaml), read by `train.models.build_model`."""

    family: str = "qwen3_moe"
    """One of train.models.FAMILIES: qwen3_moe, qwen2_moe, mixtral, olmoe, deepseek_v3, gpt_oss."""
    path: str | None = None
    """A local HF checkpoint dir; null = build from `config` with random init."""
    dtype: str = "float32"
    """Master weights: float32 on CPU; bfloat16 on GPU."""
    experts_implementation: str | None = None
    """null = transformers' default (grouped_mm); eager | batched_mm | grouped_mm."""
    copy_circuit: dict[str, Any] | None = None
    """Opt-in: {} installs hand-set induction heads at random init (train/copy_circuit.py CopyCircuit fields)."""
    upcycle: dict[str, Any] | None = None
    """Set when `path` is built by `python -m train.upcycle` (conf/upcycle.yaml keys)."""
    config: dict[str, Any] = field(default_factory=dict)
    """transformers config overrides (sizes of a tiny preset, or changes to a checkpoint's config.json)."""


@dataclass
class DataConfig:
    """Trajectories -> rows (data/pipeline.py build_dataloader). Every key but `path` and
    `tokenizer_vocab_size` is a build_dataloader argument of the same name."""

    path: str | None = None
    """Trajectories: a HF datasets dir (sandbox_env.generate) or a .jsonl in OpenAI/HF message form. Required."""
    seq_len: int = 512
    """Tokens per row; longer trajectories are split at step boundaries, what cannot fit is counted.
    Pick it with `python -m data.report <data> --seq-len N`."""
    packing: bool = True
    """Whole documents packed into rows, positions restart per document; false = one document per row, padded."""
    mask_4d: str | None = None
    """null: the model runs with use_cache=False; a dtype (bfloat16) adds a [B,1,T,T] mask. Null in padded mode."""
    streaming: bool = False
    """true reads lazily (larger-than-memory data), but len() is unknown and there is no held-out split."""
    shuffle_buffer: int = 1024
    """Streaming only: documents held for shuffling (more = better mixing, more memory)."""
    on_error: str = "raise"
    """raise | skip: skip drops invalid records, counts and logs them."""
    tokenizer_vocab_size: int = 2048
    """Tiny model only: BPE vocab trained on the training split."""


@dataclass
class QATSchedule:
    """When the fake quant runs during training, and where QAT starts from (used only when qat is set)."""

    start_step: int = 0
    """Fake quant from this optimizer step on (0 = from the start)."""
    refresh_every: int = 50
    """mse observer: re-search the clipping ratios every N steps (0 = only when the fake quant turns on)."""
    log_every: int = 10
    """Steps between per-expert-tensor-group SQNR rows in the metrics log (0 = never)."""
    init: str | None = None
    """null = the model's weights | gptq = start QAT from GPTQ (qat/gptq.py) on the training data."""
    init_samples: int = 64
    """init=gptq: calibration documents from the training split."""


@dataclass
class OptimConfig:
    """The optimizer and its LR schedule: linear warmup, then cosine / linear decay or constant."""

    name: str = "adamw"
    """adamw (torch) | adamw_8bit (bitsandbytes: 8-bit states, ~75% less optimizer memory; not with ZeRO)."""
    lr: float = 3.0e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1.0e-8
    weight_decay: float = 0.1
    """On matrices only; norms, biases and learned QAT scales get none."""
    scheduler: str = "cosine"
    """cosine | linear | constant (after warmup)."""
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    """Final lr / peak lr (cosine and linear)."""


@dataclass
class LoggerConfig:
    """metrics.jsonl is always written; `wandb` mirrors it through accelerate's tracker."""

    backend: str = "jsonl"
    """jsonl | wandb."""
    mode: str = "offline"
    """wandb: offline (sync later with `wandb sync`) | online | disabled."""
    project: str = "agentic-qat"
    name: str | None = None
    """wandb run name; null = wandb's."""
    id: str | None = None
    """Set to resume the same wandb run."""
    tags: list[str] = field(default_factory=list)


@dataclass
class CheckpointConfig:
    every: int = 100
    """Steps between checkpoints (0 = only the final one)."""
    keep_last: int | None = 3
    """Older complete checkpoints are deleted; null keeps all."""
    on_stop: bool = True
    """Also save when stopping at stop_at_step."""


@dataclass
class EvalConfig:
    every: int = 50
    """Steps between held-out loss evaluations (0 = never)."""
    val_fraction: float = 0.05
    """Share of trajectories held out (deterministic given seed)."""
    max_batches: int = 16
    """Cap on held-out batches per evaluation (0 = all)."""


@dataclass
class TrainConfig:
    """conf/train.yaml: trajectories -> checkpoints, with INT4 QAT on the routed experts (train/recipe.py)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    qat: QuantConfig | None = field(default_factory=QuantConfig)
    """The fake quantizer (qat.QuantConfig); null = no fake quant, the BF16 run (qat=none)."""
    qat_schedule: QATSchedule = field(default_factory=QATSchedule)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    max_steps: int = 200
    """Optimizer steps; the LR schedule spans exactly these."""
    stop_at_step: int | None = None
    """Stop early (as if preempted) after this step, keeping the schedule of max_steps."""
    micro_batch_size: int = 8
    """Rows per process per forward."""
    grad_accum_steps: int = 1
    """Global batch = micro_batch_size x grad_accum_steps x processes rows."""
    precision: str = "auto"
    """auto = bf16 autocast on GPU, fp32 on CPU | bf16 | fp32."""
    clip_grad_norm: float | None = 1.0
    """Max global grad norm; null disables clipping."""
    activation_checkpointing: bool = False
    """true recomputes each layer in backward: much less activation memory, ~one extra forward of compute."""
    router_aux_loss_coef: float | None = None
    """Load-balancing loss weight; null = the model config's own (0.01 for Qwen3-MoE)."""
    trainable: str | None = None
    """Regex over parameter names that train (others frozen); e.g. 'mlp\\.experts\\.' = experts only."""
    ddp_find_unused_parameters: bool = False
    """true if some parameters get no gradient in a step (eager experts with unhit experts)."""
    threads: int | None = None
    """torch intra-op threads per process; null = torch's default."""
    progress_bar: bool = True
    """tqdm bar on rank 0: loss, tokens/s, ETA."""
    log_every: int = 1
    """Steps between metrics.jsonl rows."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    resume: str | None = None
    """null = fresh start | auto = latest complete checkpoint in <output_dir>/checkpoints | a path."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str | None = "outputs/train/${now:%Y-%m-%d_%H-%M-%S}"
    """Where the run writes (checkpoints/, metrics.jsonl, loss_curve.png, config.yaml). ${now:...}
    resolves in each process: with several processes pass output_dir explicitly."""


register_schema("train", TrainConfig)
