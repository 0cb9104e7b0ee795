"""WorkerRows: a worker's end of the row-sparse exchange: ids out, touched rows both ways."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..finite import frame_finite
from ..transport.parts import WorkerPart
from ..transport.wire import Tag
from .batch import BatchIds, batch_ids

if TYPE_CHECKING:
    from ..transport.links import Link
    from .tables import SparseTables

__all__ = ["WorkerRows", "ids_message"]


def ids_message(out: np.ndarray, names: Sequence[str], push: Optional[Mapping[str, np.ndarray]],
                want: Optional[Mapping[str, np.ndarray]]) -> int:
    """Fill ``out`` with one request's ids: the push's and the pull's row counts per table,
    then the push's ids, then the pull's; ``push`` and ``want`` map each name to an ids array
    (either may be None: nothing). Returns the message's length."""
    t = len(names)
    pushed = [len(push[n]) for n in names] if push is not None else [0] * t
    wanted = [len(want[n]) for n in names] if want is not None else [0] * t
    out[:t], out[t:2 * t] = pushed, wanted
    at = 2 * t
    for ids, counts in ((push, pushed), (want, wanted)):
        for name, n in zip(names, counts):
            if n:
                assert ids is not None  # a count is nonzero only where ids were given
                out[at:at + n] = ids[name]
                at += n
    return at


class _Server:
    """Server s's share of the exchange: its block of each table's rows, and its buffers
    (one message each way per request, whatever the number of tables; through a shared
    window, the rows lie in the segments at its base, SparseTables.bases)."""

    def __init__(self, link: Link, s: int, tables: SparseTables, dtype: np.dtype) -> None:
        self.link = link
        self.row_ranges = tables.row_blocks[s]  # name -> (first row, end row) it holds
        self.ids = np.zeros(2 * len(tables) + 2 * sum(tables.server_capacity(s).values()),
                            dtype=np.int64)
        self.mode = link.name
        room, base = tables.server_elems(s), tables.bases[s]
        if link.moves_payload:
            self.push_rows, self.pull_rows = np.zeros(room, dtype), np.zeros(room, dtype)
            return
        self.push_rows = link.gradient[base:base + room]
        self.tables = tables.views(link.weights)  # the server's own, read in place
        self.pull_rows = (link.weights[base:base + room] if self.mode == "shared-copy"
                          else np.zeros(room, dtype))


