"""Run a federation locally, one virtual SuperNode per client, as ``cfg.simulation_backend`` says:
in this process (default, see :mod:`simulations.inprocess_backend`) or on Flower's Simulation Engine
with Ray actors.
"""

from __future__ import annotations

import dataclasses

import logging
import os
from pathlib import Path

from fedpriv.common.config import RunConfig
from fedpriv.server.federation import RoundObserver
from fedpriv.server.report import RunReport
from fedpriv.server.run_dir import resolve_run_dir
from fedpriv.server.preflight import preflight


# What the ClientApp imports on its first training message; loaded before forking simulation workers.
CLIENT_MODULES = ("fedpriv.client.dp_training", "fedpriv.client.local_data", "fedpriv.client.ledger", "fedpriv.common.models",
                  "fedpriv.common.accounting")


class FederationFailed(RuntimeError):
    """The simulation ended without a report (e.g. every client crashed)."""


def simulate(cfg: RunConfig, observer: RoundObserver | None = None) -> tuple[RunReport, Path]:
    """Validate, then run ``cfg`` and return its report and run folder. Flower's logs go to the folder."""
    cfg = preflight(cfg)
    run_dir = resolve_run_dir(cfg)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    from fedpriv.client.app import simulation_client_app
    from fedpriv.server.app import build_server_app

    server_app = build_server_app(cfg, observer)
    client_app = simulation_client_app(cfg)  # the user owns every simulated data set
    with _flower_logs_to(run_dir / "flower.log"):
        if cfg.simulation_backend == "ray":
            _run_on_ray(cfg, server_app, client_app)
        else:
            from fedpriv.simulations.inprocess_backend import run_inprocess, worker_count

            run_inprocess(server_app, client_app, cfg.num_clients, worker_count(cfg.client_cpus),
                          preload=CLIENT_MODULES)
    report = RunReport.load(run_dir)
    if len(report.rounds) < cfg.num_rounds:
        raise FederationFailed(f"the simulation stopped after {len(report.rounds)} of {cfg.num_rounds} rounds; "
                               f"see {run_dir / 'flower.log'}")
    return report, run_dir


def _run_on_ray(cfg: RunConfig, server_app, client_app) -> None:
    """Flower's Simulation Engine with Ray actors of ``client-cpus`` CPUs each."""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False},
    }
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.num_clients,
                   backend_config=backend_config)


class _flower_logs_to:
    """Send Flower's and fedpriv's log records to a file instead of the console while active."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        from flwr.common.logger import console_handler

        self.console = console_handler
        self.level = console_handler.level
        console_handler.setLevel(logging.CRITICAL + 1)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        self.handler.setLevel(logging.INFO)
        self.propagate = {}
        for name in ("flwr", "fedpriv"):
            logger = logging.getLogger(name)
            logger.addHandler(self.handler)
            self.propagate[name] = logger.propagate
            logger.propagate = False  # Opacus may have configured the root logger to print to the console
        logging.getLogger("fedpriv").setLevel(logging.INFO)

    def __exit__(self, *exc) -> None:
        for name in ("flwr", "fedpriv"):
            logging.getLogger(name).removeHandler(self.handler)
            logging.getLogger(name).propagate = self.propagate[name]
        self.handler.close()
        self.console.setLevel(self.level)
