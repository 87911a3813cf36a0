"""End to end: the real ``fedpriv simulate`` (in-process, and once on Flower's Simulation Engine with Ray)."""

from __future__ import annotations

import json
import math

import pytest

from fedpriv.common.accounting import epsilon_for
from tests.conftest import PREVIOUS_TRAINING_FLAGS

pytestmark = pytest.mark.e2e

CASES = {
    "cnn": ["--model", "cnn", "--dataset", "digits"],
    "rnn": ["--model", "rnn", "--dataset", "digits", "--learning-rate", "0.5"],
    "autoencoder": ["--model", "autoencoder", "--dataset", "digits", "--accountant", "prv"],
}


def _simulate(fedpriv, run_dir, *args: str, timeout: float = 420):
    """Run ``fedpriv simulate ARGS --run-dir RUN_DIR``; it must succeed. Returns its result and report."""
    result = fedpriv("simulate", *PREVIOUS_TRAINING_FLAGS, *args, "--run-dir", str(run_dir), timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((run_dir / "report.json").read_text())


def _assert_composed_over_rounds(privacy: dict, rounds: list[int]) -> None:
    """Every client's epsilon grows round by round, and anyone can recompute it from the report."""
    for client in privacy["clients"].values():
        history = client["history"]
        assert [h["round"] for h in history] == rounds
        epsilons = [h["epsilon"] for h in history]
        assert all(0 < a < b for a, b in zip(epsilons, epsilons[1:])), epsilons  # composed over rounds
        mechanisms = [(h["noise_multiplier"], h["sample_rate"], h["steps"]) for h in history]
        assert math.isclose(client["epsilon"], epsilon_for(mechanisms, privacy["delta"], privacy["accountant"]),
                            rel_tol=1e-6)


@pytest.mark.parametrize("model", list(CASES))
def test_simulation_end_to_end(fedpriv, tmp_path, model):
    run_dir = tmp_path / "run"
    result, report = _simulate(fedpriv, run_dir, *CASES[model], "--num-clients", "3", "--num-rounds", "2")
    assert "max ε" in result.stdout

    for name in ("config.json", "report.json", "report.md", "metrics.png", "epsilon.png", "final_model.pt",
                 "checkpoint.pt"):
        assert (run_dir / name).is_file(), name
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == model and config["num_clients"] == 3
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    privacy = report["privacy"]
    assert privacy["delta"] == 1e-5 and len(privacy["clients"]) == 3

    _assert_composed_over_rounds(privacy, [1, 2])

    final = report["rounds"][-1]["metrics"]
    if model == "autoencoder":
        assert final["mse"] < report["rounds"][0]["metrics"]["mse"] * 1.5 and math.isfinite(final["mse"])
    else:
        assert final["accuracy"] > 0.2, final  # chance is 0.1 for ten classes
    md = (run_dir / "report.md").read_text()
    assert "sample-level" in md and "differential privacy" in md


def test_non_private_run_reports_infinite_epsilon_and_report_rerenders(fedpriv, tmp_path):
    run_dir = tmp_path / "run"
    _, report = _simulate(fedpriv, run_dir, "--no-dp", "--num-clients", "3", "--num-rounds", "1", timeout=300)
    assert report["privacy"]["max_epsilon"] == "inf"
    assert all(c["epsilon"] == "inf" for c in report["privacy"]["clients"].values())
    (run_dir / "report.md").unlink()
    (run_dir / "epsilon.png").unlink()
    again = fedpriv("report", str(run_dir), timeout=120)
    assert again.returncode == 0, again.stderr
    assert (run_dir / "report.md").is_file() and (run_dir / "epsilon.png").is_file()
    assert "without differential privacy" in (run_dir / "report.md").read_text()


def test_clients_decline_rounds_beyond_their_budget(fedpriv, tmp_path):
    run_dir = tmp_path / "run"
    _, report = _simulate(fedpriv, run_dir, "--num-clients", "3", "--num-rounds", "3", "--budget-epsilon", "3.2")
    first, last = report["rounds"][0], report["rounds"][-1]
    assert first["trained"] == ["client-0", "client-1", "client-2"]
    assert last["declined"] == ["client-0", "client-1", "client-2"] and last["trained"] == []
    for client in report["privacy"]["clients"].values():
        assert client["epsilon"] <= 3.2
        assert len(client["history"]) == 2
    assert "declined: round 3 would raise epsilon to" in (run_dir / "report.md").read_text()
    assert all("> budget 3.200" in why for why in last["decline_reasons"].values())


def test_ray_backend_runs_the_same_federation(fedpriv, tmp_path):
    """Flower's Simulation Engine with Ray actors stays available and accounts the same way."""
    run_dir = tmp_path / "run"
    _, report = _simulate(fedpriv, run_dir, "--simulation-backend", "ray", "--num-clients", "3", "--num-rounds", "2")
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    privacy = report["privacy"]
    assert len(privacy["clients"]) == 3
    _assert_composed_over_rounds(privacy, [1, 2])
    assert report["rounds"][-1]["metrics"]["accuracy"] > 0.2


def test_fedadam_keeps_the_models_dtypes_so_clients_keep_training(fedpriv, tmp_path):
    """FedAdam's step returned float64 arrays: from round 2 every client's float32 update failed the dtype check."""
    run_dir = tmp_path / "run"
    _, report = _simulate(fedpriv, run_dir, "--strategy", "fedadam", "--num-clients", "3", "--num-rounds", "2")
    for r in report["rounds"]:
        assert r["trained"] == ["client-0", "client-1", "client-2"] and r["rejected"] == {}, r
