"""Shared helpers: run the real ``fedpriv`` command line in a subprocess with a time limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

from fedpriv.common.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]

# The previous main job's local training (FedAvg, 2 epochs at batch 64, lr 0.1, sigma 1.5). Runs of 2-3
# rounds pin it: today's defaults are tuned for 20 full-batch rounds and have barely moved the model in 2,
# and these tests check accounting and that training works, not the defaults' accuracy.
PREVIOUS_TRAINING = {"strategy": "fedavg", "local_epochs": 2, "batch_size": 64, "learning_rate": 0.1,
                     "noise_multiplier": 1.5}
PREVIOUS_TRAINING_FLAGS = RunConfig(**PREVIOUS_TRAINING).to_flags(only=PREVIOUS_TRAINING)  # as simulate flags


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One dataset cache for the whole session, away from the user's home."""
    return tmp_path_factory.mktemp("fedpriv-cache")


@pytest.fixture
def fedpriv(cache_dir):
    """Run ``fedpriv ARGS`` as a user would, in a fresh process, bounded in time."""

    def run(*args: str, timeout: float = 300) -> CliResult:
        env = {**os.environ, "FEDPRIV_CACHE": str(cache_dir), "PYTHONUNBUFFERED": "1", "COLUMNS": "120"}
        proc = subprocess.run([sys.executable, "-m", "fedpriv.simulations.cli", *args], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=timeout)
        return CliResult(proc.returncode, proc.stdout, proc.stderr)

    return run


class InProcessTimeout(BaseException):
    """Not an ``Exception``: the command's last-resort handler must not turn it into an error line."""


@pytest.fixture
def fedpriv_in_process(cache_dir):
    """Invoke the same ``fedpriv`` typer app (same commands, same ``guarded`` one-line error path) in this
    process, through click's test runner: for many bad-input cases, where a child process per case costs
    seconds of interpreter and torch start-up. Tests using it keep at least one real child-process case
    (``fedpriv`` fixture) for what only a process shows: its exit status and a stderr with nothing else on it.
    Any exception other than the command's own exit fails here, as a traceback would in the child."""
    from typer.testing import CliRunner

    from fedpriv.simulations.cli import app

    def run(*args: str, timeout: int = 120) -> CliResult:
        def expired(signum, frame):  # noqa: ARG001 - bounded in time like the child: a missed check must not hang
            raise InProcessTimeout(f"fedpriv {' '.join(args)} ran past {timeout} s")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.alarm(timeout)
        try:
            result = CliRunner().invoke(app, list(args), env={"FEDPRIV_CACHE": str(cache_dir), "COLUMNS": "120"})
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        assert result.exception is None or isinstance(result.exception, SystemExit), (args, repr(result.exception))
        return CliResult(result.exit_code, result.stdout, result.stderr)

    return run


@pytest.fixture
def task_identity():
    """Messages are built inside a Flower app process, which knows its run and node; stand in for it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
