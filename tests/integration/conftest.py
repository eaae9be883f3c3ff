"""Fixtures shared by the integration tests."""

import pytest

from data.schema import write_jsonl
from data.testing import make_records


@pytest.fixture(scope="module")
def traj(tmp_path_factory):
    """60 hand-written trajectories as JSONL: the training jobs' data in the train tests."""
    path = tmp_path_factory.mktemp("data") / "traj.jsonl"
    write_jsonl(make_records(60), path)
    return path
