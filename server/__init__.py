"""The coordinator's side: rounds, update validation, evaluation, checkpoints, privacy report."""
