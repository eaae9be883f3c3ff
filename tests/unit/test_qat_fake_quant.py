"""Fake-quant INT4 numerics and prepare() coverage, checked exactly against a reference."""

import math
import re

import pytest
import torch
from torch import nn

from qat import QuantConfig, iter_quantized, numerics, prepare, quant_error_stats, refresh_observers, set_fake_quant
from qat.fake_quant import ExpertWeightFakeQuant
from qat.numerics import FakeQuantSTE
from train.models import build_model, load_preset, set_experts_implementation

TINY_FAMILIES = ["tiny_qwen3_moe", "tiny_qwen2_moe", "tiny_mixtral", "tiny_olmoe", "tiny_deepseek_v3", "tiny_gpt_oss"]


def reference_fake_quant(w_OI: torch.Tensor, bits=4, group_size=32, grid="k2", scale_dtype=torch.bfloat16):
    """Group by group with scalar arithmetic: the definition, written independently of qat.numerics."""
    qmax = 2 ** (bits - 1) - 1
    qmin = -qmax if grid == "k2" else -(2 ** (bits - 1))
    divisor = qmax if grid == "k2" else qmax + 0.5
    w = w_OI.detach().float().reshape(-1, w_OI.shape[-1])
    out = torch.empty_like(w)
    codes = torch.empty_like(w)
    scales = torch.empty(w.shape[0], w.shape[1] // group_size, dtype=scale_dtype)
    for r in range(w.shape[0]):
        for gi in range(w.shape[1] // group_size):
            seg = w[r, gi * group_size:(gi + 1) * group_size]
            s = (seg.abs().max() / divisor).to(scale_dtype)
            scales[r, gi] = s
            s32 = s.float()
            q = torch.zeros_like(seg) if s32 == 0 else torch.clamp(torch.round(seg / s32), qmin, qmax)
            codes[r, gi * group_size:(gi + 1) * group_size] = q
            out[r, gi * group_size:(gi + 1) * group_size] = q * s32
    shape = w_OI.shape
    return out.reshape(shape).to(w_OI.dtype), codes.reshape(shape), scales.reshape(*shape[:-1], -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grid", ["k2", "full"])
def test_fake_quant_matches_reference_exactly(dtype, grid):
    cfg = QuantConfig(grid=grid)
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        w = (torch.randn(3, 8, 96, generator=g) * (0.01 + seed)).to(dtype)
        w[0, 0, :32] = 0.0  # an all-zero group
        w[1, 2, 5] = 40.0 * (seed + 1)  # an outlier owns its group's scale
        fq = ExpertWeightFakeQuant(cfg, w, transposed=False)
        got = fq(w)
        ref, ref_codes, ref_scales = reference_fake_quant(w, grid=grid)
        assert got.dtype == dtype
        torch.testing.assert_close(got, ref, atol=0, rtol=0, msg=lambda m: f"seed {seed}: {m}; sqnr {numerics.sqnr_db(ref, got)}")  # noqa: B023 - called now
        codes, scales = fq.quantize(w)
        assert torch.equal(codes.float(), ref_codes) and torch.equal(scales, ref_scales)
        # The fake-quant weight is code x scale of the export, bit for bit.
        assert torch.equal(numerics.dequantize_groups(codes, scales, 32, dtype), got)


@pytest.mark.parametrize("bits,grid", [(4, "k2"), (4, "full"), (3, "k2"), (2, "k2"), (8, "full")])
def test_codes_on_grid_and_scales_representable(bits, grid):
    cfg = QuantConfig(bits=bits, grid=grid)
    w = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(bits)) * 3
    codes, scale = numerics.quantize_groups(w, cfg)
    assert codes.dtype == torch.int8 and scale.dtype == torch.bfloat16
    assert int(codes.min()) >= cfg.qmin and int(codes.max()) <= cfg.qmax
    assert int(codes.max()) == cfg.qmax or int(codes.min()) == cfg.qmin  # absmax reaches an end of the grid
    # bf16 scales survive a float32 round trip unchanged: they are what the export stores.
    assert torch.equal(scale.float().to(torch.bfloat16), scale)
    if grid == "k2":
        assert int(codes.min()) >= -cfg.qmax  # symmetric: -8 never used on K2's grid


def test_grid_constants():
    assert (QuantConfig().qmin, QuantConfig().qmax, QuantConfig().divisor) == (-7, 7, 7.0)
    full = QuantConfig(grid="full")
    assert (full.qmin, full.qmax, full.divisor) == (-8, 7, 7.5)


def test_straight_through_gradient_is_identity_in_range():
    cfg = QuantConfig(observer="absmax")
    w = torch.randn(2, 8, 64, requires_grad=True)
    fq = ExpertWeightFakeQuant(cfg, w.detach(), transposed=False)
    upstream = torch.randn(2, 8, 64)
    fq(w).backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_mse_observer_error_not_worse_than_absmax():
    torch.manual_seed(0)
    w = torch.randn(4, 32, 128) * torch.rand(4, 32, 1)
    w[:, :, ::17] *= 6  # heavy tails
    err = {}
    for obs in ["absmax", "mse"]:
        fq = ExpertWeightFakeQuant(QuantConfig(observer=obs), w, transposed=False)
        err[obs] = (fq(w) - w).pow(2).sum().item()
    assert err["mse"] < err["absmax"]


def test_lsq_scales_get_gradients_and_move():
    torch.manual_seed(0)
    cfg = QuantConfig(observer="lsq")
    w = torch.randn(2, 8, 64)
    fq = ExpertWeightFakeQuant(cfg, w, transposed=False)
    before = fq.scale.detach().clone()
    opt = torch.optim.SGD(fq.parameters(), lr=1e-2)
    target = w * 0.5  # a target that rewards shrinking the effective weights
    for _ in range(5):
        opt.zero_grad()
        loss = (fq(w) - target).pow(2).sum()
        loss.backward()
        assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(before, fq.scale.detach())
    assert float(fq.scale.detach().mean()) < float(before.mean())


# --- gradients: every custom backward against autograd of a plain reference ------------------------
#
# The reference is written with ordinary differentiable ops and the textbook straight-through
# estimator (`c + (round(c) - c).detach()`), and autograd derives its gradients: through the clamp
# (zero outside the grid, when the observer clips), through `q * s` and `w / s` (which together give
# LSQ's scale gradient q - v inside the grid and q outside), the scale's rounding to bf16 as the
# identity, and LSQ's gradient scale as a hook. Nothing of qat.numerics' backward formula is restated.


def reference_fake_quant_autograd(w_OI, scale_OG, cfg, clip: bool):
    g = cfg.group_size
    s = scale_OG.unsqueeze(-1)
    v = w_OI.float().unflatten(-1, (-1, g)) / s
    # LSQ's order (Esser et al. 2020): clip, then round; the clip's gradient decides what is "outside"
    c = v.clamp(cfg.qmin, cfg.qmax) if clip else v + (v.clamp(cfg.qmin, cfg.qmax) - v).detach()
    q = c + (c.round() - c).detach()  # straight-through rounding
    return (q * s).flatten(-2).to(w_OI.dtype)


def reference_lsq_scale(scale_param, cfg):
    """The lsq observer's scale as plain ops: |s| rounded to the scale dtype (straight through), its
    gradient scaled by 1 / sqrt(group_size * qmax) (LSQ, Esser et al. 2020) with a hook."""
    s = scale_param.abs().clamp_min(torch.finfo(torch.float32).tiny)
    s = s + (s.to(cfg.torch_scale_dtype).float() - s).detach()
    factor = 1.0 / math.sqrt(cfg.group_size * cfg.qmax)
    s.register_hook(lambda grad: grad * factor)
    return s


def _weights(seed, shape=(3, 16, 96)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * torch.rand(*shape[:-1], 1, generator=g)


@pytest.mark.parametrize("observer", ["absmax", "mse", "static", "lsq"])
@pytest.mark.parametrize("grid", ["k2", "full"])
@pytest.mark.parametrize("transposed", [False, True])
def test_fake_quant_gradients_match_autograd_of_reference(observer, grid, transposed):
    cfg = QuantConfig(observer=observer, grid=grid)
    for seed in range(6):
        w_OI = _weights(seed)
        w_OI[0, 1, 7] *= 40  # an outlier: with mse it is clipped, its gradient must vanish
        w = w_OI.transpose(-1, -2).contiguous() if transposed else w_OI
        fq = ExpertWeightFakeQuant(cfg, w, transposed=transposed)
        if observer == "lsq":  # learned scales well below absmax: many weights fall outside the grid
            with torch.no_grad():
                fq.scale.mul_(0.6)
        upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(100 + seed))
        wg = w.clone().requires_grad_(True)
        out = fq(wg)
        (out * upstream).sum().backward()

        w_ref = w_OI.clone().requires_grad_(True)
        if observer == "lsq":
            s_param = fq.scale.detach().clone().requires_grad_(True)
            s_ref = reference_lsq_scale(s_param, cfg)
        else:
            s_ref = fq.scale_for(w_OI).float()  # the observer's scales (no gradient of their own)
        ref = reference_fake_quant_autograd(w_ref, s_ref, cfg, clip=observer != "absmax")
        up_OI = upstream.transpose(-1, -2) if transposed else upstream
        (ref * up_OI).sum().backward()

        got_out = out.transpose(-1, -2) if transposed else out
        assert torch.equal(got_out, ref.detach()), f"seed {seed}: forward differs from the reference"
        got_grad = wg.grad.transpose(-1, -2) if transposed else wg.grad
        torch.testing.assert_close(got_grad, w_ref.grad, rtol=1e-6, atol=1e-6, msg=lambda m: f"seed {seed}, d/dw: {m}")  # noqa: B023 - called now
        # and exactly: upstream where the weight is inside the grid, 0 where it is clipped (the reference
        # goes through w / s * s, so it only agrees to rounding; the straight-through estimator is exact)
        assert torch.equal(got_grad, torch.where(w_ref.grad != 0, up_OI, torch.zeros_like(up_OI))), f"seed {seed}"
        clipped = (w_ref.grad == 0).sum()
        if observer == "absmax":
            assert clipped == 0  # absmax never clips: the gradient is upstream's everywhere
        else:
            assert clipped > 0, "the test must reach weights outside the grid"
        if observer == "lsq":
            torch.testing.assert_close(fq.scale.grad, s_param.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"seed {seed}, d/dscale: {m}")  # noqa: B023 - called now
            assert fq.scale.grad.abs().sum() > 0


def test_lsq_scale_gradient_against_finite_differences_of_the_clipped_part():
    """Where every weight of a group is clipped, the fake-quant weight is qmax*s or qmin*s, linear
    in s: there LSQ's scale gradient (q, times its gradient scale) is the true derivative, which
    central differences measure."""
    cfg = QuantConfig(observer="lsq")
    w = torch.full((1, 1, 32), 3.0, dtype=torch.float64)
    w[..., 1::2] = -3.0
    scale = torch.tensor([[0.25]], dtype=torch.float64, requires_grad=True)  # |w| / s = 12: all clipped
    upstream = torch.randn(1, 1, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    factor = 1.0 / math.sqrt(cfg.group_size * cfg.qmax)

    def f(s):
        return (numerics.fake_quant(w, s, cfg, clip_grad_mask=True, scale_grad_factor=factor) * upstream).sum()

    f(scale).backward()
    h = 1e-2  # the fake quant computes in float32; s +- h keeps every weight clipped (|w| / s > 7)
    fd = (f(scale.detach() + h) - f(scale.detach() - h)) / (2 * h)
    torch.testing.assert_close(scale.grad.squeeze() / factor, fd, rtol=1e-5, atol=0)


@pytest.mark.parametrize("preset", TINY_FAMILIES)
def test_prepare_covers_exactly_the_routed_experts(preset):
    model = build_model(load_preset(preset))
    keys_before = set(model.state_dict())
    report = prepare(model, QuantConfig())
    routed = [n for n, p in model.named_parameters()
              if re.search(r"(^|\.)experts\.(gate_up_proj|down_proj)$", n)]
    assert routed and sorted(report.quantized) == sorted(routed)
    assert report.num_params == sum(p.numel() for n, p in model.named_parameters() if n in routed)
    untouched = [n for n, _ in model.named_parameters() if n not in routed]
    assert any("shared_expert" in n for n in untouched) == (preset in ("tiny_qwen2_moe", "tiny_deepseek_v3"))
    for name in untouched:  # attention, routers, shared experts, dense MLPs, embeddings, lm_head, biases
        assert "weight_fake_quant" in name or not re.search(r"(^|\.)experts\.(gate_up_proj|down_proj)$", name)
    # the state dict keeps the model's own names (absmax has no observer state)
    assert set(model.state_dict()) == keys_before
    assert "fake quant" in report.summary()


@pytest.mark.parametrize("preset", ["tiny_qwen3_moe", "tiny_gpt_oss", "tiny_deepseek_v3"])
def test_experts_implementations_agree_under_fake_quant(preset):
    torch.manual_seed(0)
    model = build_model(load_preset(preset))
    prepare(model, QuantConfig())
    ids = torch.randint(0, 2048, (2, 24))
    losses, grads = {}, {}
    for impl in ["eager", "batched_mm", "grouped_mm"]:
        set_experts_implementation(model, impl)
        model.zero_grad()
        out = model(ids, labels=ids)
        out.loss.backward()
        losses[impl] = out.loss.item()
        grads[impl] = model.model.layers[-1].mlp.experts.down_proj.grad.clone()
    for impl in ["batched_mm", "grouped_mm"]:
        assert math.isclose(losses[impl], losses["eager"], rel_tol=1e-5)
        torch.testing.assert_close(grads[impl], grads["eager"], rtol=1e-4, atol=1e-6)


def test_fake_quant_computed_once_per_forward_in_eager_loop(monkeypatch):
    model = build_model(load_preset("tiny_qwen3_moe"))
    set_experts_implementation(model, "eager")
    report = prepare(model, QuantConfig())
    calls = []
    original = FakeQuantSTE.apply
    monkeypatch.setattr(FakeQuantSTE, "apply", lambda *a: calls.append(1) or original(*a))
    model(torch.randint(0, 2048, (2, 64)))  # 128 tokens x top-2: every expert of every layer is hit
    assert len(calls) == len(report.quantized)


def test_set_fake_quant_switches_off_and_on():
    torch.manual_seed(0)
    model = build_model(load_preset("tiny_mixtral")).eval()
    ids = torch.randint(0, 2048, (1, 16))
    with torch.no_grad():
        base = model(ids).logits
        prepare(model, QuantConfig())
        quantized = model(ids).logits
        assert set_fake_quant(model, False) == 4
        off = model(ids).logits
        set_fake_quant(model, True)
        on = model(ids).logits
    assert torch.equal(off, base)
    assert torch.equal(on, quantized)
    assert (quantized - base).abs().max() > 0


def test_gpt_oss_groups_along_the_input_dim():
    model = build_model(load_preset("tiny_gpt_oss"))
    prepare(model, QuantConfig())
    experts = model.model.layers[0].mlp.experts
    w = experts.gate_up_proj.detach()  # [E, H, 2I]: input dim H is dim 1
    fq = experts.weight_fake_quant["gate_up_proj"]
    assert fq.transposed
    ref, _, _ = reference_fake_quant(w.transpose(1, 2).contiguous())
    assert torch.equal(fq(w), ref.transpose(1, 2))


class PerExpertLinearMoE(nn.Module):
    """A model that keeps one nn.Linear per expert (as older and custom MoE code does)."""

    def __init__(self, hidden=64, inter=32, num_experts=4):
        super().__init__()
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(
            nn.ModuleDict({"w1": nn.Linear(hidden, inter, bias=False), "w3": nn.Linear(hidden, inter, bias=False),
                           "w2": nn.Linear(inter, hidden, bias=False)}) for _ in range(num_experts))
        self.shared_expert = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x):
        probs = self.router(x).softmax(-1)
        out = self.shared_expert(x)
        for i, e in enumerate(self.experts):
            out = out + probs[..., i:i + 1] * e["w2"](torch.nn.functional.silu(e["w1"](x)) * e["w3"](x))
        return out


def test_prepare_per_expert_linear_model():
    torch.manual_seed(0)
    model = PerExpertLinearMoE()
    x = torch.randn(5, 64)
    base = model(x)
    report = prepare(model, QuantConfig())
    assert sorted(report.quantized) == sorted(f"experts.{i}.{w}.weight" for i in range(4) for w in ("w1", "w2", "w3"))
    out = model(x)
    manual = model.shared_expert(x)
    probs = model.router(x).softmax(-1)
    for i, e in enumerate(model.experts):
        q = {k: reference_fake_quant(e[k].weight)[0] for k in ("w1", "w2", "w3")}
        h = torch.nn.functional.silu(x @ q["w1"].T) * (x @ q["w3"].T)
        manual = manual + probs[..., i:i + 1] * (h @ q["w2"].T)
    torch.testing.assert_close(out, manual)
    assert (out - base).abs().max() > 0
    out.sum().backward()
    assert model.experts[0]["w1"].weight.grad is not None


def test_quant_error_stats_and_refresh():
    model = build_model(load_preset("tiny_olmoe"))
    prepare(model, QuantConfig(observer="mse"))
    stats = quant_error_stats(model)
    assert set(stats) == {n for n, *_ in iter_quantized(model)}
    for s in stats.values():
        assert 15.0 < s["sqnr_db"] < 40.0 and 0.0 <= s["clipped_frac"] <= 1.0
    assert refresh_observers(model) == len(stats)


# --- errors that name the setting --------------------------------------------------------------

@pytest.mark.parametrize("kwargs,needle", [
    ({"bits": 1}, "QuantConfig.bits=1"),
    ({"bits": 9}, "QuantConfig.bits=9"),
    ({"group_size": 0}, "QuantConfig.group_size=0"),
    ({"grid": "asym"}, "QuantConfig.grid='asym'"),
    ({"observer": "minmax"}, "QuantConfig.observer='minmax'"),
    ({"scale_dtype": "int8"}, "QuantConfig.scale_dtype='int8'"),
    ({"targets": ["("]}, "QuantConfig.targets"),
    ({"targets": []}, "QuantConfig.targets is empty"),
])
def test_bad_config_names_the_field(kwargs, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        QuantConfig(**kwargs)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown field.*group"):
        QuantConfig.from_dict({"group": 32})


def test_group_size_must_divide_input_dim():
    model = build_model(load_preset("tiny_mixtral"))
    with pytest.raises(ValueError, match=r"group_size=48 does not divide the input dim 128 of model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        prepare(model, QuantConfig(group_size=48))
    assert not hasattr(model.model.layers[0].mlp.experts, "weight_fake_quant")  # left unchanged


def test_prepare_twice_raises():
    model = build_model(load_preset("tiny_mixtral"))
    prepare(model)
    with pytest.raises(ValueError, match="already applied"):
        prepare(model)


def test_no_match_lists_candidates():
    model = build_model(load_preset("tiny_mixtral"))
    with pytest.raises(ValueError, match=r"matched no parameter.*experts\.gate_up_proj"):
        prepare(model, QuantConfig(targets=[r"nothing_here$"]))
    dense = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="is this a MoE model"):
        prepare(dense)


def test_target_on_a_non_expert_tensor_raises():
    model = build_model(load_preset("tiny_gpt_oss"))
    with pytest.raises(ValueError, match=r"gate_up_proj_bias.*neither a fused 3D"):
        prepare(model, QuantConfig(targets=[r"experts\.gate_up_proj_bias$"]))


def test_set_fake_quant_requires_prepare():
    with pytest.raises(ValueError, match="call qat.prepare"):
        set_fake_quant(build_model(load_preset("tiny_mixtral")), False)


@pytest.mark.integration
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_kernel_is_bit_identical_to_eager(dtype):
    torch.manual_seed(0)
    w = (torch.randn(4, 64, 96) * 0.05).to(dtype)
    w[0, 0, :32] = 0
    eager = ExpertWeightFakeQuant(QuantConfig(kernel="eager"), w, transposed=False)(w)
    compiled = ExpertWeightFakeQuant(QuantConfig(kernel="compiled"), w, transposed=False)(w)
    assert torch.equal(eager, compiled)
