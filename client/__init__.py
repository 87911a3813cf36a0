"""The data owner's side: local DP-SGD training, privacy ledger and the Flower ClientApp."""

import fedpriv.common  # noqa: E402,F401  (first: turns Flower's telemetry off before flwr is imported)
