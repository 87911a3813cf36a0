"""The terminal progress display (simulations/console.py)."""

from __future__ import annotations

import threading

from rich.live import _RefreshThread

from fedpriv.simulations.console import RoundProgress


def _refresh_threads() -> int:
    """rich's refresh threads alive: counted by class, so a thread another test left behind (the suite
    runs in one process) cannot make these checks fail or pass."""
    return sum(isinstance(t, _RefreshThread) for t in threading.enumerate())


def test_progress_runs_no_thread_until_the_first_round_so_workers_fork_from_one_thread() -> None:
    with RoundProgress() as progress:
        assert _refresh_threads() == 0  # the in-process simulation forks its workers here
        progress.round_started(1, num_rounds=2, num_clients=3)
        assert _refresh_threads() == 1  # rich's refresh thread
        progress.client_replied(1, replied=3, expected=3)
        progress.round_finished(1, {"metrics": {"accuracy": 0.5}, "max_epsilon": 1.0})
        progress.round_started(2, num_rounds=2, num_clients=3)
        assert _refresh_threads() == 1
    assert _refresh_threads() == 0


def test_progress_that_never_started_exits_cleanly() -> None:
    with RoundProgress():
        pass
    assert _refresh_threads() == 0
