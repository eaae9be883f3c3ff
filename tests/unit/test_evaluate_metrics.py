"""Evaluation numbers: Wilson intervals, per-family summaries, teacher-forced KL, config errors."""

from __future__ import annotations

import copy

import pytest
import torch

from data.render import get_renderer
from sandbox_env.eval.evaluate import _checkpoints
from sandbox_env.eval.metrics import summarize_episodes, teacher_forced_divergence, wilson_interval
from sandbox_env.eval.report import family_rows, markdown_table
from tests.fixtures import make_records, tiny_model_and_tokenizer

torch.set_num_threads(1)


def test_wilson_interval_known_values():
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)  # the rule of three's honest cousin
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 0.0)


def _rec(correct, steps, calls, invalid, exhausted=None, fam="arith"):
    return {"verdict": {"correct": correct}, "task": {"family": fam, "id": "x"},
            "metadata": {"steps": steps, "tool_calls": calls, "invalid_tool_calls": invalid, "budget_exhausted": exhausted,
                         "generated_tokens": 10 * steps, "context_hidden": 0, "family_tag": fam}}


def test_summaries_and_table():
    recs = [_rec(True, 2, 1, 0), _rec(False, 4, 3, 1, "max_steps"), _rec(True, 3, 2, 0), _rec(False, 1, 0, 0)]
    s = summarize_episodes(recs)
    assert s["episodes"] == 4 and s["correct"] == 2 and s["success"] == 0.5
    assert s["avg_steps"] == 2.5 and s["avg_tool_calls"] == 1.5 and s["avg_invalid_tool_calls"] == 0.25
    assert s["budget_exhausted"] == 0.25 and s["avg_generated_tokens"] == 25.0
    assert (s["ci_low"], s["ci_high"]) == tuple(round(x, 4) for x in wilson_interval(2, 4))
    md = markdown_table(["model", "episodes", "success", "95% CI", "a", "b", "c", "d", "e", "f"], family_rows({"m": s}))
    assert md.splitlines()[2].startswith("| m | 4 | 0.5 | [0.15, 0.85] |")


def test_teacher_forced_divergence_is_zero_against_itself_and_positive_against_another_model():
    model, tok = tiny_model_and_tokenizer(seed=0)
    other, _ = tiny_model_and_tokenizer(seed=1)
    r = get_renderer(tok)
    recs = make_records(3)
    same = teacher_forced_divergence(model, copy.deepcopy(model), r, recs, max_len=512)
    assert same["tokens"] > 50
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["top1_agreement"] == 1.0
    assert same["nll"] == pytest.approx(same["nll_reference"])
    assert len(same["kl_per_layer"]) == model.config.num_hidden_layers
    diff = teacher_forced_divergence(other, model, r, recs, max_len=512)
    assert diff["kl"] > 0.01 and diff["top1_agreement"] < 1.0 and diff["tokens"] == same["tokens"]
    assert diff["kl_per_layer"][-1] == pytest.approx(diff["kl"], rel=1e-5)
    with pytest.raises(ValueError, match="no assistant tokens"):
        teacher_forced_divergence(model, other, r, [{"messages": [{"role": "user", "content": "hi"}]}])


def test_checkpoint_list_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="checkpoints must be a non-empty list"):
        _checkpoints({"checkpoints": []})
    with pytest.raises(ValueError, match=r"checkpoints\[0\].path"):
        _checkpoints({"checkpoints": [{"name": "a", "path": str(tmp_path / "missing")}]})
    with pytest.raises(ValueError, match="used twice"):
        _checkpoints({"checkpoints": [{"name": "a", "path": str(tmp_path)}, {"name": "a", "path": str(tmp_path)}]})
    with pytest.raises(ValueError, match="reference='b'"):
        _checkpoints({"checkpoints": [{"name": "a", "path": str(tmp_path)}], "reference": "b"})
    (tmp_path / "config.json").write_text('{"model_type": "qwen3_moe", "quantization_config": {"quant_method": "compressed-tensors"}}')
    with pytest.raises(ValueError, match=r"checkpoints\[0\].ptq='rtn' needs a dense HF checkpoint"):
        _checkpoints({"checkpoints": [{"name": "a", "path": str(tmp_path), "ptq": "rtn"}]})
    with pytest.raises(ValueError, match="not a qat.ptq method"):
        _checkpoints({"checkpoints": [{"name": "a", "path": str(tmp_path), "ptq": "awq"}]})
    with pytest.raises(ValueError, match=r"ptq='gptq' needs calibration data: run `python -m train.ptq"):
        _checkpoints({"checkpoints": [{"name": "a", "path": str(tmp_path), "ptq": "gptq"}]})


