"""Dynamic batch dispatch: the server hands out batches on request, so fast workers take more."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["BatchDispatcher"]


class BatchDispatcher:
    """Batch g is rows ``order(e)[j*b : (j+1)*b]`` with e, j = divmod(g, batches_per_epoch).

    ``order(e)`` is the identity, or with ``shuffle`` the permutation seeded by (seed, e). The
    last batch of an epoch may be short, so every row is trained exactly once per epoch. The
    server calls ``next()``; workers only call ``rows()``, which needs no shared state.
    """

    _order_epoch: Optional[int]
    _order: Optional[np.ndarray]

    def __init__(self, n_rows: int, batch_size: int, total_batches: int, shuffle: bool,
                 seed: int) -> None:
        self.n_rows = int(n_rows)
        self.batch_size = int(batch_size)
        self.batches_per_epoch = math.ceil(self.n_rows / self.batch_size)
        self.total_batches = int(total_batches)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.issued = 0
        self._order_epoch, self._order = None, None

    def next(self) -> Optional[int]:
        """The next batch index, or None once every batch has been handed out."""
        if self.issued >= self.total_batches:
            return None
        self.issued += 1
        return self.issued - 1

    def rows(self, batch: int) -> np.ndarray:
        epoch, j = divmod(int(batch), self.batches_per_epoch)
        return self._order_of(epoch)[j * self.batch_size : (j + 1) * self.batch_size]

    def _order_of(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n_rows)
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, 1 << 20, epoch])
            self._order_epoch, self._order = epoch, rng.permutation(self.n_rows)
        assert self._order is not None  # set with _order_epoch
        return self._order
