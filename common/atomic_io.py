"""Atomic file writes: a crash mid-write leaves the previous file intact, never a torn one."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats by strings so that the JSON stays strict (RFC 8259)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value > 0 else ("-inf" if value < 0 else "nan")
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write via ``write(fileobj)`` into a temp file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomically write strict JSON (infinite epsilon is written as the string "inf")."""
    atomic_write(path, lambda f: json.dump(_json_safe(data), f, indent=2, sort_keys=False))


def write_text(path: Path, text: str) -> None:
    """Atomically write a text file."""
    atomic_write(path, lambda f: f.write(text))


def read_json(path: Path) -> Any:
    """Read JSON written by :func:`write_json`."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)
