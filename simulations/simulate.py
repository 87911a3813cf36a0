"""Run a federation locally on Flower's Simulation Engine (Ray), one virtual SuperNode per client."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from common.config import RunConfig
from server.federation import RoundObserver
from server.report import RunReport
from server.run_dir import resolve_run_dir
from simulations.preflight import preflight


class FederationFailed(RuntimeError):
    """The simulation ended without a report (e.g. every client crashed)."""


def simulate(cfg: RunConfig, observer: RoundObserver | None = None) -> tuple[RunReport, Path]:
    """Validate, then run ``cfg`` and return its report and run folder. Flower's logs go to the folder."""
    preflight(cfg)
    run_dir = resolve_run_dir(cfg)
    cfg.run_dir = str(run_dir)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from server.app import build_server_app

    backend_config = {
        "client_resources": {"num_cpus": cfg.client_cpus, "num_gpus": 0.0},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False, "include_dashboard": False},
    }
    with _flower_logs_to(run_dir / "flower.log"):
        run_simulation(server_app=build_server_app(cfg, observer), client_app=client_app,
                       num_supernodes=cfg.num_clients, backend_config=backend_config)
    report = RunReport.load(run_dir)
    if len(report.rounds) < cfg.num_rounds:
        raise FederationFailed(f"the simulation stopped after {len(report.rounds)} of {cfg.num_rounds} rounds; "
                               f"see {run_dir / 'flower.log'}")
    return report, run_dir


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
