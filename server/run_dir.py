"""Where a run's folder goes, and a clear error when it cannot be written."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedpriv.common.atomic_io import read_json
from fedpriv.common.config import RunConfig
from fedpriv.common.errors import ConfigError, UserInputError


def resolve_run_dir(cfg: RunConfig, base: Path | None = None) -> Path:
    """``cfg.run_dir`` or ``runs/<time>-<model>-<dataset>``, absolute, checked to be writable."""
    if cfg.run_dir:
        path = Path(cfg.run_dir).expanduser()
    else:
        dataset = cfg.dataset.partition(":")[0]  # npz, csv, parquet, images: never the path (it has slashes)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = (base or Path("runs")) / f"{stamp}-{cfg.model}-{dataset}"
    path = path.resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserInputError(f"--run-dir {path} is not writable ({exc.strerror}); choose another folder") from None
    return path


def load_run_config(run_dir: Path) -> RunConfig:
    """The config a finished run saved (``config.json``); a missing or broken folder is a one-line error.

    One reader for every command that opens a finished run (``fedpriv audit``, ``fedpriv score``)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserInputError(f"{run_dir} is not a folder; pass the folder of a finished run (made by fedpriv simulate)")
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{run_dir} holds no config.json; it is not a fedpriv run folder")
    try:
        return RunConfig.from_mapping(read_json(config_path)).validate()
    except UserInputError as exc:  # first: a FedprivError is a ValueError too
        raise ConfigError(f"{config_path}: {exc}") from None
    except (ValueError, AttributeError) as exc:
        raise ConfigError(f"{config_path} is not a valid run config ({exc.__class__.__name__})") from None
