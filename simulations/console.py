"""What people see in the terminal: round progress bars and the final results table."""

from __future__ import annotations

import math

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpriv.server.report import RunReport

console = Console(stderr=False)


def stop_and_join(progress: Progress, timeout_s: float = 2.0) -> None:
    """Stop a live display and wait for rich's refresh thread to end.

    ``Progress.stop`` only signals that thread; it exits up to one refresh period later. Waiting for it
    keeps the contract of the displays below: once their ``with`` block ends, no thread of theirs runs,
    so a second simulation in the same process forks its workers from one thread again.
    """
    thread = getattr(progress.live, "_refresh_thread", None)  # rich keeps no public handle on it
    progress.stop()
    if thread is not None:
        thread.join(timeout_s)


class RoundProgress:
    """One progress bar per round, filling as clients reply; implements ``RoundObserver``.

    The display (and rich's refresh thread) starts with the first round, not on ``__enter__``: the
    in-process simulation forks its workers before that, and forking a process that runs other
    threads can leave the child holding locks that no thread will ever release.
    """

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("clients"), TimeElapsedColumn(), TextColumn("{task.fields[info]}"),
                                 console=console)
        self.tasks: dict[int, int] = {}

    def __enter__(self) -> "RoundProgress":
        return self

    def __exit__(self, *exc) -> None:
        stop_and_join(self.progress)  # a no-op when no round started

    def round_started(self, server_round: int, num_rounds: int, num_clients: int) -> None:
        self.progress.start()  # a no-op after the first round
        self.tasks[server_round] = self.progress.add_task(f"round {server_round}/{num_rounds}",
                                                          total=num_clients, info="")

    def client_replied(self, server_round: int, replied: int, expected: int) -> None:
        self.progress.update(self.tasks[server_round], completed=replied)

    def round_finished(self, server_round: int, summary: dict) -> None:
        extra = ""
        if summary.get("declined") or summary.get("rejected") or summary.get("missed"):
            extra = (f" · declined {len(summary['declined'])} dropped {len(summary['rejected'])}"
                     f" missed {len(summary['missed'])}")
        self.progress.update(self.tasks[server_round],
                             info=round_text(summary["metrics"], summary["max_epsilon"]) + extra)


def fmt_eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.2f}"


def round_text(metrics: dict, max_epsilon: float | str) -> str:
    """One round in a few words: the test metric and the largest client epsilon so far."""
    main = f"acc {metrics['accuracy']:.3f}" if "accuracy" in metrics else f"mse {metrics['mse']:.4f}"
    return f"{main} · max ε {fmt_eps(float(max_epsilon))}"  # float() also reads report.json's "inf"


def results_table(report: RunReport) -> Table:
    """Round, test metrics and max per-client epsilon, as the README shows them."""
    names = report.metric_names()
    table = Table(title=f"{report.run.get('model')} on {report.run.get('dataset')} — "
                        f"{'DP' if report.dp else 'no DP'}, delta={report.delta:g}, {report.accountant.upper()}")
    table.add_column("round", justify="right")
    for n in names:
        table.add_column(n, justify="right")
    table.add_column("max ε", justify="right")
    central = bool(report.central)
    if central:
        table.add_column("user-level ε", justify="right")
    for r in report.rounds:
        user = [fmt_eps(r.get("user_epsilon") or 0.0)] if central else []
        table.add_row(str(r["round"]), *[f"{r['metrics'][n]:.4f}" for n in names], fmt_eps(r["max_epsilon"]), *user)
    return table


def privacy_setup(cfg) -> str:  # noqa: ANN001 - a RunConfig; kept import-light for the CLI's start-up
    """The run's privacy mechanisms in one line, for the banner before training starts."""
    parts = [f"DP-SGD σ={cfg.noise_multiplier:.4g} C={cfg.max_grad_norm} δ={cfg.delta:g} ({cfg.accountant})"
             if cfg.dp else "[red]no local DP[/]"]
    if cfg.central_dp != "off":
        parts.append(f"central DP {cfg.central_dp} z={cfg.central_noise_multiplier} C={cfg.central_clipping_norm}")
    if cfg.secure_aggregation:
        parts.append("SecAgg+")
    if cfg.secure_mode:
        parts.append("secure mode")
    return " · ".join(parts)


class ReportWatcher:
    """Progress of a run in another process, read from its ``report.json`` as rounds complete."""

    def __init__(self, run_dir, num_rounds: int, first_round: int = 0) -> None:
        from pathlib import Path

        self.path = Path(run_dir) / "report.json"
        self.progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[info]}"), console=console)
        self.task = self.progress.add_task("rounds", total=num_rounds, completed=first_round, info="waiting for clients")
        self.seen = first_round

    def __enter__(self) -> "ReportWatcher":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.tick()
        stop_and_join(self.progress)

    def tick(self) -> None:
        import json

        try:
            rounds = json.loads(self.path.read_text())["rounds"]
        except (OSError, ValueError, KeyError):
            return
        if len(rounds) != self.seen and rounds:
            self.seen = len(rounds)
            last = rounds[-1]
            info = (f"round {last['round']}: {round_text(last['metrics'], last.get('max_epsilon', 0.0))}"
                    f" · trained {len(last.get('trained', []))}")
            self.progress.update(self.task, completed=len(rounds), info=info)
