"""The shared child-process runner of the benchmarks.

A measured run is a fresh interpreter (``python -m fedpriv.simulations.bench.runner KIND SPEC OUT``, see
:func:`run_child`; ``fedpriv bench quality`` runs ``python -m fedpriv.simulations.cli`` the same way, see
:func:`run_process`), so imports, Ray start-up and shutdown count. The child leads a session of its
own: the parent samples the memory of its whole process tree (Ray's GCS, raylet and workers
included) from /proc while it runs, and kills that tree, and only that tree, when it is done, runs
out of time or the bench is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from fedpriv.simulations.bench.children import CHILDREN

ROOT = Path(__file__).resolve().parents[2]  # the project: measured children run from here


# ----------------------------------------------------------------------------- process-tree memory
def _tree_pids(pid: int) -> list[int]:
    from fedpriv.common.processes import descendants

    return [pid, *descendants(pid)]


def _memory_of(pid: int) -> tuple[int, int]:
    """(RSS, PSS) bytes of one process; PSS splits shared pages (torch's libraries) among their users."""
    rss = pss = 0
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return rss, pss


class TreeMemory:
    """Samples the summed RSS and PSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = self.peak_pss = 0
        self.peak_procs = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = _tree_pids(self.pid)
            sizes = [_memory_of(p) for p in pids]
            self.peak_rss = max(self.peak_rss, sum(s[0] for s in sizes))
            self.peak_pss = max(self.peak_pss, sum(s[1] for s in sizes))
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(self.interval)


# ----------------------------------------------------------------------------- running one child
@dataclass
class ChildResult:
    """What one measured child process reported, plus what the parent saw from outside."""

    kind: str
    label: str
    wall_s: float
    data: dict[str, Any]
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    load: float = 0.0


@dataclass
class Finished:
    """A child process that exited: its exit code, wall time from launch to exit, and peak memory."""

    code: int
    wall_s: float
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0


def run_process(argv: Sequence[str], log_path: Path, *, env: dict[str, str], timeout: float, nice: int = 0,
                memory: bool = True) -> Finished:
    """Run ``argv`` from the project folder in a session of its own, stdout and stderr to ``log_path``.

    With ``memory``, the summed RSS/PSS of its process tree is sampled while it runs. On timeout its
    whole tree is killed and :class:`subprocess.TimeoutExpired` raised; on an interrupt (Ctrl-C,
    which the child, in its own session, does not receive) the tree is killed too.
    """
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=(lambda: os.nice(nice)) if nice else None, start_new_session=True)
        with TreeMemory(proc.pid) if memory else contextlib.nullcontext() as sampler:
            try:
                code = proc.wait(timeout=timeout)
            except BaseException:  # the time limit, or the bench interrupted: nothing of the child is left
                _kill_tree(proc.pid)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=10)
                raise
    wall = time.perf_counter() - started
    _kill_tree(proc.pid)  # Ray may leave daemons behind its driver
    if sampler is None:
        return Finished(code, wall)
    return Finished(code, wall, sampler.peak_rss, sampler.peak_pss, sampler.peak_procs)


def run_child(kind: str, spec: dict[str, Any], label: str, *, nice: int = 0, timeout: float = 3600) -> ChildResult:
    """Run ``KIND`` (a key of :data:`~simulations.bench.children.CHILDREN`) in a fresh interpreter; its
    wall time counts from launch to exit."""
    from fedpriv.common.errors import UserInputError
    from fedpriv.common.processes import venv_env

    if kind not in CHILDREN:
        raise ValueError(f"unknown child kind {kind!r}; known: {', '.join(CHILDREN)}")
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        argv = [sys.executable, "-m", "fedpriv.simulations.bench.runner", kind, str(spec_path), str(out_path)]
        env = venv_env({"FEDPRIV_BENCH_LAUNCH": repr(time.time()), "RAY_DEDUP_LOGS": "0"})
        log_path = Path(tmp) / "child.log"
        try:
            done = run_process(argv, log_path, env=env, timeout=timeout, nice=nice)
        except subprocess.TimeoutExpired:
            raise UserInputError(f"bench {kind} ({label}) did not finish within {timeout:.0f} s") from None
        if done.code != 0 or not out_path.exists():
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"bench {kind} ({label}) failed with exit code {done.code}: {' | '.join(tail)}")
        return ChildResult(kind, label, done.wall_s, json.loads(out_path.read_text()), done.peak_rss, done.peak_pss,
                           done.peak_procs, os.getloadavg()[0])


def _kill_tree(pid: int) -> None:
    import signal

    try:
        os.killpg(pid, signal.SIGKILL)  # the child leads its own session: only its tree is hit
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------- the child's side
def child_main(argv: list[str]) -> None:
    """Entry point of a measured child: ``KIND SPEC_JSON OUT_JSON``.

    The workloads live in :mod:`simulations.bench.children`, imported by name, so Ray can pickle
    what they hand it (a mod, a ``client_fn``) by reference even though this module is ``__main__``.
    """
    kind, spec_path, out_path = argv
    result = CHILDREN[kind](json.loads(Path(spec_path).read_text()))
    result["launch"] = float(os.environ.get("FEDPRIV_BENCH_LAUNCH", "nan"))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    from fedpriv.simulations.command import fast_exit

    try:
        child_main(sys.argv[1:])
    finally:
        fast_exit()  # as the fedpriv command does
