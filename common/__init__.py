"""Shared pieces of fedpriv: models, data, partitioning, configuration, privacy accounting."""
