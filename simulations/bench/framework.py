"""``fedpriv bench framework``: what the federation machinery costs around training.

Wall time of ``fedpriv simulate``'s code path (in-process backend or Flower's Simulation Engine,
startup to exit) / the pure compute time of the same ``client.dp_training.train_round`` calls in a
plain loop, per number of clients, with where the simulation's time goes. Every measured run is a
fresh child process (:mod:`simulations.bench.runner`); runs of the variants being compared
alternate within one invocation (A, B, A, B, ...), so a burst of load from other work on the
machine hits every variant alike; each table prints the load average seen.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fedpriv.simulations.bench.runner import ChildResult, run_child
from fedpriv.simulations.bench.shared import (base_config, check_positive, client_list, fmt_bytes, load_note, median,
                                      sim_config, strip_private)
from fedpriv.simulations.command import guarded


@dataclass
class FrameworkRow:
    clients: int
    sims: list[ChildResult] = field(default_factory=list)
    loops: list[ChildResult] = field(default_factory=list)

    def ratio(self) -> float:
        return median([s.wall_s for s in self.sims]) / median([l.data["compute_s"] for l in self.loops])


def measure_framework(clients: list[int], base: dict[str, Any], repeats: int, nice: int, work: Path,
                      loop_threads: int, on_progress=lambda text: None) -> list[FrameworkRow]:
    rows = [FrameworkRow(n) for n in clients]
    for rep in range(repeats):
        for row in rows:
            for kind in ("sim", "loop") if rep % 2 == 0 else ("loop", "sim"):
                on_progress(f"{kind}, {row.clients} clients, repeat {rep + 1}/{repeats}")
                cfg = sim_config(base, work / f"{kind}-{row.clients}-{rep}", num_clients=row.clients)
                spec = {"config": cfg, "threads": loop_threads}
                res = run_child(kind, spec, f"{row.clients} clients", nice=nice)
                (row.sims if kind == "sim" else row.loops).append(res)
    return rows


def framework_tables(rows: list[FrameworkRow], base: dict[str, Any]):
    from rich.table import Table

    ratio = Table(title=f"Framework overhead: {base['dataset']}, {base['model']}, {base['num_rounds']} rounds, "
                        f"{base['local_epochs']} local epochs, every client every round. ratio = simulation wall "
                        "time (process launch to exit) / pure train_round compute of the same training in a plain loop")
    for col in ("clients", "samples/client", "simulation wall s", "loop compute s", "loop process s", "ratio",
                "sim peak PSS"):
        ratio.add_column(col, justify="right")
    for row in rows:
        sim_wall = median([s.wall_s for s in row.sims])
        per_client = base["_train_size"] / row.clients
        ratio.add_row(str(row.clients), f"{per_client:.0f}", f"{sim_wall:.1f}",
                      f"{median([l.data['compute_s'] for l in row.loops]):.1f}",
                      f"{median([l.wall_s for l in row.loops]):.1f}", f"{row.ratio():.2f}",
                      fmt_bytes(max(s.peak_pss for s in row.sims)))
    parts = Table(title="Where the simulation's wall time goes (seconds, median over repeats)")
    parts.add_column("phase")
    for row in rows:
        parts.add_column(f"{row.clients} clients", justify="right")
    breakdowns = [[sim_breakdown(s) for s in row.sims] for row in rows]
    for key in breakdowns[0][0]:
        parts.add_row(key, *[f"{median([b[key] for b in bs]):.2f}" for bs in breakdowns])
    parts.add_row("[bold]total wall[/]", *[f"{median([s.wall_s for s in row.sims]):.2f}" for row in rows])
    return ratio, parts


def framework(
    clients: Annotated[Optional[list[int]], typer.Option("--clients", help="Numbers of clients (repeat the option).")] = None,
    num_rounds: Annotated[int, typer.Option("--num-rounds")] = 3,
    local_epochs: Annotated[int, typer.Option("--local-epochs")] = 2,
    dataset: Annotated[str, typer.Option("--dataset", help="digits, mnist1d or npz:PATH.")] = "mnist1d",
    mnist1d_samples: Annotated[int, typer.Option("--mnist1d-samples")] = 20_000,
    model: Annotated[str, typer.Option("--model")] = "cnn",
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each variant, alternating.")] = 1,
    loop_threads: Annotated[int, typer.Option("--loop-threads", help="Torch threads of the plain loop, as each simulated client uses (--client-cpus 1); 0: torch's default.")] = 1,
    nice: Annotated[int, typer.Option("--nice", help="Extra niceness of the measured processes (they inherit this one's).")] = 0,
    backend: Annotated[str, typer.Option("--backend", help="Simulation backend: in-process or ray.")] = "in-process",
) -> None:
    """Simulation wall time vs the same local training in a plain loop, for several client counts.

    Example: fedpriv bench framework --clients 10 --clients 50 --clients 200
    """
    guarded(_framework)(clients or [10, 50, 200], num_rounds, local_epochs, dataset, mnist1d_samples, model,
                        repeats, loop_threads, nice, backend)


def _framework(clients, num_rounds, local_epochs, dataset, mnist1d_samples, model, repeats, loop_threads, nice,
               backend="in-process"):
    from fedpriv.simulations.console import console

    check_positive(num_rounds=num_rounds, local_epochs=local_epochs, repeats=repeats)
    clients = client_list(clients)
    base = base_config(dataset=dataset, mnist1d_samples=mnist1d_samples, model=model, num_rounds=num_rounds,
                       local_epochs=local_epochs, min_clients=2, simulation_backend=backend)
    load_before = load_note()
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-framework-") as tmp, console.status("measuring") as status:
        rows = measure_framework(clients, strip_private(base), repeats, nice, Path(tmp), loop_threads,
                                 lambda text: status.update(f"measuring: {text}"))
    for table in framework_tables(rows, base):
        console.print(table)
    console.print(f"plain loop: one process, {rows[0].loops[0].data['threads']} torch thread(s), clients in turn; "
                  f"simulation: {_executor_note(base)}")
    console.print(f"load: {load_before} before, {load_note()} after; measured processes at nice {min(19, os.nice(0) + nice)}")


def sim_breakdown(res: ChildResult) -> dict[str, float]:
    """Where a simulation child's wall time went (seconds), from its marks, rounds and client trace."""
    d = res.data
    marks, rounds, trace = d["marks"], d["rounds"], d["trace"]
    launch = d["launch"]
    first = rounds[0]
    r1_trace = [t for t in trace if first["start"] <= t["in"] <= first["end"]]
    actor_ready = min((t["in"] for t in r1_trace), default=first["start"])
    later = [r["end"] - r["start"] for r in rounds[1:]]
    handler = [t["out"] - t["in"] for t in trace]
    end_last = rounds[-1]["end"]
    return {
        "interpreter+imports": marks["imported"] - launch,
        "setup to round 1": first["start"] - marks["simulate"],
        "round 1: until first client runs": actor_ready - first["start"],
        "round 1: rest": first["end"] - actor_ready,
        "rounds 2..R (each, median)": median(later),
        "client handler (each call, median)": median(handler),
        "final write + shutdown": marks["returned"] - end_last,
        "interpreter exit": res.wall_s - (marks["returned"] - launch),
    }


def _executor_note(base: dict[str, Any]) -> str:
    """How the simulation ran its clients, for table footers."""
    cpus = base["client_cpus"]
    if base["simulation_backend"] == "ray":
        return f"Ray actors of {cpus:g} CPU(s) each on {os.cpu_count()} CPUs, one torch thread per client CPU"
    from fedpriv.simulations.inprocess_backend import worker_count

    workers = worker_count(cpus)
    where = "a thread of the driver" if workers == 1 else f"{workers} worker processes forked from the driver"
    return (f"in-process backend, clients run in {where} ({cpus:g} CPU(s) per client on {os.cpu_count()} CPUs), "
            "one torch thread per client CPU")
