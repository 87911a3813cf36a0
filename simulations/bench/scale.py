"""``fedpriv bench scale``: many virtual clients, few per round.

Peak memory of the whole process tree and per-round time at two populations, so it shows whether
per-round cost grows with the number of clients (it should not: only the sampled ones train).
Each run is a fresh ``sim`` child (:mod:`simulations.bench.runner`), the sizes alternating.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from fedpriv.simulations.bench.runner import ChildResult, run_child
from fedpriv.simulations.bench.shared import (base_config, check_positive, fmt_bytes, load_note, median, sim_config,
                                      strip_private)
from fedpriv.simulations.command import guarded


def _per_round(res: ChildResult) -> list[float]:
    return [r["end"] - r["start"] for r in res.data["rounds"]]


def scale(
    clients: Annotated[int, typer.Option("--clients", help="Virtual clients in the large run.")] = 1000,
    small: Annotated[int, typer.Option("--small", help="Virtual clients in the comparison run.")] = 100,
    per_round: Annotated[int, typer.Option("--per-round", help="Clients sampled per round, in both runs.")] = 10,
    num_rounds: Annotated[int, typer.Option("--num-rounds")] = 4,
    mnist1d_samples: Annotated[int, typer.Option("--mnist1d-samples", help="MNIST-1D records (spread over the clients).")] = 20_000,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each size, alternating.")] = 1,
    nice: Annotated[int, typer.Option("--nice", help="Extra niceness of the measured processes (they inherit this one's).")] = 0,
) -> None:
    """Many virtual clients, few per round: peak memory and whether per-round time grows with the population.

    Example: fedpriv bench scale --clients 1000 --small 100 --per-round 10
    """
    guarded(_scale)(clients, small, per_round, num_rounds, mnist1d_samples, repeats, nice)


def scale_config(num_clients: int, per_round: int, num_rounds: int, mnist1d_samples: int) -> dict[str, Any]:
    """MNIST-1D CNN with DP, ``per_round`` of ``num_clients`` sampled each round (fraction-train)."""
    return strip_private(base_config(dataset="mnist1d", mnist1d_samples=mnist1d_samples, num_rounds=num_rounds,
                                     num_clients=num_clients, fraction_train=per_round / num_clients,
                                     min_clients=per_round))


def _scale(clients, small, per_round, num_rounds, mnist1d_samples, repeats, nice):
    from fedpriv.common.errors import UserInputError
    from fedpriv.simulations.console import console

    check_positive(num_rounds=num_rounds, repeats=repeats, per_round=per_round)
    if num_rounds < 2:
        raise UserInputError("--num-rounds must be >= 2 (round 1 includes start-up and is shown apart)")
    if not 2 <= per_round <= small <= clients:
        raise UserInputError(f"need 2 <= --per-round ({per_round}) <= --small ({small}) <= --clients ({clients})")
    load_before = load_note()
    results: dict[int, list[ChildResult]] = {small: [], clients: []}
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-scale-") as tmp, console.status("measuring") as status:
        for rep in range(repeats):
            for n in (small, clients) if rep % 2 == 0 else (clients, small):
                status.update(f"measuring: {n} clients, repeat {rep + 1}/{repeats}")
                cfg = sim_config(scale_config(n, per_round, num_rounds, mnist1d_samples), Path(tmp) / f"sim-{n}-{rep}")
                results[n].append(run_child("sim", {"config": cfg}, f"{n} clients", nice=nice))
    table, growth = scale_table(results, per_round=per_round, num_rounds=num_rounds, mnist1d_samples=mnist1d_samples)
    console.print(table)
    console.print(f"per-round time ratio {clients} / {small} clients: {growth:.2f}")
    console.print(f"load: {load_before} before, {load_note()} after; measured processes at nice {min(19, os.nice(0) + nice)}")


def scale_table(results: dict[int, list[ChildResult]], *, per_round: int, num_rounds: int, mnist1d_samples: int):
    """The table and the per-round time ratio largest / smallest population."""
    from rich.table import Table

    table = Table(title=f"Scale: {per_round} clients per round, {num_rounds} rounds, MNIST-1D ({mnist1d_samples} "
                        "records), CNN with DP, in-process backend; round time excludes round 1 (start-up); memory "
                        "summed over the whole process tree")
    for col in ("total clients", "round 1 s", "rounds 2..R s (median)", "wall s", "peak RSS (sum)",
                "peak PSS (sum)", "processes"):
        table.add_column(col, justify="right")
    medians = {}
    for n, runs in sorted(results.items()):
        rounds = [_per_round(r) for r in runs]
        medians[n] = median([t for rs in rounds for t in rs[1:]])
        table.add_row(str(n), f"{median([rs[0] for rs in rounds]):.1f}", f"{medians[n]:.2f}",
                      f"{median([r.wall_s for r in runs]):.1f}", fmt_bytes(max(r.peak_rss for r in runs)),
                      fmt_bytes(max(r.peak_pss for r in runs)), str(max(r.peak_procs for r in runs)))
    return table, medians[max(medians)] / medians[min(medians)]
