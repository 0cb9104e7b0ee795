"""GradientInbox: receives each push through its worker's path and checks it frame by frame."""
from __future__ import annotations

import sys

from ..errors import GradientError
from ..finite import frame_finite
from ..transport.wire import Flag

__all__ = ["GradientInbox"]


class GradientInbox:
    """Lands a pushed gradient and says whether it may be used: sized as its shards and
    finite. ``on_bad_gradient`` says what a non-finite one does: "raise" or "skip"."""

    def __init__(self, layout, paths, stats, on_bad_gradient="raise", layer_shards=None):
        self.layout = layout
        # Layer-wise pushes send each layer's frames as backward makes them, last layer first.
        self.layer_shards = layer_shards
        self.paths = paths  # worker index -> its PayloadPath
        self.stats = stats  # counts the rejected pushes
        self.on_bad_gradient = on_bad_gradient

    def gradient(self, worker):
        """Where worker's latest gradient lies: its landing slot or its shared segment."""
        return self.paths[worker].gradient

    def post(self, worker, lo, hi, count):
        """Start landing worker's push of shards [lo, hi) now (its header is here); None when
        its size is wrong (receive then says so) or its path has nothing to post."""
        start, stop = self.layout.shard_range(lo, hi)
        if count != stop - start:
            return None
        return self.paths[worker].post_gradient(lo, hi, self._frames(lo, hi))

    def _frames(self, lo, hi):
        if self.layer_shards is None:
            return None
        return self.layout.layer_frames((lo, hi), self.layer_shards)

    def receive(self, worker, lo, hi, count, clock, flags=0, posted=None):
        """Land worker's push of shards [lo, hi) for step ``clock``; True if it is usable.
        Raises GradientError for a wrong size, and for a non-finite one under "raise".
        ``flags`` with Flag.NON_FINITE: the worker found the whole gradient non-finite (with
        several servers, so that every server refuses it, not only the one whose range
        holds the NaN)."""
        self.check_size(worker, lo, hi, count, clock)
        grad = self.gradient(worker)
        finite = not flags & Flag.NON_FINITE
        # Frame by frame, in the order they complete (all of them, once the server's loop
        # hands over a push it has landed).
        for a, b in self.paths[worker].receive_gradient(lo, hi, self._frames(lo, hi), posted):
            finite = frame_finite(grad[a:b]) and finite
        return finite or self.reject(worker, clock)

    def check_size(self, worker, lo, hi, count, clock):
        """Raise GradientError unless a push of ``count`` elements fits shards [lo, hi) (a
        push streamed as it lands is checked this way at its header, and its frames by
        frame_finite as they land: UpdateEngine.update_and_send)."""
        start, stop = self.layout.shard_range(lo, hi)
        if count != stop - start:
            raise GradientError(
                f"worker {worker} pushed {count} elements for step {clock}, but shards "
                f"[{lo}, {hi}) hold {stop - start}; the model's gradients do not match its "
                "parameters"
            )

    def reject(self, worker, clock):
        """Count a non-finite push; raise or warn as on_bad_gradient says. Returns False."""
        self.stats.updates_rejected += 1
        message = (
            f"worker {worker} pushed a non-finite gradient (NaN or inf) for step {clock}; "
            "it was rejected and the weights are untouched"
        )
        if self.on_bad_gradient == "raise":
            raise GradientError(message + ". Lower the learning rate, check the data, or pass "
                                "on_bad_gradient='skip' to drop such gradients and go on.")
        print(f"psframe: warning: {message}", file=sys.stderr, flush=True)
        return False
