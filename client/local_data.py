"""Which records a client holds: its partition in simulation, its own file in deployment."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common.config import RunConfig
from common.datasets import load_dataset
from common.partitioning import partition
from common.privacy import data_fingerprint


@dataclass(frozen=True)
class LocalData:
    """A client's training records, its display id and the fingerprint that keys its ledger."""

    client_id: str
    x: np.ndarray
    y: np.ndarray | None
    input_shape: tuple[int, ...]
    num_classes: int
    fingerprint: str


def local_data(cfg: RunConfig, node_config: dict) -> LocalData:
    """Resolve a node's data from its node config (``data-path`` or ``partition-id``)."""
    if "data-path" in node_config:
        spec, pid, parts = f"npz:{node_config['data-path']}", None, None
    else:
        spec, pid, parts = cfg.dataset, int(node_config.get("partition-id", 0)), int(node_config.get("num-partitions", cfg.num_clients))
    name = str(node_config.get("client-name", "")) or None
    return _cached(spec, cfg.seed, cfg.test_fraction, cfg.mnist1d_samples, cfg.partitioning,
                   cfg.dirichlet_alpha, cfg.classes_per_client, pid, parts, name)


_PARTITIONS: dict[tuple, tuple[object, list[np.ndarray]]] = {}
_PARTITIONS_LOCK = threading.Lock()  # in-process simulation trains clients in threads


def _partition_of(data, parts: int, method: str, seed: int, alpha: float, per_client: int) -> list[np.ndarray]:
    """Every client's indices, computed once per loaded dataset: a process serving many clients (a Ray
    actor in simulation) would otherwise re-partition the whole training set for each of them (75 ms a
    call for Dirichlet over 200 clients). Keyed by the dataset object, which the entry keeps alive."""
    key = (id(data), parts, method, seed, alpha, per_client)
    with _PARTITIONS_LOCK:
        if key not in _PARTITIONS:
            if len(_PARTITIONS) >= 4:
                _PARTITIONS.pop(next(iter(_PARTITIONS)))
            _PARTITIONS[key] = (data, partition(data.y_train, len(data.x_train), parts, method, seed=seed,
                                                alpha=alpha, classes_per_client=per_client))
        return _PARTITIONS[key][1]


@lru_cache(maxsize=8)
def _cached(spec, seed, test_fraction, mnist1d_samples, method, alpha, per_client, pid, parts, name) -> LocalData:
    data = load_dataset(spec, seed=seed, test_fraction=test_fraction, mnist1d_samples=mnist1d_samples)
    if pid is None:  # a data owner's own file: every record in it is theirs to train on
        x = np.concatenate([data.x_train, data.x_test])
        y = None if data.y_train is None else np.concatenate([data.y_train, data.y_test])
    else:
        idx = _partition_of(data, parts, method, seed, alpha, per_client)[pid]
        x, y = data.x_train[idx], (None if data.y_train is None else data.y_train[idx])
    x, y = np.ascontiguousarray(x), (None if y is None else np.ascontiguousarray(y))
    fingerprint = data_fingerprint(x, y)
    client_id = name or (f"client-{pid}" if pid is not None else f"owner-{fingerprint[:8]}")
    return LocalData(client_id, x, y, data.input_shape, data.num_classes, fingerprint)
