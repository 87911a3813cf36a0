"""Anomaly scores from the autoencoder: how badly the global model reconstructs each record.

An autoencoder trained (with DP) on a federation's normal records reconstructs records like them
well and unusual ones badly, so the per-record reconstruction error is an anomaly score: higher
means more unusual. Scoring runs locally on the data owner's machine and sends nothing anywhere
(``fedpriv score``, simulations/score.py). Scores are not privacy-protected themselves: they are
computed from the owner's own records, for the owner.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

SCORE_BATCH = 1024  # records per forward pass; bounds memory, not the result


def reconstruction_scores(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = SCORE_BATCH) -> np.ndarray:
    """Per-record mean squared reconstruction error of ``model`` on ``x``, shape ``(len(x),)``.

    ``x`` has the model's input shape after the record axis, ``(n, *input_shape)``, scaled as the
    training data was (fedpriv's dataset loading does that). The score of record ``i`` is
    ``mean((model(x[i]) - x[i]) ** 2)`` over all its elements: the autoencoder's training loss for
    that one record. The model is put in eval mode and no gradients are kept; float64 results.
    """
    xt = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x, dtype=torch.float32)
    model.eval()
    scores = []
    with torch.no_grad():
        for start in range(0, len(xt), batch_size):
            batch = xt[start:start + batch_size]
            err = model(batch) - batch
            scores.append(err.pow(2).flatten(1).mean(dim=1).double())
    if not scores:
        return np.zeros(0, dtype=np.float64)
    return torch.cat(scores).numpy()
