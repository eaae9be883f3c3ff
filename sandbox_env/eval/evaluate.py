"""`python -m sandbox_env.evaluate`: our checkpoints as agents on held-out tasks, INT4 against BF16.

The user's question is whether the INT4 checkpoint acts as well as BF16 on long tool-using
tasks. The recipe answers it in one run: build the held-out task list from `conf/tasks`, then for
every checkpoint (BF16 HF dir, fake-quant training checkpoint, INT4 export; see
`local_policy.load_policy_model`) run every task through the real rollout loop and sandbox with
the local-model policy, many episodes batched together; optionally heavy mode (N rollouts per
task, vote or reflect) and a tools-disabled pass. Then, teacher-forced on held-out trajectories,
the KL divergence and top-1 agreement of each quantized model against the reference. The one
idea is a fair comparison: every model sees the same tasks with the same episode seeds, budgets,
sampling seeds and renderer, so differences come from the weights alone.

Writes to `out_dir`: report.md (a table per task family, KL, sizes, speed), report.json (all
numbers), episodes/<model>.jsonl (every trajectory), success_by_model.png,
success_by_steps.png, kl_per_layer.png.

    python -m sandbox_env.evaluate out_dir=outputs/eval \
        'checkpoints=[{name: bf16, path: runs/bf16}, {name: qat_int4, path: runs/int4},
                      {name: ptq_rtn, path: runs/bf16, ptq: rtn}]'

A checkpoint entry with `ptq: <qat.ptq method>` is a post-training-quantization baseline of a
dense checkpoint (quantize -> dequantize of the routed experts, in memory); its size on disk is
that of its dense source. GPTQ needs calibration data, which an entry here does not have (and
must never be the held-out tasks): `python -m train.ptq` calibrates it on training trajectories
and writes a checkpoint (INT4 export, or fake-quant weights for INT3/INT2) that is evaluated as
an ordinary entry, `{name: ptq_gptq, path: <its output>}`.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

NO_TOOLS_SYSTEM_PROMPT = (
    "You are a careful assistant. No tools are available: think, then reply with one line of the form "
    "`Answer: <value>`."
)


def _checkpoints(cfg: dict[str, Any]) -> list[dict[str, Any]]:
    cks = cfg.get("checkpoints")
    if not isinstance(cks, list) or not cks:
        raise ValueError("checkpoints must be a non-empty list of {name, path}, e.g. "
                         "'checkpoints=[{name: bf16, path: runs/ckpt/step_000100}, {name: int4, path: runs/int4}]'")
    names = set()
    for i, c in enumerate(cks):
        if not isinstance(c, dict) or not c.get("name") or not c.get("path"):
            raise ValueError(f"checkpoints[{i}]={c!r} needs a name and a path")
        if c["name"] in names:
            raise ValueError(f"checkpoints[{i}].name={c['name']!r} is used twice; names must be unique")
        if not Path(str(c["path"])).is_dir():
            raise ValueError(f"checkpoints[{i}].path={c['path']!r} is not a directory")
        if c.get("ptq"):  # checked before any model runs, not after an hour of episodes
            from qat.ptq import CALIBRATED_METHODS, METHODS
            from sandbox_env.inference.loading import checkpoint_kind

            if c["ptq"] in CALIBRATED_METHODS:
                raise ValueError(f"checkpoints[{i}].ptq={c['ptq']!r} needs calibration data: run `python -m train.ptq "
                                 f"input={c['path']} output=<dir> method={c['ptq']} calibration=<training trajectories>` "
                                 f"and evaluate its output as {{name: {c['name']}, path: <dir>}}")
            if c["ptq"] not in METHODS:
                raise ValueError(f"checkpoints[{i}].ptq={c['ptq']!r} is not a qat.ptq method; choose one of {list(METHODS)}")
            kind = checkpoint_kind(c["path"])
            if kind != "hf":
                raise ValueError(f"checkpoints[{i}].ptq={c['ptq']!r} needs a dense HF checkpoint (the BF16 model the "
                                 f"baseline quantizes), but path={c['path']!r} is a {kind} checkpoint")
        names.add(c["name"])
    for key, which in (("tools_disabled", cfg.get("tools_disabled")), ("sampled.models", (cfg.get("sampled") or {}).get("models"))):
        if isinstance(which, (list, tuple)) and set(which) - names:
            raise ValueError(f"{key}={list(which)} names {sorted(set(which) - names)}, which are not checkpoint names "
                             f"{sorted(names)}")
    ref = cfg.get("reference")
    if ref is not None and ref not in names:
        raise ValueError(f"reference={ref!r} is not one of the checkpoint names {sorted(names)}")
    return [dict(c) for c in cks]


def _selected(which: Any, name: str) -> bool:
    """A per-model switch: true / false, null (= every model), or a list of checkpoint names."""
    if which is None:
        return True
    if isinstance(which, bool):
        return which
    return name in which


def load_checkpoint(ck: dict[str, Any], cfg: dict[str, Any]):
    from sandbox_env.inference.loading import load_policy_model

    return load_policy_model(ck["path"], dtype=ck.get("dtype", cfg["engine"].get("dtype")),
                             device=cfg["engine"].get("device", "cpu"), tokenizer_path=ck.get("tokenizer"),
                             ptq=ck.get("ptq"), ptq_config=ck.get("ptq_config"))


def build_tasks(cfg: dict[str, Any], cache_dir: Path) -> tuple[list[tuple[str, Any, Any]], str | None]:
    """-> ([(tag, family, task)], search index path or None), the same for every model."""
    from sandbox_env.tasks.corpus import CorpusConfig, ensure_corpus
    from sandbox_env.tasks.suite import build_families, family_specs

    split = cfg.get("split", "heldout")
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; choose heldout (default) or train")
    specs = family_specs(cfg["tasks"])
    corpus, index_path = None, None
    if any(s["family"] == "retrieval" for s in specs):
        corpus, index_path = ensure_corpus(CorpusConfig(**cfg["corpus"]), cache_dir)
    families = build_families(specs, corpus)
    tasks = [(s["tag"], families[s["tag"]], families[s["tag"]].make(split, i, cfg["seed"]))
             for s in specs for i in range(s["counts"][split])]
    if not tasks:
        raise ValueError(f"no tasks: tasks.splits.{split} (or a family's `{split}`) must be > 0")
    return tasks, index_path


def steps_needed(tasks, env, budgets) -> dict[str, int]:
    """Steps the scripted teacher (no mistakes) takes on each task: the x axis of 'success by steps needed'."""
    from sandbox_env.agent.rollout import run_episode
    from sandbox_env.agent.teachers import ScriptedTeacher

    teacher = ScriptedTeacher(mistake_rate=0.0)
    return {task.id: run_episode(task, teacher, env, budgets, family=fam)["metadata"]["steps"] for _, fam, task in tasks}


def run_model(name: str, loaded: Any, tasks, env, budgets, cfg: dict[str, Any], *, tools_enabled: bool = True
              ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """All tasks with one model, `engine.concurrency` episodes at a time. -> (records, speed stats)."""
    from data.render import get_renderer
    from sandbox_env.agent.rollout import TokenCounter, run_episode
    from sandbox_env.inference.engine import InferenceEngine, SamplingConfig
    from sandbox_env.inference.policy import LocalModelPolicy

    e = cfg["engine"]
    engine = InferenceEngine(loaded.model, get_renderer(loaded.tokenizer), max_batch_size=e["max_batch_size"])
    policy = LocalModelPolicy(engine, name=name, sampling=SamplingConfig(**cfg["sampling"]), tools_enabled=tools_enabled)
    counter = TokenCounter(loaded.tokenizer)
    system = None if tools_enabled else NO_TOOLS_SYSTEM_PROMPT  # None: the env's (full or compact) prompt
    t0 = time.perf_counter()

    def one(item):
        _, fam, task = item
        try:
            rec = run_episode(task, policy, env, budgets, family=fam, seed=cfg["seed"], token_counter=counter,
                              system_prompt=system)
        except Exception as e:
            # It counts as a failure (never dropped: that would flatter the success rate) and says why.
            log.exception("%s: episode %s failed", name, task.id)
            rec = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": task.prompt}],
                   "tools": [], "task": task.to_record(),
                   "verdict": {"correct": False, "answer": None, "reason": f"episode error: {type(e).__name__}: {e}"},
                   "metadata": {"steps": 0, "tool_calls": 0, "invalid_tool_calls": 0, "generated_tokens": 0,
                                "budget_exhausted": None, "context_hidden": 0, "family_tag": fam.tag,
                                "error": f"{type(e).__name__}: {e}"}}
        rec["metadata"]["model"] = name
        return rec

    from tqdm import tqdm

    try:
        with ThreadPoolExecutor(max_workers=e["concurrency"]) as pool:
            # episodes finish out of order; the bar counts them, the records keep the task order
            bar = tqdm(total=len(tasks), desc=f"{name} episodes", unit="ep", disable=not cfg.get("progress", True))
            futures = [pool.submit(one, t) for t in tasks]
            for f in futures:
                f.add_done_callback(lambda _: bar.update(1))
            records = [f.result() for f in futures]
            bar.close()
    finally:
        engine.close()
    wall = time.perf_counter() - t0
    st = engine.stats
    speed = {"wall_s": round(wall, 3), "episode_errors": sum(1 for r in records if r["metadata"].get("error")), "episodes_per_s": round(len(records) / wall, 4),
             "decode_tokens": st["decode_tokens"], "decode_tokens_per_s": round(st["decode_tokens"] / wall, 2),
             "prefill_tokens": st["prefill_tokens"], "reused_tokens": st["reused_tokens"],
             "forwards": st["forwards"], "forward_s": round(st["forward_s"], 3), "max_batch": st["max_batch"]}
    return records, speed


def run_sampled(name: str, loaded: Any, tasks, env, budgets, cfg: dict[str, Any],
                all_records: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The same tasks again with temperature > 0, once per seed in `sampled.seeds` (episode and
    sampling seeds both change; the tasks do not). Greedy decoding shows one path per task; a
    quantized model can match it there and still drift once sampling leaves that path."""
    from sandbox_env.eval.metrics import group_by_family, summarize_episodes

    smp = cfg["sampled"]
    seeds = [int(x) for x in smp["seeds"]]
    temperature = float(smp.get("temperature", 0.7))
    if temperature <= 0:
        raise ValueError(f"sampled.temperature={temperature} must be > 0 (greedy is the main run)")
    per_seed, fam_hits = [], {}
    for sd in seeds:
        scfg = dict(cfg, seed=sd, sampling=dict(cfg["sampling"], temperature=temperature))
        recs, _ = run_model(f"{name}/t{temperature:g}-s{sd}", loaded, tasks, env, budgets, scfg)
        all_records[f"{name}/t{temperature:g}-s{sd}"] = recs
        per_seed.append(summarize_episodes(recs)["success"])
        for f, r in group_by_family(recs).items():
            fam_hits.setdefault(f, []).append(summarize_episodes(r)["success"])
    mean = sum(per_seed) / len(per_seed)
    std = (sum((x - mean) ** 2 for x in per_seed) / max(len(per_seed) - 1, 1)) ** 0.5
    return {"temperature": temperature, "seeds": seeds, "success_per_seed": per_seed, "success_mean": mean,
            "success_std": std, "by_family": {f: sum(v) / len(v) for f, v in fam_hits.items()}}


