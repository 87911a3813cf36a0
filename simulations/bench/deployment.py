"""``fedpriv bench deployment``: round latency of real processes, plain vs SecAgg+.

One ``fedpriv federation`` per run (SuperLink + N SuperNodes over TLS on 127.0.0.1); the round
latency is read from the server's report, the memory of this process' tree sampled meanwhile.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from fedpriv.simulations.bench.runner import TreeMemory
from fedpriv.simulations.bench.shared import check_positive, client_list, load_note, median, sim_config
from fedpriv.simulations.command import guarded


def deployment_run(cfg_dict: dict[str, Any], run_dir: Path, timeout: float) -> dict[str, Any]:
    """One ``fedpriv federation`` (processes over TLS on 127.0.0.1); its report's per-round seconds."""
    from fedpriv.common.config import RunConfig
    from fedpriv.server.report import RunReport
    from fedpriv.simulations.federation import LocalFederation

    cfg = RunConfig.from_mapping(cfg_dict)
    started = time.perf_counter()
    with LocalFederation(cfg, run_dir) as fed:
        fed.start()
        with TreeMemory(os.getpid()) as memory:
            code = fed.wait(timeout=timeout)
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"the federation's server exited with code {code}; see {run_dir / 'logs'}")
    report = RunReport.load(run_dir)
    return {"seconds": [r["seconds"] for r in report.rounds], "wall": wall, "peak_pss": memory.peak_pss,
            "aggregation": [r.get("aggregation") for r in report.rounds],
            "trained": [len(r.get("trained", [])) for r in report.rounds]}


def deployment(
    clients: Annotated[Optional[list[int]], typer.Option("--clients", help="Client processes (repeat the option).")] = None,
    num_rounds: Annotated[int, typer.Option("--num-rounds", help="Rounds per federation (each round starts fresh ClientApp processes).")] = 1,
    local_epochs: Annotated[int, typer.Option("--local-epochs")] = 1,
    repeats: Annotated[int, typer.Option("--repeats", help="Runs of each variant, alternating.")] = 1,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds one federation may take.")] = 900,
) -> None:
    """Round latency of real SuperLink/SuperNode processes over TLS on 127.0.0.1, plain vs SecAgg+.

    Example: fedpriv bench deployment --clients 3 --clients 10
    """
    guarded(_deployment)(clients or [3, 10], num_rounds, local_epochs, repeats, timeout)


def deployment_config(num_clients: int, num_rounds: int, local_epochs: int, secure: bool, timeout: float,
                      run_dir: Path) -> dict[str, Any]:
    """Digits CNN with DP, every client every round, with or without SecAgg+.

    A round gives up on missing replies after half of ``timeout``, so a lost reply shows in the table
    (fewer clients trained, a long round) instead of failing the whole federation.
    """
    return sim_config({}, run_dir, num_clients=num_clients, num_rounds=num_rounds, local_epochs=local_epochs,
                      min_clients=num_clients, secure_aggregation=secure, round_timeout=timeout / 2)


def _deployment(clients, num_rounds, local_epochs, repeats, timeout):
    from fedpriv.common.errors import UserInputError
    from fedpriv.simulations.console import console

    check_positive(num_rounds=num_rounds, local_epochs=local_epochs, repeats=repeats)
    clients = client_list(clients)
    if min(clients) < 3:
        raise UserInputError("--clients must be >= 3 (SecAgg+ needs at least 3 clients per round)")
    load_before = load_note()
    runs: dict[tuple[int, bool], list[dict[str, Any]]] = {(n, s): [] for n in clients for s in (False, True)}
    with tempfile.TemporaryDirectory(prefix="fedpriv-bench-deploy-") as tmp, console.status("measuring") as status:
        for rep in range(repeats):
            for n in clients:
                for secure in (False, True) if rep % 2 == 0 else (True, False):
                    status.update(f"measuring: {n} client processes, {'SecAgg+' if secure else 'plain'}, "
                                  f"repeat {rep + 1}/{repeats}")
                    run_dir = Path(tmp) / f"fed-{n}-{int(secure)}-{rep}"
                    cfg = deployment_config(n, num_rounds, local_epochs, secure, timeout, run_dir)
                    runs[(n, secure)].append(deployment_run(cfg, run_dir, timeout))
    console.print(deployment_table(runs, num_rounds=num_rounds, local_epochs=local_epochs))
    console.print(f"load: {load_before} before, {load_note()} after")


def deployment_table(runs: dict[tuple[int, bool], list[dict[str, Any]]], *, num_rounds: int, local_epochs: int):
    from rich.table import Table

    table = Table(title=f"Deployment: SuperLink + N SuperNodes over TLS on 127.0.0.1, digits CNN with DP, "
                        f"{num_rounds} rounds, {local_epochs} local epoch(s); round latency from the server's report")
    for col in ("client processes", "plain round s (median)", "SecAgg+ round s (median)", "SecAgg+ / plain",
                "plain wall s", "SecAgg+ wall s", "fewest clients trained (plain / SecAgg+)"):
        table.add_column(col, justify="right")
    for n in sorted({n for n, _ in runs}):
        plain, secure = ([t for r in runs[(n, s)] for t in r["seconds"]] for s in (False, True))
        fewest = [min((t for r in runs[(n, s)] for t in r.get("trained", [])), default=0) for s in (False, True)]
        table.add_row(str(n), f"{median(plain):.1f}", f"{median(secure):.1f}", f"{median(secure) / median(plain):.2f}",
                      f"{median([r['wall'] for r in runs[(n, False)]]):.0f}",
                      f"{median([r['wall'] for r in runs[(n, True)]]):.0f}", f"{fewest[0]} / {fewest[1]} of {n}")
    return table
