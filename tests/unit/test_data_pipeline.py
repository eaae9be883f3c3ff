"""Packing and collation: documents intact, positions reset, determinism, sharding, resume, streaming,
and packed logits == unpacked logits on a real transformers MoE forward."""

import collections

import pytest
import torch

from data.pipeline import build_dataloader, pack_best_fit
from data.render import IGNORE_INDEX, get_renderer
from data.schema import write_trajectories
from tests.fixtures import long_record, make_records, tiny_tokenizer

SEQ = 512


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def records():
    return make_records(40, seed=1) + [long_record(8, 20)]


def _docs_in_batch(batch):
    """Split each packed row back into documents using position_ids resets; drop the pad tail."""
    out = []
    for ids, lab, pos in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), batch["position_ids"].tolist()):
        starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
        for a, b in zip(starts, starts[1:]):
            if any(x != IGNORE_INDEX for x in lab[a:b]):
                out.append((tuple(ids[a:b]), tuple(lab[a:b])))
    return out


def _all_docs(tok, records, seq_len):
    r = get_renderer(tok)
    return collections.Counter((tuple(d["input_ids"]), tuple(d["labels"]))
                               for rec in records for d in r.render_documents(rec, max_len=seq_len))


def test_pack_best_fit_places_every_doc_once():
    lengths = [5, 9, 3, 10, 1, 7, 2, 8, 6, 4]
    rows = pack_best_fit(lengths, 10, list(range(10)))
    assert sorted(d for r in rows for d in r) == list(range(10))
    assert all(sum(lengths[d] for d in r) <= 10 for r in rows)
    assert len(rows) == 6  # 55 tokens -> ceil(5.5); best fit decreasing reaches the bound here
    with pytest.raises(ValueError, match="seq_len=4"):
        pack_best_fit([5], 4, [0])


def test_packed_epoch_holds_every_document_once(tok, records):
    dl = build_dataloader(records, tok, seq_len=SEQ, batch_size=4, drop_last=False, seed=0)
    seen = collections.Counter()
    n = 0
    for batch in dl:
        n += 1
        assert set(batch) == {"input_ids", "labels", "position_ids"}
        assert batch["input_ids"].shape[1] == SEQ and batch["input_ids"].dtype == torch.long
        lab, ids = batch["labels"], batch["input_ids"]
        assert torch.equal(lab[lab != IGNORE_INDEX], ids[lab != IGNORE_INDEX])  # aligned, unshifted
        seen.update(_docs_in_batch(batch))
    assert n == len(dl)
    assert seen == _all_docs(tok, records, SEQ)
    assert dl.split_stats.split_docs >= 1
    assert 0.5 < dl.packing_efficiency() <= 1.0


def test_deterministic_and_reshuffled_per_epoch(tok, records):
    def run(seed, epochs=2):
        dl = build_dataloader(records, tok, seq_len=SEQ, batch_size=2, seed=seed)
        return [[b["input_ids"] for b in dl] for _ in range(epochs)]

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for e1, e2 in zip(a, b) for x, y in zip(e1, e2))
    assert not all(torch.equal(x, y) for x, y in zip(a[0], c[0]))
    assert not all(torch.equal(x, y) for x, y in zip(a[0], a[1]))  # epoch 1 is reshuffled


def test_sharding_partitions_rows(tok, records):
    full = build_dataloader(records, tok, seq_len=SEQ, batch_size=4, seed=3, drop_last=True)
    r0 = build_dataloader(records, tok, seq_len=SEQ, batch_size=2, seed=3, rank=0, world_size=2)
    r1 = build_dataloader(records, tok, seq_len=SEQ, batch_size=2, seed=3, rank=1, world_size=2)
    assert len(r0) == len(r1) == len(full)
    for f, a, b in zip(full, r0, r1):
        assert torch.equal(f["input_ids"], torch.cat([a["input_ids"], b["input_ids"]]))
    with pytest.raises(ValueError, match="rank=2"):
        build_dataloader(records, tok, rank=2, world_size=2)


def test_exact_resume_mid_epoch_and_across_epochs(tok, records):
    ref_dl = build_dataloader(records, tok, seq_len=SEQ, batch_size=2, seed=5)
    ref = [b["input_ids"] for _ in range(2) for b in ref_dl]
    n = len(ref_dl)
    for stop in (1, n - 1, n + 1):
        dl = build_dataloader(records, tok, seq_len=SEQ, batch_size=2, seed=5)
        got, it = [], iter(dl)
        for _ in range(stop):
            try:
                got.append(next(it)["input_ids"])
            except StopIteration:
                it = iter(dl)
                got.append(next(it)["input_ids"])
        state = dl.state_dict()
        dl2 = build_dataloader(records, tok, seq_len=SEQ, batch_size=2, seed=5)
        dl2.load_state_dict(state)
        while len(got) < 2 * n:
            got += [b["input_ids"] for b in dl2]
        assert all(torch.equal(x, y) for x, y in zip(got, ref)), stop
    with pytest.raises(ValueError, match="batch_size=2 but this loader has batch_size=4"):
        build_dataloader(records, tok, seq_len=SEQ, batch_size=4, seed=5).load_state_dict(state)


