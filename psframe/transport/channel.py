"""Channel: every communicator call of a run, on one communicator, waited by one Waiter."""
from __future__ import annotations

from typing import Any, Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from mpi4py import MPI

from .waits import Waiter, transfer_idle_s

__all__ = ["Channel", "RequestQueue"]


class Channel:
    """Buffer sends and receives of headers, flat-buffer frames and arrays, and the few
    small control objects, on ``comm``. Roles never call the communicator themselves: a new
    transport replaces this class (and psframe.transport.links), not the roles."""

    def __init__(self, comm: MPI.Comm, layout: Any, waiter: Optional[Waiter] = None,
                 nodes: Optional[Sequence[int]] = None) -> None:
        self.comm = comm
        self.layout = layout
        # Each rank's MPI node (psframe.transport.shm.node_ids), when the run has counted
        # them: which peers are on other nodes (the links stream pushes from those).
        self.nodes = nodes
        # Without one: short spins and no yielding, safe on any node before its census
        # (train() gives each rank the Waiter its node calls for).
        self.waiter = waiter if waiter is not None else Waiter(oversubscribed=True, yield_s=0.0)
        largest = min(layout.size, layout.shard_elems) * layout.dtype.itemsize
        self.idle_s = transfer_idle_s(largest)

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    # -- waiting ----------------------------------------------------------------------------
    def wait(self, request: MPI.Request, spin_s: Optional[float] = None) -> MPI.Status:
        return self.waiter.wait(request, spin_s)

    def wait_for_work(self, request: MPI.Request, expected_s: float) -> MPI.Status:
        return self.waiter.wait_for_work(request, expected_s)

    def wait_frames(self, requests: Sequence[MPI.Request]) -> None:
        """Wait for frames in flight (see Waiter.wait_all), with this layout's frame budget."""
        self.waiter.wait_all(requests, self.idle_s)

    def each_frame(self, requests: Sequence[MPI.Request],
                   frames: Sequence[Tuple[int, int]]) -> Iterator[Tuple[int, int]]:
        """Yield each frame's (start, stop) as its request completes, in arrival order."""
        for i in self.waiter.completed(requests, self.idle_s):
            yield frames[i]

    def until_settled(self, done: Callable[[], bool], moved: Callable[[], bool]) -> None:
        """Wait until ``done()``, testing without a pause while ``moved()`` says transfers are
        still completing (a server whose pushes land meanwhile; see Waiter.until_settled)."""
        self.waiter.until_settled(done, moved, self.idle_s)

    def each_index(self, requests: Sequence[MPI.Request]) -> Iterator[int]:
        """Yield each request's index as it completes, in arrival order."""
        return self.waiter.completed(requests, self.idle_s)

    def await_frames(self, needed: Sequence[MPI.Request],
                     watched: Sequence[MPI.Request]) -> None:
        """Wait until every request in ``needed`` is complete (left to be freed by a later
        wait), testing without a pause while any of ``watched`` (which holds ``needed``)
        keeps completing: a sleep then would stall a transfer that needs this rank's
        progress (see Waiter.until_settled)."""
        def done() -> bool:
            return all(r.Get_status() for r in needed)

        if done():
            return
        landed = sum(r.Get_status() for r in watched)

        def moved() -> bool:
            nonlocal landed
            before, landed = landed, sum(r.Get_status() for r in watched)
            return landed > before

        self.waiter.until_settled(done, moved, self.idle_s)

    def progress(self, requests: Sequence[MPI.Request]) -> None:
        """Move the transfers already posted along, without waiting for them."""
        MPI.Request.Testall(requests)

    @staticmethod
    def done(requests: Sequence[MPI.Request]) -> bool:
        """Whether every one of ``requests`` is complete (they stay to be freed by a wait)."""
        return all(r.Get_status() for r in requests)

    @staticmethod
    def count_done(requests: Sequence[MPI.Request]) -> int:
        """How many of ``requests`` are complete: whether a transfer is still moving."""
        return sum(r.Get_status() for r in requests)

    def cancel(self, requests: Sequence[MPI.Request]) -> None:
        """Withdraw receives that will never be matched (a pull answered without weights)."""
        for r in requests:
            r.Cancel()
        self.wait_frames(requests)

    def wait_received(self, request: MPI.Request, itemsize: int) -> int:
        """Wait for a receive; the number of ``itemsize``-byte elements it brought."""
        return self.wait(request).Get_count(MPI.BYTE) // itemsize

    def until_received(self, request: MPI.Request, itemsize: int,
                       while_waiting: Any = None, moved: Any = None) -> int:
        """wait_received, running ``while_waiting()`` as it tests (a server starting to land
        the pushes already announced) and testing without a pause while ``moved()`` says
        those transfers still complete (see Waiter.until_settled)."""
        if while_waiting is None:
            return self.wait_received(request, itemsize)
        status = MPI.Status()

        def done() -> bool:
            while_waiting()
            return bool(request.Test(status))

        self.waiter.until_settled(done, moved, self.idle_s)
        return status.Get_count(MPI.BYTE) // itemsize

    def barrier(self) -> None:
        """Every rank of the communicator, met without spinning a core."""
        self.wait(self.comm.Ibarrier())

    # -- headers ----------------------------------------------------------------------------
    def send_header(self, header: np.ndarray, dest: int, tag: int) -> None:
        self.wait(self.comm.Isend([header, MPI.INT64_T], dest=dest, tag=tag))

    def requests_from(self, sources: Sequence[int], tag: int) -> "RequestQueue":
        """The request headers ``sources`` send with ``tag``, one receive posted per source."""
        return RequestQueue(self, sources, tag)

    def irecv_header(self, header: np.ndarray, source: int, tag: int) -> MPI.Request:
        """A header's receive, posted now and waited later (a pull's reply)."""
        return self.comm.Irecv([header, MPI.INT64_T], source=source, tag=tag)

    # -- flat-buffer frames -----------------------------------------------------------------
    # The element type on the wire is the array's own: a frame's codec (transport.codecs)
    # decides it, not the channel.
    def isend(self, flat: np.ndarray, a: int, b: int, dest: int, tag: int) -> MPI.Request:
        """Send elements [a, b) of ``flat``: one frame."""
        return self.comm.Isend(flat[a:b], dest=dest, tag=tag)

    def irecv(self, flat: np.ndarray, a: int, b: int, source: int, tag: int) -> MPI.Request:
        """Receive elements [a, b) of ``flat``: one frame."""
        return self.comm.Irecv(flat[a:b], source=source, tag=tag)

    def isend_frames(self, flat: np.ndarray, lo: int, hi: int, dest: int, tag: int,
                     frames: Optional[Sequence[Tuple[int, int]]] = None) -> List[MPI.Request]:
        """Shards [lo, hi) of ``flat``, one message per frame: the layout's frames, or
        ``frames`` (the same elements in another order: a layer-wise push)."""
        frames = self.layout.frames(lo, hi) if frames is None else frames
        return [self.isend(flat, a, b, dest, tag) for a, b in frames]

    def irecv_frames(self, flat: np.ndarray, lo: int, hi: int, source: int, tag: int,
                     frames: Optional[Sequence[Tuple[int, int]]] = None) -> List[MPI.Request]:
        frames = self.layout.frames(lo, hi) if frames is None else frames
        return [self.irecv(flat, a, b, source, tag) for a, b in frames]

    # -- whole arrays (a pipeline's activations, row-sparse ids and rows) -------------------
    def isend_array(self, array: Any, dest: int, tag: int) -> MPI.Request:
        return self.comm.Isend(array, dest=dest, tag=tag)

    def irecv_array(self, out: Any, source: int, tag: int) -> MPI.Request:
        return self.comm.Irecv(out, source=source, tag=tag)

    def recv_array(self, out: Any, source: int, tag: int) -> None:
        self.wait(self.comm.Irecv(out, source=source, tag=tag))

    # -- control: small pickled objects, never on the hot path ------------------------------
    def send_object(self, obj: Any, dest: int, tag: int) -> None:
        self.comm.send(obj, dest=dest, tag=tag)

    def recv_object(self, source: int, tag: int) -> Any:
        return self.comm.recv(source=source, tag=tag)


