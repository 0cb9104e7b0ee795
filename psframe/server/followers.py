"""Followers: rank 0's link to the other servers, which carry out its decisions on their ranges."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from ..transport import Tag
from .orders import Kind, OrderWriter

if TYPE_CHECKING:
    import numpy as np

    from ..policies import PushDecision
    from ..sparse.tables import SparseTables
    from ..transport.channel import Channel
    from ..transport.shm import SharedWindow

__all__ = ["Followers", "snapshot_shards"]


def snapshot_shards(shards: Sequence[int], sparse: Optional[SparseTables]) -> Tuple[int, ...]:
    """The shards of a server's range that a snapshot copies as frames: with row-sparse
    tables, the dense ones (the tables' rows go by block)."""
    if sparse is None:
        return tuple(shards)
    end = sparse.dense_shards[1]
    return min(shards[0], end), min(shards[1], end)


class Followers:
    """The servers other than rank 0: ``ranks`` and each one's shard range ``shards``.

    Rank 0 runs the policy; every other server applies the same decisions, in the same
    order, to its own range (psframe.server.shard_server). So Sync's mean, a backup's drop,
    Mixed's switch, SSP's released pulls and a stop are decided once and agree everywhere.
    ``shared[i]``: server i updates rank 0's own weight buffer (the node's shared window),
    so a snapshot needs only its word that it got there, not its range; rank 0 sets it once
    its window is open (see ``share``).
    """

    def __init__(self, channel: Channel, ranks: Sequence[int], shards: Sequence[Tuple[int, int]],
                 n_workers: int, sparse: Optional[SparseTables] = None) -> None:
        """``sparse``: the run's row-sparse tables, whose rows each server holds a block of."""
        self.channel = channel
        self.ranks = list(ranks)
        self.sparse = sparse
        self.shards = [snapshot_shards(r, sparse) for r in shards]
        self.shared = [False] * len(self.ranks)
        self.writer = OrderWriter(channel, self.ranks, n_workers)

    def share(self, window: SharedWindow) -> None:
        """Which servers update rank 0's buffer in ``window``: those on its node, when the
        window holds it (ShardServer.shares_weights is the same test, from their side)."""
        self.shared = [window.mine is not None and window.has(r) for r in self.ranks]

    def request(self, worker: int, op: int, decision: Optional[PushDecision],
                replies: Sequence[Sequence[int]]) -> None:
        """Before rank 0 carries out its own part: the others work on theirs meanwhile."""
        self.writer.request(worker, op, decision, replies)

    def snapshot(self, weights: np.ndarray) -> None:
        """Every server's range into rank 0's ``weights``, as of the last order."""
        self.writer.plain(Kind.SNAPSHOT)
        frames = []
        for s, (rank, (lo, hi), shared) in enumerate(zip(self.ranks, self.shards, self.shared)):
            if not shared:
                frames += self.channel.irecv_frames(weights, lo, hi, rank, Tag.RANGE)
                if self.sparse is not None:  # and its block of each table's rows
                    tables = self.sparse.views(weights)
                    for name, (a, b) in self.sparse.row_blocks[s + 1].items():
                        frames.append(self.channel.irecv_array(tables[name][a:b], rank,
                                                               Tag.RANGE))
        for rank in self.ranks:
            self.channel.recv_object(rank, Tag.CONTROL)  # each has sent (or written) its range
        self.channel.wait_frames(frames)

    def checkpoint(self, version: int) -> List[Dict[str, Any]]:
        """Each server writes its range of checkpoint ``version``; what each wrote."""
        self.writer.plain(Kind.CHECKPOINT, version)
        return [self.channel.recv_object(rank, Tag.CONTROL) for rank in self.ranks]

    def end(self, interrupted: bool) -> List[Dict[str, Any]]:
        """Every worker is done: the other servers stop; each one's stats."""
        self.writer.plain(Kind.END, interrupted=interrupted)
        return [self.channel.recv_object(rank, Tag.CONTROL) for rank in self.ranks]
