"""Entry point that runs Flower's ``flower-superlink`` with a longer SQLite busy timeout.

Why: Flower 1.42 opens its SuperLink state with ``PRAGMA busy_timeout = 5000``. With ten SuperNodes
pushing replies at once on a 2-core machine, a request can wait more than 5 s for SQLite's write lock
(each write is short, but its thread is starved of CPU). Flower then answers that push with HTTP 500
and the SuperNode drops the reply for good, so the round waits out ``--round-timeout`` without that
client. Waiting longer for the lock only delays a write; it never changes what is written.
"""

from __future__ import annotations

import sys

import common  # noqa: F401  (first: turns Flower's telemetry off before flwr is imported)

BUSY_TIMEOUT_MS = 120_000


def patch_sqlite_busy_timeout(timeout_ms: int = BUSY_TIMEOUT_MS) -> None:
    """Make every SQLite connection Flower opens in this process wait ``timeout_ms`` for a lock."""
    from flwr.supercore import sql_mixin

    pragmas = [(name, value) for name, value in sql_mixin.SQLITE_PRAGMAS if name != "busy_timeout"]
    sql_mixin.SQLITE_PRAGMAS = (("busy_timeout", str(timeout_ms)), *pragmas)


def main() -> None:
    patch_sqlite_busy_timeout()
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv[0] = "flower-superlink"
    flower_superlink()


if __name__ == "__main__":
    main()
