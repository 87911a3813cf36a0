"""The terminal progress display (simulations/console.py)."""

from __future__ import annotations

import threading

from fedpriv.simulations.console import RoundProgress


def test_progress_runs_no_thread_until_the_first_round_so_workers_fork_from_one_thread() -> None:
    before = threading.active_count()
    with RoundProgress() as progress:
        assert threading.active_count() == before  # the in-process simulation forks its workers here
        progress.round_started(1, num_rounds=2, num_clients=3)
        assert threading.active_count() == before + 1  # rich's refresh thread
        progress.client_replied(1, replied=3, expected=3)
        progress.round_finished(1, {"metrics": {"accuracy": 0.5}, "max_epsilon": 1.0})
        progress.round_started(2, num_rounds=2, num_clients=3)
        assert threading.active_count() == before + 1
    assert threading.active_count() == before


def test_progress_that_never_started_exits_cleanly() -> None:
    before = threading.active_count()
    with RoundProgress():
        pass
    assert threading.active_count() == before
