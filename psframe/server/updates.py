"""UpdateEngine: the one writer of the weights; runs updates frame by frame while sending them."""
from __future__ import annotations

import numpy as np

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..policies import delay_compensate

if TYPE_CHECKING:
    from ..nn.optim import Optimizer
    from ..params import ParamLayout
    from ..policies import DelayCompensation
    from ..transport.parts import ServerPart

__all__ = ["UpdateEngine", "Update"]

# An update run frame by frame: (the shards' step count, start, stop) of each frame.
Update = Callable[[int, int, int], None]


class UpdateEngine:
    """The server's weights (``weights``), the optimizer and its state, and the run of one
    update over a group's shards interleaved with sending the new weights.

    ``keep_sent_weights``: delay compensation needs the weights each worker computed on, so
    the engine keeps a copy of what it last sent each one (model-sized, per worker; see
    DelayCompensation).
    """

    def __init__(self, layout: ParamLayout, weights: np.ndarray, optimizer: Optimizer,
                 n_workers: int, keep_sent_weights: bool = False) -> None:
        self.layout = layout
        self.weights = weights
        self.optimizer = optimizer
        self.opt_state = optimizer.init_state(layout.size, layout.dtype)
        self.acc = layout.empty()  # the step's scratch: a mean, or a compensated gradient
        self.shard_updates = np.zeros(layout.n_shards, dtype=np.int64)
        # shard range -> frame plan (see frame_plan)
        self._plans: Dict[Tuple[int, ...], List[Tuple[int, int, int, int]]] = {}
        # The payload parts checkpointed with its state (Executor's).
        self.parts: List[ServerPart] = []
        self.sent = [layout.empty() for _ in range(n_workers)] if keep_sent_weights else None
        self.mean_square = layout.empty() if keep_sent_weights else None  # adaptive DC's MS
        if keep_sent_weights:
            assert self.mean_square is not None
            self.mean_square[:] = 0
            widest = max(b - a for a, b in layout.frames(0, layout.n_shards))
            self._dc_scratch = np.empty(widest, layout.dtype)

    def frame_plan(self, shard_range: Tuple[int, ...]) -> List[Tuple[int, int, int, int]]:
        """(start, stop, first shard, end shard) of each frame of these shards; cached."""
        plan = self._plans.get(shard_range)
        if plan is None:
            plan = [(a, b, *self.layout.shards_of_range(a, b))
                    for a, b in self.layout.frames(*shard_range)]
            self._plans[shard_range] = plan
        return plan

    # -- updates: callables (optimizer step, start, stop) run frame by frame ---------------
    def mean_of(self, gradients: Sequence[np.ndarray], scale: float, weight: float) -> Update:
        """The update that steps the optimizer with the sum of ``gradients`` (flat arrays, in
        worker order, so Sync is bitwise reproducible) times ``scale``."""
        def update(step: int, a: int, b: int) -> None:
            acc = self.acc[a:b]
            if len(gradients) == 1 and scale == 1.0:
                acc = gradients[0][a:b]  # one gradient, unscaled: no copy needed
            elif len(gradients) == 1:
                np.multiply(gradients[0][a:b], scale, out=acc)
            else:
                np.add(gradients[0][a:b], gradients[1][a:b], out=acc)
                for g in gradients[2:]:
                    acc += g[a:b]
                acc *= scale
            self.optimizer.apply(self.opt_state, self.weights, acc, a, b, step, weight)
        return update

    def one(self, gradient: np.ndarray, worker: int, weight: float,
            compensation: Optional[DelayCompensation] = None) -> Update:
        """The update that applies one worker's gradient on arrival (Async, SSP)."""
        def update(step: int, a: int, b: int) -> None:
            g = gradient[a:b]
            if compensation is not None:
                g = self._compensated(g, worker, compensation, a, b)
            self.optimizer.apply(self.opt_state, self.weights, g, a, b, step, weight)
        return update

    def _compensated(self, g: np.ndarray, worker: int, comp: DelayCompensation, a: int,
                     b: int) -> np.ndarray:
        """The gradient for elements [a, b), corrected for the weights the worker computed on,
        in the step scratch (free here: on-arrival updates never gather a mean)."""
        assert self.sent is not None and self.mean_square is not None  # keep_sent_weights
        return delay_compensate(g, self.weights[a:b], self.sent[worker][a:b], comp,
                                out=self.acc[a:b], mean_square=self.mean_square[a:b],
                                scratch=self._dc_scratch[: b - a])

    # -- the frame loop ---------------------------------------------------------------------
    def update_and_send(self, shard_range: Tuple[int, ...], update: Optional[Update],
                        answered: Sequence[Tuple[int, Any]], sends: Any,
                        landing: Sequence[Any] = ()) -> None:
        """Run ``update`` (or None) over the shards frame by frame, handing each frame of new
        weights to ``sends`` for the link of every answered pull (worker, link) as soon as it
        is updated: the copy of one frame to the workers overlaps the update of the next.

        ``landing``: the pushes (server.pushes.Push) the update reads whose frames are still
        arriving (streamed as they land, one frame of these shards each): frame i is updated
        once frame i of each has landed and passed its check, so the update and the reply
        run while the rest of the push arrives. The caller waits for ``sends`` once it has
        answered the links that reply last.
        """
        plan = self.frame_plan(shard_range) if update is not None or answered else ()
        kept = [self.sent[w] for w, _ in answered] if self.sent is not None else []
        watched = [push.landing for push in landing]
        for i, (a, b, k_lo, k_hi) in enumerate(plan):
            for push in landing:
                push.await_frame(i, watched)
            if update is not None:
                # A group's shards always step together, so a frame's shards share one count:
                # one optimizer call per frame, not one per (often tiny) shard.
                self.shard_updates[k_lo:k_hi] += 1
                update(int(self.shard_updates[k_lo]), a, b)
            for _, link in answered:
                sends.frame(link, self.weights, a, b)
            for dest in kept:  # after the frame's update: what the worker will compute on
                np.copyto(dest[a:b], self.weights[a:b])
            sends.progress()  # moves the frames already posted along
        for push in landing:
            push.finish_landing()  # all landed: this frees them
