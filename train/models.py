"""Model builders: one function turns a `conf/model/<preset>.yaml` into a transformers MoE model.

Tiny presets and real checkpoints go through the same `build_model`: a tiny preset is a
transformers config of the real architecture with small sizes and random init, a real preset is a
local Hugging Face directory (`path=...`; nothing is downloaded). So every code path that a test
exercises on the tiny model is the one a 30B run takes: fused 3D experts
(`mlp.experts.gate_up_proj [E, 2I, H]`, `mlp.experts.down_proj [E, H, I]`), the same router, the
same experts implementations (eager, batched_mm, grouped_mm).

    from train.models import build_model, load_preset
    model = build_model(load_preset("tiny_qwen3_moe", vocab_size=512))
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from qat.config import DTYPES

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# family -> transformers model_type; the keys are the `family:` values that presets may use.
FAMILIES = {
    "qwen3_moe": "qwen3_moe",
    "qwen2_moe": "qwen2_moe",
    "mixtral": "mixtral",
    "olmoe": "olmoe",
    "deepseek_v3": "deepseek_v3",
    "gpt_oss": "gpt_oss",
}
EXPERTS_IMPLEMENTATIONS = (None, "eager", "batched_mm", "grouped_mm")


def list_presets() -> list[str]:
    """Names of the shipped model presets (files in conf/model/)."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def load_preset(name: str, **config_overrides: Any) -> dict:
    """Reads conf/model/<name>.yaml as a plain dict; keyword arguments override its `config:`."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "model" / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"model preset {name!r} not found in {path.parent}; shipped presets: {list_presets()}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    cfg.setdefault("config", {})
    cfg["config"] = dict(cfg["config"] or {}, **config_overrides)
    return cfg


def _as_dict(cfg: Any) -> dict:
    """A plain, deep copy of the preset (a DictConfig is a Mapping too, but its nested ListConfigs
    must not reach transformers' config classes)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"model config must be a mapping (conf/model/*.yaml content), got {type(cfg).__name__}")


def _hf_config(family: str, path: str | None, overrides: Mapping[str, Any]):
    from transformers import CONFIG_MAPPING, AutoConfig

    config_cls = CONFIG_MAPPING[FAMILIES[family]]
    if path is None:
        return config_cls(**overrides)
    cfg_file = Path(path) / "config.json"
    if not cfg_file.exists():
        raise ValueError(f"model.path={path!r} has no config.json; point it at a local Hugging Face model directory")
    raw = json.loads(cfg_file.read_text())
    if raw.get("model_type") == FAMILIES[family]:
        config = AutoConfig.from_pretrained(path)
    else:
        # e.g. Kimi-K2 ships model_type "kimi_k2" with the DeepSeek-V3 architecture: read it with the family's class.
        log.warning("config.json model_type=%r read as family %r", raw.get("model_type"), family)
        raw.pop("auto_map", None)
        config = config_cls.from_dict(raw)
    changed = {} if path is None else {k: (getattr(config, k), v) for k, v in overrides.items()
                                       if hasattr(config, k) and getattr(config, k) != v}
    if changed:
        log.warning("the preset's config overrides change the checkpoint's config.json at %s: %s", path,
                    ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items())))
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def build_model(cfg: Any, **config_overrides: Any) -> torch.nn.Module:
    """Builds the causal LM described by a model preset (see conf/model/*.yaml).

    cfg keys: family (one of FAMILIES), path (local HF dir or None), dtype, experts_implementation,
    config (HF config overrides), upcycle (set when `path` is built by `python -m train.upcycle`), copy_circuit (a mapping of `train.copy_circuit.CopyCircuit` fields, or
    null: installed after random init only; a checkpoint already holds it). Extra keyword arguments
    override `config` (e.g. vocab_size).
    """
    from transformers import AutoModelForCausalLM

    cfg = _as_dict(cfg)
    family = cfg.get("family")
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r} is not supported; choose one of {sorted(FAMILIES)}")
    dtype_name = cfg.get("dtype") or "float32"
    if dtype_name not in DTYPES:
        raise ValueError(f"model.dtype={dtype_name!r} is not supported; choose one of {sorted(DTYPES)}")
    impl = cfg.get("experts_implementation")
    if impl not in EXPERTS_IMPLEMENTATIONS:
        raise ValueError(f"model.experts_implementation={impl!r}; choose one of {EXPERTS_IMPLEMENTATIONS}")
    path = cfg.get("path")
    if path in ("???", ""):
        raise ValueError(f"model.path is required for the {family} preset: set model.path=/local/hf/checkpoint")
    if path is not None and not os.path.isdir(path):
        if cfg.get("upcycle") is not None:
            raise ValueError(f"model.path={path!r} does not exist yet: this preset is built by sparse upcycling; run "
                             f"`python -m train.upcycle output={path}` (or `bash scripts/pipeline.sh`, whose first stage "
                             "builds it)")
        raise ValueError(f"model.path={path!r} is not a directory; point it at a local Hugging Face model directory")
    overrides = dict(cfg.get("config") or {}, **config_overrides)
    config = _hf_config(family, path, overrides)
    dtype = DTYPES[dtype_name]
    kwargs = {"dtype": dtype}
    if impl is not None:
        kwargs["experts_implementation"] = impl
    circuit = cfg.get("copy_circuit")
    if circuit is not None and not isinstance(circuit, Mapping):
        raise ValueError(f"model.copy_circuit must be a mapping of CopyCircuit fields or null, got {circuit!r}")
    if path is None:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
        if circuit is not None:
            from train.copy_circuit import CopyCircuit, install_copy_circuit

            install_copy_circuit(model, CopyCircuit.from_config(circuit))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, **kwargs)
    return model


def set_experts_implementation(model: torch.nn.Module, impl: str) -> None:
    """Switches every experts module of a built model to `impl` (eager | batched_mm | grouped_mm)."""
    if impl not in EXPERTS_IMPLEMENTATIONS or impl is None:
        raise ValueError(f"experts_implementation={impl!r}; choose one of {EXPERTS_IMPLEMENTATIONS[1:]}")
    setter = getattr(model, "set_experts_implementation", None)
    if setter is not None:
        setter(impl)
        return
    for module in model.modules():  # older transformers: the experts read config._experts_implementation
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = impl
