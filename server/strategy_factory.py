"""Flower strategies by name; the server drives them round by round itself."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

from common import records
from common.config import RunConfig


def build_strategy(cfg: RunConfig) -> FedAvg:
    """FedAvg, FedProx or FedAdam sampling ``fraction_train`` of clients, at least ``min_clients``.

    Evaluation is server-side on the held-out test set, so federated evaluation is off.
    """
    common = dict(
        fraction_train=cfg.fraction_train,
        fraction_evaluate=0.0,
        min_train_nodes=cfg.min_clients,
        min_available_nodes=cfg.min_clients,
        weighted_by_key=records.NUM_EXAMPLES,
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
