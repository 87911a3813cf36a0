"""A client that sends a malformed update is dropped, named and explained; the round goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from server.update_validation import dp_update_bound, update_norm, update_problem
from tests.conftest import ROOT


def _record(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v, dtype=np.float32)) for k, v in arrays.items()})


def test_update_problem_names_each_defect():
    ref = _record(w=np.zeros((2, 2)), b=np.zeros(2))
    assert update_problem(_record(w=np.ones((2, 2)), b=np.ones(2)), ref) is None
    assert "NaN" in update_problem(_record(w=[[np.nan, 0], [0, 0]], b=np.zeros(2)), ref)
    assert "infinite" in update_problem(_record(w=[[np.inf, 0], [0, 0]], b=np.zeros(2)), ref)
    assert "shape" in update_problem(_record(w=np.zeros((3, 2)), b=np.zeros(2)), ref)
    assert "names differ" in update_problem(_record(w=np.zeros((2, 2))), ref)
    assert "norm" in update_problem(_record(w=np.full((2, 2), 100.0), b=np.zeros(2)), ref, max_norm=10.0)
    assert update_norm(_record(w=np.full((2, 2), 1.0), b=np.zeros(2)), ref) == pytest.approx(2.0)


def test_dp_bound_admits_honest_dp_sgd_and_scales():
    bound = dp_update_bound(num_params=10_000, steps=10, learning_rate=0.1, momentum=0.9, clip=1.0,
                            noise_multiplier=1.5, batch_size=64)
    assert bound > 0
    assert dp_update_bound(10_000, 20, 0.1, 0.9, 1.0, 1.5, 64) == pytest.approx(2 * bound)


@pytest.mark.e2e
def test_malformed_updates_are_dropped_and_the_run_goes_on(tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    env = {**os.environ, "FEDPRIV_CACHE": str(cache_dir)}
    proc = subprocess.run([sys.executable, "-m", "tests.apps.malicious_simulation", str(run_dir)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "report.json").read_text())
    for rnd in report["rounds"]:
        assert rnd["trained"] == ["client-3", "client-4"], rnd
        assert "NaN" in rnd["rejected"]["client-0"]
        assert "shape" in rnd["rejected"]["client-1"]
        assert "norm" in rnd["rejected"]["client-2"]
    # Their privacy was spent all the same: every client's epsilon is on the books.
    assert sorted(report["privacy"]["clients"]) == [f"client-{i}" for i in range(5)]
    assert report["rounds"][-1]["metrics"]["accuracy"] > 0.15
    md = (run_dir / "report.md").read_text()
    assert "update of client-0 dropped" in md
    log = (run_dir / "report.json").read_text()
    assert "client-2" in log
