"""Flower strategies by name; the server drives them round by round itself."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from common import records
from common.config import RunConfig
from server.central_dp import wrap_central_dp


def build_strategy(cfg: RunConfig) -> Strategy:
    """FedAvg, FedProx or FedAdam sampling ``fraction_train`` of clients, at least ``min_clients``,
    wrapped in Flower's central DP strategy when ``cfg.central_dp`` asks for one.

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
        arrayrecord_key=records.ARRAYS,
        configrecord_key=records.CONFIG,
        train_metrics_aggr_fn=_no_metric_aggregation,
    )
    if cfg.strategy == "fedprox":
        return FedProx(proximal_mu=cfg.proximal_mu, **common)
    if cfg.strategy == "fedadam":
        return FedAdam(eta=cfg.server_learning_rate, **common)
    return FedAvg(**common)


def _no_metric_aggregation(contents, weighted_by_key):  # noqa: ANN001 - Flower's callback signature
    """Per-client privacy numbers must not be averaged away; the server records them one by one."""
    return None


def weight_key(cfg: RunConfig) -> str:
    """The reply metric FedAvg weighs updates by: examples, or 1 each under central DP."""
    return records.UNIT_WEIGHT if cfg.central_dp != "off" else records.NUM_EXAMPLES
