"""Dataset containers (ArrayDataset, NpyDataset, Features) and the sharding contract."""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import numpy as np


class Features:
    """Several inputs of equal row counts, by name: ``{"dense": (n, d) floats, "c0": (n, k)
    ids, ...}``, as a model with several inputs (ps.models.DLRM) reads them.

    ``F["dense"]`` is one input's array; any other index selects rows of every input at once
    (``F[lo:hi]``, ``F[rows]``) and gives a Features, so datasets, splits, shards and
    evaluation chunks treat it as they treat one array. ``len(F)`` and ``F.shape[0]`` are the
    row count; ``keys()``, ``items()`` and ``values()`` go over the inputs, in the given order.
    """

    def __init__(self, arrays: Union[Mapping[str, Any], "Features"]):
        if isinstance(arrays, Features):
            arrays = arrays.arrays
        if not isinstance(arrays, Mapping) or not arrays:
            raise ValueError("Features needs a non-empty dict of name -> array")
        self.arrays: Dict[str, np.ndarray] = {}
        for name, a in arrays.items():
            if not isinstance(name, str):
                raise ValueError(f"feature names must be strings, got {name!r}")
            # Arrays stay as they are (a memmap, a device array); lists become arrays.
            a = a if hasattr(a, "shape") and hasattr(a, "dtype") else np.asarray(a)
            if a.ndim < 1:
                raise ValueError(f"feature {name!r} must have one row per sample, got a scalar")
            self.arrays[name] = a
        counts = {name: a.shape[0] for name, a in self.arrays.items()}
        if len(set(counts.values())) != 1:
            raise ValueError(f"every feature needs the same number of rows; got {counts}")
        self.shape = (next(iter(counts.values())),)

    def __getitem__(self, index):
        if isinstance(index, str):
            return self.arrays[index]
        return Features({name: a[index] for name, a in self.arrays.items()})

    def __contains__(self, name):
        return name in self.arrays

    def __len__(self):
        return self.shape[0]

    def keys(self):
        return self.arrays.keys()

    def values(self):
        return self.arrays.values()

    def items(self):
        return self.arrays.items()

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.arrays.values())

    def __repr__(self):
        inner = ", ".join(f"{k!r}: {a.dtype}{tuple(a.shape)}" for k, a in self.items())
        return f"Features({{{inner}}})"


def features(X: Any, dtype: Any, ids: Optional[Any] = None) -> Any:
    """X as a worker computes on it, each array contiguous: the inputs that ``ids`` names
    (the model's ``id_inputs()``: dict keys, None for X itself) as int64 ids, the others in
    ``dtype``. ``ids=None``: every integer array is taken as ids. A dict (or Features) of
    inputs gives a Features of them converted."""
    if isinstance(X, (Features, Mapping)):
        return Features({name: _converted(a, dtype, name, ids) for name, a in X.items()})
    return _converted(X, dtype, None, ids)


def _converted(a, dtype, name, ids):
    a = np.asarray(a)
    as_ids = a.dtype.kind in "iu" if ids is None else name in ids
    return np.ascontiguousarray(a, dtype=np.int64 if as_ids else dtype)


