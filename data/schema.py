"""Trajectory records: the one on-disk format between the rollout loop and training.

A trajectory is a plain dict in the OpenAI/HF message form (DESIGN.md "On disk"):

    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...],
     "tools":    [{"type": "function", "function": {"name", "description", "parameters"}}],
     "task":     {"family", "id", "split", "prompt", "answer", ...},
     "verdict":  {"correct", "answer", "reason", ...},
     "metadata": {...free-form...}}

Assistant messages may carry ``reasoning_content`` (thinking) and ``tool_calls``
(``[{"id", "type": "function", "function": {"name", "arguments": dict}}]``); tool messages
carry ``tool_call_id`` (and optionally ``name``). Only ``messages`` is required.

The one idea: users always see the dict form, the disk sees a fixed Arrow schema. Arrow needs
one schema for the whole dataset, while tool arguments, tool JSON schemas, task, verdict and
metadata vary per record, so those are stored as JSON strings and decoded on read; message
fields stay real Arrow columns (so ``ds.filter`` on roles and contents stays cheap). Any key the
schema does not name (on a record or a message) is kept in an ``extra`` JSON column, so a record
round-trips exactly: ``read(write(r)) == r``. The one normalisation: an optional message field
set to ``None`` reads back as absent (Arrow cannot tell the two apart).

Validation runs on every write and every read, and a bad record raises ``TrajectoryError``
(a ``ValueError``) naming the source, the record index and the field path, e.g.
``trajs.jsonl: record 12: messages[3].tool_call_id: no assistant tool call with id 'call_9'``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")
TOP_KEYS = ("messages", "tools", "task", "verdict", "metadata")
# Message fields with their own Arrow column; anything else goes to the message's `extra`.
MESSAGE_KEYS = ("role", "content", "reasoning_content", "tool_calls", "tool_call_id", "name")
_JSON_TOP = ("tools", "task", "verdict", "metadata")


class TrajectoryError(ValueError):
    """A record that breaks the trajectory schema; says where (source, index, field) and why."""

    def __init__(self, source: str, index: int | None, field_path: str, problem: str):
        self.source, self.index, self.field, self.problem = source, index, field_path, problem
        where = f"{source}: " if source else ""
        if index is not None:
            where += f"record {index}: "
        super().__init__(f"{where}{field_path}: {problem}")


@dataclass
class ReadStats:
    """What `read_trajectories` kept and skipped (skip mode); also on the returned list as `.stats`."""

    source: str
    total: int = 0
    kept: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)  # first `MAX_ERRORS_KEPT` messages

    MAX_ERRORS_KEPT = 20

    def __str__(self) -> str:
        s = f"{self.source}: {self.kept}/{self.total} records kept, {self.skipped} skipped"
        if self.errors:
            s += " (first error: " + self.errors[0] + ")"
        return s


class Trajectories(list):
    """A list of records that also carries the `ReadStats` of the read that made it."""

    stats: ReadStats


# ----------------------------------------------------------------------------- validation


def _type_name(x: Any) -> str:
    return type(x).__name__


def validate_record(rec: Any, *, source: str = "", index: int | None = None) -> None:
    """Raise `TrajectoryError` at the first schema violation of `rec`; return None if valid."""

    def err(path: str, problem: str) -> TrajectoryError:
        return TrajectoryError(source, index, path, problem)

    if not isinstance(rec, dict):
        raise err("<record>", f"expected a dict, got {_type_name(rec)}")
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise err("messages", f"expected a non-empty list of messages, got {msgs!r:.80}")

    open_calls: dict[str, str] = {}  # id -> name, calls of the latest assistant step
    seen_user = False
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise err(p, f"expected a dict, got {_type_name(m)}")
        role = m.get("role")
        if role not in ROLES:
            raise err(f"{p}.role", f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if role == "assistant":
            if content is not None and not isinstance(content, str):
                raise err(f"{p}.content", f"expected a string or null, got {_type_name(content)}")
        elif not isinstance(content, str):
            raise err(f"{p}.content", f"expected a string, got {_type_name(content)}")
        for k in ("reasoning_content", "tool_call_id", "name"):
            if m.get(k) is not None and not isinstance(m[k], str):
                raise err(f"{p}.{k}", f"expected a string, got {_type_name(m[k])}")
        if m.get("tool_calls") is not None and role != "assistant":
            raise err(f"{p}.tool_calls", f"only assistant messages may call tools (role is {role!r})")
        if m.get("reasoning_content") is not None and role != "assistant":
            raise err(f"{p}.reasoning_content", f"only assistant messages carry reasoning (role is {role!r})")

        if role == "system":
            if i != 0:
                raise err(f"{p}.role", "a system message may only be the first message")
        elif role == "user":
            seen_user = True
            open_calls = {}
        elif role == "assistant":
            if not seen_user:
                raise err(f"{p}.role", "an assistant message before any user message")
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise err(f"{p}.tool_calls", f"expected a list, got {_type_name(calls)}")
            if not (content or "") and not calls:
                raise err(p, "an assistant message needs content or tool_calls; both are empty")
            open_calls = {}
            for j, c in enumerate(calls):
                q = f"{p}.tool_calls[{j}]"
                if not isinstance(c, dict):
                    raise err(q, f"expected a dict, got {_type_name(c)}")
                if not isinstance(c.get("id"), str) or not c["id"]:
                    raise err(f"{q}.id", f"expected a non-empty string, got {c.get('id')!r}")
                if c["id"] in open_calls:
                    raise err(f"{q}.id", f"duplicate tool call id {c['id']!r} in one step")
                if c.get("type", "function") != "function":
                    raise err(f"{q}.type", f"expected 'function', got {c.get('type')!r}")
                fn = c.get("function")
                if not isinstance(fn, dict):
                    raise err(f"{q}.function", f"expected a dict with name and arguments, got {fn!r:.80}")
                if not isinstance(fn.get("name"), str) or not fn["name"]:
                    raise err(f"{q}.function.name", f"expected a non-empty string, got {fn.get('name')!r}")
                if not isinstance(fn.get("arguments"), dict):
                    raise err(
                        f"{q}.function.arguments",
                        f"expected a JSON object (dict), got {_type_name(fn.get('arguments'))} "
                        f"{fn.get('arguments')!r:.80}; decode JSON strings with read_jsonl or json.loads",
                    )
                open_calls[c["id"]] = fn["name"]
        else:  # tool
            tid = m.get("tool_call_id")
            if not isinstance(tid, str):
                raise err(f"{p}.tool_call_id", f"a tool message needs the id of the call it answers, got {tid!r}")
            if tid not in open_calls:
                raise err(f"{p}.tool_call_id", f"no assistant tool call with id {tid!r}")
            if m.get("name") is not None and m["name"] != open_calls[tid]:
                raise err(f"{p}.name", f"{m['name']!r} but call {tid!r} is to {open_calls[tid]!r}")

    tools = rec.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise err("tools", f"expected a list of tool schemas, got {_type_name(tools)}")
        for j, t in enumerate(tools):
            fn = t.get("function") if isinstance(t, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise err(f"tools[{j}]", f"expected {{'type': 'function', 'function': {{'name': ...}}}}, got {t!r:.80}")
            if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
                raise err(f"tools[{j}].function.parameters", f"expected a JSON schema dict, got {_type_name(fn['parameters'])}")
    for k in ("task", "verdict", "metadata"):
        if rec.get(k) is not None and not isinstance(rec[k], dict):
            raise err(k, f"expected a dict, got {_type_name(rec[k])}")


# ----------------------------------------------------------------------------- Arrow codec


def _dumps(x: Any) -> str:
    return json.dumps(x, ensure_ascii=False)


def arrow_features():
    """The fixed `datasets.Features` of a trajectories dataset on disk."""
    from datasets import Features, List, Value

    call = {"id": Value("string"), "type": Value("string"),
            "function": {"name": Value("string"), "arguments": Value("string")}}
    msg = {"role": Value("string"), "content": Value("string"), "reasoning_content": Value("string"),
           "tool_calls": List(call), "tool_call_id": Value("string"), "name": Value("string"),
           "extra": Value("string")}
    feats = {"messages": List(msg)}
    feats.update({k: Value("string") for k in _JSON_TOP})
    feats["extra"] = Value("string")
    return Features(feats)


def encode_record(rec: dict) -> dict:
    """Dict form -> Arrow row form (JSON strings where the shape varies)."""
    msgs = []
    for m in rec["messages"]:
        extra = {k: v for k, v in m.items() if k not in MESSAGE_KEYS}
        calls = m.get("tool_calls")
        row = {k: m.get(k) for k in ("role", "content", "reasoning_content", "tool_call_id", "name")}
        row["tool_calls"] = None if calls is None else [
            {"id": c["id"], "type": c.get("type", "function"),
             "function": {"name": c["function"]["name"], "arguments": _dumps(c["function"]["arguments"])}}
            for c in calls]
        # A tool call with keys beyond id/type/function keeps them through `extra`.
        call_extra = None if calls is None else [
            {k: v for k, v in c.items() if k not in ("id", "type", "function")} for c in calls]
        if call_extra and any(call_extra):
            extra["__tool_call_extra__"] = call_extra
        if calls is not None and any("type" not in c for c in calls):
            extra["__tool_call_no_type__"] = [("type" not in c) for c in calls]
        row["extra"] = _dumps(extra) if extra else None
        msgs.append(row)
    out = {"messages": msgs}
    for k in _JSON_TOP:
        out[k] = _dumps(rec[k]) if k in rec else None
    extra = {k: v for k, v in rec.items() if k not in TOP_KEYS}
    out["extra"] = _dumps(extra) if extra else None
    return out


def decode_record(row: dict) -> dict:
    """Arrow row form -> dict form; the inverse of `encode_record`."""
    msgs = []
    for r in row["messages"]:
        m = {"role": r["role"], "content": r["content"]}
        for k in ("reasoning_content", "tool_call_id", "name"):
            if r.get(k) is not None:
                m[k] = r[k]
        extra = json.loads(r["extra"]) if r.get("extra") else {}
        call_extra = extra.pop("__tool_call_extra__", None)
        no_type = extra.pop("__tool_call_no_type__", None)
        if r.get("tool_calls") is not None:
            calls = []
            for j, c in enumerate(r["tool_calls"]):
                call = {"id": c["id"], "type": c["type"],
                        "function": {"name": c["function"]["name"],
                                     "arguments": json.loads(c["function"]["arguments"])}}
                if no_type and no_type[j]:
                    del call["type"]
                if call_extra:
                    call.update(call_extra[j])
                calls.append(call)
            m["tool_calls"] = calls
        m.update(extra)
        # keep the caller's key order for the common keys (role, content first)
        msgs.append(m)
    rec: dict[str, Any] = {"messages": msgs}
    for k in _JSON_TOP:
        if row.get(k) is not None:
            rec[k] = json.loads(row[k])
    if row.get("extra"):
        rec.update(json.loads(row["extra"]))
    return rec


# ----------------------------------------------------------------------------- I/O


def write_trajectories(records: Iterable[dict], out_dir: str | os.PathLike, *, source: str = "records") -> Path:
    """Validate `records` and save them as a HF `datasets` dataset (Arrow) at `out_dir`."""
    from datasets import Dataset

    rows = []
    for i, rec in enumerate(records):
        validate_record(rec, source=source, index=i)
        rows.append(encode_record(rec))
    out = Path(out_dir)
    # Written next to its place and renamed in: a crash never leaves a half dataset at `out_dir`.
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    Dataset.from_list(rows, features=arrow_features()).save_to_disk(str(tmp))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def write_jsonl(records: Iterable[dict], path: str | os.PathLike, *, source: str = "records") -> Path:
    """Validate `records` and write one JSON object per line (dict form, arguments as objects)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, rec in enumerate(records):
            validate_record(rec, source=source, index=i)
            f.write(_dumps(rec) + "\n")
    return path


