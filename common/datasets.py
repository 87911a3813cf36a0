"""Built-in and user datasets, as float32 arrays with a held-out test split.

No download ever happens: digits ship with scikit-learn, MNIST-1D is generated locally with
``mnist1d.data.make_dataset`` (and cached on disk, since generation costs seconds), and a user's
data comes from an ``.npz`` file on disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from fedpriv.common.atomic_io import atomic_write
from fedpriv.common import tabular
from fedpriv.common.errors import DataError

from fedpriv.common.tabular import MAX_CLASSES  # noqa: E402 - labels are class indices 0..MAX_CLASSES-1: the model gets one output per class


@dataclass(frozen=True)
class Dataset:
    """Train and test arrays plus what a model needs to know about their shape.

    ``x`` has shape ``(n, *input_shape)`` with a channel axis first: ``(1, 8, 8)`` for digits,
    ``(1, 40)`` for MNIST-1D. ``y`` is ``None`` for unlabelled data (autoencoder only).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    num_classes: int
    # Feature columns (of a table's (n, d) x) each owner standardises with its own statistics
    # (client.local_data); x_train and x_test come standardised with their own, for the server's use.
    standardise_columns: tuple[int, ...] = ()

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def labelled(self) -> bool:
        return self.y_train is not None


def cache_dir() -> Path:
    """Where generated datasets are cached (``FEDPRIV_CACHE`` or ``~/.cache/fedpriv``)."""
    return Path(os.environ.get("FEDPRIV_CACHE", Path.home() / ".cache" / "fedpriv"))


def load_dataset(spec: str, *, seed: int = 0, test_fraction: float = 0.2, mnist1d_samples: int = 10_000,
                 label_column: str = "", image_size: int = 32, categories: str = "") -> Dataset:
    """Load ``digits``, ``mnist1d``, ``npz:PATH``, ``csv:PATH``, ``parquet:PATH`` or ``images:DIR``.

    ``label_column`` and ``categories`` apply to tables, ``image_size`` to image folders (see
    :mod:`common.tabular`). Raises :class:`~common.errors.DataError` on bad input.
    """
    return _load_cached(spec, seed, test_fraction, mnist1d_samples, label_column, image_size, categories)


def dataset_options(cfg) -> dict:  # noqa: ANN001 - a common.config.RunConfig
    """The keyword arguments of :func:`load_dataset` that a run config sets besides the split."""
    return {"label_column": getattr(cfg, "label_column", ""), "image_size": getattr(cfg, "image_size", 32),
            "categories": getattr(cfg, "categories", "")}


@lru_cache(maxsize=4)
def _load_cached(spec: str, seed: int, test_fraction: float, mnist1d_samples: int, label_column: str = "",
                 image_size: int = 32, categories: str = "") -> Dataset:
    fmt = tabular.split_spec(spec)
    if fmt is not None and fmt[0] in tabular.TABLE_FORMATS:
        x, y, classes, numeric = tabular.table_records(fmt[1], fmt[0], label_column, tabular.load_schema(categories),
                                                       derive_categories=True)
        data = _split(x, y, seed, test_fraction, spec, classes)
        return dataclasses.replace(data, x_train=tabular.standardise(data.x_train, numeric),
                                   x_test=tabular.standardise(data.x_test, numeric), standardise_columns=numeric)
    if fmt is not None and fmt[0] == "images":
        x, y, classes = tabular.image_records(fmt[1], image_size, tabular.load_schema(categories))
        return _split(x, y, seed, test_fraction, spec, classes)
    if spec == "digits":
        return _digits(seed, test_fraction)
    if spec == "mnist1d":
        return _mnist1d(mnist1d_samples, seed, test_fraction)
    if spec.startswith("npz:"):
        return _npz(Path(spec[4:]).expanduser(), seed, test_fraction)
    raise DataError(f"--dataset '{spec}' is unknown; use digits, mnist1d, npz:FILE.npz, csv:FILE.csv, "
                    "parquet:FILE.parquet or images:DIR")


