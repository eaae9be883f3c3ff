"""The main job end to end on a small setting: every stage runs and leaves its artifacts.

Runs scripts/pipeline.py as a user would (a subprocess), with a few tasks per family and a few
training steps, then checks what each stage promises: the trajectory datasets, the BF16 and QAT
checkpoints, INT4 exports that transformers itself loads, the evaluation report with its
headline table, and that a rerun skips every finished stage.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.integration


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "pipeline.py"), f"out_dir={out}",
           "generate.tasks=compute", "generate.train_per_family=6", "generate.heldout_per_family=2",
           "bf16.max_steps=4", "qat.max_steps=2", "seq_len=1024", "micro_batch_size=2",
           "sweep=[int4_g32,int2_g32]", "ptq=[rtn,gptq,nf4_b32]", "gptq.num_samples=8", "evaluate.tasks_per_family=1",
           "evaluate.sampled.seeds=[1,2]",
           "evaluate.kl_records=4", "evaluate.tools_disabled=true", "threads=1",
           "evaluate.overrides=['steps_needed=false','budgets.max_steps=3','budgets.max_total_tokens=256',"
           "'sampling.max_new_tokens=64','engine.threads=1']",
           "model_preset=tiny_qwen3_moe", *extra]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500)


def test_pipeline_small_end_to_end(tmp_path):
    out = tmp_path / "pipeline"
    proc = _run(out)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    # trajectories
    from data.schema import read_trajectories

    train = read_trajectories(out / "trajectories" / "train")
    heldout = read_trajectories(out / "trajectories" / "heldout")
    assert train and heldout
    assert {r["task"]["id"] for r in train}.isdisjoint({r["task"]["id"] for r in heldout})
    assert all(r["messages"][-1]["content"].startswith("Answer: ") for r in train)  # style=brief: the bare answer line

    # checkpoints: BF16 and one QAT run per setting, each complete
    bf16 = out / "runs" / "bf16" / "checkpoints" / "step_000004"
    assert (bf16 / "COMPLETE").exists() and (bf16 / "model.safetensors").exists()
    # the reference: the QAT stage's schedule without fake quant, from the same BF16 run
    final = out / "runs" / "bf16_final" / "checkpoints" / "step_000002"
    assert (final / "COMPLETE").exists() and not (final / "qat_config.json").exists()
    for setting, bits in (("int4_g32", 4), ("int2_g32", 2)):
        ckpt = out / "runs" / f"qat_{setting}" / "checkpoints" / "step_000002"
        qcfg = json.loads((ckpt / "qat_config.json").read_text())
        assert (ckpt / "COMPLETE").exists()
        assert qcfg["bits"] == bits and qcfg["group_size"] == 32, qcfg

    # GPTQ of the reference, calibrated on the training split: INT4 as a real export, INT2 as dense weights
    for setting, written in (("int4_g32", "int4"), ("int2_g32", "fake_quant_dense")):
        ptq = json.loads((out / "export" / f"ptq_gptq_{setting}" / "ptq_report.json").read_text())
        assert ptq["written"] == written and ptq["input"] == str(final)
        assert ptq["calibration"] == str(out / "trajectories" / "train") and ptq["calibration_tokens"] > 0

    # INT4 exports that transformers + compressed-tensors load, with int32 packed experts
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    for name in ("qat_int4_g32", "ptq_rtn_int4_g32", "ptq_gptq_int4_g32"):
        export = out / "export" / name
        cfg = json.loads((export / "config.json").read_text())
        assert cfg["quantization_config"]["format"] == "pack-quantized"
        packed = []
        for f in export.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                packed += [k for k in st.keys() if k.endswith("weight_packed") and st.get_tensor(k).dtype == torch.int32]
        assert any(".mlp.experts.0.gate_proj.weight_packed" in k for k in packed)
        model = AutoModelForCausalLM.from_pretrained(export)
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[-1] == model.config.vocab_size

    # evaluation report and the headline table
    report = json.loads((out / "eval" / "report.json").read_text())
    expected = {"bf16", "qat_int4_g32", "ptq_rtn_int4_g32", "ptq_gptq_int4_g32", "qat_int2_g32", "ptq_rtn_int2_g32",
                "ptq_gptq_int2_g32", "ptq_nf4_b32"}
    assert set(report["models"]) == expected
    assert report["models"]["qat_int4_g32"]["kind"] == "int4"
    assert report["models"]["qat_int2_g32"]["kind"] == "fake_quant"
    for name in expected - {"bf16"}:
        kl = report["models"][name]["kl_vs_reference"]
        assert kl["tokens"] > 0 and kl["kl"] >= 0.0 and 0.0 <= kl["top1_agreement"] <= 1.0
    assert "no_tools" in report["models"]["bf16"]
    assert report["models"]["bf16"]["path"] == str(final)  # the reference PTQ quantizes and QAT is measured against
    # success under sampling, several seeds, for the models conf/pipeline.yaml names (that this run has)
    for name in ("bf16", "qat_int4_g32", "ptq_rtn_int4_g32"):
        assert report["models"][name]["sampled"]["seeds"] == [1, 2]
    assert "sampled" not in report["models"]["qat_int2_g32"]
    assert (out / "eval" / "report.md").exists() and list((out / "eval").glob("*.png"))
    headline = (out / "eval" / "headline.md").read_text()
    assert "| qat_int4_g32 | int4 |" in headline and "bf16/no-tools" in headline and "sampled T=0.7 (2 seeds)" in headline
    assert "| model | kind | success (95% CI) | vs bf16: McNemar p |" in proc.stdout

    # a rerun skips every stage
    again = _run(out)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    ran = re.findall(r"^\[pipeline\] (.+): \d+s$", proc.stdout, flags=re.M)
    assert len(ran) == 10, ran  # generate, 4 trainings, 2 exports, 2 GPTQ, evaluate
    assert sorted(re.findall(r"^\[pipeline\] (.+): done \(.*\), skipped$", again.stdout, flags=re.M)) == sorted(ran)
    assert "sandbox_env.generate" not in again.stdout.replace("[pipeline] generate: done", "")
