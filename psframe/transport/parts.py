"""Payload parts: what a push and a pull carry besides the dense frames, at each end.

A push and a pull are lists of parts. The dense frames of the flat buffer are the first:
the server lands them through each worker's link (transport.links), and its update engine
runs over them frame by frame. Every other kind of payload is a part with the hooks below,
which the server and the worker call in a loop at fixed points of a request's life, and
which moves its own arrays through the peer's link (``Link.post_array``/``send_array``).
The row-sparse rows of embedding tables are one (psframe.sparse.server_rows and
worker_rows); a module's buffers, or encoded frames of their own, are additions here.

A run with no such payload has an empty list: no branch asks whether a kind is present.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["ServerPart", "WorkerPart", "Landed"]

Landed = Tuple[bool, int]  # (finite, bytes moved)


class ServerPart:
    """A part at a server: lands each worker's share of a request, updates with the
    decisions, and serves pulls. Hooks default to doing nothing."""

    #: Pushes that carry this part land whole before they are handled (the dense frames of
    #: a push without other parts may instead be applied as they land: streamed).
    lands_whole = True
    #: Every worker may send this part to every server (not only the servers whose dense
    #: range meets its shards).
    every_server = True
    #: Name in the result's stats (``stats[name]``), or None.
    stats_key: Optional[str] = None

    def start(self, workers: Iterable[int]) -> None:
        """Before any request can arrive: post the first receives of ``workers``."""

    def announce(self, worker: int, push: bool) -> None:
        """The request header of ``worker`` is here (a pull, or a push when ``push``)."""

    def land(self, worker: int, push: bool) -> Landed:
        """Wait for this part of ``worker``'s request; (finite, bytes moved)."""
        return True, 0

    def accepted(self, worker: int) -> None:
        """``worker``'s push was accepted (a part applied on arrival does it now)."""

    def apply_mean(self, workers: Sequence[int], scale: float, weight: float) -> None:
        """One step with the sum of ``workers``' pushes (worker order) times ``scale``."""

    def apply_one(self, worker: int, weight: float) -> None:
        """``worker``'s push alone, as ``weight`` of one step."""

    def serve(self, worker: int, sends: List[Any]) -> int:
        """Answer ``worker``'s pull with this part (sends to wait on go in ``sends``);
        returns the bytes moved."""
        return 0

    def close(self, worker: int) -> None:
        """``worker`` sent DONE: withdraw its posted receives."""

    def params(self) -> int:
        """Elements this server holds of the part (in stats["servers"])."""
        return 0

    def dense_range(self, start: int, stop: int) -> Tuple[int, int]:
        """What of elements [start, stop) of the flat buffer a checkpoint holds as dense
        arrays (a part laid out in the flat buffer checkpoints its own elements)."""
        return start, stop

    def snapshot_arrays(self, weights: Any) -> List[Any]:
        """The arrays a snapshot of this server sends rank 0 besides its dense range, in the
        order rank 0 receives them (psframe.server.followers)."""
        return []

    def state_part(self) -> Dict[str, Any]:
        """Arrays this server checkpoints of the part."""
        return {}

    def restore(self, arrays: Dict[str, Any]) -> None:
        """This server's part from a checkpoint's arrays."""

    def stats(self, others: Sequence[Any] = ()) -> Any:
        """The part's stats (with ``others``: the other servers')."""
        return None

    def result_params(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """The result's parameters as users see them (a part may hold them in its own order)."""
        return params


class WorkerPart:
    """A part at a worker: prepares a batch for it, packs its gradients, and moves its
    share of each request to each server. Hooks default to doing nothing."""

    #: This part goes to every server (rank 0's shard range need not meet its own).
    every_server = True

    def batch(self, X: Any) -> Any:
        """The batch's inputs as the model sees them (the part may remap them)."""
        return X

    def params(self, params: Dict[str, Any]) -> Dict[str, Any]:
        """The parameters the model computes on (the part may swap in its own)."""
        return params

    def packs(self, name: str) -> bool:
        """Whether this part packs parameter ``name``'s gradient (not the dense frames)."""
        return False

    def pack(self, grads: Dict[str, Any]) -> None:
        """Its gradients into its push buffers."""

    def finite(self) -> bool:
        """Whether its pushed values are finite (several servers refuse a push alike)."""
        return True

    def post_pull(self, server: int) -> List[Any]:
        """Receives of server ``server``'s answer to the next pull, posted before it is asked."""
        return []

    def send(self, server: int, push: bool, pull: bool) -> List[Any]:
        """Its share of a request to server ``server``; the sends to wait on."""
        return []

    def landed(self) -> None:
        """The pull's replies are here and its receives complete: its payload is usable."""
