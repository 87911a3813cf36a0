"""Loss and metrics of a model on arrays: accuracy + cross-entropy, or reconstruction MSE."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def task_loss(model_name: str) -> nn.Module:
    """The training criterion of a model family."""
    return nn.MSELoss() if model_name == "autoencoder" else nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate(model: nn.Module, model_name: str, x: np.ndarray, y: np.ndarray | None,
             batch_size: int = 512) -> dict[str, float]:
    """Metrics on a held-out set: ``{"loss", "accuracy"}`` or ``{"loss", "mse"}``."""
    model.eval()
    total_loss, correct, n = 0.0, 0, 0
    for start in range(0, len(x), batch_size):
        xb = torch.from_numpy(x[start:start + batch_size])
        out = model(xb)
        if model_name == "autoencoder":
            total_loss += float(nn.functional.mse_loss(out, xb, reduction="sum")) / xb[0].numel()
        else:
            yb = torch.from_numpy(y[start:start + batch_size])
            total_loss += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(dim=1) == yb).sum())
        n += len(xb)
    loss = total_loss / max(n, 1)
    if model_name == "autoencoder":
        return {"loss": loss, "mse": loss}
    return {"loss": loss, "accuracy": correct / max(n, 1)}
