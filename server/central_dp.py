"""User-level (central) DP with Flower's DP strategy wrappers, and its accounting.

Flower's wrappers clip each client's model update to norm C (on the server, or on the client with
``fixedclipping_mod`` / ``adaptiveclipping_mod``) and add Gaussian noise of std z*C/m to the
average of the m sampled clients' updates. Replacing one client moves the sum by up to 2C, so a
round's noise multiplier relative to that sensitivity is z*k/(2m) when k of m updates were
aggregated (k < m when clients dropped out: the average is over fewer updates, the noise is not).
Releases are accounted under "replace one client's data" adjacency in Google's dp-accounting RDP.

Three things make the guarantee hold for what the server actually releases:

* **Noise before the server optimiser.** The Gaussian mechanism covers the noisy *mean*; what the
  server does with it afterwards is post-processing, but only if nothing downstream sees the noiseless
  mean. Flower's wrappers noise whatever the wrapped strategy returns, so around FedAdam (or FedAvgM)
  the noise lands after the optimiser's step, whose moments (momentum) were built from the noiseless
  mean and re-apply it in later rounds: a client absent from round 2 still moves round 2's model,
  and no round's noise is calibrated to that (Adam's m/sqrt(v) does not even scale with C). Here
  the DP wrapper wraps a plain FedAvg mean, and the optimiser steps on the *noisy* mean
  (``NoiseBeforeServerOptimiser``). Aggregators that are not a mean (median, trimmed mean, Krum, q-FFL)
  have a different sensitivity and are refused.
* **Noise from a CSPRNG in secure mode.** Flower draws the noise (and adaptive clipping's noisy count)
  from NumPy's global generator; whoever learns its seed or state can subtract the noise. With
  ``--secure-mode`` every central draw comes from ``os.urandom`` with Opacus' secure-mode recipe.
* **Amplification only where the cohort is secret.** Flower samples exactly m of the N connected
  clients without replacement; amplification by sampling (Wang, Balle, Kasiviswanathan 2019) holds only
  against someone who does not know the cohort. Cohorts are sampled with the OS CSPRNG
  (``server.cohort``), but report.json lists who trained in every round, and under secure aggregation
  the server (the party the guarantee is against) picks the cohort itself. So the headline user-level
  epsilon is charged without amplification; the amplified one is reported beside it, valid only
  against those who see the global models and nothing else, and only when ``amplification_holds``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    FedAvg,
    FedAvgM,
    Strategy,
)
from flwr.serverapp.strategy.fedopt import FedOpt
from flwr.supercore.differential_privacy import compute_stdv

from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.csprng import csprng_gaussian
from fedpriv.common.errors import UserInputError
from fedpriv.server.cohort import samples_secretly, secret_cohort

NEIGHBOURING = "replace one client's data"
log = logging.getLogger("fedpriv.server")

# Server optimisers that step on the aggregate: post-processing once the aggregate is noised.
SERVER_OPTIMISERS: tuple[type, ...] = (FedOpt, FedAvgM)  # FedOpt: FedAdam, FedYogi, FedAdagrad

class _CentralNoise:
    """The central noise of Flower's DP wrappers, drawn from the OS CSPRNG when ``secure_noise`` is set
    (``--secure-mode``), else from NumPy's global generator as Flower does (reproducible with a seed)."""

    secure_noise: bool = False

    def _noise_clipping_norm(self) -> float:
        return self.clipping_norm

    def _gaussian(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        if self.secure_noise:
            return csprng_gaussian(shape, std)
        return np.random.normal(0.0, std, shape)

    def _add_noise_to_aggregated_arrays(self, aggregated: ArrayRecord) -> ArrayRecord:
        arrays = aggregated.to_numpy_ndarrays()
        std = compute_stdv(self.noise_multiplier, self._noise_clipping_norm(), self.num_sampled_clients)
        for array in arrays:
            array += self._gaussian(array.shape, std).astype(array.dtype)
        log.debug("central DP noise of std %.4g added (%s)", std, "OS CSPRNG" if self.secure_noise else "NumPy")
        return ArrayRecord({k: Array(np.asarray(v)) for k, v in zip(aggregated.keys(), arrays, strict=True)})

    def _noisy_fraction(self, count: int, total: int) -> float:
        """Adaptive clipping's noisy fraction of clipped updates (Flower's, with the noise drawn here)."""
        return float(count + self._gaussian((), self.clipped_count_stddev)) / float(total)


class ServerSideFixedClipping(_CentralNoise, DifferentialPrivacyServerSideFixedClipping):
    """Flower's server-side fixed clipping, noise from ``_CentralNoise``."""


class ClientSideFixedClipping(_CentralNoise, DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed clipping, noise from ``_CentralNoise``."""


class _NoiseForTheNormThatClipped(_CentralNoise):
    """Flower's adaptive wrappers update the clipping norm before adding noise, so the noise was
    scaled to the *next* round's norm while the updates were clipped to this round's. When the norm
    shrinks, that is less noise than the guarantee assumes; here the noise uses the norm that clipped."""

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):  # noqa: ANN201
        self._clipped_with = self.clipping_norm
        return super().aggregate_train(server_round, replies)

    def _noise_clipping_norm(self) -> float:
        return self._clipped_with


class ServerSideAdaptiveClipping(_NoiseForTheNormThatClipped, DifferentialPrivacyServerSideAdaptiveClipping):
    """Flower's server-side adaptive clipping, noise scaled to the norm that clipped."""


class ClientSideAdaptiveClipping(_NoiseForTheNormThatClipped, DifferentialPrivacyClientSideAdaptiveClipping):
    """Flower's client-side adaptive clipping, noise scaled to the norm that clipped."""


# ---------------------------------------------------------------------- noise, then the optimiser
class NoiseBeforeServerOptimiser(Strategy):
    """Central DP around a server optimiser, done as post-processing: ``dp`` (a Flower DP wrapper around a
    plain FedAvg mean, which also samples the cohort) releases the noisy mean of the clipped updates, and
    only that noisy mean is handed to ``optimiser`` (FedAdam, FedAvgM, ...) as the one reply it steps on.
    The optimiser's state (moments, momentum) is then a function of noisy releases alone, so every model
    it outputs, in this round or any later one, is covered by the releases' accounting.

    Reads of attributes it lacks (``noise_multiplier``, ``num_sampled_clients``, ``strategy``, ...) and
    the clipping norm go to ``dp``, so the round loop and the accounting treat it as the DP wrapper.
    """

    def __init__(self, dp: Strategy, optimiser: FedAvg) -> None:
        super().__init__()
        self.dp = dp
        self.optimiser = optimiser

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dp", "optimiser"):
            raise AttributeError(name)
        return getattr(self.dp, name)

    @property
    def clipping_norm(self) -> float:
        return self.dp.clipping_norm

    @clipping_norm.setter
    def clipping_norm(self, value: float) -> None:
        self.dp.clipping_norm = value

    def __repr__(self) -> str:
        return f"{self.dp!r}, then {type(self.optimiser).__name__}'s step on the noisy mean"

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        _set_current_model(self.optimiser, arrays)  # the optimiser's own configure_train would sample too
        return self.dp.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        noisy_mean, metrics = self.dp.aggregate_train(server_round, replies)
        if noisy_mean is None:
            return None, metrics
        content = RecordDict({self.optimiser.arrayrecord_key: noisy_mean,
                              wire.METRICS: MetricRecord({self.optimiser.weighted_by_key: 1})})
        stepped, _ = self.optimiser.aggregate_train(
            server_round, [Message(content, dst_node_id=0, message_type=MessageType.TRAIN)])
        # FedAdam computes in float64; the round loop casts the global model back to its dtypes
        # (server/federation.py, _in_model_dtypes), for every strategy alike.
        return stepped, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return self.dp.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.dp.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.dp.summary()
        self.optimiser.summary()


def _set_current_model(optimiser: FedAvg, arrays: ArrayRecord) -> None:
    """What the optimiser's configure_train records before sampling: the model the step starts from."""
    if isinstance(optimiser, FedOpt):
        optimiser.current_arrays = {k: array.numpy() for k, array in arrays.items()}
    elif isinstance(optimiser, FedAvgM):
        optimiser.current_arrays = arrays


def _mean_like(optimiser: FedAvg) -> FedAvg:
    """A plain FedAvg sampling and averaging exactly as ``optimiser`` would before its step."""
    cls = secret_cohort(FedAvg) if samples_secretly(optimiser) else FedAvg
    return cls(fraction_train=optimiser.fraction_train, fraction_evaluate=optimiser.fraction_evaluate,
               min_train_nodes=optimiser.min_train_nodes, min_evaluate_nodes=optimiser.min_evaluate_nodes,
               min_available_nodes=optimiser.min_available_nodes, weighted_by_key=optimiser.weighted_by_key,
               arrayrecord_key=optimiser.arrayrecord_key, configrecord_key=optimiser.configrecord_key,
               train_metrics_aggr_fn=optimiser.train_metrics_aggr_fn,
               evaluate_metrics_aggr_fn=optimiser.evaluate_metrics_aggr_fn)


def _is_mean(strategy: Strategy) -> bool:
    """Whether ``strategy`` aggregates by FedAvg's (weighted) mean, untouched (FedAvg, FedProx)."""
    return isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train


# ------------------------------------------------------------------------------------- wrapping
def wrap_central_dp(strategy: Strategy, cfg: RunConfig) -> Strategy:
    """``strategy`` with the central DP ``cfg.central_dp`` names (unchanged when off).

    A FedAvg mean (FedAvg, FedProx) is wrapped in the Flower DP wrapper directly; a server optimiser
    (FedAdam and the other FedOpt, FedAvgM) gets the DP wrapper around a plain mean and steps on its
    noisy output (``NoiseBeforeServerOptimiser``); anything else is refused: its sensitivity to one
    client is not that of the mean, which the noise z*C/m is calibrated to.
    """
    if cfg.central_dp == "off":
        return strategy
    optimiser = None
    if isinstance(strategy, SERVER_OPTIMISERS):
        optimiser, strategy = strategy, _mean_like(strategy)
    elif not _is_mean(strategy):
        raise UserInputError(
            f"--central-dp {cfg.central_dp} cannot wrap --strategy {cfg.strategy} ({type(strategy).__name__}): "
            "its aggregate is not the mean of the clipped updates, so replacing one client can move it by up to "
            "C rather than the C/m the central noise is calibrated to (a median, a trimmed mean or Krum's pick "
            "does); use fedavg, fedprox or fedadam with central DP, or a robust strategy with local DP (--dp)"
        )
    dp = _dp_wrapper(strategy, cfg)
    dp.secure_noise = bool(cfg.secure_mode)
    return dp if optimiser is None else NoiseBeforeServerOptimiser(dp, optimiser)


def _dp_wrapper(strategy: FedAvg, cfg: RunConfig) -> Strategy:
    m = cfg.clients_per_round()
    z, clip = cfg.central_noise_multiplier, cfg.central_clipping_norm
    if cfg.central_dp == "server-fixed":
        return ServerSideFixedClipping(strategy, z, clip, m)
    if cfg.central_dp == "client-fixed":
        return ClientSideFixedClipping(strategy, z, clip, m)
    # Andrew et al.'s default count noise m/20 cannot carry a large z for few clients (Flower then refuses).
    count_std = cfg.central_count_stddev or max(m / 20, z)
    adaptive = dict(initial_clipping_norm=clip, target_clipped_quantile=cfg.central_target_quantile,
                    clipped_count_stddev=count_std)
    if cfg.central_dp == "server-adaptive":
        return ServerSideAdaptiveClipping(strategy, z, m, **adaptive)
    if cfg.central_dp == "client-adaptive":
        return ClientSideAdaptiveClipping(strategy, z, m, **adaptive)
    raise UserInputError(f"--central-dp {cfg.central_dp} is unknown")


def amplification_holds(strategy: Strategy, cfg: RunConfig) -> bool:
    """Whether amplification by sampling may be claimed, against those who see only the global models.

    It needs a cohort they cannot know: sampled with the OS CSPRNG (not Flower's Python ``random``), and
    picked by a party the guarantee trusts. Under secure aggregation the guarantee is against the
    server, which picks the cohort itself, so never then. report.json lists every round's cohort, so
    even where this holds the amplified epsilon does not hold against readers of the report.
    """
    return not cfg.secure_aggregation and samples_secretly(strategy)


# ------------------------------------------------------------------------------------ accounting
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


