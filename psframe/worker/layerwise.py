"""LayerwiseWorker: P3-style overlap of each layer's transfers with the other layers' compute."""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Set, Tuple

from ..params import overlap
from ..transport import Landing, Op, Status
from .worker import Worker

__all__ = ["LayerwiseWorker"]


class LayerwiseWorker(Worker):
    """A data-parallel worker that overlaps its transfers with its passes, layer by layer
    (P3, Jayarajan et al. 2019): the model calls it back through ``loss_and_grad(...,
    hooks=self)``.

    - Its request header leaves as soon as the forward has the loss; each layer's gradient
      goes to the servers as soon as backward has made it, last layer first.
    - The next step's weights arrive frame by frame in forward order while the server
      updates (psframe.server.updates sends each frame once it is updated): the forward of
      layer i waits only for layer i's frames, so it starts once the first layer is in.

    The arithmetic is the same as Worker's, so Sync stays exact. Only the message path moves
    anything early: through the shared window the weights and gradient lie in place, and
    the header there still follows the whole backward. A GPU worker stages through host
    buffers and takes Worker's path, with its push in the same layer order.
    """

    # Set by run(): the step's state, which the model's hooks read and write.
    _pending: List[Landing]
    _layer_shards: Dict[int, Tuple[int, int]]
    _layer_elems: Dict[int, Tuple[int, int]]
    _step: int
    _next: bool
    _sends: List[Any]
    _posted: Optional[List[Tuple[int, Tuple[int, int], Any, Landing]]]
    _samples: int
    _reported: Set[str]
    _loss: Any

    def run(self) -> None:
        if self._staged:  # device copies are per pull: Worker's loop, frames in layer order
            return super().run()
        assert self.layer_shards is not None  # a layer-wise run has them (training.roles)
        t0, cpu0 = time.perf_counter(), time.process_time()
        step = self.start_step
        self._pending = []  # the Landings of weight frames still arriving
        # Each trained layer: its element range (what its forward reads) and shard range.
        trained = [i for i in range(len(self.model.layers)) if self.model.layer_param_names(i)]
        self._layer_shards = dict(zip(trained, self.layer_shards))
        self._layer_elems = {i: self.layout.shard_range(*self._layer_shards[i])
                             for i in trained}
        more = self._has_step(step)
        if more:
            with self.waiting:
                more = self._start_pull(Op.PULL, step)
        while more:
            with self.computing:
                self._step = step
                self._next = self._has_step(step + 1)
                self._sends, self._posted = [], None
                rows, xb, yb = self._batch_rows(step)
                self._samples = len(rows)
                self._reported = set()
                self.model.loss_and_grad(self.params, xb, yb, hooks=self)
                self._check_reported(step)
            with self.pushing:
                self._finish_push()
            if self.delay:
                time.sleep(self.delay)
            step += 1
            more = self._next and self._await_replies()
        self.finish(t0, cpu0, step)

    # -- the model's hooks ------------------------------------------------------------------
    def before_layer(self, i: int) -> None:
        """Layer i computes on its weights: wait for their frames, not for the later ones."""
        if i not in self._layer_elems or not self._pending:
            return
        start, stop = self._layer_elems[i]
        for landing in self._pending:  # counted as compute: it overlaps
            landing.wait_within(start, stop)

    def after_forward(self, loss: Any) -> None:
        """Every frame of this step's weights is in (each layer waited for its own): post the
        next step's receives, then tell the servers on messages that a push is coming."""
        for landing in self._pending:
            landing.wait()
        self._pending = []
        self._loss = loss
        op = Op.PUSH_PULL if self._next else Op.PUSH
        if self._next:
            # Safe before backward has read the weights: no server answers this pull until
            # it holds this whole push, whose last frame leaves after backward is done.
            self._posted = self._post_pull(*self.shards)
        for i, (a, b) in self._parts(*self.shards):
            if self.links[i].moves_payload:
                self._header(op, i, a, b)

    def after_backward(self, i: int, grads: Dict[str, Any]) -> None:
        """Layer i's gradient into the push buffer, and at once on to the servers."""
        for name, g in grads.items():
            self._pack_one(name, g)
            self._reported.add(name)
        layer = self._layer_shards[i]
        for s, (a, b) in self._parts(*self.shards):
            link = self.links[s]
            if link.moves_payload:
                lo, hi = overlap((a, b), layer)
                self._sends += link.post_frames(lo, hi)

    # -- the rest of a step -----------------------------------------------------------------
    def _finish_push(self) -> None:
        """The shared-window servers' headers (the gradient is whole now), then every send
        done; a lone gradient check decides nothing here (see the flags in Worker)."""
        op = Op.PUSH_PULL if self._next else Op.PUSH
        shared = [(i, part) for i, part in self._parts(*self.shards)
                  if not self.links[i].moves_payload]
        if shared:
            self.link.before_push()
            for i, (a, b) in shared:
                self._header(op, i, a, b)
        self.channel.wait_frames(self._sends)
        self._sends = []

    def _header(self, op: int, i: int, a: int, b: int) -> None:
        start, stop = self.layout.shard_range(a, b)
        status = self._pull_status() if op == Op.PUSH_PULL else Status.OK
        self._send_header(op, self._step, a, b, count=stop - start, loss=self._loss,
                          samples=self._samples, status=status, to=i)

    def _start_pull(self, op: int, clock: int) -> bool:
        posted = self._post_pull(*self.shards)
        for i, (a, b), _, _ in posted:
            self._send_header(op, clock, a, b, status=self._pull_status(), to=i)
        self._posted = posted
        return self._await_replies()

    def _await_replies(self) -> bool:
        """The servers' replies to this step's pull: the weights may still be arriving."""
        assert self._posted is not None  # the pull posted (_start_pull, after_forward)
        with self.waiting:
            ok = self._receive_weights(self._posted, wait_frames=False)
        if ok:
            self._pending = [landing for *_, landing in self._posted]
        return ok

    def _check_reported(self, step: int) -> None:
        if self._reported != set(self.grad_views):
            missing = sorted(set(self.grad_views) - self._reported)
            raise ValueError(f"loss_and_grad gave no gradient for {missing} at step {step}")
