"""The name an owner without a configured one goes by: stable on its machine, opaque to the server.

The name travels in every reply. A hash of the owner's records would let a server that holds a
candidate dataset check it against the name (and learn a missing record outright, beside any DP
noise), so the name is a keyed hash: HMAC-SHA256 of the data's fingerprint under a random key that
never leaves this machine (``<state home>/owner-id.key``, mode 0600, written atomically). The
same records on the same machine keep their name -- and so their ledger folder -- across restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_FILE = "owner-id.key"


def state_home() -> Path:
    """This machine's fedpriv state folder: ``$FEDPRIV_STATE_HOME``, default ``~/.local/state/fedpriv``."""
    return Path(os.environ.get("FEDPRIV_STATE_HOME", "~/.local/state/fedpriv")).expanduser()


def _machine_key() -> bytes:
    path = state_home() / KEY_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{KEY_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)  # atomic, and never replaces a key another process wrote first
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return bytes.fromhex(path.read_text().strip())


def unnamed_owner_id(fingerprint: str) -> str:
    """``owner-`` and 8 hex digits of HMAC(machine key, fingerprint)."""
    return "owner-" + hmac.new(_machine_key(), fingerprint.encode(), hashlib.sha256).hexdigest()[:8]
