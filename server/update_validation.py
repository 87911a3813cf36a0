"""Checks on a client's update before it may enter the aggregate."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord


def update_problem(update: ArrayRecord, reference: ArrayRecord) -> str | None:
    """Why an update must be dropped (wrong keys, shapes, dtypes, non-finite values), or None."""
    if list(update.keys()) != list(reference.keys()):
        missing = set(reference.keys()) - set(update.keys())
        extra = set(update.keys()) - set(reference.keys())
        return f"parameter names differ (missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
    for name in reference.keys():
        ref, got = reference[name], update[name]
        if tuple(got.shape) != tuple(ref.shape):
            return f"parameter '{name}' has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
        if got.dtype != ref.dtype:
            return f"parameter '{name}' has dtype {got.dtype}, expected {ref.dtype}"
        try:
            values = got.numpy()
        except (ValueError, TypeError) as exc:
            return f"parameter '{name}' cannot be decoded ({exc})"
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"parameter '{name}' contains NaN or infinite values"
    return None
