"""A data owner's tables (``csv:PATH``, ``parquet:PATH``) and image folders (``images:DIR``).

Tables: a header row names the columns; ``--label-column`` names the label (none for the
autoencoder). Numeric columns become features that each owner standardises with the mean and
standard deviation of its *own* records (:func:`standardise`; nothing of them leaves the owner).
Non-numeric columns are one-hot encoded from a schema every owner shares: ``--categories`` (a JSON
object ``{"column": ["value", ...]}``, inline or a file path) or, in simulation only, the sorted
values of the whole file. Labels that are all integers are class indices; other labels map to their
sorted values (or the schema's list for the label column).

Images: one sub-folder per class (sorted names = class indices 0..k-1, or the schema's ``"class"``
list), PNG or JPEG read with Pillow, converted to RGB and resized to ``--image-size``, scaled to
[0, 1]: shape ``(n, 3, N, N)``.

Every unusable input raises a one-line :class:`~common.errors.DataError` naming the file or folder
and the fix.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from fedpriv.common.errors import DataError

TABLE_FORMATS = ("csv", "parquet")
FILE_FORMATS = ("npz", "csv", "parquet", "images")  # the SPEC prefixes a user's data can have
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
IMAGE_CLASS_KEY = "class"  # the schema key listing image classes
MISSING = ("", "na", "nan", "null", "none")
MAX_CLASSES = 1000  # labels are class indices 0..MAX_CLASSES-1 (re-exported by common.datasets)


def split_spec(spec: str) -> tuple[str, Path] | None:
    """``("csv", Path)`` for ``csv:PATH`` and the other file formats; None for a built-in name."""
    fmt, sep, rest = spec.partition(":")
    if sep and fmt in FILE_FORMATS and rest:
        return fmt, Path(rest).expanduser()
    return None


def load_schema(categories: str, allow_file: bool = True) -> dict[str, list[str]]:
    """The shared category schema: ``""`` (none), an inline JSON object, or a JSON file's path.

    ``allow_file=False`` is for a data owner's ClientApp, where the schema arrives in the server's run
    config: an owner never opens a file because the server named it (local DP's threat model: the
    server is not trusted), so there only an inline JSON object is taken."""
    if not categories:
        return {}
    text = categories
    if not categories.lstrip().startswith("{") and not allow_file:
        raise DataError("--categories must be an inline JSON object for a data owner's run (got a file path: an "
                        "owner never reads a file the server names); pass the schema itself, e.g. "
                        '--categories \'{"color": ["blue", "red"]}\'')
    if not categories.lstrip().startswith("{"):
        try:
            text = Path(categories).expanduser().read_text()
        except OSError as exc:
            raise DataError(f"--categories {categories}: cannot read the file ({exc.strerror}); "
                            "give a JSON file or an inline JSON object") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--categories {categories}: not valid JSON ({exc.msg}); "
                        'write {"column": ["value", ...], ...}') from None
    if not isinstance(schema, dict) or not all(isinstance(v, list) and v for v in schema.values()):
        raise DataError(f"--categories {categories}: must be a JSON object mapping each column to a "
                        'non-empty list of its values, e.g. {"color": ["blue", "red"]}')
    return {str(k): [str(v) for v in vals] for k, vals in schema.items()}


# ------------------------------------------------------------------------------------- tables
def read_table(path: Path, fmt: str) -> dict[str, list]:
    """Column name -> values (strings from CSV, Python values from Parquet); missing values checked."""
    if fmt == "parquet":
        try:
            import pyarrow.parquet  # noqa: F401
        except ImportError:
            raise DataError(f"--dataset parquet:{path} needs pyarrow: pip install pyarrow (or save the table as CSV)") from None
    if not path.is_file():
        raise DataError(f"--dataset {fmt}:{path}: file not found; give the path of a .{fmt} file")
    columns = _read_parquet(path) if fmt == "parquet" else _read_csv(path)
    if not columns:
        raise DataError(f"{path}: file is empty; give a table with a header row and at least 2 records")
    n = len(next(iter(columns.values())))
    if n < 2:
        raise DataError(f"{path}: has {n} records; a table needs a header row and at least 2 records")
    for name, values in columns.items():
        missing = sum(1 for v in values if v is None or (isinstance(v, float) and v != v)
                      or (isinstance(v, str) and v.strip().lower() in MISSING))
        if missing:
            raise DataError(f"{path}: column '{name}' has {missing} missing values; fill or drop them")
    return columns


def _read_csv(path: Path) -> dict[str, list]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc.__class__.__name__}); save it as UTF-8 CSV") from None
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        return {}
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header) or "" in header:
        raise DataError(f"{path}: the header row must name every column once (got {header}); fix the first line")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}: record {line - 1} has {len(row)} fields, the header {len(header)}; fix that line")
    return {h: [r[i].strip() for r in rows[1:]] for i, h in enumerate(header)}


def _read_parquet(path: Path) -> dict[str, list]:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pydict()
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({exc.__class__.__name__}); re-export it") from None


def _numeric(path: Path, column: str, values: list, schema: dict) -> np.ndarray | None:
    """The column as float64 when it is numbers; None when it is text (categories or text labels).

    A column of numbers with a few non-numbers in it is a typo, not a category: refused with the record.
    """
    if column in schema:
        return None
    numbers = _as_float(values)
    if numbers is not None:
        return numbers
    bad = [i for i, v in enumerate(values) if _as_float([v]) is None]
    if len(bad) < len(values):
        raise DataError(f"{path}: column '{column}' value {values[bad[0]]!r} (record {bad[0] + 1}) is not a number, "
                        f"and {len(bad)} of {len(values)} values are not; fix them, or list the column in --categories")
    return None


def _as_float(values: list) -> np.ndarray | None:
    """The column as float64, or None when some value is not a number."""
    try:
        out = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out).all() else None


def table_records(path: Path, fmt: str, label_column: str, schema: dict[str, list[str]], derive_categories: bool
                  ) -> tuple[np.ndarray, np.ndarray | None, int, tuple[int, ...]]:
    """(x unstandardised (n, d), y or None, classes, indices of the numeric columns to standardise).

    ``derive_categories`` (simulation, where one process holds the whole file) takes the sorted values
    of a non-numeric column when the schema has none; an owner must get them from the schema, or its
    one-hot columns would not line up with other owners'.
    """
    columns = read_table(path, fmt)
    if label_column and label_column not in columns:
        raise DataError(f"{path}: no column '{label_column}' (columns: {', '.join(columns)}); "
                        "set --label-column to one of them")
    y, num_classes = None, 0
    if label_column:
        raw = columns[label_column]
        numbers = _numeric(path, label_column, raw, schema)
        if numbers is not None and not np.all(np.mod(numbers, 1) == 0):
            raise DataError(f"{path}: column '{label_column}' holds non-integer labels (e.g. "
                            f"{numbers[np.mod(numbers, 1) != 0][0]:g}); labels are class indices 0, 1, ... or text")
        if numbers is not None:
            if numbers.min() < 0 or numbers.max() >= MAX_CLASSES:
                raise DataError(f"{path}: column '{label_column}' labels must be class indices 0..{MAX_CLASSES - 1} "
                                f"(found {numbers.min():g}..{numbers.max():g}); renumber them or use text labels")
            y = numbers.astype(np.int64)
            num_classes = int(y.max()) + 1
        else:
            classes = _categories(path, label_column, raw, schema, derive_categories)
            y = _indices(path, label_column, raw, classes)
            num_classes = len(classes)
        if num_classes < 2:
            raise DataError(f"{path}: column '{label_column}' has a single class; classification needs at least two")
    parts, numeric = [], []
    for name, values in columns.items():
        if name == label_column:
            continue
        numbers = _numeric(path, name, values, schema)
        if numbers is not None:
            numeric.append(sum(p.shape[1] for p in parts))
            parts.append(numbers[:, None])
            continue
        cats = _categories(path, name, values, schema, derive_categories)
        parts.append(np.eye(len(cats))[_indices(path, name, values, cats)])
    if not parts:
        raise DataError(f"{path}: no feature columns besides the label '{label_column}'; add feature columns")
    x = np.concatenate(parts, axis=1).astype(np.float32)
    return x, y, num_classes, tuple(numeric)


def _categories(path: Path, column: str, values: list, schema: dict, derive: bool) -> list[str]:
    if column in schema:
        return schema[column]
    if not derive:
        example = next(str(v) for v in values if _as_float([v]) is None)
        raise DataError(f"{path}: column '{column}' is not numeric (e.g. {example!r}); list its values in "
                        f'--categories (e.g. {{"{column}": [...]}}), the schema every owner shares')
    return sorted({str(v) for v in values})


def _indices(path: Path, column: str, values: list, categories: list[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(categories)}
    unknown = sorted({str(v) for v in values} - index.keys())
    if unknown:
        raise DataError(f"{path}: column '{column}' has values not in --categories: {', '.join(unknown[:5])}; "
                        "add them to the schema or fix the records")
    return np.array([index[str(v)] for v in values], dtype=np.int64)


def column_stats(x: np.ndarray, columns: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation (1 where constant) of ``columns`` of ``x`` (n, d)."""
    cols = list(columns)
    mean = x[:, cols].mean(axis=0)
    std = x[:, cols].std(axis=0)
    return mean, np.where(std > 1e-12, std, 1.0)


