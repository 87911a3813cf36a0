"""The SuperLink entry point's SQLite lock wait (see server/superlink_process.py)."""

from __future__ import annotations

from flwr.supercore import sql_mixin
from flwr.supercore.sql_mixin import SqlMixin

from server.superlink_process import BUSY_TIMEOUT_MS, patch_sqlite_busy_timeout


class _Store(SqlMixin):
    """The smallest Flower SQL store: Flower's own connection setup, no tables."""


def test_patched_connections_wait_longer_for_the_lock_and_keep_flowers_other_pragmas(monkeypatch) -> None:
    monkeypatch.setattr(sql_mixin, "SQLITE_PRAGMAS", sql_mixin.SQLITE_PRAGMAS)  # undone after the test
    original = dict(sql_mixin.SQLITE_PRAGMAS)
    assert int(original["busy_timeout"]) < BUSY_TIMEOUT_MS

    patch_sqlite_busy_timeout()
    store = _Store(":memory:")
    store.initialize()

    assert store.query("PRAGMA busy_timeout")[0]["timeout"] == BUSY_TIMEOUT_MS
    assert store.query("PRAGMA foreign_keys")[0]["foreign_keys"] == 1
    assert {k: v for k, v in sql_mixin.SQLITE_PRAGMAS if k != "busy_timeout"} == \
        {k: v for k, v in original.items() if k != "busy_timeout"}
