"""End to end on CPU: dataset on disk -> report CLI -> saved tokenizer -> packed batches -> a tiny
Qwen3-MoE whose packed loss equals the per-document losses and goes down when trained."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data.pipeline import build_dataloader
from data.render import IGNORE_INDEX
from data.schema import write_trajectories
from data.tokenizer import load_tokenizer, train_tokenizer
from tests.fixtures import long_record, make_records

ROOT = Path(__file__).parents[2]


@pytest.mark.integration
def test_dataset_to_loss(tmp_path):
    import transformers

    torch.set_num_threads(2)
    recs = make_records(30, seed=7) + [long_record(10, 20)]
    ds = write_trajectories(recs, tmp_path / "ds")
    r = subprocess.run([sys.executable, "-m", "data.report", str(ds), "--seq-len", "512", "--out", str(tmp_path / "rep")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "loss-token share" in r.stdout and (tmp_path / "rep" / "report.png").exists()

    train_tokenizer(recs, vocab_size=1024).save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    dl = build_dataloader(ds, tok, seq_len=512, batch_size=4, seed=0)
    batch = next(iter(dl))

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                      num_experts_per_tok=2, head_dim=16, use_cache=False)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")

    # packed loss == token-weighted mean of each document's own loss (no loss leaks across documents)
    model.eval()
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"]).loss
        total, count = 0.0, 0
        for b in range(batch["input_ids"].shape[0]):
            pos = batch["position_ids"][b].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for s, e in zip(starts, starts[1:]):
                lab = batch["labels"][b:b + 1, s:e]
                n = int((lab[:, 1:] != IGNORE_INDEX).sum())
                if n == 0:
                    continue
                total += model(input_ids=batch["input_ids"][b:b + 1, s:e], labels=lab).loss.item() * n
                count += n
    assert count == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(packed.item(), total / count, atol=1e-5, rtol=1e-5)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**{k: batch[k] for k in ("input_ids", "position_ids", "labels")}).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
