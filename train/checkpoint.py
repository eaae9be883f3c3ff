"""Checkpoints that survive a crash in the middle of being written, and the search for the last good one.

A job that runs for days is killed sooner or later, sometimes while it is saving. The one idea:
a checkpoint is written under a temporary name (`step_000100.tmp`), a marker file (`COMPLETE`)
is written LAST inside it, and only then is the directory renamed to its final name with
`os.replace`, which is atomic on a POSIX file system. A directory named `step_*` without the
marker, or a leftover `*.tmp`, is never picked for resume; `latest_checkpoint` walks back to
the newest one whose marker is present.

Layout of one checkpoint (all ranks write into the same temporary directory, which must be on a
file system shared by the ranks, as the run dir is):

    step_000100/
      config.json, model.safetensors, ...   a Hugging Face model dir (from_pretrained loads it)
      tokenizer.json, chat template, ...    the tokenizer the job trained on
      qat_config.json                       the QuantConfig and the QAT schedule (if QAT is on)
      qat_state.safetensors                 observer state: mse clip ratios, lsq learned scales
      trainer_state.json                    step, tokens seen, the resolved job config
      data_state.json                       the data stream's position (exact resume)
      accelerate_state/                     model, optimizer, LR scheduler, RNG of every rank
                                            (DeepSpeed: the engine's own sharded files)
      COMPLETE                              written last: the checkpoint is whole
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "COMPLETE"
_STEP_RE = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


def temp_path(ckpt_root: str | os.PathLike, step: int) -> Path:
    return Path(ckpt_root) / f"{checkpoint_name(step)}.tmp"


def is_complete(path: str | os.PathLike) -> bool:
    """A checkpoint dir is usable only if its marker exists (it is written last)."""
    return (Path(path) / MARKER).is_file()


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every COMPLETE checkpoint under ckpt_root, oldest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and is_complete(child):
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(ckpt_root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint, or None."""
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def resolve_resume(resume: str | None, ckpt_root: str | os.PathLike) -> Path | None:
    """`resume` setting -> checkpoint dir to load, or None for a fresh start.

    null/"none": fresh start. "auto": the latest complete checkpoint under ckpt_root if any, else
    a fresh start. Anything else: a path that must be a complete checkpoint.
    """
    if resume is None or str(resume).lower() in ("none", "null", "false", ""):
        return None
    if str(resume) == "auto":
        return latest_checkpoint(ckpt_root)
    path = Path(str(resume))
    if not path.is_dir():
        raise ValueError(f"resume={resume!r} is not a directory; use resume=auto or a path like {Path(ckpt_root) / checkpoint_name(100)}")
    if not is_complete(path):
        raise ValueError(
            f"resume={resume!r} has no {MARKER} marker, so its save was interrupted; "
            f"use resume=auto to pick the latest complete checkpoint in {ckpt_root}"
        )
    return path


def begin(ckpt_root: str | os.PathLike, step: int) -> Path:
    """Creates an empty temporary dir for the checkpoint of `step` (main process only)."""
    tmp = temp_path(ckpt_root, step)
    if tmp.exists():  # left by a save that was killed: it was never valid, start over
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_marker(tmp: Path, step: int) -> None:
    """Writes the marker, fsyncs it, the LAST file of a checkpoint (main process only)."""
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    with open(tmp / MARKER, "w") as f:
        json.dump({"step": step, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())


def commit(tmp: Path, step: int) -> Path:
    """Atomically renames the finished temporary dir to its final name (main process only)."""
    final = tmp.parent / checkpoint_name(step)
    if final.exists():
        # Saving the same step again (e.g. the final save right after a periodic one): the old
        # copy moves aside first so that one complete copy exists at every instant.
        old = tmp.parent / f"{checkpoint_name(step)}.old"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(tmp.parent)
    return final


def prune(ckpt_root: str | os.PathLike, keep_last: int | None) -> list[Path]:
    """Deletes all but the newest `keep_last` complete checkpoints, and stale temporary dirs."""
    root = Path(ckpt_root)
    removed = []
    for child in root.glob("step_*.tmp"):
        shutil.rmtree(child, ignore_errors=True)
        removed.append(child)
    if keep_last is None or keep_last <= 0:
        return removed
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
