"""`python -m sandbox_env.evaluate` end to end on CPU: three real checkpoints of one tiny model
(BF16 HF dir, fake-quant training checkpoint, INT4 export), a held-out suite in the sandbox,
the report's files and numbers. The shipped config is composed through Hydra, as the job does."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def make_checkpoints(root: Path) -> dict[str, Path]:
    """bf16 (HF dir), fq (HF dir + qat_config.json, as train/ writes), int4 (qat.export.export_int4)."""
    from qat import QuantConfig, prepare
    from qat.export import export_int4
    from tests.fixtures import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(seed=0)
    paths = {k: root / k for k in ("bf16", "fq", "int4")}
    model.save_pretrained(paths["bf16"])
    tok.save_pretrained(paths["bf16"])
    cfg = QuantConfig()
    prepare(model, cfg)
    model.save_pretrained(paths["fq"])
    tok.save_pretrained(paths["fq"])
    (paths["fq"] / "qat_config.json").write_text(json.dumps(cfg.to_dict()))
    export_int4(model, paths["int4"], tok)
    return paths


def _compose(overrides: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import sandbox_env.config  # noqa: F401  registers the job schemas
    from qat.jobs import VERSION_BASE

    with initialize_config_dir(version_base=VERSION_BASE, config_dir=str(ROOT / "conf")):
        return OmegaConf.to_container(compose("evaluate", overrides=overrides), resolve=True)


def test_evaluate_three_checkpoints_report(tmp_path):
    from sandbox_env.eval.evaluate import evaluate

    torch.set_num_threads(1)
    ck = make_checkpoints(tmp_path / "ck")
    out = tmp_path / "eval"
    cfg = _compose([
        f"out_dir={out}", "+eval=quick", "tasks=compute", "tasks.splits.heldout=1",
        (f"checkpoints=[{{name: bf16, path: {ck['bf16']}}}, {{name: qat_fq, path: {ck['fq']}}}, "
         f"{{name: qat_int4, path: {ck['int4']}}}, {{name: ptq_rtn, path: {ck['bf16']}, ptq: rtn}}]"),
        "reference=bf16", "tools_disabled=true", "heavy.n=2", "budgets.max_steps=3", "sampling.max_new_tokens=32",
        "engine.threads=1", "sampled.seeds=[1,2]",
    ])
    report = evaluate(cfg)
    for f in ("report.md", "report.json", "success_by_model.png", "success_by_steps.png", "kl_per_layer.png",
              "episodes/bf16.jsonl", "episodes/qat_int4.jsonl"):
        assert (out / f).is_file(), f
    md = (out / "report.md").read_text()
    for fam in ("arith", "dates", "primes", "strings"):
        assert f"## {fam}" in md
    assert "bf16/no-tools" in md and "Heavy mode" in md
    models = report["models"]
    assert {m["kind"] for m in models.values()} == {"hf", "fake_quant", "int4", "ptq:rtn"}
    n_tasks = report["tasks"]
    assert n_tasks == 4 and all(m["overall"]["episodes"] == n_tasks for m in models.values())
    # every model saw the same tasks with the same seeds
    ids = {n: [json.loads(line)["task"]["id"] for line in (out / "episodes" / f"{n}.jsonl").read_text().splitlines()]
           for n in ("bf16", "qat_fq", "qat_int4")}
    assert ids["bf16"] == ids["qat_fq"] == ids["qat_int4"]
    kl_fq, kl_int4 = models["qat_fq"]["kl_vs_reference"], models["qat_int4"]["kl_vs_reference"]
    assert kl_fq["tokens"] > 0 and kl_fq["kl"] > 0  # INT4 experts do change the distribution...
    assert len(kl_fq["kl_per_layer"]) == 2 and kl_fq["kl_per_layer"][-1] == pytest.approx(kl_fq["kl"])
    # ...and the INT4 export is the fake-quant model (export parity), so both diverge from BF16 alike
    assert kl_int4["kl"] == pytest.approx(kl_fq["kl"], rel=1e-3, abs=1e-7)
    assert kl_int4["top1_agreement"] == pytest.approx(kl_fq["top1_agreement"])
    # the model was never trained, so QAT's fake quant is plain round-to-nearest: the RTN baseline matches it
    assert models["ptq_rtn"]["kl_vs_reference"]["kl"] == pytest.approx(kl_fq["kl"], rel=1e-5, abs=1e-9)
    assert models["qat_int4"]["size_bytes"] < models["bf16"]["size_bytes"]
    assert all(m["speed"]["decode_tokens_per_s"] > 0 for m in models.values())
    assert models["bf16"]["heavy"]["n"] == 2
    # success under sampling: every model once per seed, the same tasks
    assert "Sampled (temperature > 0" in md
    for n, m in models.items():
        assert m["sampled"]["seeds"] == [1, 2] and len(m["sampled"]["success_per_seed"]) == 2
        assert report["overall"][f"{n}/t0.7-s1"]["episodes"] == report["overall"][f"{n}/t0.7-s2"]["episodes"] == n_tasks


def test_evaluate_cli_rejects_missing_checkpoints(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sandbox_env.evaluate", f"out_dir={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode != 0 and "checkpoints must be a non-empty list" in r.stderr


def test_every_eval_config_composes(tmp_path):
    """Every shipped conf/eval preset composes with conf/evaluate.yaml and passes the checkpoint checks."""
    from sandbox_env.eval.evaluate import _checkpoints

    paths = [f"+paths.{k}={tmp_path}" for k in ("bf16", "qat", "int4")]
    presets = sorted((ROOT / "conf" / "eval").glob("*.yaml"))
    assert {"quick", "standard"} <= {p.stem for p in presets}
    for p in presets:
        text = p.read_text()
        assert text.startswith("# @package _global_\n#")  # and then says what it runs and how
        cfg = _compose([f"+eval={p.stem}"] + ([o.replace("+", "", 1) for o in paths] if "paths:" in text else paths))
        assert cfg["budgets"]["max_steps"] >= 1 and cfg["engine"]["max_batch_size"] >= 1
        if cfg["checkpoints"]:
            (tmp_path / "config.json").write_text("{}")
            assert [c["name"] for c in _checkpoints(cfg)][0] == cfg["reference"]


def test_evaluate_cli_end_to_end(tmp_path):
    """The Hydra entry point itself, as a user runs it: one checkpoint, the quick preset, one family."""
    ck = make_checkpoints(tmp_path / "ck")
    out = tmp_path / "eval"
    r = subprocess.run([sys.executable, "-m", "sandbox_env.evaluate", f"out_dir={out}", "+eval=quick",
                        "tasks=compute", "~tasks.families.dates", "~tasks.families.primes", "~tasks.families.strings",
                        "tasks.splits.heldout=1", "steps_needed=false", "engine.threads=1",
                        f"checkpoints=[{{name: int4, path: {ck['int4']}}}]"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["tasks"] == 1 and report["models"]["int4"]["kind"] == "int4"
    assert "## arith" in (out / "report.md").read_text()


def test_a_model_that_solves_its_task_scores_and_needs_its_tools(tmp_path):
    """A tiny model trained for a few seconds on the scripted solution of one held-out task: the job
    scores it 1/1 with tools and 0/1 with tools disabled (it cannot multiply 60-digit numbers itself)."""
    from data.render import get_renderer
    from sandbox_env.agent.rollout import ToolEnv, run_episode
    from sandbox_env.agent.teachers import ScriptedTeacher
    from sandbox_env.eval.evaluate import evaluate
    from sandbox_env.tasks import get_family
    from tests.fixtures import tiny_model_and_tokenizer

    torch.set_num_threads(1)
    fam = get_family("arith")
    record = run_episode(fam.make("heldout", 0, 0), ScriptedTeacher(mistake_rate=0.0), ToolEnv(tools=("python",)), family=fam)
    model, tok = tiny_model_and_tokenizer(seed=0, layers=1)
    d = get_renderer(tok).render_training(record)
    ids, labels = torch.tensor([d["input_ids"]]), torch.tensor([d["labels"]])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.005:
            break
    model.eval()
    model.save_pretrained(tmp_path / "solver")
    tok.save_pretrained(tmp_path / "solver")
    out = tmp_path / "eval"
    cfg = _compose([f"out_dir={out}", "tasks=compute", "~tasks.families.dates", "~tasks.families.primes",
                    "~tasks.families.strings", "tasks.splits.heldout=1", "tools=[python]", "tools_disabled=true",
                    "sampling.max_new_tokens=512", "budgets.max_steps=4", "engine.threads=1", "steps_needed=false",
                    "sampled.seeds=[3]", "sampled.temperature=0.3",
                    f"checkpoints=[{{name: solver, path: {tmp_path / 'solver'}}}]"])
    report = evaluate(cfg)
    m = report["models"]["solver"]
    assert m["overall"]["success"] == 1.0 and m["overall"]["avg_tool_calls"] == 1.0, m["overall"]
    assert m["no_tools"]["overall"]["success"] == 0.0
    assert m["sampled"]["success_per_seed"] == [1.0]  # it learned the solution, not just one greedy path
    assert "| solver | 1 | 1 |" in (out / "report.md").read_text()


def test_per_model_switches_name_real_checkpoints(tmp_path):
    from sandbox_env.eval.evaluate import _checkpoints, _selected

    cks = [{"name": "bf16", "path": str(tmp_path)}, {"name": "int4", "path": str(tmp_path)}]
    assert len(_checkpoints({"checkpoints": cks, "tools_disabled": ["bf16"], "sampled": {"models": None}})) == 2
    with pytest.raises(ValueError, match=r"tools_disabled=\['bf16', 'nope'\] names \['nope'\]"):
        _checkpoints({"checkpoints": cks, "tools_disabled": ["bf16", "nope"]})
    with pytest.raises(ValueError, match=r"sampled.models=\['x'\]"):
        _checkpoints({"checkpoints": cks, "sampled": {"models": ["x"]}})
    assert [_selected(w, "bf16") for w in (True, False, None, ["bf16"], ["int4"])] == [True, False, True, True, False]
