"""Payload paths: how one worker's gradients reach the server and its weights come back.

Two paths, one interface. By message, every frame is an MPI message. Through the shared
window (a worker on the server's node), the payload lies in shared memory and only the int64
headers travel as messages. Both ends of a worker-server pair hold a path: the server one per
worker (``open_server_paths``), each worker one to the server (``open_worker_path``). The
roles call only these methods, so a new transport is a new path class, not a change to them.
"""
from __future__ import annotations

from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .. import env
from ..errors import ProtocolError
from .channel import Channel
from .shm import SharedWindow, node_ids, open_window
from .waits import transfer_idle_s
from .wire import Tag

__all__ = ["PayloadPath", "MessagePath", "SharedPath", "open_server_paths", "open_worker_path"]

Frame = Tuple[int, int]


class PayloadPath:
    """The payload between the server and one worker.

    ``gradient`` is where the worker's gradient lies once pushed (the server end) or is packed
    before a push (the worker end); ``weights`` where a pull's weights land (the worker end)
    or the worker's own copy the server writes (the server end; None when nothing is written
    for it). ``name`` is what ``stats["worker_transport"]`` reports.
    """

    name = "path"
    reply_first = True  # the reply header goes before the weight frames

    # Whether a push on this path is applied frame by frame as it lands (see _streams): its
    # worker then checks it whole and flags it finite first.
    streams = False

    def __init__(self, channel: Channel, peer: int, gradient: Any, weights: Any):
        self.channel = channel
        self.peer = peer
        self.gradient = gradient
        self.weights = weights

    # -- the server's end -------------------------------------------------------------------
    def receive_gradient(self, lo: int, hi: int, frames: Optional[Sequence[Frame]] = None,
                         posted: Any = None) -> Iterator[Frame]:
        """Yield each frame (start, stop) of the pushed gradient once it is in ``gradient``;
        ``frames``: the order the worker sends them in (default: the layout's); ``posted``:
        what post_gradient started for it, if it did."""
        raise NotImplementedError

    def post_gradient(self, lo: int, hi: int, frames: Optional[Sequence[Frame]] = None) -> Any:
        """Start landing a push whose header is here, before its turn comes (a server landing
        several workers' pushes at once); receive_gradient(..., posted=) ends it."""
        return None

    def send_frame(self, weights: np.ndarray, a: int, b: int, requests: List[Any]) -> None:
        """Start sending elements [a, b) of the server's weights (requests to wait on go in
        ``requests``)."""
        raise NotImplementedError

    def replies_ready(self) -> None:
        """Before the reply headers of paths that reply last: their weights are visible."""

    @property
    def ready_key(self) -> Any:
        """Paths with the same key are made ready by one replies_ready() call."""
        return id(self)

    # -- the worker's end -------------------------------------------------------------------
    def post_weights(self, lo: int, hi: int) -> List[Any]:
        """Receives for a pull's weight frames, posted before the pull is asked for."""
        raise NotImplementedError

    def await_reply(self, reply: Any, lo: int, hi: int) -> None:
        """Wait for the pull's reply header; the weights are readable once it is here (the
        frames posted by post_weights may still be in flight on the message path)."""
        raise NotImplementedError

    def before_push(self) -> None:
        """Before the push's header is sent."""

    def push_frames(self, lo: int, hi: int) -> None:
        """After the push's header: the gradient's frames, returning once MPI has them."""
        self.channel.wait_frames(self.post_frames(lo, hi))

    def post_frames(self, lo: int, hi: int,
                    frames: Optional[Sequence[Frame]] = None) -> List[Any]:
        """After the push's header: start sending the gradient's frames (``frames``: in this
        order); the requests to wait on (a worker pushing to several servers waits for them
        all at once)."""
        return []


class MessagePath(PayloadPath):
    """Every frame as an MPI message: workers on another node, or ``transport="mpi"``."""

    name = "mpi"
    reply_first = True

    def __init__(self, channel, peer, gradient, weights, streams=False):
        super().__init__(channel, peer, gradient, weights)
        self.streams = streams

    def receive_gradient(self, lo, hi, frames=None, posted=None):
        frames = self.channel.layout.frames(lo, hi) if frames is None else frames
        requests = self.post_gradient(lo, hi, frames) if posted is None else posted
        yield from self.channel.each_frame(requests, frames)

    def post_gradient(self, lo, hi, frames=None):
        return self.channel.irecv_frames(self.gradient, lo, hi, self.peer, Tag.PUSH, frames)

    def send_frame(self, weights, a, b, requests):
        requests.append(self.channel.isend(weights, a, b, self.peer, Tag.WEIGHTS))

    def post_weights(self, lo, hi):
        return self.channel.irecv_frames(self.weights, lo, hi, self.peer, Tag.WEIGHTS)

    def await_reply(self, reply, lo, hi):
        self.channel.wait(reply)

    def post_frames(self, lo, hi, frames=None):
        return self.channel.isend_frames(self.gradient, lo, hi, self.peer, Tag.PUSH, frames)


