"""SharedWindow: one MPI-3 shared-memory window for the server and the workers on its node."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Dict, List, Optional, Set

import numpy as np
import numpy.typing as npt
from mpi4py import MPI

from .waits import Waiter

if TYPE_CHECKING:
    from .channel import Channel

__all__ = ["SharedWindow", "open_window", "node_ids"]

# Use at most this share of the free space of /dev/shm, where MPICH maps shared windows, so a
# full tmpfs means the message path, not a failed allocation on one rank and a hung collective.
_SHM_SHARE = 0.5
_SHM_DIR = "/dev/shm"
# Every segment is asked for in whole pages. Open MPI rounds them up to pages itself and
# reports the rounded size, MPICH the exact one; asking for whole pages everywhere means the
# sizes a peer sees are never the sizes to trust, so the requested lengths travel separately
# (an allgather) on every MPI, and that path is the one the tests run.
_PAGE_BYTES = 4096


def _shm_free_bytes() -> Optional[int]:
    try:
        st = os.statvfs(_SHM_DIR)
    except OSError:
        return None  # no tmpfs to look at (not Linux): let MPI decide
    return st.f_bavail * st.f_frsize


class SharedWindow:
    """Each rank's segment of one shared window over the ranks on ``server_rank``'s node.

    Collective over ``comm``: every rank calls it once, asking for ``n_elems`` elements of
    ``dtype`` (0: none). Ranks on other nodes get no window (``segment`` returns None), and so
    does everyone when the node's requests would not fit in shared memory. The window stays
    in one passive-target epoch for its life: ``fence()`` (MPI_Win_sync) orders a rank's
    writes before the message that tells a peer to read them.
    """

    def __init__(self, comm: Optional[MPI.Comm], server_rank: int, n_elems: int,
                 dtype: npt.DTypeLike, waiter: Optional[Waiter] = None) -> None:
        self.dtype = np.dtype(dtype)
        self.waiter = waiter if waiter is not None else Waiter(oversubscribed=True, yield_s=0.0)
        self.win: Optional[MPI.Win] = None
        self.node: Optional[MPI.Comm] = None
        self._segments: Dict[int, np.ndarray] = {}
        self._on_node: Set[int] = set()
        self.mine: Optional[np.ndarray] = None  # the calling rank's own segment
        if comm is None:  # the message path (transport="mpi"): no window, no segments
            return
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        comm_group, node_group = comm.Get_group(), node.Get_group()
        ranks = list(range(comm.Get_size()))
        as_node = MPI.Group.Translate_ranks(comm_group, ranks, node_group)
        comm_group.Free()
        node_group.Free()
        if as_node[server_rank] == MPI.UNDEFINED:  # the server is elsewhere: messages only
            node.Free()
            return
        self.node = node
        self._on_node = {r for r, nr in enumerate(as_node) if nr != MPI.UNDEFINED}
        lengths = node.allgather(int(n_elems))  # elements each node rank asked for
        nbytes = -(-int(n_elems) * self.dtype.itemsize // _PAGE_BYTES) * _PAGE_BYTES
        total = node.allreduce(nbytes)
        free = _shm_free_bytes()
        fits = node.allreduce(int(free is None or total <= _SHM_SHARE * free), op=MPI.MIN)
        if not fits:
            nbytes = 0
            lengths = [0] * len(lengths)
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # page-aligned segments, each near its owner
        try:
            # mpi4py's stubs type Split_type's result as a Comm; on an Intracomm it is one too.
            self.win = MPI.Win.Allocate_shared(nbytes, self.dtype.itemsize, info=info,
                                               comm=node)  # type: ignore[arg-type]
        finally:
            info.Free()
        self.win.Lock_all(MPI.MODE_NOCHECK)
        for rank, node_rank in enumerate(as_node):
            if node_rank == MPI.UNDEFINED:
                continue
            n = lengths[node_rank]
            if n:
                buf, _ = self.win.Shared_query(node_rank)
                # numpy's stubs list concrete buffer types; mpi4py's buffer has the protocol.
                self._segments[rank] = np.frombuffer(
                    buf, dtype=self.dtype, count=n)  # type: ignore[call-overload]
        self.mine = self._segments.get(comm.Get_rank())

    def has(self, rank: int) -> bool:
        """Whether ``rank`` is on this window's node (and so can reach its segments)."""
        return self.node is not None and rank in self._on_node

    def segment(self, rank: int) -> Optional[np.ndarray]:
        """Rank ``rank``'s segment (a flat writable array of exactly the elements it asked
        for), or None if it has none here."""
        return self._segments.get(rank)

    def fence(self) -> None:
        """Make this rank's writes to the window visible before it signals a peer."""
        assert self.win is not None, "fence() on a rank with no window"
        self.win.Sync()

    def close(self) -> None:
        """Free the window: collective over the node, waiting without spinning a core (a
        worker that finished early must not take the CPU from a server still evaluating)."""
        if self.node is None:
            return
        self._segments.clear()
        self.mine = None
        if self.win is not None:
            self.waiter.wait(self.node.Ibarrier())
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
        self.node.Free()
        self.node = None


def open_window(channel: Channel, server_rank: int, n_elems: int, dtype: npt.DTypeLike,
                transport: str) -> SharedWindow:
    """The run's SharedWindow over ``channel``'s communicator: collective unless
    ``transport="mpi"``, where no rank builds one (every segment is then None and every
    payload a message)."""
    comm = None if transport == "mpi" else channel.comm
    return SharedWindow(comm, server_rank, n_elems, dtype, waiter=channel.waiter)


def node_ids(comm: MPI.Comm) -> List[int]:
    """For each rank of ``comm``, the lowest rank on its shared-memory node (collective):
    ranks with equal ids can share a window. MPI's view, not the kernel's: the hosts of a
    simulated cluster share one kernel but are separate nodes to MPI."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        first = node.allreduce(comm.Get_rank(), op=MPI.MIN)
    finally:
        node.Free()
    return comm.allgather(first)
