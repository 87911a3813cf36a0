"""common.datasets.load_dataset: shapes, stratified splits, local MNIST-1D, and a user's .npz file."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from fedpriv.common import datasets
from fedpriv.common.datasets import load_dataset
from fedpriv.common.errors import UserInputError


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test starts with an empty in-process cache and its own on-disk cache folder."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDPRIV_CACHE", str(cache))
    datasets._load_cached.cache_clear()
    yield cache
    datasets._load_cached.cache_clear()


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ------------------------------------------------------------------------------------ digits
def test_digits_shapes_and_types():
    data = load_dataset("digits", seed=0, test_fraction=0.2)
    assert data.input_shape == (1, 8, 8)
    assert data.x_train.shape[1:] == (1, 8, 8) and data.x_test.shape[1:] == (1, 8, 8)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert len(data.x_train) + len(data.x_test) == 1797
    assert len(data.y_train) == len(data.x_train) and len(data.y_test) == len(data.x_test)
    assert data.num_classes == 10 and data.labelled
    everything = np.concatenate([data.x_train, data.x_test])
    assert abs(float(everything.mean())) < 1e-3 and float(everything.std()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("test_fraction", [0.2, 0.5])
def test_digits_split_is_stratified(test_fraction):
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    data = load_dataset("digits", seed=3, test_fraction=test_fraction)
    test_counts = np.bincount(data.y_test, minlength=10)
    train_counts = np.bincount(data.y_train, minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(full * test_fraction).astype(int))
    np.testing.assert_array_equal(train_counts + test_counts, full)


def test_digits_split_depends_on_seed_only():
    a = load_dataset("digits", seed=0)
    datasets._load_cached.cache_clear()
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.y_train, c.y_train)


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(UserInputError, match="--dataset"):
        load_dataset("cifar10")


# ----------------------------------------------------------------------------------- mnist1d
def test_mnist1d_generates_locally_and_caches(fresh_cache, no_network):
    cached = fresh_cache / "mnist1d-500.npz"
    assert not cached.exists()
    global_state = np.random.get_state()
    data = load_dataset("mnist1d", seed=0, mnist1d_samples=500)
    assert cached.exists(), "the generated arrays are cached on disk"
    # Generation reseeds numpy's global RNG internally; callers must not notice.
    after = np.random.get_state()
    assert global_state[0] == after[0] and np.array_equal(global_state[1], after[1])
    assert data.input_shape == (1, 40)
    assert len(data.x_train) + len(data.x_test) == 500
    assert len(data.x_test) == pytest.approx(100, abs=10)
    assert data.x_train.dtype == np.float32 and data.num_classes == 10
    assert set(np.unique(data.y_train)) == set(range(10))

    # A second load (fresh process cache) reads the file instead of regenerating: same arrays.
    datasets._load_cached.cache_clear()
    with np.load(cached) as raw:
        assert raw["x"].shape == (500, 40)
    again = load_dataset("mnist1d", seed=0, mnist1d_samples=500)
    np.testing.assert_array_equal(again.x_train, data.x_train)
    np.testing.assert_array_equal(again.y_test, data.y_test)


def test_mnist1d_damaged_cache_is_regenerated(fresh_cache, no_network):
    fresh_cache.mkdir(parents=True)
    cached = fresh_cache / "mnist1d-200.npz"
    cached.write_bytes(b"\x00garbage, not a zip")
    data = load_dataset("mnist1d", seed=0, mnist1d_samples=200)
    assert len(data.x_train) + len(data.x_test) == 200
    with np.load(cached) as raw:  # rewritten with good data
        assert raw["x"].shape == (200, 40)


# --------------------------------------------------------------------------------------- npz
def _save(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_labelled_vectors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 20)).astype(np.float64)
    y = np.arange(60) % 3
    data = load_dataset(_save(tmp_path / "d.npz", x=x, y=y), seed=0, test_fraction=0.2)
    assert data.input_shape == (1, 20)
    assert data.labelled and data.num_classes == 3
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert len(data.x_train) + len(data.x_test) == 60
    np.testing.assert_array_equal(np.bincount(data.y_test), [4, 4, 4])
    # Every row survives the split unchanged (up to float32).
    rows = {tuple(np.round(r, 5)) for r in np.concatenate([data.x_train, data.x_test])[:, 0]}
    assert rows == {tuple(np.round(r.astype(np.float32), 5)) for r in x}


def test_npz_uint8_images_are_scaled(tmp_path):
    x = np.full((10, 6, 6), 255, dtype=np.uint8)
    data = load_dataset(_save(tmp_path / "img.npz", x=x, y=np.arange(10) % 2))
    assert data.input_shape == (1, 6, 6)
    assert float(data.x_train.max()) == pytest.approx(1.0)


def test_npz_without_y_is_unlabelled(tmp_path):
    x = np.random.default_rng(1).normal(size=(30, 20)).astype(np.float32)
    data = load_dataset(_save(tmp_path / "u.npz", x=x))
    assert not data.labelled
    assert data.y_train is None and data.y_test is None
    assert data.input_shape == (1, 20)
    assert len(data.x_train) + len(data.x_test) == 30


def test_npz_missing_file(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")


def test_npz_garbage_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip file at all \x00\xff")
    with pytest.raises(UserInputError, match="not a readable"):
        load_dataset(f"npz:{path}")


def test_npz_pickled_object_array_is_refused(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, {"b": 2}], dtype=object))
    with pytest.raises(UserInputError):
        load_dataset(f"npz:{path}")


def test_npz_missing_x(tmp_path):
    with pytest.raises(UserInputError, match="'x'"):
        load_dataset(_save(tmp_path / "nox.npz", features=np.zeros((10, 4)), y=np.zeros(10)))


def test_npz_mismatched_y_length(tmp_path):
    with pytest.raises(UserInputError, match="'y'"):
        load_dataset(_save(tmp_path / "bad.npz", x=np.zeros((10, 4)), y=np.arange(9) % 2))


@pytest.mark.parametrize("arrays, needle", [
    ({"x": np.zeros(10)}, "'x' must have shape"),
    ({"x": np.array([[1.0, np.nan]] * 5)}, "NaN"),
    ({"x": np.zeros((6, 3)), "y": np.zeros(6, dtype=int)}, "single class"),
    ({"x": np.zeros((6, 3)), "y": np.array([0, 1, -1, 0, 1, 0])}, ">= 0"),
    ({"x": np.zeros((6, 3)), "y": np.array([0.5, 1, 0, 0, 1, 0])}, "integer"),
    ({"x": np.array([["a", "b"]] * 4)}, "numeric"),
])
def test_npz_other_bad_contents(tmp_path, arrays, needle):
    with pytest.raises(UserInputError, match=needle):
        load_dataset(_save(tmp_path / "bad.npz", **arrays))


def test_channels_last_images_are_detected_and_train_the_founding_cnn(tmp_path):
    """(n, 32, 32, 3), how most image tools save images, was refused; it must read as (n, 3, 32, 32)."""
    import torch

    from fedpriv.common.datasets import channels_last, load_dataset
    from fedpriv.common.models import build_model, check_fit

    rng = np.random.default_rng(0)
    first = rng.normal(size=(40, 3, 32, 32)).astype(np.float32)
    y = np.arange(40) % 2
    np.savez(tmp_path / "first.npz", x=first, y=y)
    np.savez(tmp_path / "last.npz", x=first.transpose(0, 2, 3, 1), y=y)
    a = load_dataset(f"npz:{tmp_path / 'first.npz'}", seed=0)
    b = load_dataset(f"npz:{tmp_path / 'last.npz'}", seed=0)
    assert a.input_shape == b.input_shape == (3, 32, 32)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    check_fit("cnn", b.input_shape, True, "last.npz")
    model = build_model("cnn", b.input_shape, 2, seed=0, cnn_arch="card")
    assert model.features[0].in_channels == 3  # the founding document's Conv2d(3, 32, 3)
    assert model(torch.from_numpy(b.x_train[:4])).shape == (4, 2)
    default = build_model("cnn", b.input_shape, 2, seed=0)  # the ScatterNet filters each colour channel
    assert default.features[0].channels == 3 and default(torch.from_numpy(b.x_train[:4])).shape == (4, 2)
    assert channels_last((32, 32, 3)) and channels_last((28, 28, 1))
    assert not channels_last((3, 32, 32)) and not channels_last((1, 28, 28)) and not channels_last((3, 32, 3))
