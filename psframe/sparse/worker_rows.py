"""WorkerRows: a worker's end of the row-sparse exchange: ids out, touched rows both ways."""
from __future__ import annotations

import numpy as np

from ..transport.wire import Tag

__all__ = ["WorkerRows", "ids_message"]


def ids_message(out, names, push, want):
    """Fill ``out`` with one request's ids: the push's and the pull's row counts per table,
    then the push's ids, then the pull's (either BatchIds may be None: nothing). Returns the
    message's length."""
    t = len(names)
    pushed = push.counts(names) if push is not None else [0] * t
    wanted = want.counts(names) if want is not None else [0] * t
    out[:t], out[t:2 * t] = pushed, wanted
    at = 2 * t
    for batch, counts in ((push, pushed), (want, wanted)):
        for name, n in zip(names, counts):
            if n:
                out[at:at + n] = batch.unique[name]
                at += n
    return at


class WorkerRows:
    """Sends each request's ids (and a push's gradient rows), receives a pull's rows.

    The model computes on compact tables: views into the pulled rows, one per table, in the
    order of ``tables.names``; its gradients of them are the rows a push carries.
    """

    def __init__(self, channel, tables, server, dtype):
        self.channel = channel
        self.tables = tables
        self.server = server
        self.ids = np.zeros(2 * len(tables) + 2 * tables.max_ids, dtype=np.int64)
        self.push_rows = np.zeros(tables.max_elems, dtype=dtype)
        self.pull_rows = np.zeros(tables.max_elems, dtype=dtype)
        self.current = None  # BatchIds of the batch computed on the rows last pulled
        self.bytes_sent = self.bytes_received = 0

    def _split(self, flat, batch):
        """(name, (n, dim) view) of each table's rows of ``batch`` in ``flat``."""
        at = 0
        for name in self.tables.names:
            n, dim = len(batch.unique[name]), self.tables.dims[name]
            yield name, flat[at:at + n * dim].reshape(n, dim)
            at += n * dim

    def _elems(self, batch):
        return sum(len(batch.unique[n]) * self.tables.dims[n] for n in self.tables.names)

    def compact(self, params):
        """``params`` with each table replaced by the current batch's pulled rows."""
        out = dict(params)
        for name, rows in self._split(self.pull_rows, self.current):
            out[name] = rows.reshape((len(rows),) + self.tables.layout.shapes[name][1:])
        return out

    def pack(self, grads):
        """Each table's gradient (of the compact table) into the push's rows buffer."""
        for name, rows in self._split(self.push_rows, self.current):
            g = grads[name]
            if np.shape(g)[0] != len(rows):
                raise ValueError(f"gradient {name!r} has {np.shape(g)[0]} rows, but the batch "
                                 f"touches {len(rows)} rows of the table")
            rows[:] = np.asarray(g).reshape(rows.shape)

    def post_pull(self, want):
        """The receive of the rows of ``want`` (BatchIds), posted before they are asked for."""
        n = self._elems(want)
        self.bytes_received += n * self.pull_rows.itemsize
        return self.channel.comm.Irecv(self.pull_rows[:n], self.server, Tag.SPARSE_PULL)

    def send(self, push, want):
        """The request's ids (and the rows of ``push``); the sends to wait on."""
        n = ids_message(self.ids, self.tables.names, push, want)
        sends = [self.channel.comm.Isend(self.ids[:n], self.server, Tag.SPARSE_IDS)]
        self.bytes_sent += n * self.ids.itemsize
        if push is not None:
            m = self._elems(push)
            sends.append(self.channel.comm.Isend(self.push_rows[:m], self.server,
                                                 Tag.SPARSE_ROWS))
            self.bytes_sent += m * self.push_rows.itemsize
        return sends