def run_heavy_suite(name: str, loaded: Any, tasks, env, budgets, cfg: dict[str, Any]) -> dict[str, Any]:
    from data.render import get_renderer
    from sandbox_env.agent.heavy import run_heavy
    from sandbox_env.agent.rollout import TokenCounter
    from sandbox_env.inference.engine import InferenceEngine, SamplingConfig
    from sandbox_env.inference.policy import LocalModelPolicy

    h = cfg["heavy"]
    engine = InferenceEngine(loaded.model, get_renderer(loaded.tokenizer), max_batch_size=cfg["engine"]["max_batch_size"])
    sampling = dict(cfg["sampling"], temperature=h.get("temperature", 0.7))  # N greedy rollouts would all agree
    policy = LocalModelPolicy(engine, name=name, sampling=SamplingConfig(**sampling))
    counter = TokenCounter(loaded.tokenizer)

    def one(item):
        _, fam, task = item
        return run_heavy(task, policy, env, budgets, n=h["n"], mode=h["mode"], family=fam, seed=cfg["seed"],
                         token_counter=counter)

    try:  # several tasks at a time, N rollouts each: about engine.concurrency episodes in flight
        with ThreadPoolExecutor(max_workers=max(1, cfg["engine"]["concurrency"] // h["n"])) as pool:
            rows = list(pool.map(one, tasks))
    finally:
        engine.close()
    by_fam: dict[str, dict[str, float]] = {}
    for r in rows:
        d = by_fam.setdefault(r["family"], {"tasks": 0, "pass@1": 0.0, "pass@n": 0.0, "heavy": 0.0})
        d["tasks"] += 1
        d["pass@1"] += r["pass@1"]
        d["pass@n"] += r["pass@n"]
        d["heavy"] += r["heavy_correct"]
    for d in by_fam.values():
        for k in ("pass@1", "pass@n", "heavy"):
            d[k] = round(d[k] / d["tasks"], 4)
    return {"n": h["n"], "mode": h["mode"], "by_family": by_fam,
            "tasks": [{k: v for k, v in r.items() if k != "records"} for r in rows]}


def evaluate(cfg: dict[str, Any]) -> dict[str, Any]:
    """The whole job for a plain-dict config (the Hydra config, resolved). -> report dict."""
    from data.schema import read_trajectories, write_jsonl
    from sandbox_env import SandboxConfig
    from sandbox_env.agent.rollout import Budgets, ToolEnv
    from sandbox_env.eval.metrics import (
        group_by_family,
        summarize_episodes,
        teacher_forced_divergence,
    )
    from sandbox_env.inference.loading import checkpoint_bytes

    cks = _checkpoints(cfg)
    ref_name = cfg.get("reference") or cks[0]["name"]
    if cfg["engine"].get("threads"):
        torch.set_num_threads(int(cfg["engine"]["threads"]))
    out = Path(cfg["out_dir"])
    (out / "episodes").mkdir(parents=True, exist_ok=True)
    budgets = Budgets(**cfg["budgets"])
    tasks, index_path = build_tasks(cfg, Path(cfg.get("cache_dir") or out / "cache"))
    tools = [t for t in cfg["tools"] if index_path is not None or t not in ("search", "open")]
    sandbox = SandboxConfig(**cfg["sandbox"])
    env = ToolEnv(sandbox, index_path=index_path, tools=tuple(tools), compact=bool(cfg.get("compact_prompt", False)))
    log.info("%d tasks x %d checkpoints", len(tasks), len(cks))
    needed = steps_needed(tasks, env, budgets) if cfg.get("steps_needed", True) else {}

    report: dict[str, Any] = {"reference": ref_name, "split": cfg.get("split", "heldout"), "seed": cfg["seed"],
                              "tasks": len(tasks), "budgets": cfg["budgets"], "sampling": cfg["sampling"], "models": {}}
    all_records: dict[str, list[dict[str, Any]]] = {}
    for ck in cks:
        name = ck["name"]
        loaded = load_checkpoint(ck, cfg)
        log.info("%s: %s checkpoint %s", name, loaded.kind, ck["path"])
        records, speed = run_model(name, loaded, tasks, env, budgets, cfg)
        all_records[name] = records
        write_jsonl(records, out / "episodes" / f"{name}.jsonl", source=name)
        m = {"path": str(ck["path"]), "kind": loaded.kind, "size_bytes": checkpoint_bytes(ck["path"]), "speed": speed,
             "overall": summarize_episodes(records),
             "by_family": {f: summarize_episodes(r) for f, r in group_by_family(records).items()}}
        if _selected(cfg.get("tools_disabled") or False, name):
            env0 = ToolEnv(sandbox, tools=())
            rec0, sp0 = run_model(f"{name}/no-tools", loaded, tasks, env0, budgets, cfg, tools_enabled=False)
            all_records[f"{name}/no-tools"] = rec0
            m["no_tools"] = {"overall": summarize_episodes(rec0), "speed": sp0,
                             "by_family": {f: summarize_episodes(r) for f, r in group_by_family(rec0).items()}}
        smp = cfg.get("sampled") or {}
        if smp.get("seeds") and _selected(smp.get("models", True), name):
            m["sampled"] = run_sampled(name, loaded, tasks, env, budgets, cfg, all_records)
        if cfg["heavy"].get("n", 0) > 0:
            m["heavy"] = run_heavy_suite(name, loaded, tasks, env, budgets, cfg)
        report["models"][name] = m
        del loaded

    # --- teacher-forced divergence against the reference
    kcfg = cfg["kl"]
    if len(cks) > 1 and kcfg.get("enabled", True):
        if kcfg.get("trajectories"):
            trajs = list(read_trajectories(kcfg["trajectories"]))
            source = str(kcfg["trajectories"])
        else:  # what the reference itself did on these tasks
            trajs = [r for r in all_records[ref_name] if any(m["role"] == "assistant" for m in r["messages"])]
            source = f"episodes of {ref_name}"
        trajs = trajs[: kcfg.get("max_records") or None]
        by_name = {c["name"]: c for c in cks}
        ref = load_checkpoint(by_name[ref_name], cfg)
        from data.render import get_renderer

        renderer = get_renderer(ref.tokenizer)
        report["kl_source"] = source
        for c in cks:
            if c["name"] == ref_name:
                continue
            q = load_checkpoint(c, cfg)
            d = teacher_forced_divergence(q.model, ref.model, renderer, trajs, max_len=kcfg.get("max_len", 2048),
                                          per_layer=kcfg.get("per_layer", True))
            report["models"][c["name"]]["kl_vs_reference"] = d
            del q

    # --- paired comparison with the reference on the same tasks (McNemar)
    from sandbox_env.eval.metrics import mcnemar

    solved = {n: {r["task"]["id"]: bool(r["verdict"]["correct"]) for r in recs} for n, recs in all_records.items()}
    if ref_name in solved:
        for name, m in report["models"].items():
            if name != ref_name:
                m["paired_vs_reference"] = mcnemar(solved[ref_name], solved[name])

    from sandbox_env.eval.report import write_report

    write_report(report, all_records, needed, out)
    return report
