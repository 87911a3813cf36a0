"""User-level (central) DP with Flower's DP strategy wrappers, and its accounting.

Flower's wrappers clip each client's model update to norm C (on the server, or on the client with
``fixedclipping_mod`` / ``adaptiveclipping_mod``) and add Gaussian noise of std z*C/m to the
average of the m sampled clients' updates. Flower samples exactly m of the N connected clients,
uniformly without replacement, so the guarantee is accounted under "replace one client's data"
adjacency with amplification by sampling without replacement (Wang, Balle, Kasiviswanathan 2019),
in Google's dp-accounting RDP accountant. Replacing one client moves the sum by up to 2C, so a
round's noise multiplier relative to that sensitivity is z*k/(2m) when k of m updates were
aggregated (k < m when clients dropped out: the average is over fewer updates, the noise is not).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

import dp_accounting
from dp_accounting import rdp as dp_rdp
import numpy as np
from flwr.app import Array, ArrayRecord, Message
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.supercore.differential_privacy import add_gaussian_noise_inplace, compute_stdv

from common.config import RunConfig

NEIGHBOURING = "replace one client's data"


class _NoiseForTheNormThatClipped:
    """Flower's adaptive wrappers update the clipping norm before adding noise, so the noise was
    scaled to the *next* round's norm while the updates were clipped to this round's. When the norm
    shrinks, that is less noise than the guarantee assumes; here the noise uses the norm that clipped."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        self._clipped_with = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        arrays = aggregated.to_numpy_ndarrays()
        add_gaussian_noise_inplace(arrays, compute_stdv(self.noise_multiplier, self._clipped_with,
                                                        self.num_sampled_clients))
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(aggregated.keys(), arrays, strict=True)})


class ServerSideAdaptiveClipping(_NoiseForTheNormThatClipped, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, noise scaled to the norm that clipped."""


class ClientSideAdaptiveClipping(_NoiseForTheNormThatClipped, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, noise scaled to the norm that clipped."""


def wrap_central_dp(strategy: Strategy, cfg: RunConfig) -> Strategy:
    """``strategy`` wrapped in the Flower DP strategy ``cfg.central_dp`` names (unchanged when off)."""
    m = cfg.clients_per_round()
    z, clip = cfg.central_noise_multiplier, cfg.central_clipping_norm
    if cfg.central_dp == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(strategy, z, clip, m)
    if cfg.central_dp == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(strategy, z, clip, m)
    # Andrew et al.'s default count noise m/20 cannot carry a large z for few clients (Flower then refuses).
    count_std = cfg.central_count_stddev or max(m / 20, z)
    adaptive = dict(initial_clipping_norm=clip, target_clipped_quantile=cfg.central_target_quantile,
                    clipped_count_stddev=count_std)
    if cfg.central_dp == "server-adaptive":
        return ServerSideAdaptiveClipping(strategy, z, m, **adaptive)
    if cfg.central_dp == "client-adaptive":
        return ClientSideAdaptiveClipping(strategy, z, m, **adaptive)
    return strategy


def release_noise_multiplier(wrapper: Strategy, aggregated: int) -> float:
    """The round's Gaussian noise relative to its replace-one sensitivity (see the module docstring).

    Adaptive clipping also releases a noisy count of clipped updates (std sigma_b, sensitivity 1);
    the two Gaussian releases compose into one of multiplier (4m^2/(z_u k)^2 + 1/sigma_b^2)^(-1/2),
    which for k = m is the z the user asked for halved (Andrew et al. 2021's split of the noise).
    """
    m = wrapper.num_sampled_clients
    inverse_square = (2 * m / (wrapper.noise_multiplier * aggregated)) ** 2
    count_std = getattr(wrapper, "clipped_count_stddev", None)
    if count_std:
        inverse_square += 1 / count_std**2
    return 1 / math.sqrt(inverse_square)


def user_level_epsilon(releases: list[dict], delta: float) -> float:
    """Epsilon of every round's release so far, each a dict with noise_multiplier, sampled, population.

    Identical releases are composed as one event with a count: dp-accounting's sampled-without-
    replacement RDP costs ~0.5 s per distinct event, and composition is additive either way.
    """
    if not releases:
        return 0.0
    counts = Counter((float(r["noise_multiplier"]), int(r["sampled"]), int(r["population"])) for r in releases)
    accountant = dp_rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    for (noise, sampled, population), count in counts.items():
        gaussian = dp_accounting.GaussianDpEvent(noise)
        if sampled >= population:
            accountant.compose(gaussian, count)
        else:
            accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(population, sampled, gaussian), count)
    return float(accountant.get_epsilon(delta))
