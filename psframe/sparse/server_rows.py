"""ServerRows: the server's end of the row-sparse exchange; the sparse optimizer's updates."""
from __future__ import annotations

from collections import Counter

import numpy as np

from ..errors import ProtocolError
from ..finite import frame_finite
from ..transport.wire import Tag

__all__ = ["ServerRows"]


class _Request:
    """One worker's landed ids: per table, the rows its push carries and those it pulls."""

    def __init__(self):
        self.push = {}
        self.want = {}


class ServerRows:
    """Lands each request's ids and pushed rows, updates the tables' touched rows with the
    optimizer's row method (Optimizer.apply_rows), and answers pulls with the rows asked for.

    The tables are views into the server's flat weights, so evaluation and the result hold
    them whole; this server updates its block of rows of each (``row_ranges``). The row
    state of an element-wise optimizer state (momentum, the moments, Adagrad's sum) is a
    view into the dense state's flat arrays too (no second copy). Both are checkpointed by
    rows (state_part), as lazy Adam's per-row step counts are.

    Rows travel as messages to and from a worker on the message path. Through a shared
    window (psframe.transport.paths.SharedPath), a worker writes its pushed rows into its
    gradient segment and the server reads them there; the server writes a pull's rows into
    the worker's copy of the weights ("shared-copy"), or the worker gathers them straight
    from the server's tables ("shared-read"). Only the ids are messages then. Each server's
    rows lie in the segments at ``base`` (SparseTables.bases), a region of the tables' with
    room for the most rows a step can touch of its blocks, apart from the other servers'.
    """

    def __init__(self, comm, tables, weights, optimizer, opt_state, worker_ranks, index=0,
                 paths=None):
        """``index``: this server's place among the servers (its block of each table's rows:
        tables.row_blocks[index]); ``paths``: each worker's PayloadPath (default: messages)."""
        self.comm = comm
        self.tables = tables
        self.names = tables.names
        self.table = tables.views(weights)
        self.row_ranges = tables.row_blocks[index]
        self.capacity = tables.server_capacity(index)
        max_ids = sum(self.capacity.values())
        max_elems = tables.server_elems(index)
        self.optimizer = optimizer
        self.state = {}
        dtype = weights.dtype
        for name in self.names:
            rows, dim = tables.rows[name], tables.dims[name]
            state = optimizer.init_rows_state(rows, dim, dtype)
            for key, value in state.items():
                flat = opt_state.get(key)
                if (not key.startswith("_") and flat is not None and flat.shape == weights.shape
                        and value.shape == (rows, dim)):
                    off = tables.offsets[name]
                    state[key] = flat[off:off + rows * dim].reshape(rows, dim)
            self.state[name] = state
        self.workers = list(worker_ranks)
        n = len(self.workers)
        t = len(self.names)
        self._ids = [np.zeros(2 * t + 2 * max_ids, np.int64) for _ in range(n)]
        self.modes = [getattr(p, "name", "mpi") for p in paths] if paths else ["mpi"] * n
        base = tables.bases[index]
        self._rows, self._out = [], []
        for w, mode in enumerate(self.modes):
            shared = mode != "mpi"
            self._rows.append(paths[w].gradient[base:base + max_elems] if shared
                              else np.zeros(max_elems, dtype))
            self._out.append(paths[w].weights[base:base + max_elems] if mode == "shared-copy"
                             else np.zeros(max_elems, dtype) if mode == "mpi" else None)
        # Each worker's next ids (and pushed rows) always have a receive posted: a message
        # past MPICH's eager size would otherwise wait, and its push with it, until the
        # server had read the request's header. A worker has one request in flight and waits
        # for its reply, so the buffers are free again before it can send the next.
        self._ids_recv = [None] * n
        self._rows_recv = [None] * n
        self._expect = [None] * n
        self._landed = [_Request() for _ in range(n)]
        self._acc = {name: np.zeros((min(self.capacity[name] * n,
                                         self.row_ranges[name][1] - self.row_ranges[name][0]),
                                     tables.dims[name]), dtype)
                     for name in self.names}
        self.version = 0  # updates applied to the tables
        self._pulled_at = [0] * n  # the table version each worker's rows came from
        self.staleness = Counter()
        self.bytes_in = [0] * n
        self.bytes_out = [0] * n
        self.rows_in = 0
        self.rows_out = 0

    # -- landing ----------------------------------------------------------------------------
    def start(self, workers):
        """Post the first receives of ``workers``' ids and rows (before any can arrive)."""
        from mpi4py import MPI  # here: importing psframe must not start MPI

        self._status, self._int64, self._byte = MPI.Status(), MPI.INT64_T, MPI.BYTE
        for w in workers:
            self._repost(w, rows=True)

    def _repost(self, worker, ids=True, rows=True):
        rank = self.workers[worker]
        if ids:
            self._ids_recv[worker] = self.comm.Irecv(self._ids[worker], rank, Tag.SPARSE_IDS)
        if rows and self.modes[worker] == "mpi" and self._rows_recv[worker] is None:
            self._rows_recv[worker] = self.comm.Irecv(self._rows[worker], rank, Tag.SPARSE_ROWS)

    def post(self, worker, push):
        """Worker's request header is here: its ids (and, for a push, rows) are to land."""
        if self._expect[worker] is not None:
            raise ProtocolError(f"worker {worker} sent a request before its last one landed")
        if self._ids_recv[worker] is None:
            raise ProtocolError(f"worker {worker} sent a request after it finished")
        self._expect[worker] = push

    def close(self, worker):
        """Worker is done: its receives still posted are cancelled."""
        for recvs in (self._ids_recv, self._rows_recv):
            if recvs[worker] is not None:
                recvs[worker].Cancel()
                recvs[worker].Wait()
                recvs[worker] = None

    def land(self, worker):
        """Wait for worker's ids (and rows) and check them. Returns (finite, bytes): finite
        False when the pushed rows are not (the push is then refused whole)."""
        push, self._expect[worker] = self._expect[worker], None
        if push is None:
            raise ProtocolError(f"no row-sparse request of worker {worker} was announced")
        status = self._status
        self._ids_recv[worker].Wait(status)
        got = status.Get_count(self._int64)
        ids = self._ids[worker]
        t = len(self.names)
        counts = ids[:2 * t]
        if got < 2 * t or got != 2 * t + int(counts.sum()) or (counts < 0).any():
            raise ProtocolError(f"worker {worker} sent a malformed ids message ({got} ids)")
        req = self._landed[worker]
        at = 2 * t
        elems = 0
        for which, part in ((req.push, counts[:t]), (req.want, counts[t:])):
            for name, n in zip(self.names, part.tolist()):
                rows = ids[at:at + n]
                at += n
                self._check_ids(worker, name, rows)
                which[name] = rows.copy()  # the buffer takes the next request's ids
                if which is req.push:
                    elems += n * self.tables.dims[name]
        if push and self.modes[worker] == "mpi":  # through the window: in its segment
            self._rows_recv[worker].Wait(status)
            self._rows_recv[worker] = None  # posted again when its pull is answered (serve)
            if status.Get_count(self._byte) != elems * self._rows[worker].itemsize:
                raise ProtocolError(f"worker {worker} pushed rows that do not match its ids")
        self._repost(worker, rows=False)
        nbytes = got * ids.itemsize
        if push:
            nbytes += elems * self._rows[worker].itemsize
            self.rows_in += sum(len(r) for r in req.push.values())
        self.bytes_in[worker] += nbytes
        return (not push or frame_finite(self._rows[worker][:elems])), nbytes

    def _check_ids(self, worker, name, rows):
        lo, hi = self.row_ranges[name]
        if len(rows) > self.capacity[name] or (
                len(rows) and (rows[0] < lo or rows[-1] >= hi
                               or (len(rows) > 1 and (np.diff(rows) <= 0).any()))):
            raise ProtocolError(f"worker {worker} sent {len(rows)} ids of table {name!r} that "
                                f"are not distinct sorted rows of this server's [{lo}, {hi})")

    def copy_rows(self, tables):
        """This server's rows of ``tables`` (views of another flat buffer) into its own."""
        for name, (lo, hi) in self.row_ranges.items():
            self.table[name][lo:hi] = tables[name][lo:hi]

    def state_part(self):
        """This server's rows of the tables and of their optimizer state, for its checkpoint
        part (the servers' parts, joined in order, are the whole tables: each holds a block
        of every table, in order)."""
        out = {}
        for name, (lo, hi) in self.row_ranges.items():
            out[f"table.{name}"] = self.table[name][lo:hi]
            for key, value in self.state[name].items():
                if not key.startswith("_"):
                    out[f"rows.{name}.{key}"] = value[lo:hi]
        return out

    def restore(self, arrays):
        """This server's rows of the tables and their state from a checkpoint's arrays."""
        for name, (lo, hi) in self.row_ranges.items():
            self.table[name][lo:hi] = arrays[f"table.{name}"][lo:hi]
            for key, value in self.state[name].items():
                if not key.startswith("_"):
                    value[lo:hi] = arrays[f"rows.{name}.{key}"][lo:hi]

    def _pushed(self, worker):
        """(name, ids, (n, dim) rows) of worker's landed push."""
        req, flat, at = self._landed[worker], self._rows[worker], 0
        for name in self.names:
            ids = req.push[name]
            dim = self.tables.dims[name]
            yield name, ids, flat[at:at + len(ids) * dim].reshape(len(ids), dim)
            at += len(ids) * dim

    # -- updates ----------------------------------------------------------------------------
    def apply_mean(self, workers, scale, weight):
        """One step with the sum of ``workers``' pushed rows (in worker order, so that it is
        reproducible bit for bit and equals the dense sum) times ``scale``."""
        if not workers:
            return
        if len(workers) == 1:
            for name, ids, rows in self._pushed(workers[0]):
                if scale != 1.0:
                    rows = np.multiply(rows, scale, out=self._acc[name][:len(ids)])
                self._apply(name, ids, rows, weight)
        else:
            pushed = [list(self._pushed(w)) for w in workers]
            for t, name in enumerate(self.names):
                ids = np.unique(np.concatenate([p[t][1] for p in pushed]))
                acc = self._acc[name][:len(ids)]
                acc[:] = 0
                for p in pushed:
                    acc[np.searchsorted(ids, p[t][1])] += p[t][2]  # distinct ids per worker
                acc *= scale
                self._apply(name, ids, acc, weight)
        self._updated(workers)

    def apply_one(self, worker, weight):
        """Worker's pushed rows alone, now, as ``weight`` of one optimizer step."""
        for name, ids, rows in self._pushed(worker):
            self._apply(name, ids, rows, weight)
        self._updated([worker])

    def _apply(self, name, ids, g, weight):
        if len(ids):
            self.optimizer.apply_rows(self.state[name], self.table[name], ids, g, weight)

    def _updated(self, workers):
        for w in workers:
            self.staleness[self.version - self._pulled_at[w]] += 1
        self.version += 1

    # -- answers ----------------------------------------------------------------------------
    def serve(self, worker):
        """Give worker the rows its pull asked for, as they are now: by message, into its copy
        of the weights, or (it reads them in place, after the reply) nothing to do but count
        them. Returns (the send to wait on or None, bytes)."""
        out, at = self._out[worker], 0
        for name in self.names:
            ids = self._landed[worker].want[name]
            n = len(ids) * self.tables.dims[name]
            if out is not None:
                np.take(self.table[name], ids, axis=0,
                        out=out[at:at + n].reshape(len(ids), self.tables.dims[name]))
            at += n
            self.rows_out += len(ids)
        self._pulled_at[worker] = self.version
        nbytes = at * self.table[self.names[0]].itemsize
        self.bytes_out[worker] += nbytes
        # Its last push's rows are used (a pull is answered only after): the buffer is free.
        self._repost(worker, ids=False)
        if self.modes[worker] != "mpi":
            return None, nbytes
        return self.comm.Isend(out[:at], self.workers[worker], Tag.SPARSE_PULL), nbytes

    def stats(self, others=()):
        """The exchange's counts (with ``others``: the other servers' stats, summed in)."""
        mine = {"rows_pushed": self.rows_in, "rows_pulled": self.rows_out,
                "bytes_pushed": sum(self.bytes_in), "bytes_pulled": sum(self.bytes_out)}
        out = {"tables": self.tables.describe(), **mine, "updates": self.version,
               "staleness": dict(sorted(self.staleness.items())),
               "worker_paths": list(self.modes)}
        servers = [mine] + [o for o in others if o]
        if len(servers) > 1:  # each server's rows: the partition's load
            for key in mine:
                out[key] = sum(o[key] for o in servers)
            out["servers"] = [{k: o[k] for k in mine} for o in servers]
        return out