def _split(x: np.ndarray, y: np.ndarray | None, seed: int, test_fraction: float, name: str, num_classes: int) -> Dataset:
    """Deterministic shuffled split; stratified when labels exist so every class is tested."""
    rng = np.random.default_rng(seed)
    n = len(x)
    if y is None:
        order = rng.permutation(n)
        n_test = max(1, int(round(n * test_fraction)))
        test, train = order[:n_test], order[n_test:]
    else:
        test_parts, train_parts = [], []
        for cls in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == cls))
            k = int(round(len(idx) * test_fraction))
            test_parts.append(idx[:k])
            train_parts.append(idx[k:])
        test, train = np.concatenate(test_parts), np.concatenate(train_parts)
        test, train = rng.permutation(test), rng.permutation(train)
    if len(train) == 0 or len(test) == 0:
        raise DataError(f"dataset '{name}' has too few samples ({n}) to split with --test-fraction {test_fraction}")
    return Dataset(
        name=name,
        x_train=x[train],
        y_train=None if y is None else y[train],
        x_test=x[test],
        y_test=None if y is None else y[test],
        num_classes=num_classes,
    )


def _digits(seed: int, test_fraction: float) -> Dataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32)[:, None, :, :]
    x = (x - x.mean()) / x.std()  # (n, 1, 8, 8), standardised: SGD starts learning at once
    y = bunch.target.astype(np.int64)
    return _split(x, y, seed, test_fraction, "digits", 10)


def _mnist1d(num_samples: int, seed: int, test_fraction: float) -> Dataset:
    x, y = _mnist1d_arrays(num_samples)
    return _split(x[:, None, :], y, seed, test_fraction, "mnist1d", 10)


