"""Helpers the benchmarks share: run configs, option checks, medians and formatting."""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any


def median(values: list[float]) -> float:
    """The median; NaN for no values."""
    return statistics.median(values) if values else math.nan


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def sim_config(base: dict[str, Any], run_dir: Path, **overrides: Any) -> dict[str, Any]:
    from fedpriv.common.config import RunConfig

    cfg = RunConfig.from_mapping({**base, **overrides, "run_dir": str(run_dir)})
    cfg.validate()
    return cfg.to_dict()


def load_note() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} CPUs"


def check_positive(**values: float) -> None:
    from fedpriv.common.errors import UserInputError

    for name, value in values.items():
        if value < 1:
            raise UserInputError(f"--{name.replace('_', '-')} must be >= 1 (got {value})")


def client_list(clients: list[int]) -> list[int]:
    from fedpriv.common.errors import UserInputError

    if not clients or any(c < 2 for c in clients):
        raise UserInputError(f"--clients needs values >= 2 (got {clients})")
    return clients


def base_config(**values: Any) -> dict[str, Any]:
    """A validated run config as a dict, with ``_train_size``: the records of its training set."""
    from fedpriv.common.config import RunConfig
    from fedpriv.common.datasets import load_dataset

    cfg = RunConfig.from_mapping(values)
    cfg.validate()
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction, mnist1d_samples=cfg.mnist1d_samples)
    return {**cfg.to_dict(), "_train_size": len(data.x_train)}


def strip_private(base: dict[str, Any]) -> dict[str, Any]:
    """``base`` without the keys that start with ``_`` (facts kept beside a config, not config)."""
    return {k: v for k, v in base.items() if not k.startswith("_")}

