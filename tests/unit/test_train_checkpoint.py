"""train/checkpoint.py: the temp-dir + marker + rename protocol, pruning, and resume resolution."""

import json

import pytest

from train import checkpoint as ckpt


def _save(root, step, files=("model.safetensors",), complete=True):
    tmp = ckpt.begin(root, step)
    for f in files:
        (tmp / f).write_text(f"weights of step {step}")
    if not complete:
        return tmp
    ckpt.write_marker(tmp, step)
    return ckpt.commit(tmp, step)


def test_commit_renames_and_marker_lists_files(tmp_path):
    final = _save(tmp_path, 7, files=("a.bin", "b.json"))
    assert final.name == "step_000007" and not (tmp_path / "step_000007.tmp").exists()
    marker = json.loads((final / ckpt.MARKER).read_text())
    assert marker == {"step": 7, "files": ["a.bin", "b.json"]}
    assert ckpt.latest_checkpoint(tmp_path) == final


def test_interrupted_save_is_never_picked(tmp_path):
    good = _save(tmp_path, 2)
    _save(tmp_path, 4, complete=False)  # killed before the marker: only step_000004.tmp exists
    # A dir with the final name but no marker (e.g. copied by hand, half-way) is not valid either.
    (tmp_path / "step_000006").mkdir()
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [2]
    assert ckpt.resolve_resume("auto", tmp_path) == good


def test_begin_discards_a_stale_temp_dir(tmp_path):
    tmp = _save(tmp_path, 4, complete=False)
    (tmp / "stale").write_text("x")
    tmp2 = ckpt.begin(tmp_path, 4)
    assert tmp2 == tmp and list(tmp2.iterdir()) == []


def test_saving_the_same_step_again_replaces_it(tmp_path):
    _save(tmp_path, 3, files=("old.bin",))
    final = _save(tmp_path, 3, files=("new.bin",))
    assert sorted(p.name for p in final.iterdir()) == [ckpt.MARKER, "new.bin"]
    assert not (tmp_path / "step_000003.old").exists()


def test_prune_keeps_last_k_and_removes_temp_dirs(tmp_path):
    for s in (1, 2, 3, 4):
        _save(tmp_path, s)
    _save(tmp_path, 5, complete=False)
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000004"]
    ckpt.prune(tmp_path, keep_last=None)  # None keeps all complete ones
    assert len(ckpt.list_checkpoints(tmp_path)) == 2


def test_resolve_resume(tmp_path):
    assert ckpt.resolve_resume(None, tmp_path) is None
    assert ckpt.resolve_resume("auto", tmp_path / "nothing_yet") is None  # fresh start
    good = _save(tmp_path, 2)
    assert ckpt.resolve_resume(str(good), tmp_path) == good
    with pytest.raises(ValueError, match=r"resume='.*nope'.*not a directory"):
        ckpt.resolve_resume(str(tmp_path / "nope"), tmp_path)
    broken = _save(tmp_path, 4, complete=False)
    with pytest.raises(ValueError, match="no COMPLETE marker"):
        ckpt.resolve_resume(str(broken), tmp_path)
