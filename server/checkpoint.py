"""Atomic per-round checkpoints of the global model and the run's report, for resuming."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def save_checkpoint(run_dir: Path, ckpt: Checkpoint) -> None:
    payload = {"round": ckpt.server_round, "state_dict": ckpt.state_dict, "report": ckpt.report}
    atomic_write(Path(run_dir) / CHECKPOINT, lambda f: torch.save(payload, f), binary=True)


def load_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete round's checkpoint, None if there is none; a damaged one is an error."""
    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return Checkpoint(int(payload["round"]), payload["state_dict"], payload["report"])
    except Exception as exc:  # torch raises many types for damaged files
        raise UserInputError(f"checkpoint {path} cannot be read ({exc.__class__.__name__}); "
                             "move it away to start the run afresh") from None


def save_final_model(run_dir: Path, state_dict: dict[str, torch.Tensor]) -> None:
    atomic_write(Path(run_dir) / FINAL_MODEL, lambda f: torch.save(state_dict, f), binary=True)
