"""Shared pieces of fedpriv: models, data, partitioning, configuration, privacy accounting."""

import os

# No network at run time but loopback: Flower posts telemetry events (run_simulation, SuperLink and
# SuperNode start) to its servers unless this is 0, and reads it once, when flwr is first imported.
# client/, server/ and simulations/ import this package first so it is set before any flwr import.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
