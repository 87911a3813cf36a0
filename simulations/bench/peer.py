"""``fedpriv bench peer``: Flower's published Opacus example workflow vs this project, per round.

The example (:mod:`simulations.bench.peer_example`: a legacy ``NumPyClient`` built by
``client_fn`` per message, a fresh ``PrivacyEngine`` per round, a ``DataLoader`` of dict batches,
federated evaluation) and this project's ClientApp train the same model on the same data, clients
and rounds, both on Flower's Simulation Engine with Ray, each in fresh child processes
(:mod:`simulations.bench.runner`), alternating.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer

from fedpriv.simulations.bench.runner import ChildResult, run_child
from fedpriv.simulations.bench.shared import (base_config, check_positive, client_list, load_note, median, sim_config,
                                      strip_private)
from fedpriv.simulations.command import guarded


def peer(
    clients: Annotated[int, typer.Option("--clients")] = 10,
    num_rounds: Annotated[int, typer.Option("--num-rounds")] = 4,
    local_epochs: Annotated[int, typer.Option("--local-epochs")] = 2,
    dataset: Annotated[str, typer.Option("--dataset")] = "digits",
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each workflow, alternating.")] = 1,
    nice: Annotated[int, typer.Option("--nice", help="Extra niceness of the measured processes (they inherit this one's).")] = 0,
) -> None:
    """Flower's published Opacus example workflow vs this project, per round, same Simulation Engine.

    Example: fedpriv bench peer --clients 10 --num-rounds 4
    """
    guarded(_peer)(clients, num_rounds, local_epochs, dataset, repeats, nice)


def peer_config(num_clients: int, num_rounds: int, local_epochs: int, dataset: str) -> dict[str, Any]:
    """The CNN with DP on ``dataset``, every client every round: the same for both workflows."""
    # Both on Flower's Simulation Engine with Ray, so the comparison is the workflow, not the engine.
    return strip_private(base_config(dataset=dataset, model="cnn", num_clients=num_clients, num_rounds=num_rounds,
                                     local_epochs=local_epochs, min_clients=2, simulation_backend="ray"))


def _peer(clients, num_rounds, local_epochs, dataset, repeats, nice):
    from fedpriv.common.errors import UserInputError
    from fedpriv.simulations.console import console

    check_positive(local_epochs=local_epochs, repeats=repeats)
    if num_rounds < 2:
        raise UserInputError("--num-rounds must be >= 2 (round 1 includes start-up and is shown apart)")
    client_list([clients])
    load_before = load_note()
    base = peer_config(clients, num_rounds, local_epochs, dataset)
    runs: dict[str, list[ChildResult]] = {"sim": [], "peer": []}
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-peer-") as tmp, console.status("measuring") as status:
        for rep in range(repeats):
            for kind in ("sim", "peer") if rep % 2 == 0 else ("peer", "sim"):
                status.update(f"measuring: {kind}, repeat {rep + 1}/{repeats}")
                cfg = sim_config(base, Path(tmp) / f"{kind}-{rep}")
                runs[kind].append(run_child(kind, {"config": cfg}, kind, nice=nice))
    table, speedup, train_speedup = peer_table(runs, base)
    console.print(table)
    console.print(f"per-round speed-up of fedpriv over the example: {speedup:.2f}x "
                  f"(training phase only: {train_speedup:.2f}x)")
    console.print(f"load: {load_before} before, {load_note()} after; measured processes at nice {min(19, os.nice(0) + nice)}")


def peer_table(runs: dict[str, list[ChildResult]], base: dict[str, Any]):
    """Table and speed-ups (example / fedpriv) per round, and for the training phase alone."""
    from rich.table import Table

    table = Table(title=f"Peer: Flower's Opacus example workflow vs fedpriv, {base['num_clients']} clients, "
                        f"{base['num_rounds']} rounds, {base['dataset']} CNN with DP, {base['local_epochs']} local "
                        "epochs, same Simulation Engine; round 1 (actor start-up) shown apart")
    for col in ("workflow", "round 1 s", "rounds 2..R s (median)", "of which training s", "wall s"):
        table.add_column(col, justify="right" if col != "workflow" else "left")
    stats = {}
    for kind, name in (("peer", "Flower example: client_fn per message, fresh PrivacyEngine, dict batches, "
                                "client-side evaluate"), ("sim", "fedpriv")):
        rounds = [r.data["rounds"] for r in runs[kind]]
        later = median([x["end"] - x["start"] for rs in rounds for x in rs[1:]])
        train = median([x.get("fit_end", x["end"]) - x["start"] for rs in rounds for x in rs[1:]])
        stats[kind] = (later, train)
        table.add_row(name, f"{median([rs[0]['end'] - rs[0]['start'] for rs in rounds]):.2f}", f"{later:.2f}",
                      f"{train:.2f}", f"{median([r.wall_s for r in runs[kind]]):.1f}")
    return table, stats["peer"][0] / stats["sim"][0], stats["peer"][1] / stats["sim"][1]
