"""The coordinator's side: rounds, update validation, evaluation, checkpoints, privacy report."""

import fedpriv.common  # noqa: E402,F401  (first: turns Flower's telemetry off before flwr is imported)
