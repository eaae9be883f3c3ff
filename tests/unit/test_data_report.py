"""`python -m data.report`: figures match the data, files are written, bad records are counted."""

import json

import numpy as np

from data.report import main
from data.schema import write_jsonl
from tests.fixtures import long_record, make_records, tiny_tokenizer


def test_report_on_jsonl_with_a_bad_record(tmp_path):
    recs = make_records(15) + [long_record(5, 5)]
    p = write_jsonl(recs, tmp_path / "t.jsonl")
    bad = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "tool_call_id": "x", "content": ""}]})
    with open(p, "a") as f:
        f.write(bad + "\n")
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path / "tok")
    rep = main([str(p), "--out", str(tmp_path / "rep"), "--tokenizer", str(tmp_path / "tok"), "--seq-len", "400"])
    assert rep["records"] == 16 and rep["skipped"] == 1 and "record 16" in rep["skipped_errors"][0]
    calls = [sum(len(m.get("tool_calls") or []) for m in r["messages"]) for r in recs]
    assert rep["tool_calls_per_trajectory"]["mean"] == np.mean(calls)
    assert rep["tool_calls_per_trajectory"]["max"] == 5
    assert rep["render"]["split_docs"] >= 1 and rep["tokens_per_trajectory"]["max"] > 400
    assert 0 < rep["loss_share_overall"] < 1
    for name in ("report.md", "report.json", "report.png"):
        assert (tmp_path / "rep" / name).stat().st_size > 0
    assert "loss-token share" in (tmp_path / "rep" / "report.md").read_text()
    assert (tmp_path / "rep" / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_report_trains_a_tokenizer_when_none_given(tmp_path):
    p = write_jsonl(make_records(10), tmp_path / "t.jsonl")
    rep = main([str(p), "--vocab-size", "600"])
    assert rep["tokenizer_vocab"] <= 600 and rep["records"] == 10
    assert (tmp_path / "t_report" / "report.png").exists()
