"""WorkerRows: a worker's end of the row-sparse exchange: ids out, touched rows both ways."""
from __future__ import annotations

import numpy as np

from ..finite import frame_finite
from ..transport.wire import Tag

__all__ = ["WorkerRows", "ids_message"]


def ids_message(out, names, push, want):
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
                out[at:at + n] = ids[name]
                at += n
    return at


class _Server:
    """Server s's share of the exchange: its block of each table's rows, and its buffers
    (one message each way per request, whatever the number of tables; through a shared
    window, the rows lie in the segments at its base, SparseTables.bases)."""

    def __init__(self, rank, s, tables, dtype, path=None):
        self.rank = rank
        self.row_ranges = tables.row_blocks[s]  # name -> (first row, end row) it holds
        self.ids = np.zeros(2 * len(tables) + 2 * sum(tables.server_capacity(s).values()),
                            dtype=np.int64)
        self.mode = getattr(path, "name", "mpi")
        room, base = tables.server_elems(s), tables.bases[s]
        if self.mode == "mpi":
            self.push_rows, self.pull_rows = np.zeros(room, dtype), np.zeros(room, dtype)
            return
        self.push_rows = path.gradient[base:base + room]
        self.tables = tables.views(path.weights)  # the server's own, read in place
        self.pull_rows = (path.weights[base:base + room] if self.mode == "shared-copy"
                          else np.zeros(room, dtype))


class WorkerRows:
    """Sends each request's ids (and a push's gradient rows) to the servers holding those
    rows, and receives a pull's rows from them.

    The model computes on compact tables, one per table: its batch's distinct rows in id
    order (views into the one server's reply; with several servers, their replies side by
    side), and its gradients of them are the rows a push carries.
    """

    def __init__(self, channel, tables, ranks, dtype, paths=None):
        """``ranks``: every server's rank, in order; ``paths``: the PayloadPath to each
        (default: messages)."""
        self.channel = channel
        self.tables = tables
        self.names = tables.names
        paths = paths or [None] * len(ranks)
        self.servers = [_Server(rank, s, tables, dtype, path)
                        for s, (rank, path) in enumerate(zip(ranks, paths))]
        self._compact = {n: np.zeros((tables.capacity[n], tables.dims[n]), dtype)
                         for n in self.names}
        self.current = None  # BatchIds of the batch computed on the rows last pulled

    def _split(self, batch):
        """Per server: {name: (a, b)}, its slice of each table's distinct ids in ``batch``
        (computed once per batch, kept with it)."""
        if batch.split is None:
            parts = [{} for _ in self.servers]
            for name in self.names:
                ids = batch.unique[name]
                for part, server in zip(parts, self.servers):
                    lo, hi = server.row_ranges[name]
                    part[name] = (int(np.searchsorted(ids, lo)), int(np.searchsorted(ids, hi)))
            batch.split = parts
        return batch.split

    def _ids_for(self, batch, s):
        if batch is None:
            return None
        return {n: batch.unique[n][a:b] for n, (a, b) in self._split(batch)[s].items()}

    def _blocks(self, batch, s, flat):
        """(name, (a, b), (b - a, dim) view) of server s's rows of ``batch`` in ``flat``."""
        at = 0
        for name, (a, b) in self._split(batch)[s].items():
            dim = self.tables.dims[name]
            yield name, (a, b), flat[at:at + (b - a) * dim].reshape(b - a, dim)
            at += (b - a) * dim

    def compact(self, params):
        """``params`` with each table replaced by the current batch's pulled rows."""
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

    def pack(self, grads):
        """Each table's gradient (of the compact table) into each server's push buffer."""
        for name in self.names:
            n = len(self.current.unique[name])
            if np.shape(grads[name])[0] != n:
                raise ValueError(f"gradient {name!r} has {np.shape(grads[name])[0]} rows, but "
                                 f"the batch touches {n} rows of the table")
        for s, server in enumerate(self.servers):
            for name, (a, b), rows in self._blocks(self.current, s, server.push_rows):
                rows[:] = np.asarray(grads[name]).reshape(-1, rows.shape[1])[a:b]

    def push_finite(self):
        """Whether every pushed row is finite (several servers must refuse a push alike)."""
        return all(frame_finite(server.push_rows[:self._elems(self.current, s)])
                   for s, server in enumerate(self.servers))

    def _elems(self, batch, s):
        return sum((b - a) * self.tables.dims[n] for n, (a, b) in self._split(batch)[s].items())

    def post_pull(self, want, s):
        """Server s's reply of the rows of ``want`` (BatchIds), posted before it is asked;
        None where they come through the shared window."""
        server = self.servers[s]
        if server.mode != "mpi":
            return None
        n = self._elems(want, s)
        return self.channel.comm.Irecv(server.pull_rows[:n], server.rank, Tag.SPARSE_PULL)

    def landed(self, want):
        """After the replies: the rows read in place from the servers' tables (a lockstep
        policy's "shared-read": no update runs until this worker pushes again)."""
        for s, server in enumerate(self.servers):
            if server.mode == "shared-read":
                for name, (a, b), rows in self._blocks(want, s, server.pull_rows):
                    np.take(server.tables[name], want.unique[name][a:b], axis=0, out=rows)

    def send(self, push, want, s):
        """Server s's share of the request: its ids (and its rows of ``push``); the sends."""
        server = self.servers[s]
        n = ids_message(server.ids, self.names, self._ids_for(push, s), self._ids_for(want, s))
        sends = [self.channel.comm.Isend(server.ids[:n], server.rank, Tag.SPARSE_IDS)]
        if push is not None and server.mode == "mpi":
            m = self._elems(push, s)
            sends.append(self.channel.comm.Isend(server.push_rows[:m], server.rank,
                                                 Tag.SPARSE_ROWS))
        return sends
