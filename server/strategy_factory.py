"""Flower strategies by name; the server drives them round by round itself."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (Bulyan, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, Krum, MultiKrum,
                                     Strategy)

from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.server.central_dp import wrap_central_dp
from fedpriv.server.cohort import secret_cohort


def build_strategy(cfg: RunConfig) -> Strategy:
    """FedAvg, FedProx, FedAdam, FedAvgM or a robust rule (``_robust_strategy``) sampling ``fraction_train`` of
    clients, at least ``min_clients``, wrapped in Flower's central DP strategy when ``cfg.central_dp``
    asks for one (FedAdam then steps on the noisy mean, and aggregators that are not a mean are
    refused: see ``wrap_central_dp``).

    Evaluation is server-side on the held-out test set, so federated evaluation is off. Central DP
    weighs every client equally: its noise is calibrated to the average of m clipped updates.
    """
    return wrap_central_dp(_base_strategy(cfg), cfg)


def _base_strategy(cfg: RunConfig) -> FedAvg:
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.min_clients,
        min_available_nodes=cfg.min_clients,
        weighted_by_key=weight_key(cfg),
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
        train_metrics_aggr_fn=_no_metric_aggregation,
    )
    # Cohorts from the OS CSPRNG, not Flower's Python `random` (server/cohort.py): amplification needs them secret.
    if cfg.strategy == "fedprox":
        return secret_cohort(FedProx)(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedadam":
        return secret_cohort(FedAdam)(eta=cfg.server_lr(), **common)
    if cfg.strategy == "fedavgm":  # server SGD with momentum on the averaged update (post-processing)
        return secret_cohort(FedAvgM)(server_learning_rate=cfg.server_lr(), server_momentum=cfg.server_momentum, **common)
    robust = _robust_strategy(cfg, common)
    if robust is not None:
        return robust
    return secret_cohort(FedAvg)(**common)


def _robust_strategy(cfg: RunConfig, common: dict) -> FedAvg | None:
    """Flower's Byzantine-robust rules (``cfg.strategy`` in ``ROBUST_STRATEGIES``), else None.

    What each assumes (RunConfig.validate refuses the settings that break it): FedMedian (Yin et al.
    2018), the coordinate-wise median, holds while fewer than half the updates are bad; FedTrimmedAvg
    drops the ``trimmed_beta`` fraction at each end per coordinate, at most that fraction bad; Krum
    (Blanchard et al. 2017) takes the one update closest to its m-f-2 nearest neighbours, m > 2f+2;
    MultiKrum averages the m-f best-scored ones; Bulyan (El Mhamdi et al. 2018) takes m-2f by Krum,
    then the mean of the m-4f values nearest the median per coordinate, m >= 4f+3. All of them need
    each client's own update (not with secure aggregation), and none is a mean (not with central DP).
    """
    f = cfg.malicious_clients()
    m = cfg.clients_per_round()
    if cfg.strategy == "fedmedian":
        return secret_cohort(FedMedian)(**common)
    if cfg.strategy == "fedtrimmedavg":
        return secret_cohort(FedTrimmedAvg)(beta=cfg.trimmed_beta, **common)
    if cfg.strategy == "krum":
        return secret_cohort(Krum)(num_malicious_nodes=f, **common)
    if cfg.strategy == "multikrum":
        return secret_cohort(MultiKrum)(num_malicious_nodes=f, num_nodes_to_select=max(1, m - f), **common)
    if cfg.strategy == "bulyan":
        return secret_cohort(Bulyan)(num_malicious_nodes=f, **common)
    return None


# The state a server optimiser carries from round to round, by strategy class and attribute.
_OPTIMISER_STATE = {FedAvgM: ("momentum_vector",), FedAdam: ("m_t", "v_t")}


def _server_optimiser(strategy: Strategy) -> Strategy | None:
    """The FedAvgM / FedAdam that steps in ``strategy`` (itself, or the one central DP hands its noisy mean to)."""
    inner = strategy.__dict__.get("optimiser", strategy)  # server/central_dp.NoiseBeforeServerOptimiser
    return inner if isinstance(inner, tuple(_OPTIMISER_STATE)) else None


def optimiser_state(strategy: Strategy) -> dict[str, Any] | None:
    """What a checkpoint keeps of the server optimiser (momentum, Adam's moments), None if there is none.

    Restoring it makes a restarted server take the same steps it would have taken; without it the
    momentum would restart from zero. It is a function of the aggregated updates alone (post-processing)."""
    optimiser = _server_optimiser(strategy)
    if optimiser is None:
        return None
    names = next(v for k, v in _OPTIMISER_STATE.items() if isinstance(optimiser, k))
    return {name: getattr(optimiser, name) for name in names}


def restore_optimiser_state(strategy: Strategy, state: dict[str, Any] | None) -> None:
    """Put back what :func:`optimiser_state` returned (a checkpoint of the same run config)."""
    optimiser = _server_optimiser(strategy)
    if optimiser is None or not state:
        return
    for name, value in state.items():
        setattr(optimiser, name, value)


def _no_metric_aggregation(contents, weighted_by_key):  # noqa: ANN001 - Flower's callback signature
    """Per-client privacy numbers must not be averaged away; the server records them one by one."""
    return None


def weight_key(cfg: RunConfig) -> str:
    """The metric FedAvg weighs updates by: examples, or 1 each under central DP. The round loop writes
    the server's own value there (server/update_validation.server_weight), never the client's."""
    return wire.UNIT_WEIGHT if cfg.central_dp != "off" else wire.NUM_EXAMPLES
