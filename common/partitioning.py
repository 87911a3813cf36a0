"""Split a training set among clients: disjoint, covering, deterministic from a seed."""

from __future__ import annotations

import numpy as np

from fedpriv.common.errors import DataError

MIN_SAMPLES_PER_CLIENT = 2


def partition(labels: np.ndarray | None, num_samples: int, num_clients: int, method: str, *,
              seed: int = 0, alpha: float = 0.5, classes_per_client: int = 2) -> list[np.ndarray]:
    """Return one sorted index array per client.

    ``iid``: a shuffled even split. ``dirichlet``: for each class, client shares drawn from
    Dir(alpha) (smaller alpha = more label skew). ``shards``: sorted by label, cut into
    ``num_clients * classes_per_client`` shards, each client gets ``classes_per_client`` of them.
    """
    if num_clients > num_samples // MIN_SAMPLES_PER_CLIENT:
        raise DataError(
            f"--num-clients {num_clients} is more than the {num_samples} training samples allow "
            f"(at least {MIN_SAMPLES_PER_CLIENT} each); use fewer clients or more data"
        )
    rng = np.random.default_rng(seed)
    if method == "iid":
        parts = np.array_split(rng.permutation(num_samples), num_clients)
    elif method in ("dirichlet", "shards") and labels is None:
        raise DataError(f"--partitioning {method} needs labels; the dataset has none, use --partitioning iid")
    elif method == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, rng)
    elif method == "shards":
        parts = _shards(labels, num_clients, classes_per_client, rng)
    else:
        raise DataError(f"--partitioning '{method}' is unknown; choose one of: iid, dirichlet, shards")
    return [np.sort(p.astype(np.int64)) for p in parts]


def _dirichlet(labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator,
               max_tries: int = 100) -> list[np.ndarray]:
    """Per-class Dirichlet shares; redrawn until every client holds enough samples."""
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(labels == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, chunk in enumerate(np.split(idx, cuts)):
                parts[client].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= MIN_SAMPLES_PER_CLIENT:
            return merged
    raise DataError(
        f"--dirichlet-alpha {alpha} leaves some of {num_clients} clients with fewer than "
        f"{MIN_SAMPLES_PER_CLIENT} samples; raise alpha or use fewer clients"
    )


def _shards(labels: np.ndarray, num_clients: int, per_client: int, rng: np.random.Generator) -> list[np.ndarray]:
    num_shards = num_clients * per_client
    if num_shards > len(labels):
        raise DataError(
            f"--classes-per-client {per_client} x {num_clients} clients needs {num_shards} shards but only "
            f"{len(labels)} samples exist; lower one of them"
        )
    order = np.argsort(labels, kind="stable")
    # Shuffle within each class first so shard contents do not depend on the original order.
    order = np.concatenate([rng.permutation(order[labels[order] == c]) for c in np.unique(labels)])
    shards = np.array_split(order, num_shards)
    assignment = rng.permutation(num_shards).reshape(num_clients, per_client)
    return [np.concatenate([shards[s] for s in row]) for row in assignment]


def label_skew(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    """Mean total-variation distance between each client's label distribution and the global one."""
    classes = np.unique(labels)
    global_dist = np.array([(labels == c).mean() for c in classes])
    distances = []
    for p in parts:
        local = np.array([(labels[p] == c).mean() for c in classes]) if len(p) else np.zeros_like(global_dist)
        distances.append(0.5 * np.abs(local - global_dist).sum())
    return float(np.mean(distances))
