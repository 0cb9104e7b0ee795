"""One stage of a GPipe-style pipeline: a worker that owns some layers and their shards."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..metrics import Stopwatch
from ..transport import Tag
from .stages import stage_shard_range
from .worker import Worker

if TYPE_CHECKING:
    from ..params import ParamLayout

__all__ = ["StageWorker"]


class StageWorker(Worker):
    """Stage ``stage`` of pipeline ``pipeline``: pulls and pushes only its own shards.

    Each step: pull the stage's weights, run the forward of every micro-batch (receiving
    activations from the previous stage, sending to the next), then the backward in reverse
    order (activation gradients flow back), summing the gradients over micro-batches, and
    push. The weights pulled at the start of a step serve every micro-batch's forward and
    backward, so both always see the same weights (PipeDream's weight stashing, for free).
    """

    steps: int  # a pipeline trains on static data: a step count, never dynamic dispatch
    act_out: Optional[List[Any]]
    grad_out: Optional[List[Any]]

    def __init__(self, channel: Any,
                 server_rank: Union[int, Sequence[Tuple[int, Tuple[int, int]]]], index: int,
                 layout: ParamLayout, model: Any, backend: Any, X: Any, y: Any, schedule: Any,
                 steps: int, *, layer_ids: Sequence[int], stage: int, n_stages: int,
                 prev_rank: Optional[int], next_rank: Optional[int], micro_batches: int,
                 delay: float = 0.0, start_step: int = 0, transport: str = "mpi",
                 reads_in_place: bool = False) -> None:
        super().__init__(channel, server_rank, index, layout, model, backend, X, y, schedule, steps,
                         delay=delay, start_step=start_step, transport=transport,
                         reads_in_place=reads_in_place)
        self.layer_ids = list(layer_ids)
        self.first, self.last = stage == 0, stage == n_stages - 1
        self.prev_rank, self.next_rank = prev_rank, next_rank
        self.shards = stage_shard_range(model, layout, layer_ids)
        b = schedule.batch_size
        self.micro = np.array_split(np.arange(b), micro_batches)
        self.fractions = [len(mb) / b for mb in self.micro]
        # (local name, global name) per layer, so layers see their own parameter names.
        self.names = {i: list(zip(model.layers[i].param_shapes(), model.layer_param_names(i)))
                      for i in self.layer_ids}
        # Per-sample shapes of what comes in and goes out: (width,) or e.g. (C, H, W).
        self._in_shape = self._shape_before(self.layer_ids[0], X.shape[1])
        self._out_shape = self._shape_before(self.layer_ids[-1] + 1, X.shape[1])
        self.slices = [slice(int(mb[0]), int(mb[-1]) + 1) if len(mb) else slice(0, 0)
                       for mb in self.micro]  # the same micro-batches, as device-friendly slices
        dt = layout.dtype
        be = self.backend
        # Receive buffers of known shapes, one per micro-batch, allocated once: what MPI writes
        # and what the layers read (one array on NumPy; pinned host + device on a GPU).
        self.act_in, self.act_dev = map(list, zip(*[be.buffers((len(mb),) + self._in_shape, dt)
                                                    for mb in self.micro]))
        self.grad_in, self.grad_dev = map(list, zip(*[be.buffers((len(mb),) + self._out_shape,
                                                                 dt) for mb in self.micro]))
        self.y_in = [be.empty((len(mb),) + y.shape[1:], y.dtype) for mb in self.micro]
        self.act_out = self.grad_out = None
        if self._staged:  # a GPU's outgoing activations and gradients leave through pinned memory
            self.act_out = [be.pinned((len(mb),) + self._out_shape, dt) for mb in self.micro]
            self.grad_out = [be.pinned((len(mb),) + self._in_shape, dt) for mb in self.micro]
        self.idle = Stopwatch()

    def _shape_before(self, layer_index: int, n_features: int) -> Tuple[int, ...]:
        shape = self.model.out_features(n_features, stop=layer_index)
        return (shape,) if isinstance(shape, int) else tuple(shape)

    def _params_of(self, i: int) -> Dict[str, Any]:
        return {local: self.params[full] for local, full in self.names[i]}

    def _accumulator(self, grad_slice: np.ndarray, start: int) -> Tuple[Any, Dict[str, Any]]:
        """Where the stage sums its gradient over micro-batches: the push buffer itself, or on a
        host-staged GPU a device buffer (with per-parameter views) copied out once per step."""
        if not self._staged:
            return grad_slice, self.grad_views
        acc = self.backend.empty(grad_slice.shape, self.layout.dtype)
        views = {}
        for i in self.layer_ids:
            for _, full in self.names[i]:
                a = self.layout.offsets[full] - start
                views[full] = acc[a:a + self.layout.sizes[full]].reshape(self.layout.shapes[full])
        return acc, views

    def run(self) -> None:
        t0, cpu0 = time.perf_counter(), time.process_time()
        lo, hi = self.shards
        start, stop = self.layout.shard_range(lo, hi)
        grad_slice = self.grad[start:stop]
        acc, self._acc_views = self._accumulator(grad_slice, start)
        with self.backend.activate():  # the GPU path's kernels run on the worker's CUDA stream
            for step in range(self.start_step, self.steps):
                with self.waiting:
                    if not self.pull(step, lo, hi):
                        break
                rows = self.schedule.rows(step)
                acc[:] = 0
                with self.computing:
                    loss, sends, caches, douts = self._forward(rows)
                    sends += self._backward(caches, douts)
                    if acc is not grad_slice:
                        self.backend.to_host(acc, out=grad_slice)  # push synchronizes on it
                self.channel.wait_frames(sends)
                if self.delay:
                    time.sleep(self.delay)
                with self.pushing:
                    self.push(step, loss if self.last else 0.0,
                              len(rows) if self.last else 0, lo, hi)
            else:  # every step ran (or none was left after a resume)
                step = self.steps
        self.finish(t0, cpu0, step, idle_s=self.idle.total + self.waiting.total)

    def _outgoing(self, array: Any, buffers: Optional[List[Any]], i: int) -> Any:
        """A device array made ready for MPI: copied into pinned ``buffers[i]`` (or contiguous
        on the device where MPI is CUDA-aware), with the stream synchronized either way."""
        if self._staged:
            assert buffers is not None  # a host-staged GPU has pinned buffers
            out = self.backend.to_host(array, out=buffers[i])
        else:
            out = self.backend.xp.ascontiguousarray(array)
        self.backend.synchronize()
        return out

    def _receive(self, host: Any, device: Any, source: Optional[int], tag: int) -> Any:
        """A neighbour's activations (or their gradient) into ``host``, then on to ``device``
        where the layers read it (the same array unless a GPU is host-staged)."""
        assert source is not None  # prev_rank or next_rank: a stage has that neighbour
        self._waiting = ("activations" if tag == Tag.ACT else "their gradient", source)
        with self.idle:
            self.channel.recv_array(host, source, tag)
        self.heartbeat()
        self._waiting = ("computing", None)
        if self._staged:
            self.backend.to_device(host, out=device)
        return device

    def _rows_for_device(self, rows: np.ndarray) -> Any:
        """The step's rows where the device gathers them: on the device if the data is."""
        if not self._device or not (self.first or self.last):
            return rows
        return self._device_rows(rows) if self._device_data() is not None else rows

    def _forward(self, rows: np.ndarray) -> Tuple[float, List[Any], List[List[Any]], List[Any]]:
        sends, caches, douts, loss = [], [], [], 0.0
        idx = self._rows_for_device(rows)
        for i, mb in enumerate(self.micro):
            if self.first and self._device:
                h = self._take(0, idx[self.slices[i]], self.act_dev[i], slot=i)
            elif self.first:
                # A buffer per micro-batch: layers cache their input until the backward.
                h = np.take(self.X, rows[mb], axis=0, out=self.act_in[i])
            else:
                h = self._receive(self.act_in[i], self.act_dev[i], self.prev_rank, Tag.ACT)
            layer_caches = []
            for j in self.layer_ids:
                h, cache = self.model.layers[j].forward(self._params_of(j), h)
                layer_caches.append(cache)
            caches.append(layer_caches)
            if self.last:
                if self._device:
                    yb = self._take(1, idx[self.slices[i]], self.y_in[i], slot=i)
                else:
                    yb = np.take(self.y, rows[mb], axis=0, out=self.y_in[i])
                mb_loss, loss_cache = self.model.loss.forward(h, yb)
                # Each micro-batch's mean loss, weighted by its share of the batch, sums to
                # the full batch's mean: so do the gradients.
                douts.append(self.model.loss.backward(loss_cache) * self.fractions[i])
                loss += float(mb_loss) * self.fractions[i]
            else:
                out = (self._outgoing(h, self.act_out, i) if self._device
                       else np.ascontiguousarray(h))
                sends.append(self.channel.isend_array(out, self.next_rank, Tag.ACT))
                caches[-1].append(out)  # keep the send buffer alive until it completes
        return loss, sends, caches, douts

    def _backward(self, caches: List[List[Any]], douts: List[Any]) -> List[Any]:
        sends = []
        for i in reversed(range(len(self.micro))):
            if self.last:
                d = douts[i]
            else:
                d = self._receive(self.grad_in[i], self.grad_dev[i], self.next_rank,
                                  Tag.ACT_GRAD)
            for pos in reversed(range(len(self.layer_ids))):
                j = self.layer_ids[pos]
                if self.first and j < self.model.first_trained:
                    break  # what lies below the first parameterised layer needs no gradient
                layer = self.model.layers[j]
                lp = self._params_of(j)
                if self.first and j == self.model.first_trained and layer.can_skip_dx:
                    grads, d = layer.backward(lp, caches[i][pos], d, need_dx=False)
                else:
                    grads, d = layer.backward(lp, caches[i][pos], d)
                for local, full in self.names[j]:
                    self._acc_views[full] += grads[local]
            if not self.first:
                out = (self._outgoing(d, self.grad_out, i) if self._device
                       else np.ascontiguousarray(d))
                sends.append(self.channel.isend_array(out, self.prev_rank, Tag.ACT_GRAD))
                caches[i].append(out)
        return sends
