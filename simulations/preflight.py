"""Checks that need the data, run before any process or Ray actor starts, so bad input fails fast."""

from __future__ import annotations

from common.config import RunConfig
from common.datasets import Dataset, load_dataset
from common.models import check_fit
from common.partitioning import partition


def preflight(cfg: RunConfig) -> Dataset:
    """Validate the config, load the data, check model fit and partitioning; return the data."""
    cfg.validate()
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction,
                        mnist1d_samples=cfg.mnist1d_samples)
    check_fit(cfg.model, data.input_shape, data.labelled, cfg.dataset)
    partition(data.y_train, len(data.x_train), cfg.num_clients, cfg.partitioning, seed=cfg.seed,
              alpha=cfg.dirichlet_alpha, classes_per_client=cfg.classes_per_client)
    return data
