"""Each worker's batches: the BatchSchedule over its block, and steps per epoch."""
from __future__ import annotations

import math
from typing import Dict

import numpy as np


class BatchSchedule:
    """A worker's batches: step t takes positions [t*b, (t+1)*b) of an endless sequence of
    its block's rows.

    The sequence is the block repeated (shuffle=False), so step t uses
    ``block[(t*b + arange(b)) % len(block)]``; with shuffle=True each pass over the block is
    a fresh permutation seeded by (seed, worker, epoch), the same on every run.
    """

    def __init__(self, block: np.ndarray, batch_size: int, shuffle: bool, seed: int,
                 worker: int):
        self.block = np.asarray(block)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.worker = int(worker)
        self._orders: Dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return self.block
        if epoch not in self._orders:
            rng = np.random.default_rng([self.seed, self.worker, epoch])
            order = self.block[rng.permutation(len(self.block))]
            # A batch rarely spans more than two passes: keep the previous one, drop older.
            self._orders = {k: v for k, v in self._orders.items() if k == epoch - 1}
            self._orders[epoch] = order
        return self._orders[epoch]

    def rows(self, step: int) -> np.ndarray:
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

    def epoch_of(self, step: int) -> float:
        return step * self.batch_size / len(self.block)


def steps_per_epoch(n_rows: int, n_workers: int, batch_size: int) -> int:
    """Steps for every worker to pass once over its (largest) block."""
    return max(1, math.ceil(math.ceil(n_rows / n_workers) / batch_size))


# The old name, kept for code that imports it ("stream" now means only a push applied as it
# lands, and a CUDA stream).
BatchStream = BatchSchedule
