"""Trajectory schema: validation messages name file, index and field; disk formats round-trip."""

import copy
import json

import pytest

from data.schema import TrajectoryError, read_jsonl, read_trajectories, validate_record, write_jsonl, write_trajectories
from tests.fixtures import make_records, probe_records, python_record


def test_fixtures_are_valid():
    for i, rec in enumerate(make_records(25)):
        validate_record(rec, source="fixtures", index=i)


def _bad(mutate):
    rec = python_record()
    mutate(rec)
    return rec


BAD = [
    (lambda r: r["messages"][1].update(role="robot"), "messages[1].role", "unknown role 'robot'"),
    (lambda r: r["messages"][3].update(tool_call_id="call_9"), "messages[3].tool_call_id",
     "no assistant tool call with id 'call_9'"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="[1, 2]"),
     "messages[2].tool_calls[0].function.arguments", "expected a JSON object"),
    (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments=[1, 2]),
     "messages[2].tool_calls[0].function.arguments", "expected a JSON object"),
    (lambda r: r["messages"][4].update(content=""), "messages[4]", "needs content or tool_calls"),
    (lambda r: r["messages"][3].update(name="search"), "messages[3].name", "call 'call_0' is to 'python'"),
    (lambda r: r["messages"][1].update(content=None), "messages[1].content", "expected a string"),
    (lambda r: r.update(messages=[]), "messages", "non-empty list"),
    (lambda r: r.update(tools={"python": 1}), "tools", "expected a list"),
    (lambda r: r["messages"].insert(2, {"role": "system", "content": "late"}), "messages[2].role",
     "only be the first message"),
]


@pytest.mark.parametrize("mutate,field,problem", BAD)
def test_validation_names_source_index_and_field(mutate, field, problem):
    with pytest.raises(TrajectoryError) as ei:
        validate_record(_bad(mutate), source="trajs.jsonl", index=12)
    e = ei.value
    assert isinstance(e, ValueError)
    assert str(e).startswith(f"trajs.jsonl: record 12: {field}: "), str(e)
    assert problem in str(e)
    assert (e.source, e.index, e.field) == ("trajs.jsonl", 12, field)


def test_tool_result_must_answer_latest_step():
    rec = python_record()
    # a second assistant step without calls closes call_0; a late tool result is then unmatched
    rec["messages"].insert(4, {"role": "assistant", "content": "thinking aloud"})
    rec["messages"].insert(5, {"role": "tool", "tool_call_id": "call_0", "content": "late"})
    with pytest.raises(TrajectoryError, match=r"messages\[5\].tool_call_id: no assistant tool call"):
        validate_record(rec)


def test_datasets_round_trip_exact(tmp_path):
    recs = probe_records()
    recs[0]["messages"][2]["tool_calls"][0]["function"]["arguments"] = {
        "code": "x", "nested": {"a": [1, 2.5, None, True]}, "ü": "数"}
    recs[1]["metadata"] = {"anything": [1, {"b": None}], "f": 0.1}
    recs[2]["id"] = "external-42"                       # unknown top-level key survives
    recs[2]["messages"][0]["weight"] = 0.5              # unknown message key survives
    recs[3]["messages"][2]["tool_calls"][0].pop("type")  # absent `type` stays absent
    recs[4]["messages"][1]["content"] = "tabs\tand\nnewlines "
    out = write_trajectories(recs, tmp_path / "ds")
    back = read_trajectories(out)
    assert back == recs
    assert back.stats.kept == len(recs) and back.stats.skipped == 0
    # the Arrow schema is fixed: arguments and tools are JSON strings on disk
    from datasets import load_from_disk

    ds = load_from_disk(str(out))
    assert ds.features["tools"].dtype == "string"
    assert json.loads(ds[0]["messages"][2]["tool_calls"][0]["function"]["arguments"])["ü"] == "数"


def test_jsonl_round_trip_and_openai_string_arguments(tmp_path):
    recs = make_records(10)
    p = write_jsonl(recs, tmp_path / "t.jsonl")
    assert read_jsonl(p) == recs
    # OpenAI API form: arguments as a JSON string -> decoded to a dict on read
    rec = python_record()
    api = copy.deepcopy(rec)
    api["messages"][2]["tool_calls"][0]["function"]["arguments"] = json.dumps({"code": "print(2**100)"})
    (tmp_path / "api.jsonl").write_text(json.dumps(api) + "\n")
    assert read_jsonl(tmp_path / "api.jsonl") == [rec]


def test_read_raise_names_file_and_index(tmp_path):
    recs = make_records(5)
    lines = [json.dumps(r) for r in recs]
    bad = copy.deepcopy(recs[3])
    bad["messages"][-1]["role"] = "bot"
    lines[3] = json.dumps(bad)
    lines.insert(1, "{not json")
    p = tmp_path / "mixed.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrajectoryError, match=rf"{p}: record 1: <line>: not valid JSON"):
        read_jsonl(p)
    got = read_trajectories(p, on_error="skip")
    assert got.stats.total == 6 and got.stats.kept == 4 and got.stats.skipped == 2
    assert got == [recs[0], recs[1], recs[2], recs[4]]
    assert "record 4: messages[" in got.stats.errors[1] and "unknown role 'bot'" in got.stats.errors[1]


def test_write_validates_first(tmp_path):
    recs = make_records(3)
    recs[2]["messages"][1]["role"] = "narrator"
    with pytest.raises(TrajectoryError, match="records: record 2: messages.1..role"):
        write_trajectories(recs, tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_bad_on_error_and_missing_path(tmp_path):
    with pytest.raises(ValueError, match="on_error='ignore'"):
        read_trajectories(tmp_path, on_error="ignore")
    with pytest.raises(FileNotFoundError, match="nope"):
        read_trajectories(tmp_path / "nope")


def test_write_replaces_an_existing_dataset(tmp_path):
    write_trajectories(make_records(4), tmp_path / "ds")
    write_trajectories(make_records(2, seed=9), tmp_path / "ds")
    assert read_trajectories(tmp_path / "ds") == make_records(2, seed=9)
    assert [p.name for p in tmp_path.iterdir()] == ["ds"]  # no temporary left behind
