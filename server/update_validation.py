"""Checks on a client's update before it may enter the aggregate."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord


def update_problem(update: ArrayRecord, reference: ArrayRecord, max_norm: float | None = None) -> str | None:
    """Why an update must be dropped (wrong keys, shapes, dtypes, non-finite values, a change far
    larger than DP-SGD's clipping allows), or None."""
    if list(update.keys()) != list(reference.keys()):
        missing = set(reference.keys()) - set(update.keys())
        extra = set(update.keys()) - set(reference.keys())
        return f"parameter names differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    decoded: dict[str, np.ndarray] = {}  # each array decoded once: the server checks every reply of every round
    for name in reference.keys():
        ref, got = reference[name], update[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"parameter '{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"parameter '{name}' has dtype {got.dtype}, expected {ref.dtype}"
        try:
            values = decoded[name] = got.numpy()
        except (ValueError, TypeError) as exc:
            return f"parameter '{name}' cannot be decoded ({exc})"
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"parameter '{name}' contains NaN or infinite values"
    if max_norm is not None:
        norm = _norm(decoded, reference)
        if norm > max_norm:
            return f"update norm {norm:.3g} exceeds the bound {max_norm:.3g} that clipping and noise allow"
    return None


def update_norm(update: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of (update - reference) over all floating-point parameters."""
    return _norm({name: update[name].numpy() for name in reference.keys()}, reference)


def _norm(values: dict[str, np.ndarray], reference: ArrayRecord) -> float:
    total = 0.0
    for name in reference.keys():
        ref = reference[name].numpy()
        if np.issubdtype(ref.dtype, np.floating):
            total += float(np.sum((values[name].astype(np.float64) - ref) ** 2))
    return total ** 0.5


def dp_update_bound(num_params: int, steps: int, learning_rate: float, momentum: float, clip: float,
                    noise_multiplier: float, batch_size: int, slack: float = 3.0) -> float:
    """A generous upper bound on how far honest DP-SGD can move the weights in one round.

    Each step moves at most lr * (C + noise), the noise's norm being about sigma*C*sqrt(d)/B for
    the expected batch size B; momentum scales steps by at most 1/(1-mu); the triangle inequality
    over steps is loose already, and ``slack`` adds margin. Updates beyond it are not DP-SGD's.
    """
    per_step = clip * (1.0 + noise_multiplier * (num_params ** 0.5 + 10.0) / max(batch_size, 1))
    return slack * learning_rate / (1.0 - momentum) * max(steps, 1) * per_step
