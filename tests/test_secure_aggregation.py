"""Secure aggregation with Flower's SecAgg+: exact up to quantisation, blind server, dropouts, bad settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fedpriv.common.config import RunConfig
from fedpriv.common.errors import UserInputError
from tests.conftest import ROOT
from tests.test_cli_errors import assert_clean_error

# Flower's defaults, which the project keeps: parameters in [-8, 8] quantised to 2**22 levels.
CLIPPING_RANGE, QUANTIZATION_RANGE = 8.0, 2**22


def quantisation_bound(weights: list[float], max_weight: float) -> float:
    """Largest error SecAgg+ can add to a weighted average: one quantisation step per client.

    Each client scales its parameters by w / max_weight and rounds them stochastically to a grid of
    step 2 * range / levels; unmasking divides the summed error by the summed scale factors.
    """
    step = 2 * CLIPPING_RANGE / QUANTIZATION_RANGE
    return len(weights) * step / (sum(weights) / max_weight)


@pytest.mark.e2e
def test_secagg_rounds_equal_fedavg_hide_updates_and_survive_dropouts(tmp_path):
    out = tmp_path / "probe.json"
    proc = subprocess.run([sys.executable, "-m", "tests.apps.secagg_probe", str(out)], cwd=ROOT,
                          env={**os.environ, "RAY_DEDUP_LOGS": "0"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    shares, threshold = result["shares_threshold"]
    rounds = result["rounds"]
    max_weight = RunConfig().secagg_max_weight

    # 1. All five clients: the unmasked aggregate is the weighted FedAvg up to quantisation.
    full = rounds["1"]
    assert full["completed"] and full["dtype"] == "float32"
    assert full["max_abs_error"] <= quantisation_bound([10, 20, 30, 40, 50], max_weight)
    assert full["clients_reporting"] == [f"client-{i}" for i in range(5)]

    # 2. One dropout (shares - threshold = 1 allowed): the round completes over the four survivors.
    one_down = rounds["2"]
    assert shares - threshold >= len(one_down["dropped"])
    assert one_down["completed"]
    assert one_down["max_abs_error"] <= quantisation_bound([20, 30, 40, 50], max_weight)
    assert "client-0" not in one_down["clients_reporting"]

    # 3. Beyond the threshold the protocol halts rather than release anything.
    assert not rounds["3"]["completed"]

    # In no round did the server-side code receive a client's update in the clear.
    for entry in rounds.values():
        assert entry["replies_seen"] > 0
        assert entry["clear_updates_seen"] == 0, entry


@pytest.mark.parametrize("overrides, needle", [
    (dict(num_clients=2, min_clients=2), "at least 3 clients per round"),
    (dict(secagg_shares=2), "--secagg-shares"),
    (dict(secagg_shares=11), "--secagg-shares"),
    (dict(secagg_threshold=10), "--secagg-threshold"),
    (dict(secagg_threshold=1), "--secagg-threshold"),
    (dict(central_dp="client-fixed"), "not supported"),
])
def test_unworkable_secagg_settings_are_refused(overrides, needle):
    with pytest.raises(UserInputError, match=needle):
        RunConfig(secure_aggregation=True, **overrides).validate()


def test_secagg_defaults_tolerate_a_third_of_the_clients_dropping():
    shares, threshold = RunConfig(secure_aggregation=True).validate().secagg_parameters(9)
    assert (shares, threshold) == (9, 6)


def test_cli_refuses_bad_secagg_threshold_in_one_line(fedpriv, tmp_path):
    result = fedpriv("simulate", "--secure-aggregation", "--num-clients", "4", "--secagg-threshold", "4",
                     "--run-dir", str(tmp_path / "run"))
    assert_clean_error(result, "--secagg-threshold")


def test_cli_refuses_a_max_weight_below_the_largest_client(fedpriv, tmp_path):
    result = fedpriv("simulate", "--secure-aggregation", "--num-clients", "4", "--secagg-max-weight", "50",
                     "--run-dir", str(tmp_path / "run"))
    assert_clean_error(result, "--secagg-max-weight", "overflow")
