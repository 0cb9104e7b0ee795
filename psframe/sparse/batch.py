"""BatchIds: the rows each table's ids touch in one batch, and the batch with ids remapped."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

if TYPE_CHECKING:
    from .tables import SparseTables

__all__ = ["BatchIds", "batch_ids"]


class BatchIds:
    """``unique[name]``: the sorted distinct rows (in storage: RowPlacement) of table
    ``name`` the batch reads;
    ``X``: the batch with each table's ids replaced by their place in ``unique``, so the
    model computes on a compact table of just those rows (its gradient is then exactly the
    rows to push, duplicates summed by the model's backward)."""

    def __init__(self, unique: Dict[str, np.ndarray], X: Any) -> None:
        self.unique = unique
        self.X = X
        # Each server's share of the rows: {name: (a, b)} slices of ``unique`` (WorkerRows,
        # once per batch).
        self.split: Optional[List[Dict[str, Tuple[int, int]]]] = None


def batch_ids(tables: SparseTables, X: Any) -> BatchIds:
    """The BatchIds of batch ``X`` for ``tables`` (a SparseTables)."""
    unique: Dict[str, np.ndarray] = {}
    remapped: Any = dict(X) if isinstance(X, dict) else X
    for name in tables.names:
        ids = tables.ids_of(X, name)
        # Distinct rows in storage order (each id's placed row), the order servers hold them.
        placed = tables.placement[name].position(np.asarray(ids).reshape(-1))
        rows, inverse = np.unique(placed, return_inverse=True)
        unique[name] = rows.astype(np.int64, copy=False)
        local = inverse.reshape(np.shape(ids)).astype(np.int64, copy=False)
        key = tables.inputs[name]
        if key is None:
            remapped = local
        else:
            remapped[key] = local
    return BatchIds(unique, remapped)