def test_a_failing_episode_counts_as_a_failure_with_its_reason():
    """A checkpoint whose tokenizer does not fit its model (ids past the embedding) fails every episode;
    the evaluation goes on and scores them as failures with the error, never dropping them."""
    from sandbox_env.agent.rollout import Budgets, ToolEnv
    from sandbox_env.eval.evaluate import run_model
    from sandbox_env.inference.loading import LoadedModel
    from sandbox_env.tasks import get_family
    from train.models import build_model, load_preset

    _, tok = tiny_model_and_tokenizer(seed=0)
    small = build_model(dict(load_preset("tiny_qwen3_moe"), copy_circuit=None), vocab_size=64, hidden_size=64,
                        intermediate_size=128,
                        moe_intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                        head_dim=32, num_experts=4).eval()
    fam = get_family("arith")
    tasks = [("arith", fam, fam.make("heldout", i, 0)) for i in range(2)]
    cfg = {"engine": {"max_batch_size": 2, "concurrency": 2}, "sampling": {"max_new_tokens": 8}, "seed": 0}
    records, speed = run_model("broken", LoadedModel(small, tok, "hf", "x"), tasks, ToolEnv(tools=("python",)),
                               Budgets(max_steps=2), cfg)
    assert speed["episode_errors"] == 2 and summarize_episodes(records)["success"] == 0.0
    assert all("episode error: IndexError" in r["verdict"]["reason"] for r in records)


def test_mcnemar_exact_p_values():
    from sandbox_env.eval.metrics import mcnemar

    ref = {f"t{i}": True for i in range(10)}
    # 5 tasks lost, none gained: p = 2 * (1/2)^5
    model = dict(ref, **{f"t{i}": False for i in range(5)})
    d = mcnemar(ref, model)
    assert (d["only_reference"], d["only_model"], d["tasks"]) == (5, 0, 10)
    assert d["p_value"] == round(2 / 32, 4) and d["success_diff"] == -0.5
    # 9 against 1: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = {f"t{i}": i < 9 for i in range(20)}
    b = {f"t{i}": i == 9 for i in range(20)}
    assert mcnemar(a, b)["p_value"] == round(2 * 11 / 1024, 4)
    # identical results: no discordant task, no evidence of a difference
    assert mcnemar(a, dict(a))["p_value"] == 1.0
    # only the shared tasks count
    assert mcnemar({"x": True, "y": False}, {"x": True})["tasks"] == 1


def test_plots_are_written_for_many_models_and_zero_kl(tmp_path):
    from sandbox_env.eval.report import plot_kl_per_layer, plot_success_by_model

    summaries = {f"ptq_gptq_int{b}_g32_variant{i}": {"success": 0.1 * i, "ci_low": 0.0, "ci_high": min(1.0, 0.1 * i + 0.2)}
                 for b in (4, 3) for i in range(8)}
    plot_success_by_model(summaries, str(tmp_path / "s.png"))
    plot_kl_per_layer({"qat_int4_g32": [0.0, 1e-4, 3e-2], "ptq_rtn_int4_g32": [0.0, 2e-4, 5e-2]},
                      str(tmp_path / "kl.png"), "bf16")
    assert (tmp_path / "s.png").stat().st_size > 1000 and (tmp_path / "kl.png").stat().st_size > 1000