def _normalize_openai(rec: Any, source: str, index: int) -> Any:
    """Accept OpenAI-API style records: tool-call `arguments` as a JSON string become a dict."""
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
        return rec
    for i, m in enumerate(rec["messages"]):
        for j, c in enumerate((m.get("tool_calls") or []) if isinstance(m, dict) else []):
            fn = c.get("function") if isinstance(c, dict) else None
            if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                try:
                    fn["arguments"] = json.loads(fn["arguments"])
                except json.JSONDecodeError as e:
                    raise TrajectoryError(source, index, f"messages[{i}].tool_calls[{j}].function.arguments",
                                          f"not valid JSON ({e}): {fn['arguments']!r:.80}") from None
    return rec


def _iter_raw(path: Path) -> Iterator[tuple[int, Any]]:
    """(index, record-or-exception) pairs from a .jsonl file or a datasets directory."""
    src = str(path)
    if path.is_dir():
        from datasets import load_from_disk

        ds = load_from_disk(src)
        for i, row in enumerate(ds):
            try:
                yield i, decode_record(row)
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                yield i, TrajectoryError(src, i, "<row>", f"cannot decode Arrow row: {e}")
    elif path.is_file():
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    yield i, _normalize_openai(json.loads(line), src, i)
                except json.JSONDecodeError as e:
                    yield i, TrajectoryError(src, i, "<line>", f"not valid JSON: {e}")
                except TrajectoryError as e:
                    yield i, e
    else:
        raise FileNotFoundError(f"trajectories path {src!r} is neither a datasets directory nor a .jsonl file")