def test_padded_mode(tok, records):
    dl = build_dataloader(records, tok, seq_len=SEQ, batch_size=3, packing=False, drop_last=False)
    seen = collections.Counter()
    for b in dl:
        assert set(b) == {"input_ids", "labels", "position_ids", "attention_mask"}
        assert b["input_ids"].shape[1] % 8 == 0
        for ids, lab, att in zip(b["input_ids"].tolist(), b["labels"].tolist(), b["attention_mask"].tolist()):
            n = sum(att)
            assert att == [1] * n + [0] * (len(att) - n)
            seen[(tuple(ids[:n]), tuple(lab[:n]))] += 1
    assert seen == _all_docs(tok, records, SEQ)


def test_streaming_from_disk(tok, records, tmp_path):
    path = write_trajectories(records, tmp_path / "ds")
    dl = build_dataloader(path, tok, seq_len=SEQ, batch_size=2, streaming=True, shuffle_buffer=8, drop_last=False)
    with pytest.raises(TypeError, match="streaming"):
        len(dl)
    seen = collections.Counter()
    first = [b["input_ids"] for b in dl]
    for b in dl:  # second epoch, different order, same documents
        seen.update(_docs_in_batch(b))
    assert seen == _all_docs(tok, records, SEQ)
    again = build_dataloader(path, tok, seq_len=SEQ, batch_size=2, streaming=True, shuffle_buffer=8, drop_last=False)
    assert all(torch.equal(x, y) for x, y in zip(first, [b["input_ids"] for b in again]))
    # resume in streaming mode
    it = iter(again)
    next(it), next(it)
    st = again.state_dict()
    resumed = build_dataloader(path, tok, seq_len=SEQ, batch_size=2, streaming=True, shuffle_buffer=8, drop_last=False)
    resumed.load_state_dict(st)
    rest = [b["input_ids"] for b in resumed]
    cont = [b["input_ids"] for b in it]
    assert len(rest) == len(cont) > 0 and all(torch.equal(x, y) for x, y in zip(rest, cont))


def test_oversized_steps_are_dropped_and_counted(tok):
    rec = long_record(3, 5)
    rec["messages"][4]["content"] = "y " * 2000
    dl = build_dataloader([rec] * 4, tok, seq_len=SEQ, batch_size=1)
    # per record: the huge assistant step, and the next one, which needs it as context
    assert dl.split_stats.dropped_steps == 8 and dl.split_stats.records == 4
    assert all(len(d.input_ids) <= SEQ for d in dl.docs)


def test_bad_settings_name_the_setting(tok, records):
    with pytest.raises(ValueError, match="seq_len=0"):
        build_dataloader(records, tok, seq_len=0)
    with pytest.raises(ValueError, match="mask_4d='int8'"):
        build_dataloader(records, tok, mask_4d="int8")


def _tiny_moe(vocab, impl):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                      num_experts_per_tok=2, head_dim=16)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("how", ["position_ids", "config_no_cache", "mask_4d"])
def test_packed_logits_equal_unpacked(tok, records, impl, how):
    """No token attends across documents: each packed document's logits equal its own forward."""
    torch.set_num_threads(2)
    model = _tiny_moe(len(tok), impl)
    dl = build_dataloader(records[:12], tok, seq_len=SEQ, batch_size=2, mask_4d="float32" if how == "mask_4d" else None)
    batch = next(iter(dl))
    with torch.no_grad():
        if how == "position_ids":  # no cache, or transformers ignores the packing in position_ids
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        elif how == "config_no_cache":  # what train/ does: model.config.use_cache = False
            model.config.use_cache = False
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        else:  # the 4D mask holds whatever use_cache is
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                           attention_mask=batch["attention_mask"]).logits
        n_docs = 0
        for b in range(batch["input_ids"].shape[0]):
            pos = batch["position_ids"][b].tolist()
            starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
            for s, e in zip(starts, starts[1:]):
                if (batch["labels"][b, s:e] == IGNORE_INDEX).all():
                    continue  # pad tail
                alone = model(input_ids=batch["input_ids"][b:b + 1, s:e]).logits[0]
                torch.testing.assert_close(logits[b, s:e], alone, atol=2e-5, rtol=1e-4)
                n_docs += 1
    assert n_docs >= 3  # several documents shared a row


def test_streaming_validates_in_memory_records(tok, records):
    bad = [dict(r) for r in records[:3]]
    bad[2] = {"messages": [{"role": "user", "content": "q"}, {"role": "wizard", "content": "a"}]}
    dl = build_dataloader(bad, tok, seq_len=SEQ, batch_size=1, streaming=True, shuffle=False)
    with pytest.raises(ValueError, match=r"records: record 2: messages\[1\].role"):
        list(dl)