class SharedPath(PayloadPath):
    """The payload in the node's shared window; only headers are messages.

    The worker's segment holds its gradient, then (unless it reads the server's weights in
    place: "shared-read", safe only under a lockstep policy) its own copy of the weights,
    which the server writes frame by frame as each is updated ("shared-copy").
    """

    reply_first = False  # the reply says the weights are all there

    def __init__(self, channel, peer, gradient, weights, window: SharedWindow,
                 server_writes: bool):
        super().__init__(channel, peer, gradient, weights)
        self.window = window
        self.name = "shared-copy" if server_writes else "shared-read"

    def receive_gradient(self, lo, hi, frames=None, posted=None):
        self.window.fence()  # already in the worker's segment: read it where it lies
        yield from self.channel.layout.frames(lo, hi)

    def send_frame(self, weights, a, b, requests):
        if self.weights is not None:  # copied while the frame is still in cache
            np.copyto(self.weights[a:b], weights[a:b])

    def replies_ready(self):
        self.window.fence()

    @property
    def ready_key(self):
        return id(self.window)  # one fence orders this rank's writes to the whole window

    def post_weights(self, lo, hi):
        return []  # the server writes them in place, then answers

    def await_reply(self, reply, lo, hi):
        # No transfer to keep moving: the reply comes when the server's update is done.
        layout = self.channel.layout
        start, stop = layout.shard_range(lo, hi)
        self.channel.wait_for_work(reply, transfer_idle_s((stop - start) * layout.dtype.itemsize))
        self.window.fence()  # the server's writes before the reply, seen before our reads

    def before_push(self):
        self.window.fence()  # the gradient is already in our segment: the header says so


def open_server_paths(channel: Channel, layout: Any, weights: np.ndarray,
                      worker_ranks: Sequence[int], transport: str, owner: int = 0,
                      own: Optional[Tuple[int, int]] = None):
    """A server's end: (window, weights, paths). Collective with every other server's
    open_server_paths and every worker's open_worker_path. ``weights`` come back moved into
    the shared window where there is one, so that workers on this node can read them.

    Rank ``owner`` (the first server) holds the weights' segment; other servers on its node
    update their range of that same buffer. Each server copies in only ``own``, the element
    range it updates (default: all), so that no server overwrites another's.

    A worker's segment says how it takes part: ``size`` elements, its gradient only (it reads
    the weights in place); ``2 * size``, its gradient then its own copy of the weights;
    none, the message path.
    """
    size = layout.size
    nodes = channel.nodes
    if transport != "mpi" and nodes is None:
        nodes = node_ids(channel.comm)  # collective with the workers' (see open_worker_path)
    mine = channel.rank == owner
    window = open_window(channel, owner, size if mine else 0, layout.dtype, transport)
    shared = window.mine if mine else window.segment(owner)
    if shared is not None:
        start, stop = own if own is not None else (0, size)
        shared[start:stop] = weights[start:stop]  # the weights live where workers read them
        weights = shared
    paths = []
    for rank in worker_ranks:
        seg = window.segment(rank)
        if seg is None:
            paths.append(MessagePath(channel, rank, layout.empty(), None,
                                     streams=_streams(channel, nodes, rank)))
            continue
        if len(seg) not in (size, 2 * size):
            raise ProtocolError(f"rank {rank} shares {len(seg)} elements; expected "
                                f"{size} or {2 * size}")
        copy = seg[size:] if len(seg) == 2 * size else None
        paths.append(SharedPath(channel, rank, seg[:size], copy, window,
                                server_writes=copy is not None))
    return window, weights, paths


def open_worker_path(channel: Channel, layout: Any, servers: Sequence[int], transport: str,
                     reads_in_place: bool, backend: Any, on_device: bool):
    """A worker's end: (window, one path per server, device weights). Collective with the
    servers' open_server_paths. The model computes on the device weights: the paths' own
    weights on NumPy (and on CUDA-aware MPI), a device copy of a pinned host buffer otherwise.

    Every path shares one gradient buffer and one weight buffer: each server reads and writes
    its own range of them. ``reads_in_place``: read the weights straight from the first
    server's segment, when every server is on this node (a remote server's frames need a
    buffer of the worker's own). A GPU worker's buffers are pinned or device memory: it takes
    part with no segment.
    """
    servers = list(servers)
    size, dtype = layout.size, layout.dtype
    nodes = channel.nodes
    if transport != "mpi":
        if nodes is None:
            nodes = node_ids(channel.comm)
        reads_in_place = reads_in_place and all(nodes[s] == nodes[channel.rank]
                                                for s in servers)
    wanted = 0 if on_device else size if reads_in_place else 2 * size
    window = open_window(channel, servers[0], wanted, dtype, transport)
    segment = window.mine
    if segment is None:
        weights, weights_dev = backend.buffers(size, dtype)
        gradient, _ = backend.buffers(size, dtype)
        return window, [MessagePath(channel, s, gradient, weights,
                                    streams=_streams(channel, nodes, s))
                        for s in servers], weights_dev
    if reads_in_place:
        weights = window.segment(servers[0]).view()
        weights.flags.writeable = False  # the servers' weights: never the worker's to write
    else:
        weights = segment[size:]
    gradient = segment[:size]
    paths = [SharedPath(channel, s, gradient, weights, window, server_writes=not reads_in_place)
             if window.has(s) else MessagePath(channel, s, gradient, weights,
                                               streams=_streams(channel, nodes, s))
             for s in servers]
    return window, paths, weights


def _streams(channel, nodes, peer):
    """Whether pushes by message between this rank and ``peer`` are applied as they land
    ($PSFRAME_STREAM): by default only between nodes, where the reply's frames then travel
    while the push's still arrive. On one node MPI's copies share the cores with the update,
    and streaming measured slower (docs/operations.md). ``nodes``: each rank's node, or None
    where the run did not count them (a hand-built channel): then nothing is remote."""
    mode = env.stream()
    if mode != "remote":
        return mode == "always"
    return nodes is not None and nodes[channel.rank] != nodes[peer]
