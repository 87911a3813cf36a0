"""Where a run's folder goes, and a clear error when it cannot be written."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fedpriv.common.config import RunConfig
from fedpriv.common.errors import UserInputError


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
