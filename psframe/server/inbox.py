"""GradientInbox: lands each push through its worker's link; the server's one finiteness check."""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence, Tuple

from ..errors import GradientError
from ..finite import frame_finite
from ..transport.wire import Flag

__all__ = ["GradientInbox"]


class GradientInbox:
    """Lands a pushed gradient and says whether it may be used: sized as its shards and
    finite. ``on_bad_gradient`` says what a non-finite one does: "raise" or "skip".

    The server's finiteness checks are all here: a push landed whole is checked frame by
    frame in ``receive``; a push applied as it lands, frame by frame in ``check_frame``.
    """

    def __init__(self, layout: Any, links: Sequence[Any], stats: Any,
                 on_bad_gradient: str = "raise",
                 layer_shards: Optional[Sequence[Tuple[int, int]]] = None) -> None:
        self.layout = layout
        # Layer-wise pushes send each layer's frames as backward makes them, last layer first.
        self.layer_shards = layer_shards
        self.links = links  # worker index -> its Link
        self.stats = stats  # counts the rejected pushes
        self.on_bad_gradient = on_bad_gradient

    def gradient(self, worker: int) -> Any:
        """Where worker's latest gradient lies: its landing slot or its shared segment."""
        return self.links[worker].gradient

    def post(self, worker: int, lo: int, hi: int, count: int) -> Any:
        """Start landing worker's push of shards [lo, hi) now (its header is here); None when
        its size is wrong (receive then says so) or its link has nothing to post."""
        start, stop = self.layout.shard_range(lo, hi)
        if count != stop - start:
            return None
        return self.links[worker].post_push(lo, hi, self._frames(lo, hi))

    def _frames(self, lo: int, hi: int) -> Any:
        if self.layer_shards is None:
            return None
        return self.layout.layer_frames((lo, hi), self.layer_shards)

    def check_frame(self, worker: int, a: int, b: int) -> None:
        """Frame [a, b) of a push applied as it lands. Its worker checked the push whole and
        flagged it finite (Flag.FINITE), so a non-finite frame here means it changed on the
        way: the frames before it are already applied, and the run ends."""
        if not frame_finite(self.gradient(worker)[a:b]):
            raise GradientError(
                f"worker {worker}'s push was checked finite where it was computed, but "
                f"elements [{a}, {b}) arrived non-finite; the update had started on "
                "earlier frames, so the run stops here (a fault on the way or in memory)")

    def receive(self, worker: int, lo: int, hi: int, count: int, clock: int, flags: int = 0,
                landing: Any = None) -> bool:
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
        for a, b in self.links[worker].pushed_frames(lo, hi, self._frames(lo, hi), landing):
            finite = frame_finite(grad[a:b]) and finite
        return finite or self.reject(worker, clock)

    def check_size(self, worker: int, lo: int, hi: int, count: int, clock: int) -> None:
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

    def reject(self, worker: int, clock: int) -> bool:
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
