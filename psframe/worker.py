"""Data-parallel worker loop: pull the weights, compute a gradient on a batch, push it back."""
import time

import numpy as np

from .comm import Channel, Field, Op, Status, Tag, new_header, set_loss, wait, wait_all
from .metrics import Stopwatch

__all__ = ["Worker"]

class Worker:
    """One worker of a data-parallel run; ``index`` is its 0-based place among the workers."""

    def __init__(self, comm, server_rank, index, layout, model, backend, X, y, stream, steps,
                 delay=0.0, start_step=0):
        """``stream`` maps a step to rows (static data), or a BatchDispatcher maps the batch
        each pull reply assigns to rows (dynamic dispatch; ``steps`` is then None)."""
        self.comm = comm
        self.server = server_rank
        self.index = index
        self.layout = layout
        self.channel = Channel(comm, layout)
        self.model = model
        self.backend = backend
        self.X, self.y = X, y
        self.stream = stream
        self.steps = steps
        self.delay = float(delay)
        self.start_step = int(start_step)  # > 0 when resuming from a checkpoint
        self.interrupted = False
        self._stop_requested = False
        self.weights = layout.empty()
        self.params = layout.views(self.weights)
        self.grad = layout.empty()
        self.grad_views = layout.views(self.grad)
        self.version = 0
        self.batch = -1
        self._request = new_header()
        self._reply = new_header()
        self._batches = {}  # batch size -> preallocated (X, y) buffers
        self.waiting, self.computing, self.pushing = Stopwatch(), Stopwatch(), Stopwatch()

    def run(self):
        t0, cpu0 = time.perf_counter(), time.process_time()
        step = self.start_step
        while self.steps is None or step < self.steps:
            with self.waiting:
                if not self.pull(step):
                    break
            with self.computing:
                rows = self.stream.rows(self.batch if self.steps is None else step)
                xb, yb = self._gather(rows)
                loss, grads = self.model.loss_and_grad(self.params, xb, yb)
                self._pack(grads, step)
            if self.delay:
                time.sleep(self.delay)  # a simulated straggler: slower, never wrong
            with self.pushing:
                self.push(step, loss, len(rows))
            step += 1
        self._finish(t0, cpu0, step)

    def _finish(self, t0, cpu0, steps, **extra):
        """Tell the server this worker is done, with its timing report."""
        self._send_header(Op.DONE, steps, 0, 0)
        report = {
            "steps": steps,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": time.process_time() - cpu0,
            "wait_s": self.waiting.total,
            "compute_s": self.computing.total,
            "push_s": self.pushing.total,
            **extra,
        }
        self.comm.send(report, dest=self.server, tag=Tag.CONTROL)

    def _gather(self, rows):
        """Rows into preallocated buffers: np.take(out=) instead of a fresh copy per step."""
        n = len(rows)
        if n not in self._batches:
            self._batches[n] = (np.empty((n,) + self.X.shape[1:], dtype=self.X.dtype),
                                np.empty((n,) + self.y.shape[1:], dtype=self.y.dtype))
        xb, yb = self._batches[n]
        np.take(self.X, rows, axis=0, out=xb)
        np.take(self.y, rows, axis=0, out=yb)
        return xb, yb

    def pull(self, clock, lo=0, hi=None):
        """Fetch the weights; False when the server says the run is over for this worker."""
        hi = self.layout.n_shards if hi is None else hi
        # Post the receives before asking, so the reply lands straight in the weight buffer.
        reply = self.comm.Irecv(self._reply, source=self.server, tag=Tag.REPLY)
        frames = self.channel.irecv_frames(self.weights, lo, hi, self.server, Tag.WEIGHTS)
        self._send_header(Op.PULL, clock, lo, hi,
                          status=Status.INTERRUPT if self._stop_requested else Status.OK)
        wait(reply)
        if self._reply[Field.STATUS] != Status.OK:
            self.interrupted = self._reply[Field.STATUS] == Status.INTERRUPT
            for r in frames:
                r.Cancel()
            wait_all(frames)
            return False
        wait_all(frames)
        self.version = int(self._reply[Field.VERSION])
        self.batch = int(self._reply[Field.BATCH])
        return True

    def push(self, clock, loss, samples, lo=0, hi=None):
        hi = self.layout.n_shards if hi is None else hi
        start, stop = self.layout.shard_range(lo, hi)
        self._send_header(Op.PUSH, clock, lo, hi, count=stop - start, loss=loss, samples=samples)
        wait_all(self.channel.isend_frames(self.grad, lo, hi, self.server, Tag.PUSH))

    def request_stop(self):
        """Ask the server to stop the run (signal-safe: the next pull carries the request)."""
        self._stop_requested = True

    def _send_header(self, op, clock, lo, hi, count=0, loss=0.0, samples=0, status=Status.OK):
        h = self._request
        h[Field.STATUS] = status
        h[Field.OP], h[Field.WORKER], h[Field.CLOCK] = op, self.index, clock
        h[Field.SHARD_LO], h[Field.SHARD_HI], h[Field.COUNT] = lo, hi, count
        h[Field.VERSION], h[Field.SAMPLES], h[Field.BATCH] = self.version, samples, self.batch
        set_loss(h, loss)
        self.channel.send_header(h, self.server, Tag.REQUEST)

    def _pack(self, grads, step):
        """Copy the model's gradients into the flat push buffer, checking names and shapes."""
        if not isinstance(grads, dict) or grads.keys() != self.grad_views.keys():
            got = sorted(grads) if isinstance(grads, dict) else type(grads).__name__
            raise ValueError(
                f"loss_and_grad must return a gradient for exactly the parameters "
                f"{sorted(self.grad_views)}; got {got} at step {step}"
            )
        for name, view in self.grad_views.items():
            g = grads[name]
            if g.shape != view.shape:
                raise ValueError(
                    f"gradient {name!r} has shape {g.shape}, but the parameter is {view.shape}"
                )
            self.backend.to_host(g, out=view)
