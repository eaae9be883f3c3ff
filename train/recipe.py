"""The training job as one readable recipe: setup -> train -> save_checkpoint -> cleanup.

Trajectories in, checkpoints out: it builds the model (train.models), the data stream (data/),
puts INT4 fake quant on the routed experts (qat.prepare), and trains with accelerate, so the same
file runs on one CPU, on eight GPUs (DDP or DeepSpeed ZeRO-2/3) and across nodes.

QAT enters in exactly two places, as in torchtune: `qat.prepare(model, cfg)` in setup, and
`set_fake_quant(model, step >= qat_schedule.start_step)` at the top of every optimizer step (plus the mse
observers' refresh every `qat_schedule.refresh_every` steps and SQNR logging per expert tensor group).

The one idea that makes runs comparable across world sizes: every process reads the SAME stream
of micro-batches and keeps every world_size-th one, and the loss of an optimizer step is the sum
of token losses over the whole global batch divided by its number of loss tokens (counted
locally, since every rank sees every batch). So 1 process x 2 accumulation steps, 2 processes
(DDP, ZeRO-2, ZeRO-3) x 1, and resumes from any checkpoint all compute the same function of the
same data; only float summation order differs. The cost is that every rank collates every
micro-batch (cheap next to an MoE forward); a bonus is that the data position in a checkpoint
does not depend on the number of processes.

Tensor names: B batch rows, T tokens per row, V vocab.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data.render import IGNORE_INDEX

from . import checkpoint as ckpt
from .metrics import LOGGER_BACKENDS, WANDB_MODES, MetricsLogger, plot_loss_curve, wandb_init_kwargs
from .schedules import SCHEDULERS, build_scheduler, fake_quant_on

log = logging.getLogger("train")

PRECISIONS = ("auto", "bf16", "fp32")
OPTIMIZERS = ("adamw", "adamw_8bit")
QAT_INITS = (None, "gptq")


def validate_config(cfg: DictConfig) -> None:
    """User errors in the job config that its schema (train.config.TrainConfig: keys and types,
    checked at composition) cannot express: ranges, choices, regexes, the required data path.
    Found before anything is built; each names the setting."""

    def at_least(key: str, value: int, minimum: int = 1) -> None:
        if value < minimum:
            raise ValueError(f"{key}={value!r}: must be an integer >= {minimum}")

    at_least("max_steps", cfg.max_steps)
    at_least("micro_batch_size", cfg.micro_batch_size)
    at_least("grad_accum_steps", cfg.grad_accum_steps)
    at_least("log_every", cfg.log_every)
    at_least("checkpoint.every", cfg.checkpoint.every, minimum=0)
    at_least("eval.every", cfg.eval.every, minimum=0)
    if cfg.stop_at_step is not None:
        at_least("stop_at_step", cfg.stop_at_step)
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"precision={cfg.precision!r}: choose one of {PRECISIONS} (auto = bf16 on GPU, fp32 on CPU)")
    if cfg.precision == "bf16" and not torch.cuda.is_available():
        log.warning("precision=bf16 on a CPU host: autocast to bf16 on CPU works but is slow; precision=fp32 is faster here")
    o = cfg.optim
    if o.name not in OPTIMIZERS:
        raise ValueError(f"optim.name={o.name!r}: choose one of {OPTIMIZERS} (optim=adamw or optim=adamw_8bit)")
    if o.scheduler not in SCHEDULERS:
        raise ValueError(f"optim.scheduler={o.scheduler!r}: choose one of {SCHEDULERS}")
    if not o.lr > 0:
        raise ValueError(f"optim.lr={o.lr!r}: must be a positive number, e.g. optim.lr=3e-4")
    at_least("optim.warmup_steps", o.warmup_steps, minimum=0)
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ValueError(f"optim.min_lr_ratio={o.min_lr_ratio!r}: must be in [0, 1] (the final lr / peak lr)")
    if cfg.logger.backend not in LOGGER_BACKENDS:
        raise ValueError(f"logger.backend={cfg.logger.backend!r}: choose one of {LOGGER_BACKENDS} (logger=jsonl or logger=wandb)")
    if cfg.logger.mode not in WANDB_MODES:
        raise ValueError(f"logger.mode={cfg.logger.mode!r}: choose one of {WANDB_MODES}")
    if cfg.clip_grad_norm is not None and not cfg.clip_grad_norm > 0:
        raise ValueError(f"clip_grad_norm={cfg.clip_grad_norm!r}: a positive max norm, or null to disable clipping")
    if cfg.trainable is not None:
        try:
            re.compile(cfg.trainable)
        except re.error as e:
            raise ValueError(f"trainable={cfg.trainable!r} is not a valid regex ({e}); e.g. trainable='mlp\\.experts\\.'") from None
    if cfg.data.path is None:
        raise ValueError("data.path is not set: point it at a trajectories dataset dir or .jsonl "
                         "(made by `python -m sandbox_env.generate`), e.g. data.path=outputs/trajectories")
    if not 0.0 <= cfg.eval.val_fraction < 1.0:
        raise ValueError(f"eval.val_fraction={cfg.eval.val_fraction!r}: must be in [0, 1)")
    if cfg.qat is not None:
        s = cfg.qat_schedule
        at_least("qat_schedule.start_step", s.start_step, minimum=0)
        at_least("qat_schedule.refresh_every", s.refresh_every, minimum=0)
        at_least("qat_schedule.log_every", s.log_every, minimum=0)
        if s.init not in QAT_INITS:
            raise ValueError(f"qat_schedule.init={s.init!r}: choose one of {QAT_INITS} (null = the model's own "
                             f"weights; gptq = start from GPTQ calibrated on the training data)")
        if s.init == "gptq":
            at_least("qat_schedule.init_samples", s.init_samples)


class TrainRecipe:
    """One training run. `setup()` builds everything (and resumes), `train()` loops, `cleanup()` closes."""

    def __init__(self, cfg: DictConfig):
        validate_config(cfg)
        self.cfg = cfg
        self.step = 0  # optimizer steps done
        self.tokens_seen = 0
        self.epoch = 0
        self.resumed_from: Path | None = None
        self.last_loss = float("nan")

    # ------------------------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_accelerator()
        self._setup_run_dir()
        self._setup_tokenizer_and_data()
        self._setup_model()
        self._setup_optimizer()
        self._prepare_distributed()
        self._maybe_resume()
        self._setup_logging()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, set_seed

        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(int(cfg.threads))
        use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
        on_gpu = torch.cuda.is_available()
        precision = cfg.precision if cfg.precision != "auto" else ("bf16" if on_gpu else "fp32")
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("LOCAL_RANK", "-1")) >= 0
        kwargs_handlers = [DistributedDataParallelKwargs(find_unused_parameters=bool(cfg.ddp_find_unused_parameters))]
        if not on_gpu and launched:
            # Without CUDA, accelerate's default backend is none: each rank would report itself as the
            # only process and train alone. gloo is the CPU collective backend (DDP and DeepSpeed alike);
            # cpu=True is what makes accelerate wrap DDP on CPU, but it must stay False for DeepSpeed,
            # whose CPU accelerator (DS_ACCELERATOR=cpu) does its own wrapping.
            kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
        self.accelerator = Accelerator(
            cpu=not on_gpu and not use_deepspeed,
            mixed_precision="bf16" if precision == "bf16" else "no",
            gradient_accumulation_steps=cfg.grad_accum_steps,
            kwargs_handlers=kwargs_handlers,
            step_scheduler_with_optimizer=False,
            log_with="wandb" if cfg.logger.backend == "wandb" else None,
        )
        acc = self.accelerator
        launched_world = int(os.environ.get("WORLD_SIZE", "1"))
        if acc.num_processes != launched_world:
            raise ValueError(f"the launcher started {launched_world} processes but accelerate sees {acc.num_processes}; "
                               "every rank would train alone. Launch with torchrun or a conf/accelerate/*.yaml config")
        self.precision = precision
        self.world_size = acc.num_processes
        self.rank = acc.process_index
        self.is_main = acc.is_main_process
        self.deepspeed = acc.state.deepspeed_plugin if use_deepspeed else None
        self.zero_stage = self.deepspeed.zero_stage if self.deepspeed is not None else 0
        if not self.is_main:
            logging.getLogger().setLevel(logging.WARNING)  # log from rank 0 only
        how = f"DeepSpeed ZeRO-{self.zero_stage}" if self.deepspeed else str(acc.distributed_type).split(".")[-1]
        backend = acc.state.backend or "none"
        log.info("%d process(es), %s, torch.distributed backend %s%s, precision %s", self.world_size, how, backend,
                 " (CPU host: gloo)" if not on_gpu and self.world_size > 1 else "", precision)
        set_seed(cfg.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)

    def _setup_run_dir(self) -> None:
        from accelerate.utils import broadcast_object_list

        out = self.cfg.output_dir
        if out is None:
            from hydra.core.hydra_config import HydraConfig

            if not HydraConfig.initialized():
                raise ValueError("output_dir is null and no Hydra run is active: set output_dir=/path/to/run")
            out = HydraConfig.get().runtime.output_dir
        # `${now:...}` in Hydra's run dir resolves per process and can differ by a second across
        # ranks: every rank takes rank 0's, so checkpoints and logs land in one place.
        box = [str(out)]
        if self.world_size > 1:
            broadcast_object_list(box, from_process=0)
        self.run_dir = Path(box[0]).resolve()
        self.ckpt_root = self.run_dir / "checkpoints"
        if self.is_main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(OmegaConf.to_yaml(self.cfg, resolve=True))
        self.resume_path = ckpt.resolve_resume(self.cfg.resume, self.ckpt_root)
        log.info("run dir %s%s", self.run_dir, f"; resuming from {self.resume_path}" if self.resume_path else "")

    def _setup_tokenizer_and_data(self) -> None:
        from data.pipeline import build_dataloader, split_heldout
        from data.schema import iter_trajectories, read_trajectories
        from data.tokenizer import load_tokenizer, train_tokenizer

        cfg, d = self.cfg, self.cfg.data
        # Every key of conf/data/*.yaml but these two is a build_dataloader argument of the same name.
        loader_kw = {k: v for k, v in OmegaConf.to_container(d, resolve=True).items()
                     if k not in ("path", "tokenizer_vocab_size")}
        if d.get("streaming"):
            # Streamed data is never held in memory: no held-out split (eval needs streaming=false).
            train_source, train_records, val_records = str(d.path), None, []
            if cfg.eval.every:
                log.warning("data.streaming=true: no held-out split, so no held-out loss (eval.every ignored)")
        else:
            records = list(read_trajectories(d.path, on_error=d.get("on_error", "raise")))
            train_records, val_records = split_heldout(records, cfg.eval.val_fraction, cfg.seed)
            train_source = train_records
        if cfg.model.path is not None:
            tokenizer = load_tokenizer(cfg.model.path)
        elif self.resume_path is not None:
            tokenizer = load_tokenizer(self.resume_path)  # the vocab the checkpoint was trained with
        else:
            # The tiny model has no tokenizer: rank 0 trains one on the training split and all ranks
            # load that file, so every rank has the identical vocabulary.
            tok_dir = self.run_dir / "tokenizer"
            if self.is_main:
                corpus = train_records if train_records is not None else iter_trajectories(str(d.path))
                train_tokenizer(corpus, vocab_size=d.tokenizer_vocab_size).save_pretrained(tok_dir)
            self.accelerator.wait_for_everyone()
            tokenizer = load_tokenizer(tok_dir)
        self.tokenizer = tokenizer
        # rank=0, world_size=1 on purpose: every rank reads the same stream and keeps its share (module doc).
        common = dict(batch_size=cfg.micro_batch_size, rank=0, world_size=1, **loader_kw)
        self.train_loader = build_dataloader(train_source, tokenizer, seed=cfg.seed, shuffle=True, drop_last=True, **common)
        self.val_loader, self._val_batches = None, None
        if val_records and cfg.eval.every > 0:
            common["streaming"] = False
            self.val_loader = build_dataloader(val_records, tokenizer, seed=cfg.seed, shuffle=False, drop_last=False, **common)
        self._batches = iter(self.train_loader)
        self._train_records = train_records  # None when streamed; qat_schedule.init=gptq calibrates on them
        n_train = len(train_records) if train_records is not None else "streamed"
        log.info("data: %s training / %d held-out trajectories from %s, seq_len %d, packing %s",
                 n_train, len(val_records), d.path, d.seq_len, d.packing)

    def _setup_model(self) -> None:
        import qat
        from train.models import build_model

        cfg = self.cfg
        overrides = {}
        if cfg.model.path is None:
            overrides["vocab_size"] = len(self.tokenizer)
        else:
            # A preset's `config:` overrides are applied to a loaded checkpoint too; its own vocab must win
            # (e.g. model=tiny_qwen3_moe model.path=<a tiny checkpoint trained with another vocab size).
            saved = json.loads((Path(cfg.model.path) / "config.json").read_text())
            if "vocab_size" in saved:
                overrides["vocab_size"] = saved["vocab_size"]
        if self.zero_stage == 3:
            # transformers would build the model inside deepspeed.zero.Init (parameters partitioned,
            # shape [0]) whenever a ZeRO-3 config is alive; qat.prepare needs the real expert shapes,
            # so every rank builds the full model and accelerate.prepare partitions it afterwards.
            from transformers.integrations import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
        model = build_model(cfg.model, **overrides)  # build_model turns the DictConfig into plain dicts/lists
        if cfg.model.path is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
            model.config.eos_token_id = self.tokenizer.eos_token_id
        model.config.use_cache = False
        self.aux_coef = 0.0
        if hasattr(model.config, "router_aux_loss_coef"):
            # The load-balancing loss is added by this recipe (so it can be logged on its own), not by the model.
            coef = cfg.router_aux_loss_coef if cfg.router_aux_loss_coef is not None else model.config.router_aux_loss_coef
            self.aux_coef = float(coef)
        elif cfg.router_aux_loss_coef:
            log.warning("router_aux_loss_coef=%s ignored: %s has no load-balancing loss", cfg.router_aux_loss_coef,
                        type(model).__name__)
        if cfg.activation_checkpointing:
            # transformers v5 renamed it (the old name warns); non-reentrant works with ZeRO-3 and frozen inputs.
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.qat_cfg = None
        self.gptq_report = None
        if cfg.qat is not None:
            self.qat_cfg = OmegaConf.to_object(cfg.qat)  # a qat.QuantConfig, validated by its __post_init__
            if cfg.qat_schedule.init == "gptq" and self.resume_path is None:  # a resume loads trained weights
                self.gptq_report = self._gptq_init(model)
            qat.prepare(model, self.qat_cfg)  # logs what it quantized
            if self.gptq_report is not None and self.qat_cfg.observer in ("static", "lsq"):
                # QAT starts exactly at the GPTQ solution; the absmax / mse observers re-derive their
                # scales from the GPTQ weights (the same scale wherever GPTQ's codes reach the grid's end).
                from qat.ptq import set_scales

                set_scales(model, self.gptq_report.scales)
            qat.set_fake_quant(model, fake_quant_on(0, cfg.qat_schedule.start_step))
        self._apply_trainable(model)
        self.model = model
        if self.zero_stage == 3:
            self.deepspeed.set_deepspeed_weakref()

    def _gptq_init(self, model: torch.nn.Module):
        """qat_schedule.init=gptq: GPTQ of the routed experts on qat_schedule.init_samples documents of the training split."""
        from data.pipeline import calibration_batches
        from data.schema import iter_trajectories
        from qat.ptq import apply_ptq

        cfg = self.cfg
        n = cfg.qat_schedule.init_samples
        records = self._train_records
        if records is None:  # streamed: the first records (each gives at least one document)
            records = itertools.islice(iter_trajectories(str(cfg.data.path)), n)
        batches = calibration_batches(records, self.tokenizer, num_samples=n, seq_len=cfg.data.seq_len,
                                      batch_size=cfg.micro_batch_size, seed=cfg.seed)
        report = apply_ptq(model, "gptq", self.qat_cfg, calibration=batches)
        log.info("qat_schedule.init=gptq: %d calibration tokens, mean weight SQNR %.2f dB, %d expert tensors fell back to RTN",
                 report.calibration_tokens, report.mean_sqnr_db, len(report.rtn_fallback))
        return report

    def _apply_trainable(self, model: torch.nn.Module) -> None:
        pattern = self.cfg.trainable
        if pattern is None:
            return
        regex = re.compile(pattern)
        n_train = 0
        for name, p in model.named_parameters():
            p.requires_grad_(bool(regex.search(name)))
            n_train += p.numel() if p.requires_grad else 0
        if n_train == 0:
            names = [n for n, _ in model.named_parameters()][:8]
            raise ValueError(f"trainable={pattern!r} matches no parameter; names look like {names}")
        total = sum(p.numel() for p in model.parameters())
        log.info("trainable=%r: %s of %s parameters train (%.1f%%)", pattern, f"{n_train:,}", f"{total:,}", 100 * n_train / total)

    def _setup_optimizer(self) -> None:
        o = self.cfg.optim
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # Matrices decay; norms, biases and the QAT observers' learned scales do not.
            (decay if p.ndim >= 2 and "weight_fake_quant" not in name else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        groups = [g for g in groups if g["params"]]
        kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
        if o.name == "adamw_8bit":
            if self.deepspeed is not None:
                raise ValueError("optim=adamw_8bit does not combine with DeepSpeed ZeRO (it shards its own fp32 "
                                 "states); use optim=adamw, or launch without a DeepSpeed accelerate config")
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(groups, **kw)
        else:
            self.optimizer = torch.optim.AdamW(groups, **kw)
        self.scheduler = build_scheduler(self.optimizer, scheduler=o.scheduler, warmup_steps=o.warmup_steps,
                                         max_steps=self.cfg.max_steps, min_lr_ratio=float(o.min_lr_ratio))

    def _prepare_distributed(self) -> None:
        acc = self.accelerator
        if self.deepspeed is not None:
            self._fill_deepspeed_config()
            if self.zero_stage == 3:
                # ZeRO-3 gathers a module's parameters through hooks on every submodule. A rank whose
                # tokens route to no token of expert e never calls expert e's hooks while another does,
                # and the collectives deadlock; as leaves, the whole MoE block is gathered at once.
                from deepspeed.utils import set_z3_leaf_modules

                leaf_classes = moe_block_classes(self.model)
                set_z3_leaf_modules(self.model, leaf_classes)
                log.info("ZeRO-3 leaf modules: %s", [c.__name__ for c in leaf_classes])
        # The LR scheduler is stepped here once per optimizer step, not handed to accelerate (which
        # steps it world_size times per call) nor to DeepSpeed; it is saved via register_for_checkpointing.
        self.model, self.optimizer = acc.prepare(self.model, self.optimizer)
        acc.register_for_checkpointing(self.scheduler)

    def _fill_deepspeed_config(self) -> None:
        """Fills the DeepSpeed JSON's "auto" entries from this job's config (no dataloader is prepared)."""
        ds = self.deepspeed.deepspeed_config
        fills = {
            "train_micro_batch_size_per_gpu": self.cfg.micro_batch_size,
            "gradient_accumulation_steps": self.cfg.grad_accum_steps,
            "gradient_clipping": self.cfg.clip_grad_norm if self.cfg.clip_grad_norm is not None else 0.0,
            "train_batch_size": self.cfg.micro_batch_size * self.cfg.grad_accum_steps * self.world_size,
        }
        for key, value in fills.items():
            if ds.get(key, "auto") == "auto":
                ds[key] = value
        for key in ("bf16", "fp16"):
            if isinstance(ds.get(key), dict) and ds[key].get("enabled") == "auto":
                ds[key]["enabled"] = key == "bf16" and self.precision == "bf16"
        if "optimizer" in ds or "scheduler" in ds:
            raise ValueError("the DeepSpeed config defines an optimizer/scheduler; remove them: this job builds "
                             "its own (optim=...) so that every distributed mode runs the same numerics")

    def _maybe_resume(self) -> None:
        if self.resume_path is None:
            return
        import qat

        acc = self.accelerator
        acc.load_state(str(self.resume_path / "accelerate_state"))
        state = json.loads((self.resume_path / "trainer_state.json").read_text())
        self.step, self.tokens_seen, self.epoch = state["step"], state["tokens_seen"], state["epoch"]
        data_state = json.loads((self.resume_path / "data_state.json").read_text())
        self.train_loader.load_state_dict(data_state)
        self._batches = iter(self.train_loader)
        if self.qat_cfg is not None:
            qat.set_fake_quant(self._unwrapped(), fake_quant_on(self.step, self.cfg.qat_schedule.start_step))
        self.resumed_from = self.resume_path
        log.info("resumed from %s at step %d (%s tokens seen)", self.resume_path, self.step, f"{self.tokens_seen:,}")

    def _setup_logging(self) -> None:
        lg, acc = self.cfg.logger, self.accelerator
        if lg.backend == "wandb":  # accelerate's tracker; init_trackers and log act on the main process only
            acc.init_trackers(lg.project, config=OmegaConf.to_container(self.cfg, resolve=True),
                              init_kwargs=wandb_init_kwargs(OmegaConf.to_container(lg), self.run_dir))
        self.metrics = None
        if self.is_main:
            self.metrics = MetricsLogger(self.run_dir, resume_step=self.step if self.resumed_from else None,
                                         mirror=acc.log if lg.backend == "wandb" else None)

    # ------------------------------------------------------------------------------------ train
    def train(self) -> None:
        from tqdm.auto import tqdm

        import qat

        cfg = self.cfg
        stop = min(cfg.max_steps, cfg.stop_at_step or cfg.max_steps)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not self.is_main or not cfg.progress_bar,
                   desc="train", dynamic_ncols=True)
        self.model.train()
        while self.step < stop:
            if self.qat_cfg is not None:
                on = fake_quant_on(self.step, cfg.qat_schedule.start_step)
                qat.set_fake_quant(self._unwrapped(), on)
                # mse observers: re-search the clipping ratios every refresh_every steps, and when the
                # fake quant switches on (the ratios from prepare() belong to the initial weights).
                refresh = cfg.qat_schedule.refresh_every and self.step % cfg.qat_schedule.refresh_every == 0
                if on and (refresh or self.step == cfg.qat_schedule.start_step):
                    with self._gathered_params():
                        qat.refresh_observers(self._unwrapped())
            t0 = time.perf_counter()
            metrics = self._train_step()
            dt = time.perf_counter() - t0
            self.step += 1
            self.tokens_seen += metrics["tokens"]
            metrics["tokens_per_s"] = metrics["tokens"] / dt
            self.last_loss = metrics["loss"]
            if self.qat_cfg is not None and cfg.qat_schedule.log_every and (self.step % cfg.qat_schedule.log_every == 0 or self.step == 1):
                metrics.update(self._qat_metrics())
            if self.val_loader is not None and cfg.eval.every and self.step % cfg.eval.every == 0:
                metrics["eval/loss"] = self.evaluate()
                self.agentic_eval_hook(metrics)
            if self.metrics is not None and (self.step % cfg.log_every == 0 or self.step == stop):
                self.metrics.log(self.step, {**metrics, "tokens_seen": self.tokens_seen, "epoch": self.epoch})
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0 and self.step < stop:
                self.save_checkpoint()
        bar.close()
        if self.step == cfg.max_steps or cfg.checkpoint.on_stop:
            self.save_checkpoint()

    def _next_batch(self) -> dict:
        try:
            return next(self._batches)
        except StopIteration:
            self.epoch += 1
            self._batches = iter(self.train_loader)
            return next(self._batches)

    def _train_step(self) -> dict:
        """One optimizer step over grad_accum_steps x world_size micro-batches of the shared stream."""
        cfg, acc = self.cfg, self.accelerator
        G, W = cfg.grad_accum_steps, self.world_size
        # micro[g][w]: the batch rank w trains on at accumulation step g.
        micro = [[self._next_batch() for _ in range(W)] for _ in range(G)]
        n_loss_tokens = sum(_num_loss_tokens(b["labels"]) for row in micro for b in row)
        n_tokens = sum(_num_tokens(b) for row in micro for b in row)
        # Running sums stay on the device: one transfer per step, not a sync per micro-batch.
        lm_sum = torch.zeros((), dtype=torch.float32, device=acc.device)
        aux_sum = torch.zeros((), dtype=torch.float32, device=acc.device)
        for g in range(G):
            batch = {k: v.to(acc.device) for k, v in micro[g][self.rank].items()}
            with acc.accumulate(self.model):
                lm_loss_sum, aux = self._forward(batch)
                # accelerate divides by G and DDP/ZeRO average over W: scaling by G*W/N makes the
                # gradient that of (sum of token losses of the global batch) / N, whatever G and W are.
                loss = lm_loss_sum * (G * W / max(n_loss_tokens, 1))
                if aux is not None:
                    loss = loss + self.aux_coef * aux
                acc.backward(loss)
                grad_norm = None
                if acc.sync_gradients and cfg.clip_grad_norm is not None and self.deepspeed is None:
                    grad_norm = acc.clip_grad_norm_(self.model.parameters(), cfg.clip_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            lm_sum += lm_loss_sum.detach().float()
            if aux is not None:
                aux_sum += aux.detach().float()
        assert acc.sync_gradients, "an optimizer step must end on an accumulation boundary"
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        if self.deepspeed is not None:
            engine = self.model
            grad_norm = engine.get_global_grad_norm() if hasattr(engine, "get_global_grad_norm") else None
        totals = torch.stack([lm_sum, aux_sum])
        if W > 1:
            totals = acc.reduce(totals, reduction="sum")
        totals = totals.double().cpu()
        out = {"loss": float(totals[0]) / max(n_loss_tokens, 1), "lr": lr, "tokens": n_tokens,
               "loss_tokens": n_loss_tokens}
        if self.aux_coef or aux is not None:
            out["aux_loss"] = float(totals[1]) / (G * W)
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        return out

    def _forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sum of token losses, router load-balancing loss or None) of one micro-batch."""
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
        want_aux = self.aux_coef > 0 or getattr(self._unwrapped().config, "output_router_logits", False)
        if want_aux:
            kwargs["output_router_logits"] = True
        out = self.model(**kwargs)
        logits_BTV = out.logits
        labels_BT = batch["labels"]
        # HF convention: labels are aligned with input_ids and the loss predicts token t+1 from t.
        lm_loss_sum = torch.nn.functional.cross_entropy(
            logits_BTV[:, :-1].flatten(0, 1).float(), labels_BT[:, 1:].flatten(), ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        aux = getattr(out, "aux_loss", None) if want_aux else None
        return lm_loss_sum, aux

    @torch.no_grad()
    def evaluate(self) -> float:
        """Held-out loss (nats per loss token) over up to eval.max_batches batches, shared out over ranks."""
        acc, W = self.accelerator, self.world_size
        self.model.eval()
        if self._val_batches is None:
            # Read once and kept: the held-out set is small (eval.max_batches), and this does not
            # depend on whether the loader's iterator restarts or resumes where it stopped.
            limit = self.cfg.eval.max_batches or None
            self._val_batches = list(itertools.islice(iter(self.val_loader), limit))
        batches = self._val_batches
        if not batches:
            return float("nan")
        total = torch.zeros(2, dtype=torch.float64)
        # Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively); a rank
        # with no batch left in the last round repeats batch 0 and does not count it.
        rounds = math.ceil(len(batches) / W)
        for r in range(rounds):
            i = r * W + self.rank
            b = batches[i] if i < len(batches) else batches[0]
            lm_sum, _ = self._forward({k: v.to(acc.device) for k, v in b.items()})
            if i < len(batches):
                total += torch.tensor([float(lm_sum), _num_loss_tokens(b["labels"])], dtype=torch.float64)
        if W > 1:
            total = acc.reduce(total.to(acc.device), reduction="sum").cpu()
        self.model.train()
        return float(total[0] / total[1].clamp_min(1))

    def agentic_eval_hook(self, metrics: dict) -> None:
        """Extension point, empty here: a subclass may add in-training numbers to `metrics` every
        eval.every steps (it runs on every rank; under ZeRO-3 it must gather the parameters).

        The job itself measures tool-use success offline, not here: `python -m sandbox_env.evaluate
        'checkpoints=[{name: x, path: <run>/checkpoints/step_N}]'` on saved checkpoints (the pipeline's
        evaluate stage). Rollouts inside the training loop are not implemented.
        """

    def _qat_metrics(self) -> dict:
        """Mean SQNR (dB) of the fake quant per expert tensor group (gate_up_proj, down_proj, ...)."""
        import qat

        with self._gathered_params():
            stats = qat.quant_error_stats(self._unwrapped())
        groups: dict[str, list[float]] = {}
        for name, s in stats.items():
            groups.setdefault(_tensor_group(name), []).append(s["sqnr_db"])
        out = {f"qat/sqnr_db/{g}": sum(v) / len(v) for g, v in sorted(groups.items())}
        out["qat/fake_quant"] = int(fake_quant_on(self.step - 1, self.cfg.qat_schedule.start_step))
        return out

    def _gathered_params(self):
        """ZeRO-3 partitions parameters; reading expert weights outside a forward needs them gathered."""
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed

        import qat

        params = [getattr(module, attr) for _, module, attr, _ in qat.iter_quantized(self._unwrapped())]
        return deepspeed.zero.GatheredParameters(params)

    def _unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """Writes the checkpoint of the current step atomically (see train/checkpoint.py)."""
        import qat

        acc, step = self.accelerator, self.step
        tmp = ckpt.temp_path(self.ckpt_root, step)
        if self.is_main:
            ckpt.begin(self.ckpt_root, step)
        acc.wait_for_everyone()
        # All ranks: the HF model dir needs the full state dict (ZeRO-3 gathers 16-bit weights here),
        # and accelerate's state holds every rank's RNG (and DeepSpeed's shards).
        state_dict = acc.get_state_dict(self.model)
        acc.save_state(str(tmp / "accelerate_state"))
        if self.is_main:
            # The QAT training-checkpoint format (qat/checkpoint.py): HF model dir, QAT config, observer state.
            qat.write_qat_checkpoint(tmp, self._unwrapped(), self.qat_cfg, state_dict=state_dict,
                                     tokenizer=self.tokenizer)
            (tmp / "trainer_state.json").write_text(json.dumps({
                "step": step, "tokens_seen": self.tokens_seen, "epoch": self.epoch, "world_size": self.world_size,
                "loss": self.last_loss, "fake_quant_enabled": self.qat_cfg is not None and fake_quant_on(step, self.cfg.qat_schedule.start_step), "config": OmegaConf.to_container(self.cfg, resolve=True),
            }, indent=2, default=str))
            (tmp / "data_state.json").write_text(json.dumps(self.train_loader.state_dict()))
        acc.wait_for_everyone()
        final = self.ckpt_root / ckpt.checkpoint_name(step)
        if self.is_main:
            ckpt.write_marker(tmp, step)
            final = ckpt.commit(tmp, step)
            ckpt.prune(self.ckpt_root, self.cfg.checkpoint.keep_last)
            log.info("checkpoint %s", final)
        acc.wait_for_everyone()
        return final

    # ---------------------------------------------------------------------------------- cleanup
    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            try:
                png = plot_loss_curve(self.metrics.path, self.run_dir / "loss_curve.png",
                                      qat_start_step=self.cfg.qat_schedule.start_step if self.qat_cfg is not None else None)
                log.info("loss curve %s", png)
            except Exception as e:  # noqa: BLE001 - a plot must never fail a finished run
                log.warning("could not plot the loss curve: %s", e)
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        if self.world_size == 1:
            # accelerate keeps its state in process-wide singletons; forget it so that another recipe
            # (a benchmark, a notebook, a test) can run in this process with other settings. accelerate
            # has no public call for this (end_training / free_memory keep the singletons); _reset_state
            # is what its own test harness (accelerate.test_utils AccelerateTestCase) calls.
            from accelerate.state import AcceleratorState, GradientState

            AcceleratorState._reset_state(reset_partial_state=True)
            GradientState._reset_state()


def moe_block_classes(model: torch.nn.Module) -> list[type]:
    """Classes of the modules that own routed experts (a child named `experts`): the MoE blocks."""
    classes = []
    for module in model.modules():
        if hasattr(module, "experts") and isinstance(module.experts, torch.nn.Module) and type(module) not in classes:
            classes.append(type(module))
    if not classes:
        raise ValueError(f"{type(model).__name__} has no module with an `experts` child; is it a MoE model?")
    return classes


def _tensor_group(param_name: str) -> str:
    """'model.layers.3.mlp.experts.gate_up_proj' -> 'gate_up_proj'; per-Linear experts -> 'w1' etc."""
    parts = param_name.split(".")
    return parts[-2] if parts[-1] == "weight" else parts[-1]


def _num_loss_tokens(labels_BT: torch.Tensor) -> int:
    return int((labels_BT[:, 1:] != IGNORE_INDEX).sum())


def _num_tokens(batch: dict) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def run(cfg: DictConfig) -> TrainRecipe:
    recipe = TrainRecipe(cfg)
    recipe.setup()
    recipe.train()
    recipe.cleanup()
    return recipe
