"""User data files as datasets: .npz, .csv, or a directory of .npy files (``from_file``)."""
from __future__ import annotations

import csv
import os
import warnings
from typing import Optional, Sequence, Tuple

import numpy as np

from .containers import ArrayDataset, NpyDataset, _magic

_ZIP_MAGIC = b"PK\x03\x04"


def from_file(path: str) -> Tuple[ArrayDataset, Optional[ArrayDataset]]:
    """(train, test) from a user's file; test is None when the file holds no test split.

    - ``.npz``: arrays ``X`` and ``y``, optionally ``X_test`` and ``y_test``; loaded whole.
    - ``.csv``: numbers, an optional header; ``y`` is the column headed ``label``, else the
      last one (whole numbers become int64 class labels); loaded whole.
    - a directory: ``X.npy`` and ``y.npy`` (optionally ``X_test.npy``, ``y_test.npy``) as
      memory-mapped NpyDatasets, read only where indexed.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        has_test = [os.path.exists(os.path.join(path, f"{n}.npy")) for n in ("X_test", "y_test")]
        if any(has_test) and not all(has_test):
            raise ValueError(f"{path} has one of X_test.npy and y_test.npy; give both or neither")
        return NpyDataset(path), NpyDataset(path, "X_test", "y_test") if all(has_test) else None
    if not os.path.exists(path):
        raise ValueError(f"data file {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".npz":
        return _load_npz(path)
    if ext == ".csv":
        return _load_csv(path), None
    if ext == ".npy":
        raise ValueError(f"data file {path}: give the directory holding X.npy and y.npy")
    raise ValueError(f"data file {path}: use a .npz, a .csv, or a directory of X.npy and y.npy")


def _numeric_pair(path: str, X: np.ndarray, y: np.ndarray,
                  names: Sequence[str] = ("X", "y")) -> ArrayDataset:
    for name, a in zip(names, (X, y)):
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{path}: {name} must be numeric, got dtype {a.dtype}")
    try:
        return ArrayDataset(X, y)
    except ValueError as exc:
        raise ValueError(f"{path}: {names[0]}/{names[1]}: {exc}") from None


def _load_npz(path: str) -> Tuple[ArrayDataset, Optional[ArrayDataset]]:
    if _magic(path, len(_ZIP_MAGIC)) != _ZIP_MAGIC:
        raise ValueError(f"{path} is not an .npz file (write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("X", "y") if k not in f.files]
            if missing:
                held = ", ".join(f.files) or "no arrays"
                raise ValueError(f"{path} has no {' or '.join(missing)} (it holds {held}); "
                                 "an .npz data file needs X and y, optionally X_test and y_test")
            test_keys = [k for k in ("X_test", "y_test") if k in f.files]
            if len(test_keys) == 1:
                raise ValueError(f"{path} has {test_keys[0]} alone; give X_test and y_test both")
            arrays = {k: f[k] for k in ("X", "y", *test_keys)}
    except ValueError as exc:  # zip corruption, pickled (object) arrays, our own
        raise ValueError(str(exc) if str(exc).startswith(path) else f"{path}: {exc}") from None
    except (OSError, EOFError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    train = _numeric_pair(path, arrays["X"], arrays["y"])
    if not test_keys:
        return train, None
    return train, _numeric_pair(path, arrays["X_test"], arrays["y_test"], ("X_test", "y_test"))


def _load_csv(path: str) -> ArrayDataset:
    with open(path, newline="") as f:
        first = next(csv.reader(f), None)
    if not first:
        raise ValueError(f"{path} is empty")
    header = not all(_is_number(cell) for cell in first)
    names = [cell.strip().lower() for cell in first]
    if len(first) < 2:
        raise ValueError(f"{path} needs at least 2 columns (features, then a label)")
    label = names.index("label") if header and "label" in names else len(first) - 1
    try:
        with warnings.catch_warnings():  # no data rows: said below as an error, not a warning
            warnings.simplefilter("ignore", UserWarning)
            table = np.loadtxt(path, delimiter=",", skiprows=int(header), ndmin=2,
                               dtype=np.float64)
    except ValueError:
        raise ValueError(f"{path} is not a numeric CSV: {_bad_cell(path, header)}") from None
    if table.shape[0] == 0:
        raise ValueError(f"{path} has no data rows")
    y = table[:, label]
    X = np.delete(table, label, axis=1)
    if np.isfinite(y).all() and (y == np.round(y)).all():
        y = y.astype(np.int64)  # whole numbers: class labels
    return _numeric_pair(path, X, y)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _bad_cell(path: str, header: bool) -> str:
    """Where numpy's parse failed, found again slowly (only on the error path)."""
    with open(path, newline="") as f:
        rows = csv.reader(f)
        width = None
        for line, cells in enumerate(rows, start=1):
            if header and line == 1:
                width = len(cells)
                continue
            width = len(cells) if width is None else width
            if len(cells) != width:
                return f"line {line} has {len(cells)} columns, expected {width}"
            for col, cell in enumerate(cells, start=1):
                if not _is_number(cell):
                    return f"line {line}, column {col} is {cell!r}"
    return "numpy could not parse it"
