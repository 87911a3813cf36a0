"""Checks that need the data, run before any process or Ray actor starts, so bad input fails fast."""

from __future__ import annotations

import dataclasses
import logging

from fedpriv.common.config import RunConfig
from fedpriv.common.errors import UserInputError
from fedpriv.common.datasets import Dataset, dataset_options, load_dataset
from fedpriv.common.models import check_fit
from fedpriv.common.partitioning import partition

logger = logging.getLogger("fedpriv")


def preflight(cfg: RunConfig) -> RunConfig:
    """Validate the config, load the data, check model fit, partitioning and the privacy plan; return
    the resolved config.

    With ``cfg.target_epsilon`` set, the returned config carries the derived noise multiplier (see
    :func:`plan_privacy`), so whatever runs it afterwards sends that noise to clients; ``cfg`` itself
    (frozen) is unchanged.
    """
    cfg.validate()
    data = load_dataset(cfg.dataset, seed=cfg.seed, test_fraction=cfg.test_fraction,
                        mnist1d_samples=cfg.mnist1d_samples,
                        **dataset_options(cfg))
    check_fit(cfg.model, data.input_shape, data.labelled, cfg.dataset, cfg.augment_views, cfg.cnn_arch)
    parts = partition(data.y_train, len(data.x_train), cfg.num_clients, cfg.partitioning, seed=cfg.seed,
                      alpha=cfg.dirichlet_alpha, classes_per_client=cfg.classes_per_client)
    noise = plan_privacy(cfg, [len(p) for p in parts])
    check_secagg_weights(cfg, [len(p) for p in parts])
    return cfg if noise is None else dataclasses.replace(cfg, noise_multiplier=noise)


def plan_privacy(cfg: RunConfig, client_sizes: list[int]) -> float | None:
    """Check delta against the smallest client; derive the noise for ``--target-epsilon``.

    The smallest client has the largest sample rate, hence the largest epsilon for the same
    number of rounds. The noise is chosen so that client ends at most at the target even if it
    trains in every round (the worst case; clients sampled less often spend less). Returns the
    derived noise multiplier, or None when there is nothing to derive.
    """
    if not cfg.dp:
        return None
    from fedpriv.common.accounting import check_delta, noise_for_target  # imports Opacus: only with DP on

    smallest = min(client_sizes)
    check_delta(cfg.delta, smallest)
    if cfg.target_epsilon <= 0:
        return None
    noise = noise_for_target(cfg.target_epsilon, cfg.delta, cfg.num_rounds, cfg.local_epochs,
                             cfg.batch_size, smallest, cfg.accountant, poisson_sampling=cfg.poisson_sampling)
    logger.info("noise multiplier %.4g derived for target epsilon %g (smallest client: %d records, %s)",
                noise, cfg.target_epsilon, smallest, cfg.accountant)
    return noise


def check_secagg_weights(cfg: RunConfig, client_sizes: list[int]) -> None:
    """SecAgg+ scales each update by its weight / --secagg-max-weight; a larger weight overflows the sum."""
    if cfg.secure_aggregation and max(client_sizes) > cfg.secagg_max_weight:
        raise UserInputError(
            f"--secagg-max-weight {cfg.secagg_max_weight:g} is below the largest client's {max(client_sizes)} "
            "records: SecAgg+ would overflow; raise it to at least that"
        )
