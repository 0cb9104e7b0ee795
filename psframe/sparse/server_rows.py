"""ServerRows: the server's end of the row-sparse exchange; the sparse optimizer's updates."""
from __future__ import annotations

from collections import Counter
from typing import (TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Mapping, Optional,
                    Sequence, Tuple)

import numpy as np

from ..errors import ProtocolError
from ..finite import frame_finite
from ..transport.parts import Landed, ServerPart
from ..transport.wire import Tag

if TYPE_CHECKING:
    from ..nn.optim import Optimizer
    from ..transport.links import Link
    from .tables import SparseTables

__all__ = ["ServerRows"]


class _Request:
    """One worker's landed ids: per table, the rows its push carries and those it pulls."""

    def __init__(self) -> None:
        self.push: Dict[str, np.ndarray] = {}
        self.want: Dict[str, np.ndarray] = {}


class ServerRows(ServerPart):
    """Lands each request's ids and pushed rows, updates the tables' touched rows with the
    optimizer's row method (Optimizer.apply_rows), and answers pulls with the rows asked for.

    The tables are views into the server's flat weights, so evaluation and the result hold
    them whole; this server updates its block of rows of each (``row_ranges``). The row
    state of an element-wise optimizer state (momentum, the moments, Adagrad's sum) is a
    view into the dense state's flat arrays too (no second copy). Both are checkpointed by
    rows (state_part), as lazy Adam's per-row step counts are.

    Rows travel as messages to and from a worker on the message path. Through a shared
    window (psframe.transport.links.SharedLink), a worker writes its pushed rows into its
    gradient segment and the server reads them there; the server writes a pull's rows into
    the worker's copy of the weights ("shared-copy"), or the worker gathers them straight
    from the server's tables ("shared-read"). Only the ids are messages then. Each server's
    rows lie in the segments at ``base`` (SparseTables.bases), a region of the tables' with
    room for the most rows a step can touch of its blocks, apart from the other servers'.
    """

    stats_key = "sparse"

    def __init__(self, tables: SparseTables, weights: np.ndarray, optimizer: Optimizer,
                 opt_state: Mapping[str, np.ndarray], links: Sequence[Link], index: int = 0,
                 on_arrival: Optional[float] = None) -> None:
        """``index``: this server's place among the servers (its block of each table's rows:
        tables.row_blocks[index]); ``links``: each worker's link, through which its ids and
        rows move. ``on_arrival``: the weight each push's rows are applied with as it
        arrives, whatever the dense policy decides (ps.Hybrid); None: they follow the dense
        policy's decisions."""
        self.links = list(links)
        self.on_arrival = on_arrival
        self.index = index
        self.tables = tables
        self.names = tables.names
        self.table = tables.views(weights)
        self.row_ranges = tables.row_blocks[index]
        self.capacity = tables.server_capacity(index)
        max_ids = sum(self.capacity.values())
        max_elems = tables.server_elems(index)
        self.optimizer = optimizer
        self.state: Dict[str, Dict[str, np.ndarray]] = {}
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
        n = len(self.links)
        t = len(self.names)
        self._ids = [np.zeros(2 * t + 2 * max_ids, np.int64) for _ in range(n)]
        self.modes = [link.name for link in self.links]
        base = tables.bases[index]
        self._rows: List[np.ndarray] = []
        self._out: List[Optional[np.ndarray]] = []
        for link in self.links:
            # Through the window the rows lie in the worker's segments: the gradient's for a
            # push, its copy of the weights for a pull ("shared-copy"; "shared-read" worker
            # gathers them from the tables itself).
            self._rows.append(np.zeros(max_elems, dtype) if link.moves_payload
                              else link.gradient[base:base + max_elems])
            self._out.append(np.zeros(max_elems, dtype) if link.moves_payload
                             else link.weights[base:base + max_elems]
                             if link.weights is not None else None)
        # Each worker's next ids (and pushed rows) always have a receive posted: a message
        # past MPICH's eager size would otherwise wait, and its push with it, until the
        # server had read the request's header. A worker has one request in flight and waits
        # for its reply, so the buffers are free again before it can send the next.
        self._ids_recv: List[Any] = [None] * n
        self._rows_recv: List[Any] = [None] * n
        self._expect: List[Optional[bool]] = [None] * n
        self._landed = [_Request() for _ in range(n)]
        self._acc = {name: np.zeros((min(self.capacity[name] * n,
                                         self.row_ranges[name][1] - self.row_ranges[name][0]),
                                     tables.dims[name]), dtype)
                     for name in self.names}
        self.version = 0  # updates applied to the tables
        self._pulled_at = [0] * n  # the table version each worker's rows came from
        self.staleness: Counter[int] = Counter()
        self.bytes_in = [0] * n
        self.bytes_out = [0] * n
        self.rows_in = 0
        self.rows_out = 0

    # -- landing ----------------------------------------------------------------------------
    def start(self, workers: Iterable[int]) -> None:
        """Post the first receives of ``workers``' ids and rows (before any can arrive)."""
        for w in workers:
            self._repost(w, rows=True)

    def _repost(self, worker: int, ids: bool = True, rows: bool = True) -> None:
        link = self.links[worker]
        if ids:
            self._ids_recv[worker] = link.post_array(self._ids[worker], Tag.SPARSE_IDS)
        if rows and link.moves_payload and self._rows_recv[worker] is None:
            self._rows_recv[worker] = link.post_array(self._rows[worker], Tag.SPARSE_ROWS)

    def announce(self, worker: int, push: bool) -> None:
        """Worker's request header is here: its ids (and, for a push, rows) are to land."""
        if self._expect[worker] is not None:
            raise ProtocolError(f"worker {worker} sent a request before its last one landed")
        if self._ids_recv[worker] is None:
            raise ProtocolError(f"worker {worker} sent a request after it finished")
        self._expect[worker] = push

    def close(self, worker: int) -> None:
        """Worker is done: its receives still posted are cancelled."""
        for recvs in (self._ids_recv, self._rows_recv):
            if recvs[worker] is not None:
                self.links[worker].channel.cancel([recvs[worker]])
                recvs[worker] = None

    def land(self, worker: int, push: Optional[bool] = None) -> Landed:
        """Wait for worker's ids (and rows) and check them. Returns (finite, bytes): finite
        False when the pushed rows are not (the push is then refused whole)."""
        push, self._expect[worker] = self._expect[worker], None
        if push is None:
            raise ProtocolError(f"no row-sparse request of worker {worker} was announced")
        channel = self.links[worker].channel
        ids = self._ids[worker]
        got = channel.wait_received(self._ids_recv[worker], ids.itemsize)
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
        if push and self.links[worker].moves_payload:  # through the window: in its segment
            landed = channel.wait_received(self._rows_recv[worker], 1)
            self._rows_recv[worker] = None  # posted again when its pull is answered (serve)
            if landed != elems * self._rows[worker].itemsize:
                raise ProtocolError(f"worker {worker} pushed rows that do not match its ids")
        self._repost(worker, rows=False)
        nbytes = got * ids.itemsize
        if push:
            nbytes += elems * self._rows[worker].itemsize
            self.rows_in += sum(len(r) for r in req.push.values())
        self.bytes_in[worker] += nbytes
        return (not push or frame_finite(self._rows[worker][:elems])), nbytes

    def _check_ids(self, worker: int, name: str, rows: np.ndarray) -> None:
        lo, hi = self.row_ranges[name]
        if len(rows) > self.capacity[name] or (
                len(rows) and (rows[0] < lo or rows[-1] >= hi
                               or (len(rows) > 1 and (np.diff(rows) <= 0).any()))):
            raise ProtocolError(f"worker {worker} sent {len(rows)} ids of table {name!r} that "
                                f"are not distinct sorted rows of this server's [{lo}, {hi})")

    def copy_rows(self, tables: Mapping[str, np.ndarray]) -> None:
        """This server's rows of ``tables`` (views of another flat buffer) into its own."""
        for name, (lo, hi) in self.row_ranges.items():
            self.table[name][lo:hi] = tables[name][lo:hi]

    def state_part(self) -> Dict[str, Any]:
        """This server's rows of the tables and of their optimizer state, for its checkpoint
        part (the servers' parts, joined in order, are the whole tables: each holds a block
        of every table, in order)."""
        out: Dict[str, Any] = {}
        for name, (lo, hi) in self.row_ranges.items():
            out[f"table.{name}"] = self.table[name][lo:hi]
            for key, value in self.state[name].items():
                if not key.startswith("_"):
                    out[f"rows.{name}.{key}"] = value[lo:hi]
        return out

    def restore(self, arrays: Dict[str, Any]) -> None:
        """This server's rows of the tables and their state from a checkpoint's arrays."""
        for name, (lo, hi) in self.row_ranges.items():
            self.table[name][lo:hi] = arrays[f"table.{name}"][lo:hi]
            for key, value in self.state[name].items():
                if not key.startswith("_"):
                    value[lo:hi] = arrays[f"rows.{name}.{key}"][lo:hi]

    def _pushed(self, worker: int) -> Iterator[Tuple[str, np.ndarray, np.ndarray]]:
        """(name, ids, (n, dim) rows) of worker's landed push."""
        req, flat, at = self._landed[worker], self._rows[worker], 0
        for name in self.names:
            ids = req.push[name]
            dim = self.tables.dims[name]
            yield name, ids, flat[at:at + len(ids) * dim].reshape(len(ids), dim)
            at += len(ids) * dim

    # -- updates ----------------------------------------------------------------------------
    def apply_mean(self, workers: Sequence[int], scale: float, weight: float) -> None:
        """One step with the sum of ``workers``' pushed rows (in worker order, so that it is
        reproducible bit for bit and equals the dense sum) times ``scale``; nothing when the
        rows are applied on arrival instead."""
        if not workers or self.on_arrival is not None:
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

    def apply_one(self, worker: int, weight: float, arrival: bool = False) -> None:
        """Worker's pushed rows alone, now, as ``weight`` of one optimizer step (under a
        dense decision, only when the rows follow the dense policy)."""
        if self.on_arrival is not None and not arrival:
            return
        for name, ids, rows in self._pushed(worker):
            self._apply(name, ids, rows, weight)
        self._updated([worker])

    def _apply(self, name: str, ids: np.ndarray, g: np.ndarray, weight: float) -> None:
        if len(ids):
            self.optimizer.apply_rows(self.state[name], self.table[name], ids, g, weight)

    def _updated(self, workers: Iterable[int]) -> None:
        for w in workers:
            self.staleness[self.version - self._pulled_at[w]] += 1
        self.version += 1

    # -- answers ----------------------------------------------------------------------------
    def accepted(self, worker: int) -> None:
        if self.on_arrival is not None:
            self.apply_one(worker, self.on_arrival, arrival=True)

    def serve(self, worker: int, sends: List[Any]) -> int:
        """Give worker the rows its pull asked for, as they are now: by message, into its copy
        of the weights, or (it reads them in place, after the reply) nothing to do but count
        them. The send to wait on goes in ``sends``; returns the bytes."""
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
        if self.links[worker].moves_payload:
            assert out is not None  # a link that moves payload has a buffer of its own
            sends.append(self.links[worker].send_array(out[:at], Tag.SPARSE_PULL))
        return nbytes

    def params(self) -> int:
        return self.tables.server_params(self.index)

    def snapshot_arrays(self, weights: np.ndarray) -> List[np.ndarray]:
        """Its block of each table's rows, in the tables' order."""
        tables = self.tables.views(weights)
        return [tables[name][a:b] for name, (a, b) in self.row_ranges.items()]

    def dense_range(self, start: int, stop: int) -> Tuple[int, int]:
        end = self.tables.dense_end  # the tables follow the dense weights; rows go by block
        return min(start, end), min(stop, end)

    def result_params(self, params: Dict[str, Any]) -> Dict[str, Any]:
        return self.tables.from_storage(params)

    def stats(self, others: Sequence[Any] = ()) -> Dict[str, Any]:
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
