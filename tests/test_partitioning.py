"""common.partitioning: disjoint, covering, seeded splits with the label skew each method promises."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from fedpriv.common.errors import UserInputError
from fedpriv.common.partitioning import MIN_SAMPLES_PER_CLIENT, label_skew, partition

METHODS = ("iid", "dirichlet", "shards")


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return load_digits().target.astype(np.int64)  # 1797 samples, 10 classes of ~180


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("num_clients", [3, 10])
def test_parts_are_disjoint_and_cover_every_index_once(labels, method, num_clients):
    parts = partition(labels, len(labels), num_clients, method, seed=1, alpha=0.5, classes_per_client=2)
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part is sorted and without repeats"
        assert len(p) >= MIN_SAMPLES_PER_CLIENT
    merged = np.concatenate(parts)
    assert len(merged) == len(labels), "no index lost or duplicated"
    np.testing.assert_array_equal(np.sort(merged), np.arange(len(labels)))


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_parts_other_seed_other_parts(labels, method):
    a = partition(labels, len(labels), 10, method, seed=7)
    b = partition(labels, len(labels), 10, method, seed=7)
    c = partition(labels, len(labels), 10, method, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_without_labels_is_an_even_split():
    parts = partition(None, 103, 10, "iid", seed=0)
    sizes = sorted(len(p) for p in parts)
    assert sizes[0] == 10 and sizes[-1] == 11 and sum(sizes) == 103


def test_iid_has_little_label_skew(labels):
    skew = label_skew(labels, partition(labels, len(labels), 10, "iid", seed=0))
    assert skew < 0.15


def test_dirichlet_skew_grows_as_alpha_shrinks(labels):
    def mean_skew(alpha: float) -> float:
        return float(np.mean([label_skew(labels, partition(labels, len(labels), 10, "dirichlet", seed=s, alpha=alpha))
                              for s in range(4)]))

    near_iid, medium, extreme = mean_skew(100.0), mean_skew(1.0), mean_skew(0.1)
    assert near_iid < medium < extreme, (near_iid, medium, extreme)
    # Well separated, not just ordered: alpha=100 is close to iid, alpha=0.1 close to one-class clients.
    assert near_iid < 0.1
    assert medium > 2 * near_iid
    assert extreme > 0.5


@pytest.mark.parametrize("per_client", [1, 2, 3])
def test_shards_give_each_client_about_classes_per_client_labels(labels, per_client):
    for seed in range(3):
        parts = partition(labels, len(labels), 10, "shards", seed=seed, classes_per_client=per_client)
        distinct = []
        for p in parts:
            counts = np.bincount(labels[p], minlength=10)
            distinct.append(np.count_nonzero(counts))
            # Shards may straddle a class boundary, leaving a few stray samples, but the
            # client's data is dominated by per_client labels.
            top = np.sort(counts)[::-1][:per_client].sum()
            assert top >= 0.9 * len(p), (seed, counts)
        assert np.mean(distinct) <= per_client + 1, distinct
    iid_skew = label_skew(labels, partition(labels, len(labels), 10, "iid", seed=0))
    assert label_skew(labels, parts) > 3 * iid_skew


def test_label_skew_extremes():
    labels = np.array([0, 0, 1, 1])
    assert label_skew(labels, [np.array([0, 2]), np.array([1, 3])]) == pytest.approx(0.0)
    assert label_skew(labels, [np.array([0, 1]), np.array([2, 3])]) == pytest.approx(0.5)


@pytest.mark.parametrize("method", METHODS)
def test_too_many_clients_is_a_user_error(labels, method):
    n = 40
    partition(labels[:n], n, n // MIN_SAMPLES_PER_CLIENT, "iid", seed=0)  # the limit itself is fine
    with pytest.raises(UserInputError, match="--num-clients"):
        partition(labels[:n], n, n // MIN_SAMPLES_PER_CLIENT + 1, method, seed=0)


def test_unknown_method_and_missing_labels_are_user_errors(labels):
    with pytest.raises(UserInputError, match="--partitioning"):
        partition(labels, len(labels), 10, "random", seed=0)
    for method in ("dirichlet", "shards"):
        with pytest.raises(UserInputError, match="--partitioning"):
            partition(None, 100, 10, method, seed=0)


def test_dirichlet_that_cannot_feed_every_client_is_a_user_error():
    labels = np.repeat(np.arange(2), 10)  # 20 samples, 10 clients, extreme skew: someone gets < 2
    with pytest.raises(UserInputError, match="--dirichlet-alpha"):
        partition(labels, len(labels), 10, "dirichlet", seed=0, alpha=0.01)
