"""``fedpriv score``: anomaly scores of a data owner's records under a finished run's autoencoder.

Reads the run folder (``config.json`` and the final global model, ``final_model.pt``), loads the
owner's data with the project's dataset loading, and scores every record by its reconstruction
error (common/anomaly.py). Everything stays on this machine: nothing is sent anywhere.

Which records, in which order (row ``i`` of the CSV is record ``i``):

* ``npz:PATH``: every record of the file, in the file's own order (as a data owner trains on it).
* ``digits`` / ``mnist1d``: the whole built-in dataset as the run split it (its seed, test fraction
  and MNIST-1D size): the training records, then the held-out test records (column ``split``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedpriv.common.anomaly import reconstruction_scores
from fedpriv.common.atomic_io import atomic_write
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import load_dataset, npz_records
from fedpriv.common.errors import DataError, UserInputError
from fedpriv.common.models import build_model
from fedpriv.server.checkpoint import FINAL_MODEL
from fedpriv.server.run_dir import load_run_config

PERCENTILES = (50, 90, 95, 99)
SCORES_FILE = "scores.csv"


@dataclass
class ScoreResult:
    scores: np.ndarray
    splits: list[str]  # per record: "train", "test" (built-in datasets) or "data" (npz)
    out: Path

    def summary(self) -> dict[str, float]:
        s = self.scores
        return {"count": len(s), "mean": float(s.mean()), "std": float(s.std()), "min": float(s.min()),
                **{f"p{q}": float(np.percentile(s, q)) for q in PERCENTILES}, "max": float(s.max())}


def owner_records(spec: str, cfg: RunConfig) -> tuple[np.ndarray, list[str]]:
    """The records to score and their split labels (see the module docstring)."""
    if spec.startswith("npz:"):
        x, _, _ = npz_records(Path(spec[4:]))
        return x, ["data"] * len(x)
    data = load_dataset(spec, seed=cfg.seed, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples)
    return (np.concatenate([data.x_train, data.x_test]),
            ["train"] * len(data.x_train) + ["test"] * len(data.x_test))


def score_run(run_dir: Path, spec: str, out: Path | None = None) -> ScoreResult:
    """Score ``spec``'s records with ``run_dir``'s final autoencoder and write them to ``out`` (CSV)."""
    run_dir = Path(run_dir)
    cfg = load_run_config(run_dir)
    if cfg.model != "autoencoder":
        raise UserInputError(f"{run_dir} trained a {cfg.model} model; anomaly scores need an autoencoder run "
                             "(fedpriv simulate --model autoencoder)")
    model_path = run_dir / FINAL_MODEL
    if not model_path.is_file():
        raise UserInputError(f"{run_dir} holds no {FINAL_MODEL}; the run has not finished")
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for damaged files
        raise UserInputError(f"{model_path} cannot be read ({exc.__class__.__name__})") from None
    x, splits = owner_records(spec, cfg)
    if len(x) == 0:
        raise DataError(f"--data {spec}: no records to score")
    weight = state.get("encoder.1.weight")
    expected = None if weight is None else int(weight.shape[1])
    if expected is not None and expected != math.prod(x.shape[1:]):
        raise DataError(f"--data {spec}: records of shape {tuple(x.shape[1:])} ({math.prod(x.shape[1:])} values) do "
                        f"not fit the run's autoencoder, which takes {expected} values per record")
    model = build_model("autoencoder", tuple(x.shape[1:]), 0, encoding_dim=cfg.encoding_dim, ae_layers=cfg.ae_layers)
    try:
        model.load_state_dict(state)
    except Exception as exc:
        raise UserInputError(f"{model_path} does not fit the autoencoder of {run_dir / 'config.json'} "
                             f"({exc.__class__.__name__}); was the config edited after the run?") from None
    scores = reconstruction_scores(model, x)
    out = Path(out) if out is not None else run_dir / SCORES_FILE
    if out.is_dir():
        raise UserInputError(f"--out {out} is a folder; give a file name such as {out / SCORES_FILE}")
    if not out.parent.is_dir():
        raise UserInputError(f"--out {out}: folder {out.parent} does not exist")

    def write(f) -> None:  # noqa: ANN001 - a text file
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["record", "split", "score"])
        for i, (split, s) in enumerate(zip(splits, scores)):
            w.writerow([i, split, f"{s:.8g}"])

    atomic_write(out, write)
    return ScoreResult(scores, splits, out)