class RequestQueue:
    """Request headers from a fixed set of peers: one receive posted per peer; ``arrived``
    says whose are here, ``take`` reads one and posts that peer's next receive.

    Never an MPI_ANY_SOURCE receive: under MPICH's UCX netmod, a receive from any source
    while two or more peers on other hosts send messages above the eager size stalled for
    good, while one receive per source ran (docs/operations.md, "Many nodes"). A peer has at
    most one request outstanding (it waits for the reply), but may send DONE right after a
    PUSH, so its receive is posted again as soon as a header is read.
    """

    def __init__(self, channel: Channel, sources: Sequence[int], tag: int) -> None:
        from .wire import new_header

        self.channel = channel
        self.sources = list(sources)
        self.tag = tag
        self.headers = [new_header() for _ in self.sources]
        self.requests = [channel.irecv_header(h, s, tag)
                         for h, s in zip(self.headers, self.sources)]
        self.ready: List[int] = []

    def arrived(self) -> List[int]:
        """The peers whose next request is here, not waiting for any (not yet taken)."""
        done = MPI.Request.Testsome(self.requests)
        if done:
            self.ready = sorted(set(self.ready) | set(done))
        return list(self.ready)

    def take(self, i: int) -> List[int]:
        """The next request of peer ``i`` itself, waiting for it (a server that follows rank
        0's order of requests), or that arrived() listed; its next receive is posted."""
        if i in self.ready:
            self.ready.remove(i)
        else:
            self.channel.wait(self.requests[i])
        fields = self.headers[i].tolist()  # plain ints: cheaper to read than the array
        self.requests[i] = self.channel.irecv_header(self.headers[i], self.sources[i],
                                                      self.tag)
        return fields

    def close(self, i: int) -> None:
        """Peer ``i`` sends no more requests: withdraw its posted receive."""
        request = self.requests[i]
        if request != MPI.REQUEST_NULL:
            request.Cancel()
            request.Wait()
        self.requests[i] = MPI.REQUEST_NULL
