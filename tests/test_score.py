"""fedpriv score: per-record reconstruction errors of a finished autoencoder run, local only."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from fedpriv.common.anomaly import reconstruction_scores
from fedpriv.common.config import RunConfig
from fedpriv.common.models import build_model

from test_cli_errors import assert_clean_error


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_reconstruction_scores_is_the_per_record_mse():
    model = build_model("autoencoder", (1, 8, 8), 0, encoding_dim=4, seed=0)
    x = np.random.default_rng(0).normal(size=(7, 1, 8, 8)).astype(np.float32)
    scores = reconstruction_scores(model, x, batch_size=3)  # several batches
    with torch.no_grad():
        expected = ((model(torch.from_numpy(x)) - torch.from_numpy(x)) ** 2).mean(dim=(1, 2, 3)).numpy()
    assert scores.shape == (7,) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    assert reconstruction_scores(model, x[:0]).shape == (0,)


def test_score_a_real_autoencoder_run(fedpriv, fedpriv_in_process, tmp_path):
    """The run, the built-in data's scores and the wrong-size error as real child processes; the owner's
    npz through the same ``fedpriv score`` command in this process (a child spent ~10 s starting)."""
    run = tmp_path / "ae-run"
    result = fedpriv("simulate", "--model", "autoencoder", "--dataset", "digits", "--num-clients", "2",
                     "--num-rounds", "1", "--local-epochs", "1", "--run-dir", str(run), timeout=300)
    assert result.returncode == 0, result.stderr
    assert (run / "final_model.pt").is_file()

    # Built-in data: the whole dataset as the run split it, train records then test records.
    result = fedpriv("score", str(run), "--data", "digits", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = _rows(run / "scores.csv")
    assert len(rows) == 1797  # sklearn's digits
    assert {r["split"] for r in rows} == {"train", "test"}
    assert [int(r["record"]) for r in rows] == list(range(1797))
    scores = np.array([float(r["score"]) for r in rows])
    assert np.isfinite(scores).all() and (scores >= 0).all()
    assert "scored 1797 records" in result.stdout and "p95" in result.stdout

    # An owner's npz: every record in file order, to the CSV named by --out.
    records = np.random.default_rng(1).uniform(0, 1, size=(30, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "owner.npz", x=records)
    out = tmp_path / "owner-scores.csv"
    result = fedpriv_in_process("score", str(run), "--data", f"npz:{tmp_path / 'owner.npz'}", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = _rows(out)
    assert len(rows) == 30 and {r["split"] for r in rows} == {"data"}

    # Records of the wrong size for the model: one line, exit 2.
    np.savez(tmp_path / "wrong.npz", x=np.zeros((10, 5), dtype=np.float32))
    result = fedpriv("score", str(run), "--data", f"npz:{tmp_path / 'wrong.npz'}", "--out", str(tmp_path / "w.csv"),
                     timeout=120)
    assert_clean_error(result, "do not fit")
    assert not (tmp_path / "w.csv").exists()


def test_score_refuses_a_run_that_is_not_an_autoencoder(fedpriv_in_process, tmp_path):
    run = tmp_path / "cnn-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(RunConfig(model="cnn").to_dict()))
    result = fedpriv_in_process("score", str(run), "--data", "digits")
    assert_clean_error(result, "autoencoder")
    assert not (run / "scores.csv").exists()


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_score_needs_a_run_folder(fedpriv_in_process, tmp_path, make):
    run = tmp_path / "run"
    if make == "empty":
        run.mkdir()
    result = fedpriv_in_process("score", str(run), "--data", "digits")
    assert_clean_error(result, str(run))
