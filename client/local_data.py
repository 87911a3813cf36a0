"""Which records a client holds: its partition in simulation, its own file in deployment."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedpriv.client.owner_id import unnamed_owner_id
from fedpriv.common import wire
from fedpriv.common.config import RunConfig
from fedpriv.common.datasets import dataset_options, load_dataset, owner_records
from fedpriv.common.partitioning import partition
from fedpriv.common.accounting import data_fingerprint
from fedpriv.common.tabular import FILE_FORMATS, split_spec, standardise


@dataclass(frozen=True)
class LocalData:
    """A client's training records, its display id and their fingerprint (recorded with each release)."""

    client_id: str
    x: np.ndarray
    y: np.ndarray | None
    input_shape: tuple[int, ...]
    num_classes: int
    fingerprint: str


def local_data(cfg: RunConfig, node_config: dict) -> LocalData:
    """Resolve a node's data from its node config (``data-path`` or ``partition-id``)."""
    if wire.NODE_DATA_PATH in node_config:
        path = str(node_config[wire.NODE_DATA_PATH])  # a bare path is an .npz (the first format)
        spec, pid, parts = (path if path.partition(":")[0] in FILE_FORMATS else f"npz:{path}"), None, None
    else:
        spec, pid, parts = cfg.dataset, int(node_config.get(wire.NODE_PARTITION_ID, 0)), int(node_config.get(wire.NODE_NUM_PARTITIONS, cfg.num_clients))
    name = str(node_config.get(wire.NODE_CLIENT_NAME, "")) or None
    return _cached(spec, cfg.seed, cfg.test_fraction, cfg.mnist1d_samples, cfg.partitioning,
                   cfg.dirichlet_alpha, cfg.classes_per_client, pid, parts, name,
                   _file_version(spec) if pid is None else None, tuple(sorted(dataset_options(cfg).items())))


def _file_version(spec: str) -> tuple[int, int] | None:
    """(mtime, size) of an owner's file: a file changed between rounds is a new cache entry, never stale data."""
    try:
        stat = split_spec(spec)[1].stat()
    except OSError:
        return None  # npz_records raises the one-line error
    return (stat.st_mtime_ns, stat.st_size)


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
def _cached(spec, seed, test_fraction, mnist1d_samples, method, alpha, per_client, pid, parts, name,
            file_version, options=()) -> LocalData:  # noqa: ARG001 - file_version only keys the cache
    options = dict(options)
    if pid is None:  # a data owner's own file: every record in it, in its own order (no server seed involved)
        x, y, num_classes = owner_records(spec, **options)
        x, y = np.ascontiguousarray(x), (None if y is None else np.ascontiguousarray(y))
        fingerprint = data_fingerprint(x, y)
        return LocalData(name or unnamed_owner_id(fingerprint), x, y, tuple(x.shape[1:]), num_classes, fingerprint)
    data = load_dataset(spec, seed=seed, test_fraction=test_fraction, mnist1d_samples=mnist1d_samples, **options)
    idx = _partition_of(data, parts, method, seed, alpha, per_client)[pid]
    # A table's numeric columns are standardised with this client's own statistics, as its owner would
    # (the same as from the raw file: standardising is invariant to the whole set's affine rescaling).
    x = np.ascontiguousarray(standardise(data.x_train[idx], data.standardise_columns))
    y = None if data.y_train is None else np.ascontiguousarray(data.y_train[idx])
    return LocalData(name or f"client-{pid}", x, y, data.input_shape, data.num_classes, data_fingerprint(x, y))
