"""SparseTables: which parameters are row-sparse tables, where they lie, what a batch reads."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Container, Dict, List, Mapping, Optional, Tuple, TypeVar

import numpy as np

from .placement import RowPlacement

if TYPE_CHECKING:
    from ..params import ParamLayout

V = TypeVar("V")

__all__ = ["SparseTables", "sparse_tables", "dense_first"]


class SparseTables:
    """The row-sparse tables of a run, in layout order: each has a name (the parameter),
    the input it reads (a key of a dict X, or None for X itself), rows and width.

    The tables lie at the end of the flat layout, after every dense parameter, so the dense
    part is one shard range (``dense_shards``) that moves as before, and the servers' flat
    buffers, evaluation and results hold the whole tables. The servers split the dense part
    by its elements (their shard ranges), and every table by its rows: server s holds rows
    ``row_blocks[s][t]``, an equal block of each table's storage (where RowPlacement puts
    each id, so the blocks are hash partitions of the ids).
    ``capacity[t]``: the most rows one step can touch in table t (its ids per sample times
    the batch size, at most its rows); the wire's buffers are sized by it.
    """

    def __init__(self, layout: ParamLayout, inputs: Dict[str, Optional[str]],
                 ids_per_sample: Mapping[str, int], batch_size: int, n_servers: int = 1) -> None:
        keys = [k for k in inputs.values() if k is not None]
        if len(set(keys)) != len(keys) or (None in inputs.values() and len(inputs) > 1):
            raise ValueError(f"each row-sparse table must read its own input; got {inputs}")
        self.layout = layout
        self.names: List[str] = [n for n in layout.names if n in inputs]
        self.inputs = {n: inputs[n] for n in self.names}
        self.rows = {n: layout.shapes[n][0] for n in self.names}
        self.dims = {n: int(np.prod(layout.shapes[n][1:], dtype=np.int64)) for n in self.names}
        self.offsets = {n: layout.offsets[n] for n in self.names}
        # Each id's row in storage: the servers' row ranges split ids by a hash (placement).
        self.placement = {n: RowPlacement(self.rows[n]) for n in self.names}
        self.dense_end = min(self.offsets.values())  # where the tables begin
        self.dense_shards: Tuple[int, int] = (0, layout.shards_of_range(0, self.dense_end)[1])
        self.capacity = {n: min(self.rows[n], int(ids_per_sample[n]) * int(batch_size))
                         for n in self.names}
        S = int(n_servers)
        self.row_blocks = [{n: (self.rows[n] * s // S, self.rows[n] * (s + 1) // S)
                            for n in self.names} for s in range(S)]
        # Server s's rows lie in a shared segment at bases[s], after the other servers': each
        # has room for the most rows one step can touch of its blocks.
        self.bases: List[int] = []
        at = self.dense_end
        for s in range(S):
            self.bases.append(at)
            at += self.server_elems(s)

    def server_capacity(self, s: int) -> Dict[str, int]:
        """{name: the most rows one step can touch of server s's block of the table}."""
        return {n: min(self.capacity[n], hi - lo) for n, (lo, hi) in self.row_blocks[s].items()}

    def server_elems(self, s: int) -> int:
        """The most elements one step's rows of server s's blocks take: its buffers' size."""
        return sum(c * self.dims[n] for n, c in self.server_capacity(s).items())

    def server_params(self, s: int) -> int:
        """How many table weights server s holds."""
        return sum((hi - lo) * self.dims[n] for n, (lo, hi) in self.row_blocks[s].items())

    def __len__(self) -> int:
        return len(self.names)

    def views(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """Each table as a (rows, dim) view into a flat buffer of the layout."""
        return {n: flat[self.offsets[n]:self.offsets[n] + self.rows[n] * self.dims[n]]
                .reshape(self.rows[n], self.dims[n]) for n in self.names}

    def ids_of(self, X: Any, name: str) -> Any:
        """The ids table ``name`` reads in a batch ``X``."""
        key = self.inputs[name]
        return X if key is None else X[key]

    def placed(self, X: Any) -> Any:
        """``X`` with each table's ids replaced by their rows in storage (the server's view
        of the tables: evaluation on rank 0 reads them so)."""
        if any(k is None for k in self.inputs.values()):
            name = self.names[0]
            return self.placement[name].position(X)
        out = {k: v for k, v in X.items()}
        for name, key in self.inputs.items():
            out[key] = self.placement[name].position(X[key])
        return type(X)(out) if not isinstance(X, dict) else out

    def place(self, weights: np.ndarray) -> None:
        """Move each table in flat buffer ``weights`` from id order to storage order in place
        (one table's rows at a time of scratch)."""
        for name, table in self.views(weights).items():
            table[...] = self.placement[name].to_storage(table)

    def to_storage(self, params: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """A dict of parameters with each table in storage order (placement)."""
        return {n: self.placement[n].to_storage(v) if n in self.placement else v
                for n, v in params.items()}

    def from_storage(self, params: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """A dict of parameters with each stored table back in id order."""
        return {n: self.placement[n].from_storage(v) if n in self.placement else v
                for n, v in params.items()}

    def describe(self) -> List[Dict[str, Any]]:
        return [{"name": n, "rows": self.rows[n], "dim": self.dims[n], "input": self.inputs[n]}
                for n in self.names]


def dense_first(params: Mapping[str, V], sparse_names: Container[str]) -> Dict[str, V]:
    """``params`` reordered with the row-sparse tables last (see SparseTables)."""
    return {**{n: v for n, v in params.items() if n not in sparse_names},
            **{n: v for n, v in params.items() if n in sparse_names}}


def _ids_per_sample(X: Any, inputs: Mapping[str, Optional[str]]) -> Dict[str, int]:
    out = {}
    for name, key in inputs.items():
        ids = X if key is None else X[key]
        shape = np.shape(ids)
        out[name] = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    return out


def sparse_tables(model: Any, layout: ParamLayout, X: Any, batch_size: int,
                  n_servers: int = 1) -> Optional[SparseTables]:
    """The run's SparseTables, or None when the model has no row-sparse table."""
    inputs: Mapping[str, Optional[str]] = getattr(model, "embedding_inputs", lambda: {})()
    if not inputs:
        return None
    unknown = [n for n in inputs if n not in layout.shapes]
    if unknown:
        raise ValueError(f"embedding_inputs() names {unknown}, which are not parameters of "
                         "the model")
    return SparseTables(layout, dict(inputs), _ids_per_sample(X, inputs), batch_size, n_servers)
