"""fedpriv: federated learning with local differential privacy (placeholder, filled by the API step)."""
