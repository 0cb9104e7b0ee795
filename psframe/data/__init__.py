"""Datasets (digits, MNIST, synthetic, click logs, user files), features, each worker's batches.

One module per job: ``containers`` (ArrayDataset, NpyDataset, Features, the sharding
contract), ``files`` (from_file), ``builtin`` (digits, mnist, synthetic, click_log) and
``batches`` (BatchSchedule, steps_per_epoch). Every name stays importable from here, as
``psframe.data.X`` and ``ps.data.X``.
"""
from __future__ import annotations

from .batches import BatchSchedule, BatchStream, steps_per_epoch
from .builtin import click_log, digits, mnist, synthetic, zipf_ids
from .containers import ArrayDataset, Features, NpyDataset, block_range, features, worker_block
from .files import from_file

__all__ = ["ArrayDataset", "NpyDataset", "Features", "features", "from_file", "digits", "mnist",
           "synthetic", "click_log", "zipf_ids", "worker_block", "block_range", "BatchSchedule",
           "BatchStream"]

# Validation reads a memory-mapped dataset this many bytes at a time, so checking it never
# holds more than this (plus its own temporaries) in memory. It lives here rather than in
# containers.py so that setting ``psframe.data.CHUNK_BYTES`` (as a test does) still takes
# effect: NpyDataset.chunk_rows looks it up in this package on every call.
CHUNK_BYTES = 64 << 20