def iter_trajectories(path: str | os.PathLike, on_error: str = "raise",
                      stats: ReadStats | None = None) -> Iterator[dict]:
    """Stream validated records from `path` without holding them all (for larger-than-memory data).

    `on_error="skip"` drops bad records, counting them in `stats` (pass one to see the counts)."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error={on_error!r}; expected 'raise' or 'skip'")
    path = Path(path)
    stats = stats if stats is not None else ReadStats(str(path))
    for i, rec in _iter_raw(path):
        stats.total += 1
        try:
            if isinstance(rec, TrajectoryError):
                raise rec
            validate_record(rec, source=str(path), index=i)
        except TrajectoryError as e:
            if on_error == "raise":
                raise
            stats.skipped += 1
            if len(stats.errors) < ReadStats.MAX_ERRORS_KEPT:
                stats.errors.append(str(e))
            continue
        stats.kept += 1
        yield rec
    if stats.skipped:
        log.warning("%s", stats)


def read_trajectories(path: str | os.PathLike, on_error: str = "raise") -> Trajectories:
    """Read a datasets directory or a .jsonl file into a list of validated dict records.

    With `on_error="skip"`, bad records are dropped, logged (one warning with the counts and the
    first error) and counted in the returned list's `.stats` (`ReadStats`)."""
    stats = ReadStats(str(path))
    out = Trajectories(iter_trajectories(path, on_error=on_error, stats=stats))
    out.stats = stats
    return out


def read_jsonl(path: str | os.PathLike, on_error: str = "raise") -> Trajectories:
    """Read a .jsonl file of records (OpenAI-style string `arguments` are decoded to dicts)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"read_jsonl: {str(path)!r} is not a file")
    return read_trajectories(path, on_error=on_error)
