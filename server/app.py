"""The Flower ServerApp. ``app`` reads its config from the run config (``flwr run .``);
:func:`build_server_app` binds a config and a progress observer (``fedpriv simulate``)."""

from __future__ import annotations

import dataclasses

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedpriv.common.config import RunConfig
from fedpriv.server.federation import RoundObserver, run_federation
from fedpriv.server.run_dir import resolve_run_dir
from fedpriv.server.preflight import preflight


def build_server_app(cfg: RunConfig, observer: RoundObserver | None = None) -> ServerApp:
    """A ServerApp that runs ``cfg`` and reports progress to ``observer``."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:  # noqa: ARG001 - Flower's signature
        run_federation(grid, cfg, observer)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``: same kebab-case keys as ``fedpriv simulate``."""
    cfg = RunConfig.from_mapping(dict(context.run_config), ignore_unknown=True)
    cfg = preflight(cfg)  # validates, and derives the noise for target-epsilon like `fedpriv simulate` does
    cfg = dataclasses.replace(cfg, run_dir=str(resolve_run_dir(cfg)))
    run_federation(grid, cfg)
