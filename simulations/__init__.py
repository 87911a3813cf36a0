"""Local simulation, the ``fedpriv`` command line and (later) launchers and benchmarks."""

import fedpriv.common  # noqa: E402,F401  (first: turns Flower's telemetry off before flwr is imported)
