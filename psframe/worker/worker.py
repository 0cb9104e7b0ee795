"""Data-parallel worker loop: pull the weights, compute a gradient on a batch, push it back."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..metrics import Stopwatch
from ..transport import (Channel, Field, Flag, Landing, Op, Status, Tag, fill_header,
                         new_header, open_worker_links)
from ..transport.parts import WorkerPart
from ..transport.topology import node_local_index
from ..params import overlap
from ..finite import frame_finite
from ..data import Features
from ..sparse.worker_rows import WorkerRows

if TYPE_CHECKING:
    from ..params import ParamLayout
    from ..sparse.tables import SparseTables

__all__ = ["Worker"]


def _nothing() -> None:
    return None

_NOT_YET = object()  # the worker's data has not been offered to the device yet


def _like(X: Any, n: int, empty: Callable[..., Any]) -> Any:
    """An uninitialised batch of ``n`` rows shaped like X's. For several inputs (Features) a
    plain dict of one buffer per input: a model reads a batch by key only, and the row-sparse
    path (psframe.sparse.batch_ids) copies it as a dict to swap in remapped ids."""
    if isinstance(X, Features):
        return {name: empty((n,) + a.shape[1:], a.dtype) for name, a in X.items()}
    return empty((n,) + X.shape[1:], X.dtype)


class Worker:
    """One worker of a data-parallel run; ``index`` is its 0-based place among the workers."""

    def __init__(self, channel: Any, servers: Union[int, Sequence[Tuple[int, Tuple[int, int]]]],
                 index: int, layout: ParamLayout, model: Any, backend: Any, X: Any, y: Any,
                 schedule: Any, steps: Optional[int], delay: float = 0.0, start_step: int = 0,
                 transport: str = "mpi", reads_in_place: bool = False,
                 layer_shards: Optional[Sequence[Tuple[int, int]]] = None,
                 sparse: Optional[SparseTables] = None) -> None:
        """``channel``: a psframe.transport.Channel (or a communicator, wrapped in one).
        ``servers``: the server's rank, or (rank, shard range) of every server, the first
        being rank 0's: each step pushes to and pulls from all of them at once.
        ``schedule`` maps a step to rows (static data), or a BatchDispatcher maps the batch
        each pull reply assigns to rows (dynamic dispatch; ``steps`` is then None).

        ``transport="auto"``: on the server's node, gradients and weights go through a shared
        window (psframe.transport.shm), only headers as messages; ``reads_in_place``: read the
        weights straight from the server's segment, which is safe only when no update can
        run while a worker computes (a lockstep policy).

        ``sparse``: the run's row-sparse tables (psframe.sparse.SparseTables): each pull asks
        for the rows its batch touches, each push carries those rows' gradients, and the
        dense shards move as before."""
        if not isinstance(channel, Channel):
            channel = Channel(channel, layout)
        self.channel = channel
        if isinstance(servers, (int, np.integer)):
            servers = [(int(servers), (0, layout.n_shards))]
        self.servers = [(int(r), tuple(shards)) for r, shards in servers]
        self.server = self.servers[0][0]  # rank 0's: its reply carries the status and batch
        self.shards = (0, layout.n_shards)  # what it pulls and pushes (a stage: its layers')
        # Layer-wise overlap: each layer's shard range, forward order; pushes go last layer first.
        self.layer_shards = layer_shards
        self.index = index
        self.layout = layout
        self.model = model
        # bind may hand back another backend ("auto" whose GPU failed its check: NumPy).
        self.backend = backend.bind(node_local_index(channel.comm, [r for r, _ in self.servers]))
        self._device = self.backend.name != "numpy"
        self.X, self.y = X, y
        self.schedule = schedule
        self.steps = steps
        self.delay = float(delay)
        self.start_step = int(start_step)  # > 0 when resuming from a checkpoint
        self.interrupted = False
        self._stop_requested = False
        self._open_window(transport, reads_in_place)
        self.params = layout.views(self._weights_dev)
        self.grad_views = layout.views(self.grad)
        self._data: Any = _NOT_YET  # (X, y) on the device once the first batch asks for them
        self.version = 0
        self.batch = -1
        self._request = new_header()
        self._replies = [new_header() for _ in self.servers]
        self._reply = self._replies[0]
        # The worker checks each push whole where a server cannot do it before using it:
        # several servers must agree on whether a push is usable, and a server applies a
        # push by message frame by frame as it lands (Flag.FINITE).
        self._check_finite = len(self.servers) > 1 or any(link.streams for link in self.links)
        self._batches: Dict[Any, Any] = {}  # batch size -> preallocated (X, y) buffers
        self.waiting, self.computing, self.pushing = Stopwatch(), Stopwatch(), Stopwatch()
        self.heartbeat = _nothing  # set by the run (psframe.training.watchdog)
        # What it waits for, as (what, rank): set on every wait, put in words only when the
        # watchdog asks (no string formatting per step).
        self._waiting: Tuple[str, Optional[int]] = ("computing", None)
        self._parts_of: Dict[Tuple[int, int], list] = {}  # shard range -> _parts(range)
        # The payload parts besides the dense frames (psframe.transport.parts): the
        # row-sparse tables' rows, when the model has some.
        self.parts: List[WorkerPart] = []
        if sparse is not None:
            self.parts.append(WorkerRows(sparse, layout.dtype, self.links))
            self.shards = sparse.dense_shards
        self._every_server = any(p.every_server for p in self.parts)
        self._parts_posted: List[Any] = []  # the parts' receives of the pull in flight

    def _open_window(self, transport: str, reads_in_place: bool) -> None:
        """The link to each server, with the gradient and weight buffers they share
        (see psframe.transport.links.open_worker_links)."""
        self.window, self.links, self._weights_dev = open_worker_links(
            self.channel, self.layout, [r for r, _ in self.servers], transport, reads_in_place,
            self.backend, self._device)
        self.link = self.links[0]
        self.grad, self.weights = self.link.gradient, self.link.weights
        self._staged = self.weights is not self._weights_dev

    def release(self) -> None:
        """Free the shared window (collective with the server and this node's workers)."""
        self.window.close()

    def run(self) -> None:
        t0, cpu0 = time.perf_counter(), time.process_time()
        step = self.start_step
        with self.backend.activate():  # the GPU path's kernels run on the worker's CUDA stream
            more = self._has_step(step)
            ahead = None  # this step's (rows, xb, yb), gathered while the server was updating
            if more and self.parts:
                ahead = self._batch_rows(step)  # its pull may depend on the batch (its rows)
            if more:
                with self.waiting:
                    more = self.pull(step)
            while more:
                with self.computing:
                    loss, rows = self.compute(step, ahead)
                    ahead = None
                if self.delay:
                    time.sleep(self.delay)  # a simulated straggler: slower, never wrong
                step += 1
                more = self._has_step(step)
                if more:  # push this step's gradient and pull the next step's weights at once
                    meanwhile = None
                    if self.parts:
                        # A part's request may depend on the next batch (the row-sparse rows
                        # it touches), so that batch is gathered before it goes.
                        ahead = self._batch_rows(step)
                    elif self.steps is not None:
                        # Static data: the next rows do not depend on the reply, so gather them
                        # while the server updates (the model has finished with this batch's
                        # buffers, which the gather reuses).
                        def meanwhile(next_step: int = step) -> None:
                            nonlocal ahead
                            ahead = self._batch_rows(next_step)
                    more = self.push_pull(step - 1, float(loss), len(rows), meanwhile=meanwhile)
                else:
                    with self.pushing:
                        self.push(step - 1, float(loss), len(rows))
        self.finish(t0, cpu0, step)

    def compute(self, step: int,
                gathered: Optional[Tuple[np.ndarray, Any, Any]] = None) -> Tuple[Any, np.ndarray]:
        """Step ``step``'s gradient into the push buffer: gather its batch (unless
        ``gathered`` holds its (rows, X, y) already), run the model, pack the gradients.
        Returns (loss, rows)."""
        rows, xb, yb = gathered if gathered is not None else self._batch_rows(step)
        params = self.params
        for part in self.parts:
            params = part.params(params)
        loss, grads = self.model.loss_and_grad(params, xb, yb)
        self._pack(grads, step)
        return loss, rows

    def set_weights(self, flat: Optional[np.ndarray] = None) -> None:
        """The weights as a pull leaves them, without a server: ``flat`` (default: what the
        pull buffer holds) into the pull buffer, then on to the device the model computes on."""
        if flat is not None:
            self.weights[:] = flat
        if self._staged:
            for a, b in self.layout.frames():
                self.backend.to_device(self.weights[a:b], out=self._weights_dev[a:b])

    def _batch_rows(self, step: int) -> Tuple[np.ndarray, Any, Any]:
        """(rows, X, y) of a step: the rows the schedule (or the dispatched batch) gives."""
        rows = self.schedule.rows(self.batch if self.steps is None else step)
        xb, yb = self._gather(rows)
        for part in self.parts:  # e.g. ids into the compact tables the next pull brings
            xb = part.batch(xb)
        return rows, xb, yb

    def _has_step(self, step: int) -> bool:
        """Whether step ``step`` is this worker's to take (always, under dynamic dispatch)."""
        return self.steps is None or step < self.steps

    def finish(self, t0: float, cpu0: float, steps: int, **extra: Any) -> None:
        """Tell the server this worker is done (``steps`` taken since wall time ``t0`` and CPU
        time ``cpu0``), with its timing report; the last message a worker sends."""
        for i, (lo, hi) in self._parts(*self.shards):  # every server that serves it
            self._send_header(Op.DONE, steps, lo, hi, to=i)
        report = {
            "steps": steps,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,
            "wait_s": self.waiting.total,
            "compute_s": self.computing.total,
            "push_s": self.pushing.total,
            **self.backend.report(),  # backend, device, transfer: which data path ran
            **extra,
        }
        self.channel.send_object(report, self.server, Tag.CONTROL)

    def _gather(self, rows: np.ndarray) -> Tuple[Any, Any]:
        """Rows into preallocated buffers: np.take(out=) instead of a fresh copy per step.
        Several inputs (a Features X) gather each input into a buffer of its own, the batch
        a dict of them."""
        if self._device:
            return self._gather_device(rows)
        n = len(rows)
        if n not in self._batches:
            self._batches[n] = (_like(self.X, n, np.empty),
                                np.empty((n,) + self.y.shape[1:], dtype=self.y.dtype))
        xb, yb = self._batches[n]
        if isinstance(self.X, Features):
            for name, a in self.X.items():
                np.take(a, rows, axis=0, out=xb[name])
        else:
            np.take(self.X, rows, axis=0, out=xb)
        np.take(self.y, rows, axis=0, out=yb)
        return xb, yb

    def _device_data(self) -> Optional[Tuple[Any, Any]]:
        """(X, y) on the device, copied once at the first batch; None if they do not fit."""
        if self._data is _NOT_YET:
            self._data = self.backend.put_data(self.X, self.y)
        return self._data

    def _device_rows(self, rows: np.ndarray) -> Any:
        """``rows`` as a device index array (preallocated per batch size)."""
        key = ("rows", len(rows))
        if key not in self._batches:
            self._batches[key] = self.backend.pair(len(rows), np.int64)
        host, dev = self._batches[key]
        np.copyto(host, rows)
        return self.backend.to_device(host, out=dev)

    def _take(self, which: int, rows: Any, out: Any, slot: int = 0) -> Any:
        """Rows of X (which=0) or y (which=1) into device array ``out``: gathered on the device
        where the data lives there, else on the host into a pinned buffer (one per ``slot``,
        so a pending copy is never overwritten) and copied over asynchronously."""
        data = self._device_data()
        if data is not None:
            return self.backend.xp.take(data[which], rows, axis=0, out=out)
        source = (self.X, self.y)[which]
        key = ("host", which, slot, out.shape)
        if key not in self._batches:
            self._batches[key] = self.backend.pinned(out.shape, source.dtype)
        host = np.take(source, rows, axis=0, out=self._batches[key])
        return self.backend.to_device(host, out=out)

    def _gather_device(self, rows: np.ndarray) -> Tuple[Any, Any]:
        n = len(rows)
        if isinstance(self.X, Features):
            return self._gather_inputs_device(rows)
        if n not in self._batches:
            self._batches[n] = [self.backend.empty((n,) + a.shape[1:], a.dtype)
                                for a in (self.X, self.y)]
        xb, yb = self._batches[n]
        idx = self._device_rows(rows) if self._device_data() is not None else rows
        return self._take(0, idx, xb), self._take(1, idx, yb)

    def _gather_inputs_device(self, rows: np.ndarray) -> Tuple[Dict[str, Any], Any]:
        """Several inputs on a device: each gathered on the host into a pinned buffer of its
        own and copied over (the data stays on the host: put_data takes one X array)."""
        n = len(rows)
        key = ("inputs", n)
        if key not in self._batches:
            pinned = {name: self.backend.pinned((n,) + a.shape[1:], a.dtype)
                      for name, a in self.X.items()}
            pinned["y"] = self.backend.pinned((n,) + self.y.shape[1:], self.y.dtype)
            device = {name: self.backend.empty(b.shape, b.dtype) for name, b in pinned.items()}
            self._batches[key] = pinned, device
        pinned, device = self._batches[key]
        for name, a in [*self.X.items(), ("y", self.y)]:
            np.take(a, rows, axis=0, out=pinned[name])
            self.backend.to_device(pinned[name], out=device[name])
        return {name: device[name] for name in self.X.keys()}, device["y"]

    def waiting_for(self) -> str:
        """What it waits for, in words (the watchdog's diagnostic)."""
        what, rank = self._waiting
        if what == "computing":
            return "nothing: it computes"
        if what == "reply":
            return f"the reply of server rank {rank} to its pull"
        return f"{what} from rank {rank}"

    def _parts(self, lo: int, hi: int) -> List[Tuple[int, Tuple[int, int]]]:
        """(server index, shard range) of each server that takes part in shards [lo, hi):
        rank 0 always (it runs the policy: it hears every request, if empty), the others
        where their range meets [lo, hi)."""
        parts = self._parts_of.get((lo, hi))
        if parts is None:
            parts = []
            for i, (_, own) in enumerate(self.servers):
                part = overlap(own, (lo, hi))  # type: ignore[arg-type]  # own: a pair
                # A part that goes to every server (row-sparse rows) takes them all.
                if i == 0 or part[0] < part[1] or self._every_server:
                    parts.append((i, part))
            self._parts_of[(lo, hi)] = parts
        return parts

    def pull(self, clock: int, lo: int = 0, hi: Optional[int] = None) -> bool:
        """Fetch the weights; False when the server says the run is over for this worker."""
        if hi is None:
            lo, hi = self.shards
        posted = self._post_pull(lo, hi)
        status = self._pull_status()
        for i, (a, b), _, _ in posted:
            self._send_header(Op.PULL, clock, a, b, status=status, to=i)
        self.channel.wait_frames([r for i, *_ in posted for part in self.parts
                                  for r in part.send(i, push=False, pull=True)])
        return self._receive_weights(posted)

    def push_pull(self, clock: int, loss: float, samples: int, lo: int = 0,
                  hi: Optional[int] = None,
                  meanwhile: Optional[Callable[[], None]] = None) -> bool:
        """Push step ``clock``'s gradient and pull the weights of step ``clock + 1`` in one
        request; False when the server says the run is over for this worker. ``meanwhile``
        runs after the push has left, while the server updates (the next batch's gather)."""
        if hi is None:
            lo, hi = self.shards
        posted = self._post_pull(lo, hi)  # the compute is done: safe to post now
        with self.pushing:
            self._send_gradient(Op.PUSH_PULL, clock, loss, samples, lo, hi, self._pull_status())
        if meanwhile is not None:
            with self.computing:
                meanwhile()
        with self.waiting:
            return self._receive_weights(posted)

    def _pull_status(self) -> Status:
        return Status.INTERRUPT if self._stop_requested else Status.OK

    def _post_pull(self, lo: int, hi: int) -> List[Tuple[int, Tuple[int, int], Any, Landing]]:
        """Post the receives of each server's reply and weight frames, before asking for
        them, so the weights land straight in the weight buffer.
        Returns [(server index, its shard range, reply request, frame requests)]."""
        if self._device:
            self.backend.synchronize()  # no kernel may still read a buffer MPI will write
        posted = []
        for i, (a, b) in self._parts(lo, hi):
            reply = self.channel.irecv_header(self._replies[i], self.servers[i][0], Tag.REPLY)
            posted.append((i, (a, b), reply, self.links[i].post_weights(a, b)))
        if self.parts:
            self._parts_posted = [r for i, *_ in posted for part in self.parts
                                  for r in part.post_pull(i)]
        return posted

    def _receive_weights(self, posted: Sequence[Tuple[int, Tuple[int, int], Any, Landing]],
                         wait_frames: bool = True) -> bool:
        """Wait for each server's reply; then, with ``wait_frames``, for the weights (else
        the caller waits for them: a layer-wise worker, layer by layer)."""
        # Every server answers with rank 0's status: each follows rank 0's decisions.
        for i, (a, b), reply, _ in posted:
            self._waiting = ("reply", self.servers[i][0])
            self.links[i].await_reply(reply, a, b)
        self.heartbeat()
        self._waiting = ("computing", None)
        parts_posted, self._parts_posted = self._parts_posted, []
        if self._reply[Field.STATUS] != Status.OK:
            self.interrupted = self._reply[Field.STATUS] == Status.INTERRUPT
            for *_, landing in posted:
                landing.cancel()
            self.channel.cancel(parts_posted)
            return False
        self.version = int(self._reply[Field.VERSION])
        self.batch = int(self._reply[Field.BATCH])
        if self.parts:
            self.channel.wait_frames(parts_posted)
            for part in self.parts:
                part.landed()
        if not wait_frames:
            return True
        for i, (a, b), _, landing in posted:
            if self._staged:
                self._land(landing.requests, a, b, self.links[i].codec)
            else:
                landing.wait()
        return True

    def _land(self, requests: List[Any], lo: int, hi: int, codec: Any = None) -> None:
        """Each weight frame of shards [lo, hi) goes on to the device as soon as it arrives
        through ``requests`` (async copy), so the copy of one frame overlaps the receive of
        the next."""
        landing = Landing(self.channel, self.weights, self.layout.frames(lo, hi), requests,
                          codec if codec is not None else self.link.codec)
        for a, b in landing.in_order():
            self.backend.to_device(self.weights[a:b], out=self._weights_dev[a:b])

    def push(self, clock: int, loss: float, samples: int, lo: int = 0,
             hi: Optional[int] = None) -> None:
        if hi is None:
            lo, hi = self.shards
        if self._device:
            self.backend.synchronize()  # the gradient's copies must be done before MPI reads
        self._send_gradient(Op.PUSH, clock, loss, samples, lo, hi)

    def _send_gradient(self, op: int, clock: int, loss: float, samples: int, lo: int, hi: int,
                       status: int = Status.OK) -> None:
        """Each server's request header, then its range of the gradient's frames, all in
        flight at once; returns once MPI has them all."""
        flags = 0
        if self._check_finite:  # the one place a worker checks its push
            start, stop = self.layout.shard_range(lo, hi)
            finite = frame_finite(self.grad[start:stop]) and all(p.finite() for p in self.parts)
            flags = Flag.FINITE if finite else Flag.NON_FINITE
        sends = []
        self.link.before_push()  # the links share one gradient buffer: one fence does
        pull = op == Op.PUSH_PULL
        for i, (a, b) in self._parts(lo, hi):
            start, stop = self.layout.shard_range(a, b)
            self._send_header(op, clock, a, b, count=stop - start, loss=loss, samples=samples,
                              status=status, flags=flags, to=i)
            sends += self.links[i].post_frames(a, b, self._push_order(a, b))
            for part in self.parts:  # e.g. the rows computed on, and (with a pull) the next
                sends += part.send(i, push=True, pull=pull)
        self.channel.wait_frames(sends)

    def _push_order(self, lo: int, hi: int) -> Optional[List[Tuple[int, int]]]:
        """The frames of a push of shards [lo, hi) in the order the servers expect them."""
        if self.layer_shards is None:
            return None
        return self.layout.layer_frames((lo, hi), self.layer_shards)

    def request_stop(self) -> None:
        """Ask the server to stop the run (signal-safe: the next pull carries the request)."""
        self._stop_requested = True

    def _send_header(self, op: int, clock: int, lo: int, hi: int, count: int = 0,
                     loss: float = 0.0, samples: int = 0, status: int = Status.OK,
                     flags: int = 0, to: int = 0) -> None:
        fill_header(self._request, op, self.index, clock, lo, hi, count, self.version, loss,
                    samples, status, self.batch, flags)
        self.channel.send_header(self._request, self.servers[to][0], Tag.REQUEST)

    def _pack(self, grads: Any, step: int) -> None:
        """Copy the model's gradients into the flat push buffer, checking names and shapes."""
        if not isinstance(grads, dict) or grads.keys() != self.grad_views.keys():
            got = sorted(grads) if isinstance(grads, dict) else type(grads).__name__
            raise ValueError(
                f"loss_and_grad must return a gradient for exactly the parameters "
                f"{sorted(self.grad_views)}; got {got} at step {step}"
            )
        if not self.parts:
            for name, g in grads.items():
                self._pack_one(name, g)
            return
        for name, g in grads.items():
            if not any(part.packs(name) for part in self.parts):
                self._pack_one(name, g)
        for part in self.parts:
            part.pack(grads)

    def _pack_one(self, name: str, g: Any) -> None:
        """One parameter's gradient into its place in the push buffer, checking its shape."""
        view = self.grad_views[name]
        if g.shape != view.shape:
            raise ValueError(
                f"gradient {name!r} has shape {g.shape}, but the parameter is {view.shape}"
            )
        # Into the push buffer: host memory, or the device's where MPI is CUDA-aware.
        self.backend.to_host(g, out=view)
