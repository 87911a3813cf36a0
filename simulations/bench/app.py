"""The ``fedpriv bench`` command group: every benchmark's command, registered here.

The benchmark modules define plain functions and import nothing of this one, so the command line
(``simulations/cli.py``) -> this group -> each benchmark is a tree without a cycle.
"""

from __future__ import annotations

import typer

from fedpriv.simulations.bench import deployment, dp_overhead, framework, peer, quality, scale

bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Benchmarks: how fast private training runs here.")

bench_app.command("dp-overhead")(dp_overhead.dp_overhead)
bench_app.command("framework")(framework.framework)
bench_app.command("scale")(scale.scale)
bench_app.command("deployment")(deployment.deployment)
bench_app.command("peer")(peer.peer)
bench_app.command("quality")(quality.quality)  # accuracy under DP