def standardise(x: np.ndarray, columns: tuple[int, ...]) -> np.ndarray:
    """``x`` with ``columns`` standardised by this array's own statistics (a copy; others untouched)."""
    if not columns or len(x) == 0:
        return x
    mean, std = column_stats(x, columns)
    out = np.array(x, dtype=np.float32, copy=True)
    out[:, list(columns)] = (x[:, list(columns)] - mean) / std
    return out


# ------------------------------------------------------------------------------------- images
def image_files(root: Path, schema: dict[str, list[str]]) -> tuple[list[tuple[Path, int]], list[str]]:
    """(file, class index) for every image, and the class names; one-line errors for a bad folder."""
    if not root.is_dir():
        raise DataError(f"--dataset images:{root}: folder not found; give a folder with one sub-folder per class")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders; put each class's images in its own sub-folder "
                        f"({root}/cat/1.png, {root}/dog/2.jpg)")
    classes = schema.get(IMAGE_CLASS_KEY, folders)
    unknown = sorted(set(folders) - set(classes))
    if unknown:
        raise DataError(f"{root}: class folders not in --categories \"{IMAGE_CLASS_KEY}\": {', '.join(unknown)}; "
                        "add them to the schema or remove them")
    index = {c: i for i, c in enumerate(classes)}
    files = []
    for name in folders:
        found = sorted(p for p in (root / name).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{root / name}: class folder with no images (.png, .jpg, .jpeg); add images or remove the folder")
        files += [(p, index[name]) for p in found]
    return files, list(classes)


def image_records(root: Path, size: int, schema: dict[str, list[str]]) -> tuple[np.ndarray, np.ndarray, int]:
    """(x (n, 3, size, size) in [0, 1], y class indices, classes) of an image folder."""
    from PIL import Image, UnidentifiedImageError

    files, classes = image_files(root, schema)
    x = np.empty((len(files), 3, size, size), dtype=np.float32)
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                img = img.convert("RGB").resize((size, size), Image.BILINEAR)
                x[i] = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"{path}: not a readable image ({exc.__class__.__name__}); replace or remove it") from None
    y = np.array([c for _, c in files], dtype=np.int64)
    return x, y, len(classes)


def check_owner_file(spec: str) -> int:
    """An owner's ``csv:``/``parquet:``/``images:`` data, checked before its client connects: its record count.

    The run's settings (label column, image size) are not known yet; this catches the file-level
    mistakes (missing, empty, missing values, empty class folders, unreadable images).
    """
    fmt, path = split_spec(spec)
    if fmt == "images":
        from PIL import Image

        files, _ = image_files(path, {})
        for file, _ in files:
            try:
                with Image.open(file) as img:
                    img.verify()
            except Exception as exc:  # noqa: BLE001 - Pillow raises many kinds for a damaged file
                raise DataError(f"{file}: not a readable image ({exc.__class__.__name__}); replace or remove it") from None
        return len(files)
    columns = read_table(path, fmt)
    return len(next(iter(columns.values())))
