"""Shared helpers: run the real ``fedpriv`` command line in a subprocess with a time limit."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from flwr.supercore.task_identity import TaskIdentity

ROOT = Path(__file__).resolve().parents[1]


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


@pytest.fixture
def task_identity():
    """Messages are built inside a Flower app process, which knows its run and node; stand in for it."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