class WorkerRows(WorkerPart):
    """Sends each request's ids (and a push's gradient rows) to the servers holding those
    rows, and receives a pull's rows from them.

    The model computes on compact tables, one per table: its batch's distinct rows in id
    order (views into the one server's reply; with several servers, their replies side by
    side), and its gradients of them are the rows a push carries.
    """

    def __init__(self, tables: SparseTables, dtype: np.dtype, links: Sequence[Link]) -> None:
        """``links``: the link to each server, in order."""
        self.tables = tables
        self.names = tables.names
        self.servers = [_Server(link, s, tables, dtype) for s, link in enumerate(links)]
        self._compact = {n: np.zeros((tables.capacity[n], tables.dims[n]), dtype)
                         for n in self.names}
        # BatchIds of the batch computed on the rows last pulled
        self.current: Optional[BatchIds] = None
        # BatchIds of the batch gathered ahead: the rows its pull asks for
        self.want: Optional[BatchIds] = None

    # -- the part's hooks (psframe.transport.parts.WorkerPart) ------------------------------
    def batch(self, X: Any) -> Any:
        """The model sees ids into the compact tables; the pull asks for this batch's rows."""
        self.want = batch_ids(self.tables, X)
        return self.want.X

    def params(self, params: Dict[str, Any]) -> Dict[str, Any]:
        return self.compact(params)

    def packs(self, name: str) -> bool:
        return name in self.tables.inputs

    def finite(self) -> bool:
        return self.push_finite()

    def _split(self, batch: BatchIds) -> List[Dict[str, Tuple[int, int]]]:
        """Per server: {name: (a, b)}, its slice of each table's distinct ids in ``batch``
        (computed once per batch, kept with it)."""
        if batch.split is None:
            parts: List[Dict[str, Tuple[int, int]]] = [{} for _ in self.servers]
            for name in self.names:
                ids = batch.unique[name]
                for part, server in zip(parts, self.servers):
                    lo, hi = server.row_ranges[name]
                    part[name] = (int(np.searchsorted(ids, lo)), int(np.searchsorted(ids, hi)))
            batch.split = parts
        return batch.split

    def _ids_for(self, batch: Optional[BatchIds], s: int) -> Optional[Dict[str, np.ndarray]]:
        if batch is None:
            return None
        return {n: batch.unique[n][a:b] for n, (a, b) in self._split(batch)[s].items()}

    def _blocks(self, batch: BatchIds, s: int,
                flat: np.ndarray) -> Iterator[Tuple[str, Tuple[int, int], np.ndarray]]:
        """(name, (a, b), (b - a, dim) view) of server s's rows of ``batch`` in ``flat``."""
        at = 0
        for name, (a, b) in self._split(batch)[s].items():
            dim = self.tables.dims[name]
            yield name, (a, b), flat[at:at + (b - a) * dim].reshape(b - a, dim)
            at += (b - a) * dim

    def compact(self, params: Mapping[str, Any]) -> Dict[str, Any]:
        """``params`` with each table replaced by the current batch's pulled rows."""
        assert self.current is not None  # a pull has landed (landed)
        out = dict(params)
        shape = self.tables.layout.shapes
        if len(self.servers) == 1:
            for name, _, rows in self._blocks(self.current, 0, self.servers[0].pull_rows):
                out[name] = rows.reshape((len(rows),) + shape[name][1:])
            return out
        for name in self.names:
            n = len(self.current.unique[name])
            out[name] = self._compact[name][:n].reshape((n,) + shape[name][1:])
        for s, server in enumerate(self.servers):
            for name, (a, b), rows in self._blocks(self.current, s, server.pull_rows):
                self._compact[name][a:b] = rows
        return out

    def pack(self, grads: Dict[str, Any]) -> None:
        """Each table's gradient (of the compact table) into each server's push buffer."""
        assert self.current is not None  # computed on the rows of a landed pull
        for name in self.names:
            n = len(self.current.unique[name])
            if np.shape(grads[name])[0] != n:
                raise ValueError(f"gradient {name!r} has {np.shape(grads[name])[0]} rows, but "
                                 f"the batch touches {n} rows of the table")
        for s, server in enumerate(self.servers):
            for name, (a, b), rows in self._blocks(self.current, s, server.push_rows):
                rows[:] = np.asarray(grads[name]).reshape(-1, rows.shape[1])[a:b]

    def push_finite(self) -> bool:
        """Whether every pushed row is finite (several servers must refuse a push alike)."""
        assert self.current is not None  # computed on the rows of a landed pull
        return all(frame_finite(server.push_rows[:self._elems(self.current, s)])
                   for s, server in enumerate(self.servers))

    def _elems(self, batch: BatchIds, s: int) -> int:
        return sum((b - a) * self.tables.dims[n] for n, (a, b) in self._split(batch)[s].items())

    def post_pull(self, s: int) -> List[Any]:
        """Server s's reply of the rows of the batch gathered ahead, posted before it is
        asked; nothing where they come through the shared window."""
        server = self.servers[s]
        if not server.link.moves_payload:
            return []
        assert self.want is not None  # the batch gathered ahead (batch)
        n = self._elems(self.want, s)
        return [server.link.post_array(server.pull_rows[:n], Tag.SPARSE_PULL)]

    def landed(self) -> None:
        """After the replies: the rows read in place from the servers' tables (a lockstep
        policy's "shared-read": no update runs until this worker pushes again); the next
        compute runs on these rows."""
        want = self.want
        for s, server in enumerate(self.servers):
            if server.mode == "shared-read":
                assert want is not None  # the batch gathered ahead (batch)
                for name, (a, b), rows in self._blocks(want, s, server.pull_rows):
                    np.take(server.tables[name], want.unique[name][a:b], axis=0, out=rows)
        self.current = want

    def send(self, s: int, push: bool, pull: bool) -> List[Any]:
        """Server s's share of the request: its ids (the rows computed on, with ``push``, and
        with ``pull`` the next batch's) and its rows of the push; the sends."""
        server = self.servers[s]
        pushed = self.current if push else None
        n = ids_message(server.ids, self.names, self._ids_for(pushed, s),
                        self._ids_for(self.want if pull else None, s))
        sends = [server.link.send_array(server.ids[:n], Tag.SPARSE_IDS)]
        if pushed is not None and server.link.moves_payload:
            m = self._elems(pushed, s)
            sends.append(server.link.send_array(server.push_rows[:m], Tag.SPARSE_ROWS))
        return sends
