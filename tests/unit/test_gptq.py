"""GPTQ on fused experts: the algorithm against a direct least-squares reference, per-expert error
below RTN's on tiny models of two families, the exact export, and the RTN fallback."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open

from qat import QuantConfig, numerics, prepare
from qat.export import export_int4
from qat.gptq import GPTQConfig, expert_intermediate, gptq_quantize
from qat.int4 import unpack_int4
from qat.ptq import apply_ptq, prepare_with_scales, set_scales
from train.models import build_model, load_preset

torch.set_num_threads(1)
VOCAB = 128


def tiny(family, **overrides):
    torch.manual_seed(0)
    return build_model(load_preset(f"tiny_{family}", vocab_size=VOCAB, num_hidden_layers=2, **overrides)).eval()


def calibration(n=6, rows=4, T=32):
    return [torch.randint(0, VOCAB, (rows, T), generator=torch.Generator().manual_seed(100 + i)) for i in range(n)]


def greedy_least_squares(W, X, cfg):
    """GPTQ by definition, without its algebra: quantize column j (the group's scale taken when the
    group starts, from the weights as updated so far), then refit every later column by least
    squares against the original output X W^T, given all columns fixed so far."""
    W, X = W.double().clone(), X.double()
    O, I = W.shape
    gs, target = cfg.group_size, X @ W.T
    Q = torch.zeros_like(W)
    scale = torch.zeros(O, I // gs, dtype=cfg.torch_scale_dtype)
    for j in range(I):
        if j % gs == 0:
            scale[:, j // gs] = numerics.absmax_scale(W[:, j:j + gs], cfg).squeeze(-1)
        s = scale[:, j // gs].double()
        Q[:, j] = (W[:, j] / s).round().clamp(cfg.qmin, cfg.qmax) * s
        if j + 1 < I:
            W[:, j + 1:] = torch.linalg.lstsq(X[:, j + 1:], target - X[:, :j + 1] @ Q[:, :j + 1].T).solution.T
    return Q


@pytest.mark.parametrize("bits", [4, 2])
def test_gptq_is_greedy_least_squares(bits):
    torch.manual_seed(0)
    cfg = QuantConfig(bits=bits, group_size=8)
    O, I, n = 6, 32, 200
    X = (torch.randn(n, I) @ torch.randn(I, I)) * 0.3 + torch.randn(n, 1)  # correlated inputs
    W = torch.randn(O, I)
    H = 2 * X.double().T @ X.double()
    # float64 and no dampening: the Cholesky form equals the explicit refits to rounding
    codes, scale = gptq_quantize(W.double()[None], H[None], cfg, percdamp=1e-12, block_size=16)
    got = numerics.dequantize_groups(codes[0], scale[0], cfg.group_size, torch.float64)
    assert torch.allclose(got, greedy_least_squares(W, X, cfg), rtol=0, atol=1e-9)
    assert codes.abs().max() <= cfg.qmax

    def out_err(Wq):
        return float(((X.double() @ (W.double() - Wq).T) ** 2).sum())

    rtn = numerics.dequantize_groups(*numerics.quantize_groups(W, cfg), cfg.group_size, torch.float64)
    ordered = numerics.dequantize_groups(*gptq_quantize(W[None], H.float()[None], cfg, act_order=True),
                                         cfg.group_size, torch.float64)[0]
    assert out_err(got) < out_err(rtn) and out_err(ordered) < out_err(rtn)


def _routed_inputs(model):
    """{experts module: (module, hidden [N, H], top_k_index [N, K])} of one forward on the calibration."""
    seen, handles = {}, []
    for name, m in model.named_modules():
        if name.endswith("mlp.experts"):
            def hook(mod, args, out, name=name):
                x, idx = args[0].detach(), args[1].detach()
                old = seen.get(name)
                seen[name] = (mod, x, idx) if old is None else (mod, torch.cat([old[1], x]), torch.cat([old[2], idx]))
            handles.append(m.register_forward_hook(hook))
    with torch.no_grad():
        for ids in calibration():
            model(ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family,bits,act_order", [("qwen3_moe", 4, False), ("mixtral", 4, False),
                                                   ("mixtral", 3, True)])
def test_gptq_output_error_below_rtn_on_every_expert(family, bits, act_order):
    cfg = QuantConfig(bits=bits)
    original, rtn, gptq = tiny(family), tiny(family), tiny(family)
    apply_ptq(rtn, "rtn", cfg)
    report = apply_ptq(gptq, "gptq", cfg, calibration=calibration(), gptq=GPTQConfig(act_order=act_order))
    assert not report.rtn_fallback and report.calibration_tokens == 6 * 4 * 32
    params = {key: {n: p.detach() for n, p in model.named_parameters()}
              for key, model in (("orig", original), ("rtn", rtn), ("gptq", gptq))}
    # The inputs GPTQ calibrated on: routed by the model's router, after the already-quantized layers.
    ratios = []
    for name, (experts, x, idx) in _routed_inputs(gptq).items():
        for e in range(experts.gate_up_proj.shape[0]):
            tok = (idx == e).any(-1)
            inputs = {"gate_up_proj": x[tok], "down_proj": expert_intermediate(experts, e, x[tok]).detach()}
            for attr, X in inputs.items():
                w0 = params["orig"][f"{name}.{attr}"][e]
                err = {k: float((X @ (w0 - params[k][f"{name}.{attr}"][e]).T).pow(2).sum()) for k in ("rtn", "gptq")}
                assert err["gptq"] < err["rtn"], (name, attr, e, err)
                ratios.append(err["gptq"] / err["rtn"])
    mean = sum(ratios) / len(ratios)
    print(f"\n{family} int{bits} act_order={act_order}: GPTQ/RTN output error {mean:.3f} "
          f"over {len(ratios)} expert tensors")
    assert mean <= 0.9


def test_export_writes_gptq_codes_and_scales_and_transformers_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM

    model, reference = tiny("qwen3_moe"), tiny("qwen3_moe")
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    report = apply_ptq(model, "gptq", calibration=calibration())
    with torch.no_grad():
        float_logits, gptq_logits = reference(ids).logits, model(ids).logits
    gptq_weights = {n: p.detach().clone() for n, p in model.named_parameters() if n in report.tensors}
    prepare_with_scales(model, report)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gptq_logits)  # the static fake quant is the identity on them

    export_int4(model, tmp_path / "gptq")
    with safe_open(str(tmp_path / "gptq" / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    I = model.config.moe_intermediate_size
    hub_rows = {"gate_up_proj": (("gate_proj", slice(0, I)), ("up_proj", slice(I, 2 * I))),
                "down_proj": (("down_proj", slice(None)),)}
    for name, w in gptq_weights.items():
        layer, attr = name.split(".")[2], name.split(".")[-1]
        for e in range(w.shape[0]):
            for proj, rows in hub_rows[attr]:
                base = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                scale = tensors[f"{base}.weight_scale"]
                assert torch.equal(scale, report.scales[name][e, rows])  # GPTQ's scales, not recomputed ones
                codes = unpack_int4(tensors[f"{base}.weight_packed"])
                w_hat = numerics.dequantize_groups(codes, scale, 32, torch.float32)
                assert torch.equal(w_hat, w[e, rows])  # codes x scales are the GPTQ weights, bit for bit

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "gptq")).eval()
    with torch.no_grad():
        hf_logits = hf(ids).logits
    quant_effect = (gptq_logits - float_logits).abs().max().item()
    parity = (hf_logits - gptq_logits).abs().max().item()
    print(f"\nGPTQ vs float {quant_effect:.2e} | transformers+compressed-tensors vs GPTQ fake quant {parity:.2e}")
    assert parity < 0.1 * quant_effect  # compressed-tensors multiplies code x scale in bf16

    # The trap: exporting the GPTQ weights with scales recomputed by absmax moves codes.
    rtn_scales = numerics.absmax_scale(gptq_weights["model.layers.0.mlp.experts.down_proj"], QuantConfig())
    assert not torch.equal(rtn_scales, report.scales["model.layers.0.mlp.experts.down_proj"])


def test_expert_without_routed_tokens_falls_back_to_rtn():
    model, rtn = tiny("gpt_oss"), tiny("gpt_oss")  # transposed experts with biases, a router with a bias
    for m in (model, rtn):
        for layer in m.model.layers:
            layer.mlp.router.bias.data[3] = -1e4  # expert 3 is never chosen
    apply_ptq(rtn, "rtn")
    report = apply_ptq(model, "gptq", calibration=calibration(n=2), gptq=GPTQConfig(min_tokens=1))
    names = [f"model.layers.{i}.mlp.experts.{a}" for i in range(2) for a in ("gate_up_proj", "down_proj")]
    assert sorted(report.rtn_fallback) == sorted(f"{n}[3]" for n in names)
    assert all(report.tokens_per_expert[f"model.layers.{i}.mlp.experts"][3] == 0 for i in range(2))
    got, want = dict(model.named_parameters()), dict(rtn.named_parameters())
    for n in names:
        assert torch.equal(got[n][3], want[n][3])  # RTN exactly
        assert not torch.equal(got[n][0], want[n][0])  # GPTQ elsewhere


def test_min_tokens_threshold_counts_experts():
    report = apply_ptq(tiny("qwen3_moe"), "gptq", calibration=calibration(n=1, rows=1, T=8),
                       gptq=GPTQConfig(min_tokens=3))
    counts = report.tokens_per_expert
    expected = sum(2 for c in counts.values() for n in c if n < 3)  # gate_up_proj and down_proj per expert
    assert len(report.rtn_fallback) == expected > 0


def test_static_observer_holds_given_scales():
    model = tiny("qwen3_moe")
    prepare(model, QuantConfig(observer="static"))
    experts = model.model.layers[0].mlp.experts
    fq = experts.weight_fake_quant["down_proj"]
    assert torch.equal(fq.scale, numerics.absmax_scale(experts.down_proj, QuantConfig()))  # absmax at prepare
    with torch.no_grad():
        experts.down_proj.mul_(2)
    assert torch.equal(fq.scale, numerics.absmax_scale(experts.down_proj / 2, QuantConfig()))  # held fixed
    halved = {"model.layers.0.mlp.experts.down_proj": fq.scale / 2}
    assert set_scales(model, halved) == 1 and torch.equal(fq.scale, halved["model.layers.0.mlp.experts.down_proj"])
    absmax = tiny("qwen3_moe")
    prepare(absmax, QuantConfig())
    with pytest.raises(ValueError, match="observer='absmax'"):
        set_scales(absmax, halved)


def test_errors_name_the_setting():
    with pytest.raises(ValueError, match="needs calibration"):
        apply_ptq(tiny("qwen3_moe"), "gptq")
    with pytest.raises(ValueError, match="percdamp"):
        GPTQConfig(percdamp=0)
    with pytest.raises(ValueError, match="min_tokens"):
        GPTQConfig(min_tokens=-1)
    with pytest.raises(ValueError, match="calibration is empty"):
        apply_ptq(tiny("qwen3_moe"), "gptq", calibration=[])
    report = apply_ptq(tiny("qwen3_moe"), "rtn")
    with pytest.raises(ValueError, match="carries no scales"):
        prepare_with_scales(tiny("qwen3_moe"), dataclasses.replace(report))


# --- the job (python -m train.ptq) and QAT from the GPTQ solution (qat_schedule.init=gptq) ----------------

CONF = str(__import__("pathlib").Path(__file__).resolve().parents[2] / "conf")


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    """A tiny dense Qwen3-MoE with its own tokenizer, as the BF16 training run would save it, and
    trajectories to calibrate on."""
    from data.schema import write_jsonl
    from data.tokenizer import train_tokenizer
    from tests.fixtures import make_records

    root = tmp_path_factory.mktemp("ptq")
    records = make_records(80)
    write_jsonl(records, root / "traj.jsonl")
    tok = train_tokenizer(records, vocab_size=384)
    torch.manual_seed(0)
    preset = load_preset("tiny_qwen3_moe", vocab_size=len(tok), num_hidden_layers=2, hidden_size=64,
                         moe_intermediate_size=32, intermediate_size=128, head_dim=16)
    preset["copy_circuit"] = None  # needs hidden_size >= 193
    model = build_model(preset)
    model.save_pretrained(root / "bf16")
    tok.save_pretrained(root / "bf16")
    return root


def _ptq_cfg(root, out, *overrides):
    from hydra import compose, initialize_config_dir

    from qat.jobs import VERSION_BASE

    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        return compose(config_name="ptq", overrides=[f"input={root / 'bf16'}", f"output={out}",
                                                     f"calibration={root / 'traj.jsonl'}", "num_samples=16",
                                                     "seq_len=256", "gptq.min_tokens=4", *overrides])


def test_ptq_job_int4_export_and_int2_dense(dense_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    from qat.files import verify_export
    from train.ptq import run

    root = dense_checkpoint
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    summary = run(_ptq_cfg(root, tmp_path / "int4"))
    assert summary["written"] == "int4" and summary["calibration_tokens"] > 0
    assert verify_export(tmp_path / "int4")
    int4 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "int4")).eval()
    assert json.loads((tmp_path / "int4" / "ptq_report.json").read_text())["tokens_per_expert"]

    summary = run(_ptq_cfg(root, tmp_path / "int2", "bits=2", "gptq.act_order=true"))
    assert summary["written"] == "fake_quant_dense" and summary["quant_config"]["bits"] == 2
    dense = AutoModelForCausalLM.from_pretrained(str(root / "bf16")).eval()
    int2 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "int2")).eval()
    with torch.no_grad():
        ref, l4, l2 = dense(ids).logits, int4(ids).logits, int2(ids).logits
    assert torch.isfinite(l2).all() and (l2 - ref).abs().max() > (l4 - ref).abs().max() > 0  # 2 bits: further off
    with pytest.raises(ValueError, match="output=.* is not empty"):
        run(_ptq_cfg(root, tmp_path / "int4"))
    with pytest.raises(ValueError, match="method='rtn'"):
        run(_ptq_cfg(root, tmp_path / "x", "method=rtn"))
    not_dense = _ptq_cfg(root, tmp_path / "y")
    not_dense.input = str(tmp_path / "int4")  # an INT4 export is no starting point for PTQ
    with pytest.raises(ValueError, match="is a int4 checkpoint; PTQ starts from the BF16 model"):
        run(not_dense)


def test_qat_starts_from_the_gptq_solution(dense_checkpoint, tmp_path):
    from hydra import compose, initialize_config_dir

    from qat import iter_quantized
    from qat.jobs import VERSION_BASE
    from train.recipe import TrainRecipe

    root = dense_checkpoint
    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        cfg = compose(config_name="train", overrides=[
            "experiment=tiny_cpu_smoke", "threads=1", "progress_bar=false", f"data.path={root / 'traj.jsonl'}",
            f"output_dir={tmp_path / 'run'}", "max_steps=2", "qat_schedule.start_step=0", "qat_schedule.init=gptq", "qat.observer=lsq",
            "qat_schedule.init_samples=16", "checkpoint.every=0", "eval.every=0"])
    recipe = TrainRecipe(cfg)
    recipe.setup()
    report = recipe.gptq_report
    assert report is not None and report.calibration_tokens > 0
    model = recipe._unwrapped()
    for name, module, attr, fq in iter_quantized(model):
        w = getattr(module, attr)
        assert torch.equal(fq.scale.to(torch.bfloat16), report.scales[name])  # learning starts from GPTQ's scales
        assert torch.equal(fq(w), w)  # the fake-quant model IS the GPTQ model at step 0
    recipe.train()
    recipe.cleanup()
    with pytest.raises(ValueError, match="qat_schedule.init='awq'"):
        with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
            TrainRecipe(compose(config_name="train", overrides=[f"data.path={root / 'traj.jsonl'}", "qat_schedule.init=awq"]))