def _mnist1d_arrays(num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Generate MNIST-1D locally (never its download) and cache the arrays atomically."""
    path = cache_dir() / f"mnist1d-{num_samples}.npz"
    if path.exists():
        try:
            with np.load(path) as data:
                return data["x"], data["y"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile):
            pass  # a damaged cache is regenerated below
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = 1.0  # we split ourselves, like every other dataset
    state = np.random.get_state()  # make_dataset reseeds numpy's global RNG; keep callers unaffected
    with contextlib.redirect_stdout(io.StringIO()):
        data = make_dataset(args)
    np.random.set_state(state)
    x = data["x"].astype(np.float32)
    y = data["y"].astype(np.int64)

    def _save(f) -> None:
        np.savez(f, x=x, y=y)

    try:
        atomic_write(path, _save, binary=True)
    except OSError:
        pass  # an unwritable cache only costs time
    return x, y


def _npz(path: Path, seed: int, test_fraction: float) -> Dataset:
    """A user's ``.npz`` with ``x`` (n, ...) and optional ``y`` (n,) integer labels."""
    x, y, num_classes = npz_records(path)
    return _split(x, y, seed, test_fraction, f"npz:{path}", num_classes)


IMAGE_CHANNELS = (1, 3, 4)  # grey, RGB, RGBA


def channels_last(shape: tuple[int, ...]) -> bool:
    """Whether an image shape (3 axes, no batch) is (H, W, C) rather than (C, H, W).

    Channels last when the last axis is a channel count (1, 3 or 4) and the first is not; an
    ambiguous shape such as (3, 32, 3) keeps the channels-first reading fedpriv always used.
    """
    return len(shape) == 3 and shape[-1] in IMAGE_CHANNELS and shape[0] not in IMAGE_CHANNELS


def npz_records(path: Path) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Every record of a user's ``.npz`` in the file's own order: (x with a channel axis, y, classes).

    A data owner trains on all of its records; nothing a server sends (a seed, a split) changes
    which records they are or their order, so their fingerprint is the file's own.

    ``classes`` is the largest label + 1 (0 without ``y``): labels are class indices, and an owner's
    file may lack some classes. Anything unusable raises a one-line :class:`DataError` naming the
    file and the fix, before any large allocation: labels must be integers in
    ``0..MAX_CLASSES - 1`` (a label of 1e9 would otherwise ask the model for a billion outputs).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"--dataset npz:{path}: file not found; give the path of an .npz file with arrays x and y")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"--dataset npz:{path}: not a readable .npz file ({exc.__class__.__name__}); save it with numpy.savez") from None
    if "x" not in arrays:
        raise DataError(f"--dataset npz:{path}: no array named 'x' (found: {', '.join(arrays) or 'none'}); save with numpy.savez(path, x=..., y=...)")
    x = arrays["x"]
    if x.ndim < 2 or len(x) < 2:
        raise DataError(f"--dataset npz:{path}: 'x' must have shape (n, features...) with n >= 2 (got {x.shape})")
    if not np.issubdtype(x.dtype, np.number):
        raise DataError(f"--dataset npz:{path}: 'x' must be numeric (got dtype {x.dtype})")
    x = x.astype(np.float32) / (255.0 if arrays["x"].dtype == np.uint8 else 1.0)
    if not np.isfinite(x).all():
        raise DataError(f"--dataset npz:{path}: 'x' contains NaN or infinite values; clean the data first")
    # Channel axis first: (n, L) -> (n, 1, L); (n, H, W) -> (n, 1, H, W); (n, C, H, W) stays;
    # (n, H, W, C), how most image tools save images, is detected and moved to (n, C, H, W).
    if x.ndim in (2, 3):
        x = x[:, None, ...]
    elif x.ndim == 4 and channels_last(x.shape[1:]):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    elif x.ndim > 4:
        raise DataError(f"--dataset npz:{path}: 'x' has {x.ndim - 1} feature axes; at most 3 (C, H, W) are supported")
    y = arrays.get("y")
    num_classes = 0
    if y is not None:
        if y.shape != (len(x),):
            raise DataError(f"--dataset npz:{path}: 'y' must have shape ({len(x)},) to match 'x' (got {y.shape})")
        if not np.issubdtype(y.dtype, np.integer) and not (np.issubdtype(y.dtype, np.floating)
                                                     and np.isfinite(y).all() and np.all(np.mod(y, 1) == 0)):
            raise DataError(f"--dataset npz:{path}: 'y' must hold integer class labels (got dtype {y.dtype})")
        if y.min() < 0:
            raise DataError(f"--dataset npz:{path}: 'y' labels must be >= 0 (found {y.min()})")
        if y.max() >= MAX_CLASSES:  # before the cast (a float 1e30 or a huge uint64 would wrap) and the model
            distinct = len(np.unique(y))
            fix = (f"number the {distinct} distinct labels 0..{distinct - 1}, e.g. y = numpy.unique(y, return_inverse=True)[1]"
                   if distinct <= MAX_CLASSES else f"it has {distinct} distinct labels: merge them into at most {MAX_CLASSES} classes")
            raise DataError(f"--dataset npz:{path}: 'y' labels go up to {y.max()}, but at most {MAX_CLASSES} classes "
                            f"are supported (the model gets one output per label value); {fix}")
        y = y.astype(np.int64)
        num_classes = int(y.max()) + 1
        if num_classes < 2:
            raise DataError(f"--dataset npz:{path}: 'y' has a single class; classification needs at least two")
    return x, y, num_classes


def owner_records(spec: str, *, label_column: str = "", image_size: int = 32, categories: str = ""
                  ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Every record of a data owner's ``npz:``, ``csv:``, ``parquet:`` or ``images:`` data, in its own order.

    A table's numeric columns are standardised with this owner's own mean and standard deviation
    (never sent anywhere); its categories come from the shared ``categories`` schema only.
    """
    fmt = tabular.split_spec(spec)
    if fmt is None:
        raise DataError(f"--data '{spec}' must be npz:PATH, csv:PATH, parquet:PATH or images:DIR")
    kind, path = fmt
    if kind == "npz":
        return npz_records(path)
    schema = tabular.load_schema(categories, allow_file=False)  # it came in the server's run config
    if kind == "images":
        return tabular.image_records(path, image_size, schema)
    x, y, classes, numeric = tabular.table_records(path, kind, label_column, schema, derive_categories=False)
    return tabular.standardise(x, numeric), y, classes
