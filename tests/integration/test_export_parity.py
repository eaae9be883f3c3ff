"""Export parity on every supported family, against loaders we did not write; the export job.

For the tiny preset of each family: the logits of `load_int4(out)` and of transformers'
`AutoModelForCausalLM.from_pretrained(out)` (compressed-tensors path) equal the fake-quant model's
up to float rounding, far below the fake-quant-vs-float difference. Run with -s to see the figures.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qat import QuantConfig, iter_quantized, prepare
from qat.export import export_int4
from qat.files import verify_export
from qat.load import load_int4
from train.models import build_model, load_preset

pytestmark = pytest.mark.integration
torch.set_num_threads(2)

FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3"]
ROOT = Path(__file__).resolve().parents[2]


def tiny(family, dtype="float32"):
    torch.manual_seed(0)
    preset = load_preset(f"tiny_{family}", vocab_size=128, num_hidden_layers=2)
    preset["dtype"] = dtype
    return build_model(preset).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_fp32(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(family)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = _logits(model, ids)
    prepare(model, QuantConfig())
    fq = _logits(model, ids)
    export_int4(model, tmp_path)
    quant_effect = (fq - ref).abs().max().item()

    ours = (_logits(load_int4(tmp_path), ids) - fq).abs().max().item()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    theirs = (_logits(hf, ids) - fq).abs().max().item()
    print(f"\n{family} fp32: fake quant vs float {quant_effect:.2e} | load_int4 vs fake quant {ours:.2e} | "
          f"transformers+compressed-tensors vs fake quant {theirs:.2e}")
    assert ours < 1e-4 and ours < 1e-3 * quant_effect
    # transformers really decompresses the INT4 tensors: its expert weights are the fake-quant
    # weights, rounded to bf16 because compressed-tensors multiplies code * scale in the scale dtype.
    hf_params = dict(hf.named_parameters())
    for name, module, attr, fq_mod in iter_quantized(model):
        w_fq = fq_mod(getattr(module, attr)).detach()
        assert torch.equal(hf_params[name].to(torch.bfloat16), w_fq.to(torch.bfloat16)), name
    assert theirs < 0.1 * quant_effect


def _capture_experts_calls(model):
    """{experts module name: (args, output)} of the last forward, via hooks."""
    calls, handles = {}, []
    for name, module in model.named_modules():
        if name.endswith("mlp.experts"):
            def hook(mod, args, output, name=name):
                calls[name] = (tuple(a.detach().clone() for a in args), output.detach().clone())
            handles.append(module.register_forward_hook(hook))
    return calls, handles


@pytest.mark.parametrize("family", FAMILIES)
def test_parity_bf16(family, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny(family, "bfloat16")
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    ref = _logits(model, ids)
    prepare(model, QuantConfig())
    calls, handles = _capture_experts_calls(model)
    fq = _logits(model, ids)
    for h in handles:
        h.remove()
    export_int4(model, tmp_path)
    quant_effect = (fq - ref).abs().max().item()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    theirs = (_logits(hf, ids) - fq).abs().max().item()
    assert theirs == 0.0  # the same bf16 weights through the same kernels: identical logits
    # Our bf16 int4 kernel accumulates in another order than bf16 F.linear; one bf16 ulp can flip a
    # router's top-k choice downstream, so compare each experts module on the fake-quant model's
    # own inputs (same tokens, same routing): equal up to bf16 rounding of the output.
    m = load_int4(tmp_path)
    worst = 0.0
    for name, (args, out_fq) in calls.items():
        with torch.no_grad():
            out = m.get_submodule(name)(*args).float()
        err = (out - out_fq.float()).abs().max().item()
        worst = max(worst, err / out_fq.float().abs().max().item())
        assert err <= 4 * 2**-8 * out_fq.float().abs().max().item(), name
    logits_diff = (_logits(m, ids) - fq).abs()
    print(f"\n{family} bf16: fake quant vs bf16 {quant_effect:.2e} | transformers+compressed-tensors vs fake quant "
          f"{theirs:.2e} | load_int4 experts vs fake-quant experts (same inputs) max rel {worst:.2e} | "
          f"load_int4 logits vs fake quant max {logits_diff.max().item():.2e} mean {logits_diff.mean().item():.2e}")


def _job(*overrides):
    cmd = [sys.executable, "-m", "qat.export", *overrides]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def _tensors(path):
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            out.update({k: sf.get_tensor(k) for k in sf.keys()})
    return out


def test_export_job_plain_checkpoint_is_rtn(tmp_path):
    model = tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "ckpt")
    _job(f"input={tmp_path / 'ckpt'}", f"output={tmp_path / 'int4'}", "qat.grid=full", "max_shard_size=1MB")
    assert verify_export(tmp_path / "int4")
    assert (tmp_path / "int4" / "model.safetensors.index.json").exists()
    export_int4(model, tmp_path / "direct", quant_config=QuantConfig(grid="full"))
    a, b = _tensors(tmp_path / "int4"), _tensors(tmp_path / "direct")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(tmp_path.glob("**/.hydra"))


def test_export_job_qat_checkpoint_uses_its_observers(tmp_path):
    model = tiny("qwen3_moe")
    model.save_pretrained(tmp_path / "ckpt")
    cfg = QuantConfig(observer="mse")
    prepare(model, cfg)
    with torch.no_grad():  # observer state that differs from what a fresh prepare would compute
        for _, _, _, fq in iter_quantized(model):
            fq.clip_ratio.fill_(0.8)
    (tmp_path / "ckpt" / "qat_config.json").write_text(json.dumps(cfg.to_dict()))
    observers = {k: v for k, v in model.state_dict().items() if ".weight_fake_quant." in k}
    save_file(observers, str(tmp_path / "ckpt" / "qat_state.safetensors"))
    _job(f"input={tmp_path / 'ckpt'}", f"output={tmp_path / 'int4'}")
    export_int4(model, tmp_path / "direct")
    a, b = _tensors(tmp_path / "int4"), _tensors(tmp_path / "direct")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    src = json.loads((tmp_path / "int4" / "config.json").read_text())["agentic_qat_export"]["source"]
    assert src == "fake_quant"


def test_export_job_requires_input():
    r = subprocess.run([sys.executable, "-m", "qat.export", "output=/tmp/x"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode != 0 and "input" in r.stderr