class ArrayDataset:
    """Features ``X`` (n_rows, n_features) and targets ``y`` (n_rows,) or (n_rows, k).

    ``X`` may also be a dict (or Features) of 2-D arrays of n_rows each, one per input of a
    model with several (ps.models.DLRM): it is kept as a Features. ``vocab`` optionally says
    how many ids each integer input draws from (ps.data.click_log sets it), so a model can be
    sized for the data (``psframe train --model dlrm``).
    """

    lazy = False  # the rows are in memory (NpyDataset: on disk, read when indexed)

    def __init__(self, X: Any, y: Any, vocab: Optional[Mapping[str, int]] = None):
        X = Features(X) if isinstance(X, Mapping) or isinstance(X, Features) else np.asarray(X)
        y = np.asarray(y)
        for name, a in (X.items() if isinstance(X, Features) else [("X", X)]):
            if a.ndim != 2:
                raise ValueError(f"{name} must be 2-D (rows, features), got shape {a.shape}")
        if y.ndim not in (1, 2) or len(y) != len(X):
            raise ValueError(f"y must have one entry per row of X ({len(X)}), got shape {y.shape}")
        if len(X) == 0:
            raise ValueError("the dataset is empty")
        self.X = X
        self.y = y
        self.vocab = None if vocab is None else dict(vocab)

    def __len__(self):
        return len(self.X)

    @property
    def n_features(self):
        """Columns of X; for several inputs, {name: columns}."""
        if isinstance(self.X, Features):
            return {name: a.shape[1] for name, a in self.X.items()}
        return self.X.shape[1]

    def _arrays(self):
        named = self.X.items() if isinstance(self.X, Features) else [("X", self.X)]
        return [*named, ("y", self.y)]

    def check_finite(self, what="data"):
        for name, a in self._arrays():
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
                raise ValueError(f"{what} {name} has {bad} non-finite values (NaN or inf)")
            if a.dtype.kind not in "biuf":
                raise ValueError(f"{what} {name} must be numeric, got dtype {a.dtype}")

    @property
    def chunk_rows(self):
        return len(self)  # in memory already: one pass, one message

    def check(self, model, what="data", rows=None):
        """check_finite and ``model.validate_data`` on rows [lo, hi) (default: all), at most
        ``chunk_rows`` rows at a time; an error found in a chunk names its rows."""
        lo, hi = (0, len(self)) if rows is None else rows
        step = max(1, self.chunk_rows)
        for start in range(lo, hi, step):
            stop = min(hi, start + step)
            whole = (start, stop) == (0, len(self))
            part = self if whole else self.subset(slice(start, stop))
            try:
                part.check_finite(what)
                model.validate_data(part.X, part.y)
            except ValueError as exc:
                if whole:
                    raise
                raise ValueError(f"{exc} (in rows {start}..{stop - 1})") from None

    def subset(self, rows: Any) -> "ArrayDataset":
        return ArrayDataset(self.X[rows], self.y[rows], self.vocab)

    def __repr__(self):
        return f"ArrayDataset({len(self)} rows, {self.n_features} features)"


class NpyDataset(ArrayDataset):
    """``X.npy`` and ``y.npy`` in a directory, memory-mapped: rows are read from disk only
    when indexed, so a worker reads just its block and validation reads in bounded chunks.

    ``x`` and ``y`` name other files of the directory (``NpyDataset(d, "X_test", "y_test")``).
    Write files larger than memory with ``numpy.lib.format.open_memmap``.
    """

    lazy = True

    def __init__(self, path: Union[str, "os.PathLike[str]"], x: str = "X", y: str = "y"):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise ValueError(f"NpyDataset needs a directory holding {x}.npy and {y}.npy; "
                             f"{self.path} is not one")
        X, Y = (_open_npy(os.path.join(self.path, f"{name}.npy")) for name in (x, y))
        try:
            super().__init__(X, Y)
        except ValueError as exc:
            raise ValueError(f"{self.path}: {exc}") from None
        for name, a in ((x, X), (y, Y)):
            if a.dtype.kind not in "biuf":
                raise ValueError(f"{self.path}: {name}.npy must be numeric, got dtype {a.dtype}")
        self.X, self.y = X, Y  # the memmaps themselves (asarray dropped the subclass)
        self.names = (x, y)

    @property
    def chunk_rows(self) -> int:
        # The package's knob, read at call time (see psframe/data/__init__.py): a module-level
        # copy here would not see a later ``psframe.data.CHUNK_BYTES = ...``.
        from . import CHUNK_BYTES

        row_bytes = max(1, self.X.itemsize * self.n_features)
        return max(1, CHUNK_BYTES // row_bytes)

    def __repr__(self):
        return f"NpyDataset({self.path!r}, {len(self)} rows, {self.n_features} features)"


_NPY_MAGIC = b"\x93NUMPY"


# Shared with files.py, which checks an .npz's magic the same way.
def _magic(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _open_npy(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise ValueError(f"data file {path} does not exist")
    if _magic(path, len(_NPY_MAGIC)) != _NPY_MAGIC:
        raise ValueError(f"{path} is not a .npy file (write it with numpy.save)")
    try:
        # allow_pickle=False: reading data must never run code from the file.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot memory-map {path}: {exc}") from None


# The sharding contract: which rows each worker owns, computed alike wherever it is asked
# (numpy.array_split's blocks, without building them).
def block_range(n_rows: int, n_workers: int, worker: int) -> Tuple[int, int]:
    """(lo, hi): ``worker``'s block is rows lo..hi-1, as numpy.array_split cuts them, computed
    without an index array of every row."""
    size, extra = divmod(n_rows, n_workers)
    lo = worker * size + min(worker, extra)
    return lo, lo + size + (worker < extra)


def worker_block(n_rows: int, n_workers: int, worker: int) -> np.ndarray:
    """Rows owned by ``worker``: block w of numpy.array_split(arange(n_rows), n_workers)."""
    return np.arange(*block_range(n_rows, n_workers, worker))

