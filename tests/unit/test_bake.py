"""qat.bake_fake_quant: the baked model computes exactly what the fake-quant model computed."""

import pytest
import torch

from qat import QuantConfig, bake_fake_quant, get_config, prepare, set_fake_quant
from train.models import build_model, load_preset


def _tiny(family):
    torch.manual_seed(0)
    return build_model(load_preset(f"tiny_{family}", vocab_size=128, num_hidden_layers=2)).eval()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "olmoe"])
@pytest.mark.parametrize("observer", ["absmax", "mse", "lsq"])
def test_baked_model_equals_the_fake_quant_model_bit_for_bit(family, observer):
    model = _tiny(family)
    prepare(model, QuantConfig(observer=observer, bits=3))
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "experts" in n}
        n = bake_fake_quant(model)
        got = model(ids).logits
    assert n > 0 and get_config(model) is None
    assert not any("weight_fake_quant" in name for name, _ in model.named_modules())
    assert torch.equal(got, want)
    changed = [name for name, p in model.named_parameters() if name in before and not torch.equal(p, before[name])]
    assert changed, "baking wrote no quantized weight"


def test_a_disabled_quantizer_is_not_baked():
    model = _tiny("qwen3_moe")
    prepare(model, QuantConfig())
    set_fake_quant(model, enabled=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert bake_fake_quant(model) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="has no fake quant"):
        bake_fake_quant(model)
