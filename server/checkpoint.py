"""Atomic per-round checkpoints of the global model and the run's report, for resuming."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedpriv.common.atomic_io import atomic_write
from fedpriv.common.errors import UserInputError

CHECKPOINT = "checkpoint.pt"
FINAL_MODEL = "final_model.pt"


@dataclass
class Checkpoint:
    """The state after a completed round: enough to continue with the next one."""

    server_round: int
    state_dict: dict[str, torch.Tensor]
    report: dict[str, Any]
    averaged: dict[str, torch.Tensor] | None = None  # --server-ema: the average of the iterates so far
    optimiser: dict[str, Any] | None = None  # FedAvgM's momentum / FedAdam's moments (NumPy arrays)


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    payload = {"round": ckpt.server_round, "state_dict": ckpt.state_dict, "report": ckpt.report}
    if ckpt.averaged is not None:
        payload["averaged"] = ckpt.averaged
    if ckpt.optimiser is not None:  # as tensors: weights_only loading takes no NumPy arrays
        payload["optimiser"] = _to_tensors(ckpt.optimiser)
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: torch.save(payload, f), binary=True)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete round's checkpoint, None if there is none; a damaged one is an error."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(int(payload["round"]), payload["state_dict"], payload["report"], payload.get("averaged"),
                          _to_arrays(payload.get("optimiser")))
    except Exception as exc:  # torch raises many types for damaged files
        raise UserInputError(f"checkpoint {path} cannot be read ({exc.__class__.__name__}); "
                             "move it away to start the run afresh") from None


def _to_tensors(value: Any) -> Any:
    """NumPy arrays (in lists and dicts) as tensors; everything else as it is."""
    if isinstance(value, dict):
        return {k: _to_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_tensors(v) for v in value]
    return torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value


def _to_arrays(value: Any) -> Any:
    """The inverse of :func:`_to_tensors`."""
    if isinstance(value, dict):
        return {k: _to_arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_arrays(v) for v in value]
    return value.numpy() if isinstance(value, torch.Tensor) else value


def save_final_model(run_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
    atomic_write(Path(run_dir) / FINAL_MODEL, lambda f: torch.save(state_dict, f), binary=True)
