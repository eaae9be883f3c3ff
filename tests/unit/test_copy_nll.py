"""scripts/copy_nll.py: per-token NLL of a checkpoint on trajectories, digits apart."""

import importlib.util
import math
import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("copy_nll", ROOT / "scripts" / "copy_nll.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_copy_nll_reports_digits_near_chance_for_an_untrained_model(tmp_path, capsys):
    from data.schema import write_trajectories
    from tests.fixtures import make_records, tiny_model_and_tokenizer

    torch.set_num_threads(1)
    model, tok = tiny_model_and_tokenizer(seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    write_trajectories(make_records(10), tmp_path / "data")
    _script().main([str(tmp_path / "m"), str(tmp_path / "data"), "--per-family", "10", "--show", "1"])
    out = capsys.readouterr().out
    m = re.search(r"digits ([\d.]+) nats over (\d+) tokens \(chance 2.30\), other assistant tokens ([\d.]+) over (\d+)", out)
    assert m, out
    digits, n_digits, other, n_other = float(m[1]), int(m[2]), float(m[3]), int(m[4])
    assert n_digits > 0 and n_other > 0
    # random init: about uniform over the vocabulary, far above a copying model's ~0
    assert digits > math.log(10) and other > math.log(10)
