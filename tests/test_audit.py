"""Membership-inference audit: the statistics against hand-checkable cases and independent
references (scipy's beta quantiles, exact binomial sums, scikit-learn's AUC), the run-folder
side on a small fake run, and one end-to-end check that DP weakens the attack."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import beta
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fedpriv.common import audit as st
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import load_dataset
from fedpriv.common.errors import UserInputError
from fedpriv.common.evaluation import evaluate
from fedpriv.common.models import model_from_config
from fedpriv.common.partitioning import partition
from fedpriv.client.ledger import OwnerLedger, Release
from fedpriv.common.accounting import data_fingerprint
from fedpriv.server.checkpoint import FINAL_MODEL
from fedpriv.server.report import RunReport
from fedpriv.simulations.audit import audit_run, load_run, per_record_loss, theoretical_epsilon


# --------------------------------------------------------------------------------- AUC
def test_auc_hand_cases():
    assert st.auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0   # perfectly separable
    assert st.auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == 0.0   # perfectly reversed
    assert st.auc(np.ones(5), np.ones(7)) == 0.5                        # all tied
    # pairs (3,2) (3,1) (1,2) (1,1): 1 + 1 + 0 + 1/2 = 2.5 of 4
    assert st.auc(np.array([3.0, 1.0]), np.array([2.0, 1.0])) == 0.625


def test_auc_matches_sklearn_and_is_half_for_identical_distributions():
    rng = np.random.default_rng(1)
    members, nonmembers = rng.normal(0.3, 1, 500).round(1), rng.normal(0, 1, 400).round(1)  # rounding makes ties
    labels = np.r_[np.ones(500), np.zeros(400)]
    assert st.auc(members, nonmembers) == pytest.approx(roc_auc_score(labels, np.r_[members, nonmembers]), abs=1e-12)
    same = st.auc(rng.normal(size=4000), rng.normal(size=4000))
    assert abs(same - 0.5) < 0.02  # standard error ~0.0065


def test_tpr_at_fpr_hand_case():
    nonmembers = np.arange(100.0)              # 0..99
    members = np.array([50.5, 98.5, 99.5, 200.0])
    # FPR <= 1 % lets one non-member (99) through: threshold 98.5 catches 3 of 4 members.
    assert st.tpr_at_fpr(members, nonmembers, 0.01) == 0.75
    assert st.tpr_at_fpr(members, nonmembers, 0.001) is None  # 100 non-members cannot show 0.1 %
    assert st.tpr_at_fpr(members, np.arange(1000.0), 0.001) == 0.0  # 999 is above every member but 200; fp<=1
    assert st.tpr_at_fpr(np.array([2000.0]), np.arange(1000.0), 0.001) == 1.0


# ----------------------------------------------------------------------- Clopper-Pearson
def _binom_tail_ge(k: int, n: int, p: float) -> float:
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))


def test_clopper_pearson_against_beta_quantiles_and_exact_binomial_sums():
    alpha = 1 - st.CONFIDENCE
    for n in (1, 7, 30, 150):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            lo, hi = float(st.clopper_pearson_lower(k, n)), float(st.clopper_pearson_upper(k, n))
            assert lo == (0.0 if k == 0 else pytest.approx(beta.ppf(alpha, k, n - k + 1), rel=1e-9))
            assert hi == (1.0 if k == n else pytest.approx(beta.ppf(1 - alpha, k + 1, n - k), rel=1e-9))
            # The defining property, by direct binomial sums: P(X >= k | lo) = alpha = P(X <= k | hi).
            if k > 0:
                assert _binom_tail_ge(k, n, lo) == pytest.approx(alpha, rel=1e-6)
            if k < n:
                assert 1 - _binom_tail_ge(k + 1, n, hi) == pytest.approx(alpha, rel=1e-6)
    # Closed forms at the edges: (1 - p)^n = alpha and p^n = alpha.
    assert float(st.clopper_pearson_upper(0, 100)) == pytest.approx(1 - alpha ** (1 / 100), rel=1e-12)
    assert float(st.clopper_pearson_lower(100, 100)) == pytest.approx(alpha ** (1 / 100), rel=1e-12)


def test_epsilon_lower_bound_hand_cases():
    alpha = 1 - st.CONFIDENCE
    # A perfect attack on 100 + 100 records: TPR >= alpha^(1/100), FPR <= 1 - alpha^(1/100).
    t = alpha ** (1 / 100)
    assert float(st.epsilon_lower_bound(100, 100, 0, 100, 0.0)) == pytest.approx(math.log(t / (1 - t)), rel=1e-9)
    assert st.epsilon_ceiling(100, 100, 0.0) == pytest.approx(math.log(t / (1 - t)), rel=1e-9)
    # The complement inequality: every member and 40 of 100 non-members flagged.
    fpr_hi = beta.ppf(1 - alpha, 41, 60)
    expected = max(math.log((t - 1e-5) / fpr_hi), math.log((1 - fpr_hi - 1e-5) / (1 - t)))
    assert float(st.epsilon_lower_bound(100, 100, 40, 100, 1e-5)) == pytest.approx(expected, rel=1e-9)
    # No separation, or delta = 1, proves nothing.
    assert float(st.epsilon_lower_bound(50, 100, 50, 100, 1e-5)) == 0.0
    assert float(st.epsilon_lower_bound(100, 100, 0, 100, 1.0)) == 0.0


def test_held_out_bound_hits_the_ceiling_for_a_perfect_attack_and_rarely_fires_without_signal():
    rng = np.random.default_rng(0)
    sel_m, sel_n = st.split_halves(200, 200, rng)
    perfect = st.run_attack("t", "s", rng.normal(10, 1, 200), rng.normal(0, 1, 200), sel_m, sel_n, 1e-5)
    assert perfect.auc == 1.0 and perfect.evaluation.tpr == 1.0 and perfect.evaluation.fpr == 0.0
    assert perfect.evaluation.epsilon_lower_bound == pytest.approx(st.epsilon_ceiling(100, 100, 1e-5))
    # Null: members and non-members alike. The held-out bound may exceed 0 only with probability
    # <= 1 - 0.90 (the two one-sided 95 % bounds); in-sample selection would fire far more often.
    fired_held_out = fired_in_sample = 0
    trials = 300
    for _ in range(trials):
        ms, ns = rng.normal(size=200), rng.normal(size=200)
        sel_m, sel_n = st.split_halves(200, 200, rng)
        fired_held_out += st.run_attack("t", "s", ms, ns, sel_m, sel_n, 1e-5).evaluation.epsilon_lower_bound > 0
        fired_in_sample += st.run_attack("t", "s", ms, ns, sel_m, sel_n, 1e-5).selection.epsilon_lower_bound > 0
    assert fired_held_out / trials <= 0.10, fired_held_out
    assert fired_in_sample > fired_held_out, (fired_in_sample, fired_held_out)


def test_class_calibrated_scores_hand_case():
    losses = np.array([1.0, 2.0, 3.0, 10.0, 20.0, 30.0, 5.0])
    labels = np.array([0, 0, 0, 1, 1, 1, 2])  # class 2: a single record, MAD 0 -> unscaled
    assert st.class_calibrated_scores(losses, labels).tolist() == [1.0, 0.0, -1.0, 1.0, 0.0, -1.0, -0.0]


# ------------------------------------------------------------------------- run folder
def make_run(tmp_path, model_name: str = "cnn"):
    """A finished-looking run folder whose final model is the untrained initial model."""
    rng = np.random.default_rng(0)
    npz = tmp_path / "data.npz"
    arrays = {"x": rng.normal(size=(240, 8, 8)).astype(np.float32)}
    if model_name != "autoencoder":
        arrays["y"] = np.arange(240) % 3
    np.savez(npz, **arrays)
    run_dir = tmp_path / "run"
    cfg = RunConfig(model=model_name, dataset=f"npz:{npz}", num_clients=2, num_rounds=1, test_fraction=0.25,
                    run_dir=str(run_dir))
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction)
    model = model_from_config(cfg, data.input_shape, data.num_classes, seed=cfg.seed)
    parts = partition(data.y_train, len(data.x_train), 2, "iid", seed=cfg.seed)
    report = RunReport(run={"model": model_name, "dataset": cfg.dataset, "clients": 2, "rounds": 1},
                       delta=cfg.delta, accountant="rdp", dp=True)
    for cid in ("client-0", "client-1"):
        report.record_training(cid, 1, 1.5, 0.5, 4, 2.5)
    report.add_round(1, {"loss": 1.0, "accuracy": 0.3}, {"trained": ["client-0", "client-1"]})
    run_dir.mkdir()
    report.write(run_dir, plots=False)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save(model.state_dict(), run_dir / FINAL_MODEL)
    for cid, part in (("client-0", parts[0]), ("client-1", parts[1])):  # ledgers as DP clients name them
        fingerprint = data_fingerprint(np.ascontiguousarray(data.x_train[part]),
                                       None if data.y_train is None else np.ascontiguousarray(data.y_train[part]))
        OwnerLedger(cid, releases=[Release("run", 1, 0.0, 1.5, 0.5, 4, 2, "poisson", fingerprint, len(part), 2.5,
                                           "rdp", cfg.delta)]).save(run_dir / "clients" / cid)
    return run_dir, cfg, data, model


@pytest.fixture
def fake_run(tmp_path):
    return make_run(tmp_path)


def test_per_record_loss_averages_to_the_evaluation_loss(fake_run):
    _, cfg, data, model = fake_run
    losses = per_record_loss(model, "cnn", data.x_test, data.y_test, batch_size=7)
    assert losses.shape == (len(data.x_test),)
    assert losses.mean() == pytest.approx(evaluate(model, "cnn", data.x_test, data.y_test)["loss"], rel=1e-5)
    ae = model_from_config(RunConfig(model="autoencoder"), data.input_shape, 0, seed=0)
    mse = per_record_loss(ae, "autoencoder", data.x_test, None)
    assert mse.mean() == pytest.approx(evaluate(ae, "autoencoder", data.x_test, None)["mse"], rel=1e-5)


def test_audit_of_an_untrained_model_matches_its_control_and_writes_audit_json(fake_run):
    run_dir, cfg, data, _ = fake_run
    inputs = load_run(run_dir)
    assert len(inputs.member_index) == len(data.x_train) and inputs.trained_clients == ["client-0", "client-1"]
    result = audit_run(run_dir, seed=3)
    saved = json.loads((run_dir / "audit.json").read_text())
    assert saved["records"]["members"] == saved["records"]["nonmembers"] == len(data.x_test) == 60
    loss_attack = saved["attacks"][0]
    assert loss_attack["name"] == "loss threshold" and saved["attacks"][1]["name"] == "class-calibrated"
    # The final model is the initial one, so the attack is exactly the control.
    assert loss_attack["auc"] == pytest.approx(saved["control"]["auc_initial_model"])
    assert saved["theoretical"]["epsilon"] == 2.5 and saved["theoretical"]["delta"] == cfg.delta
    assert saved["empirical_epsilon"]["lower_bound"] <= saved["empirical_epsilon"]["ceiling"]
    assert "consistent with the theoretical epsilon 2.50" in saved["meaning"]
    assert result["meaning"] == saved["meaning"]
    assert audit_run(run_dir, seed=3)["attacks"] == result["attacks"]  # seeded: same records, same split


def test_members_are_only_the_records_of_clients_whose_updates_were_aggregated(fake_run):
    run_dir, cfg, data, _ = fake_run
    report = json.loads((run_dir / "report.json").read_text())
    report["rounds"][0]["trained"], report["rounds"][0]["rejected"] = ["client-1"], {"client-0": "non-finite values"}
    (run_dir / "report.json").write_text(json.dumps(report))
    expected = partition(data.y_train, len(data.x_train), 2, "iid", seed=cfg.seed)[1]
    np.testing.assert_array_equal(load_run(run_dir).member_index, expected)


def test_autoencoder_run_is_audited_on_reconstruction_error(tmp_path):
    run_dir = make_run(tmp_path, "autoencoder")[0]
    result = audit_run(run_dir)
    assert [a["name"] for a in result["attacks"]] == ["loss threshold"]
    assert result["attacks"][0]["score"] == "-(reconstruction MSE)"
    assert result["attacks"][0]["auc"] == pytest.approx(result["control"]["auc_initial_model"])


def test_theoretical_epsilon_is_the_smaller_of_local_and_user_level():
    local = RunReport(run={}, delta=1e-5, accountant="rdp", dp=True)
    local.record_training("client-0", 1, 1.5, 0.5, 4, 2.5)
    assert theoretical_epsilon(local) == (2.5, "local DP-SGD, largest client epsilon (RDP)")
    local.central = {"epsilon": 1.2}
    assert theoretical_epsilon(local) == (1.2, "user-level central DP")
    none = RunReport(run={}, delta=1e-5, accountant="rdp", dp=False)
    assert theoretical_epsilon(none) == (math.inf, "no DP")
    none.central = {"epsilon": 3.0}  # central DP alone still protects every record
    assert theoretical_epsilon(none) == (3.0, "user-level central DP")


def _cli(*args):
    from fedpriv.simulations.cli import app

    return CliRunner().invoke(app, ["audit", *map(str, args)])


def test_cli_audit_prints_a_table(fake_run):
    run_dir = fake_run[0]
    result = _cli(run_dir)
    assert result.exit_code == 0, result.output
    assert "membership-inference audit" in result.output and "AUC" in result.output
    assert "0.1%: n/a, 60 non-members are too few" in result.output and (run_dir / "audit.json").is_file()


@pytest.mark.parametrize("breakage, needle", [
    ("missing folder", "is not a folder"),
    ("no config", "no config.json"),
    ("no final model", f"no {FINAL_MODEL}"),
    ("other model in report", "mixes two runs"),
    ("model does not fit", "does not fit"),
    ("own-data client", "own data"),
    ("ledger of other data", "dataset file changed"),
])
def test_bad_run_folders_fail_with_one_line(fake_run, breakage, needle):
    run_dir = fake_run[0]
    report = json.loads((run_dir / "report.json").read_text())
    if breakage == "missing folder":
        run_dir = run_dir / "nope"
    elif breakage == "no config":
        (run_dir / "config.json").unlink()
    elif breakage == "no final model":
        (run_dir / FINAL_MODEL).unlink()
    elif breakage == "other model in report":
        report["run"]["model"] = "rnn"
    elif breakage == "model does not fit":
        torch.save({"weight": torch.zeros(3)}, run_dir / FINAL_MODEL)
    elif breakage == "own-data client":
        report["rounds"][0]["trained"] = ["hospital-a"]
    elif breakage == "ledger of other data":
        path = run_dir / "clients" / "client-1" / "ledger.json"
        path.write_text(path.read_text().replace('"fingerprint": "', '"fingerprint": "0'))
    (run_dir / "report.json").write_text(json.dumps(report)) if run_dir.is_dir() else None
    with pytest.raises(UserInputError, match=needle):
        audit_run(run_dir)
    result = _cli(run_dir)
    assert result.exit_code == 2 and "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.output


# ------------------------------------------------------------------------ end to end
# One data owner, a small hard dataset (300 MNIST-1D training records) and many local epochs, so
# the non-private model overfits. With 40 epochs the non-private AUC swung from 0.65 to 0.86 between
# runs (client randomness comes from the OS) and once came within 0.1 of the DP run's. Measured with
# 80 epochs over 3 repeats: loss attack AUC 0.89-0.90 without DP (empirical epsilon lower bound
# 2.2-3.6), 0.57-0.59 with sigma = 4 (epsilon 6.59, lower bound 0); the control on the initial model 0.506.
E2E_RUN = ["--dataset", "mnist1d", "--mnist1d-samples", "600", "--test-fraction", "0.5", "--num-clients", "1",
           "--min-clients", "1", "--num-rounds", "1", "--local-epochs", "80", "--batch-size", "128",
           "--learning-rate", "0.2", "--momentum", "0.5", "--noise-multiplier", "4"]


@pytest.mark.e2e
def test_dp_run_resists_the_attack_that_breaks_a_non_private_run(cache_dir, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "FEDPRIV_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1"}
    runs = {"nodp": [*E2E_RUN, "--no-dp"], "dp": E2E_RUN}
    # Both runs at once: most of a run's time is Ray starting up, which overlaps well.
    procs = {name: subprocess.Popen([sys.executable, "-m", "fedpriv.simulations.cli", "simulate", *args,
                                     "--run-dir", str(tmp_path / name)], cwd=Path(__file__).parents[1], env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for name, args in runs.items()}
    try:
        for name, proc in procs.items():
            _, err = proc.communicate(timeout=400)
            assert proc.returncode == 0, (name, err[-3000:])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    monkeypatch.setenv("FEDPRIV_CACHE", str(cache_dir))  # the audit rebuilds the same data in this process
    nodp, dp = audit_run(tmp_path / "nodp"), audit_run(tmp_path / "dp")
    auc_nodp, auc_dp = nodp["attacks"][0]["auc"], dp["attacks"][0]["auc"]
    assert auc_nodp > auc_dp + 0.1, (auc_nodp, auc_dp)
    assert nodp["empirical_epsilon"]["lower_bound"] > 1.0, nodp["empirical_epsilon"]
    # The DP run's measured leak must stay within its guarantee, and neither set is special before training.
    assert dp["empirical_epsilon"]["lower_bound"] <= dp["theoretical"]["epsilon"], dp["meaning"]
    assert all(abs(r["control"]["auc_initial_model"] - 0.5) < 0.05 for r in (nodp, dp))
