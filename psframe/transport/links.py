"""Links: one per peer, how a worker's payload reaches a server and the weights come back.

Two kinds, one interface. By message (``MessageLink``), every frame is an MPI message.
Through the shared window (``SharedLink``, a worker on the server's node), the payload lies
in shared memory and only the int64 headers travel as messages. Both ends of a worker-server
pair hold a link: a server one per worker (``open_server_links``), a worker one per server
(``open_worker_links``). ``make_link`` is the one place that chooses a kind (as ps-lite's
``Van::Create`` does), so a new transport is a new Link class registered in ``LINKS``.

Every frame of the dense buffer passes through the link's codec (transport.codecs), which
says its element type and count on the wire. Other payload parts (the row-sparse rows) move
whole arrays through ``post_array``/``send_array``, on links that move payload.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Type

import numpy as np

from .. import env
from ..errors import ProtocolError
from .channel import Channel
from .codecs import Codec, Identity
from .shm import SharedWindow, node_ids, open_window
from .waits import transfer_idle_s
from .wire import Tag

__all__ = ["Link", "MessageLink", "SharedLink", "Landing", "Sends", "LINKS", "make_link",
           "open_server_links", "open_worker_links", "streams_between"]

Frame = Tuple[int, int]


class Landing:
    """The receives of one payload's frames (``frames[i]`` lands through ``requests[i]``),
    into ``flat`` through ``codec``. The one object that waits on them: the server's update
    and the worker's device copies see frames, never requests."""

    def __init__(self, channel: Channel, flat: np.ndarray, frames: Sequence[Frame],
                 requests: List[Any], codec: Codec) -> None:
        self.channel = channel
        self.flat = flat
        self.frames = list(frames)
        self.requests = requests
        self.codec = codec
        self._landed: Set[int] = set()  # frames waited for (and decoded), by index

    def done(self) -> bool:
        """Whether every frame has landed (not yet decoded: see wait_frame, arrivals)."""
        return self.channel.done(self.requests)

    def count_done(self) -> int:
        return self.channel.count_done(self.requests)

    def wait_frame(self, i: int, watched: Sequence["Landing"] = ()) -> Frame:
        """Frame i, landed and decoded. ``watched``: every landing the caller is waiting on
        (this one among them), tested without a pause while any of them keeps completing."""
        needed = [self.requests[i]]
        if not self.channel.done(needed):
            self.channel.await_frames(needed, [r for landing in watched or (self,)
                                               for r in landing.requests])
        return self._decoded(i)

    def _decoded(self, i: int) -> Frame:
        a, b = self.frames[i]
        if i not in self._landed:  # once: a real codec's decode is not idempotent
            self._landed.add(i)
            if not self.codec.in_place:
                self.codec.decode(self.flat, a, b)
        return a, b

    def arrivals(self) -> Iterator[Frame]:
        """Each frame as it lands, decoded, in the order they complete."""
        if self.codec.in_place:
            return self.channel.each_frame(self.requests, self.frames)
        return (self._decoded(i) for i in self.channel.each_index(self.requests))

    def in_order(self) -> Iterator[Frame]:
        """Each frame in frame order, once it has landed and is decoded (a GPU worker copies
        one to the device while the next arrives)."""
        for i, request in enumerate(self.requests):
            self.channel.wait(request, spin_s=self.channel.idle_s)  # in flight: keep progressing
            yield self._decoded(i)

    def wait(self) -> None:
        """Every frame landed and decoded."""
        if self.codec.in_place:
            self.channel.wait_frames(self.requests)
            return
        for _ in self.arrivals():
            pass

    def wait_within(self, start: int, stop: int) -> None:
        """The frames that meet elements [start, stop) (a layer's weights), landed."""
        needed = [i for i, (a, b) in enumerate(self.frames)
                  if a < stop and b > start and i not in self._landed]
        if needed:
            self.channel.wait_frames([self.requests[i] for i in needed])
            for i in needed:
                self._decoded(i)

    def cancel(self) -> None:
        """Withdraw the frames: no payload follows (the pull was answered without weights)."""
        self.channel.cancel(self.requests)


class Sends:
    """The sends of one answer in flight (weight frames, row-sparse rows): the server's
    update hands each frame to the links through it, and never sees a request."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.requests: List[Any] = []

    def frame(self, link: "Link", weights: np.ndarray, a: int, b: int) -> None:
        """Elements [a, b) of ``weights`` on their way to ``link``'s peer."""
        link.send_frame(weights, a, b, self.requests)

    def progress(self) -> None:
        """Move the frames already posted along, without waiting for them."""
        if self.requests:
            self.channel.progress(self.requests)

    def wait(self) -> None:
        if self.requests:
            self.channel.wait_frames(self.requests)
            self.requests = []


class Link:
    """The payload between one worker and one server, at either end.

    ``gradient`` is where the worker's gradient lies once pushed (the server end) or is packed
    before a push (the worker end); ``weights`` where a pull's weights land (the worker end)
    or the worker's own copy the server writes (the server end; None when nothing is written
    for it). ``name`` is what ``stats["worker_transport"]`` reports.
    """

    name = "link"
    reply_first = True  # the reply header goes before the weight frames
    # Whether payload moves as messages on this link (else it lies in place: only headers
    # and the row-sparse ids travel).
    moves_payload = True
    # Whether a push on this link is applied frame by frame as it lands (see
    # ParameterServer's pushes): its worker then checks it whole and flags it finite first.
    streams = False

    def __init__(self, channel: Channel, peer: int, gradient: Any, weights: Any,
                 codec: Optional[Codec] = None) -> None:
        self.channel = channel
        self.peer = peer
        self.gradient = gradient
        self.weights = weights
        self.codec = codec if codec is not None else Identity(channel.layout.dtype)

    def _frames(self, lo: int, hi: int, frames: Optional[Sequence[Frame]]) -> Sequence[Frame]:
        return self.channel.layout.frames(lo, hi) if frames is None else frames

    # -- the server's end -------------------------------------------------------------------
    def post_push(self, lo: int, hi: int,
                  frames: Optional[Sequence[Frame]] = None) -> Optional[Landing]:
        """Start landing a push of shards [lo, hi) whose header is here (``frames``: the order
        the worker sends them in; default: the layout's); None where nothing moves."""
        return None

    def pushed_frames(self, lo: int, hi: int, frames: Optional[Sequence[Frame]] = None,
                      landing: Optional[Landing] = None) -> Iterator[Frame]:
        """Each frame of the pushed gradient once it is in ``gradient``, in arrival order."""
        raise NotImplementedError

    def send_frame(self, weights: np.ndarray, a: int, b: int, sends: List[Any]) -> None:
        """Start sending elements [a, b) of the server's weights (requests to wait on go in
        ``sends``)."""
        raise NotImplementedError

    def replies_ready(self) -> None:
        """Before the reply headers of links that reply last: their weights are visible."""

    @property
    def ready_key(self) -> Any:
        """Links with the same key are made ready by one replies_ready() call."""
        return id(self)

    # -- the worker's end -------------------------------------------------------------------
    def post_weights(self, lo: int, hi: int) -> Landing:
        """Receives for a pull's weight frames, posted before the pull is asked for."""
        raise NotImplementedError

    def await_reply(self, reply: Any, lo: int, hi: int) -> None:
        """Wait for the pull's reply header; the weights are readable once it is here (the
        frames posted by post_weights may still be in flight on the message link)."""
        raise NotImplementedError

    def before_push(self) -> None:
        """Before the push's header is sent."""

    def post_frames(self, lo: int, hi: int,
                    frames: Optional[Sequence[Frame]] = None) -> List[Any]:
        """After the push's header: start sending the gradient's frames (``frames``: in this
        order); the requests to wait on (a worker pushing to several servers waits for them
        all at once)."""
        return []

    # -- whole arrays of another payload part (row-sparse ids and rows) ---------------------
    def post_array(self, out: np.ndarray, tag: int) -> Any:
        """A receive of one whole array from the peer (its length: wait_received)."""
        return self.channel.irecv_array(out, self.peer, tag)

    def send_array(self, array: np.ndarray, tag: int) -> Any:
        return self.channel.isend_array(array, self.peer, tag)


class MessageLink(Link):
    """Every frame as an MPI message: workers on another node, or ``transport="mpi"``."""

    name = "mpi"
    reply_first = True
    moves_payload = True

    def __init__(self, channel: Channel, peer: int, gradient: Any, weights: Any,
                 codec: Optional[Codec] = None, streams: bool = False) -> None:
        super().__init__(channel, peer, gradient, weights, codec)
        self.streams = streams

    def _post(self, flat: np.ndarray, frames: Sequence[Frame], tag: int) -> Landing:
        codec, channel, peer = self.codec, self.channel, self.peer
        if codec.in_place:  # the common case, on every step: no call per frame
            requests = [channel.irecv_array(flat[a:b], peer, tag) for a, b in frames]
        else:
            requests = [channel.irecv_array(codec.landing(flat, a, b), peer, tag)
                        for a, b in frames]
        return Landing(channel, flat, frames, requests, codec)

    def post_push(self, lo: int, hi: int,
                  frames: Optional[Sequence[Frame]] = None) -> Landing:
        return self._post(self.gradient, self._frames(lo, hi, frames), Tag.PUSH)

    def pushed_frames(self, lo: int, hi: int, frames: Optional[Sequence[Frame]] = None,
                      landing: Optional[Landing] = None) -> Iterator[Frame]:
        if landing is None:
            landing = self.post_push(lo, hi, frames)
        yield from landing.arrivals()

    def send_frame(self, weights: np.ndarray, a: int, b: int, sends: List[Any]) -> None:
        frame = weights[a:b] if self.codec.in_place else self.codec.encode(weights, a, b)
        sends.append(self.channel.isend_array(frame, self.peer, Tag.WEIGHTS))

    def post_weights(self, lo: int, hi: int) -> Landing:
        return self._post(self.weights, self.channel.layout.frames(lo, hi), Tag.WEIGHTS)

    def await_reply(self, reply: Any, lo: int, hi: int) -> None:
        self.channel.wait(reply)

    def post_frames(self, lo: int, hi: int,
                    frames: Optional[Sequence[Frame]] = None) -> List[Any]:
        codec, flat, channel, peer = self.codec, self.gradient, self.channel, self.peer
        if codec.in_place:
            return [channel.isend_array(flat[a:b], peer, Tag.PUSH)
                    for a, b in self._frames(lo, hi, frames)]
        return [channel.isend_array(codec.encode(flat, a, b), peer, Tag.PUSH)
                for a, b in self._frames(lo, hi, frames)]


class SharedLink(Link):
    """The payload in the node's shared window; only headers are messages.

    The worker's segment holds its gradient, then (unless it reads the server's weights in
    place: "shared-read", safe only under a lockstep policy) its own copy of the weights,
    which the server writes frame by frame as each is updated ("shared-copy"). Nothing is
    encoded: the buffers are the same memory at both ends.
    """

    reply_first = False  # the reply says the weights are all there
    moves_payload = False

    def __init__(self, channel: Channel, peer: int, gradient: Any, weights: Any,
                 window: SharedWindow, server_writes: bool) -> None:
        super().__init__(channel, peer, gradient, weights)
        self.window = window
        self.name = "shared-copy" if server_writes else "shared-read"
        self._nothing_to_land = Landing(channel, weights, [], [], self.codec)

    def pushed_frames(self, lo: int, hi: int, frames: Optional[Sequence[Frame]] = None,
                      landing: Optional[Landing] = None) -> Iterator[Frame]:
        self.window.fence()  # already in the worker's segment: read it where it lies
        yield from self.channel.layout.frames(lo, hi)

    def send_frame(self, weights: np.ndarray, a: int, b: int, sends: List[Any]) -> None:
        if self.weights is not None:  # copied while the frame is still in cache
            np.copyto(self.weights[a:b], weights[a:b])

    def replies_ready(self) -> None:
        self.window.fence()

    @property
    def ready_key(self) -> Any:
        return id(self.window)  # one fence orders this rank's writes to the whole window

    def post_weights(self, lo: int, hi: int) -> Landing:
        # The server writes them in place, then answers: nothing to land (one empty
        # landing serves every pull).
        return self._nothing_to_land

    def await_reply(self, reply: Any, lo: int, hi: int) -> None:
        # No transfer to keep moving: the reply comes when the server's update is done.
        layout = self.channel.layout
        start, stop = layout.shard_range(lo, hi)
        self.channel.wait_for_work(reply, transfer_idle_s((stop - start) * layout.dtype.itemsize))
        self.window.fence()  # the server's writes before the reply, seen before our reads

    def before_push(self) -> None:
        self.window.fence()  # the gradient is already in our segment: the header says so


LINKS: Dict[str, Type[Link]] = {"mpi": MessageLink, "shared": SharedLink}


def make_link(kind: str, channel: Channel, peer: int, gradient: Any, weights: Any,
              **options: Any) -> Link:
    """The link of ``kind`` ("mpi", "shared") to ``peer``: the one place a kind is chosen."""
    try:
        cls = LINKS[kind]
    except KeyError:
        raise ValueError(f"unknown link kind {kind!r}; known: {sorted(LINKS)}") from None
    return cls(channel, peer, gradient, weights, **options)


def open_server_links(channel: Channel, layout: Any, weights: np.ndarray,
                      worker_ranks: Sequence[int], transport: str, owner: int = 0,
                      own: Optional[Tuple[int, int]] = None
                      ) -> Tuple[SharedWindow, np.ndarray, List[Link]]:
    """A server's end: (window, weights, links). Collective with every other server's
    open_server_links and every worker's open_worker_links. ``weights`` come back moved into
    the shared window where there is one, so that workers on this node can read them.

    Rank ``owner`` (the first server) holds the weights' segment; other servers on its node
    update their range of that same buffer. Each server copies in only ``own``, the element
    range it updates (default: all), so that no server overwrites another's.

    A worker's segment says how it takes part: ``size`` elements, its gradient only (it reads
    the weights in place); ``2 * size``, its gradient then its own copy of the weights;
    none, the message link.
    """
    size = layout.size
    nodes = channel.nodes
    if transport != "mpi" and nodes is None:
        nodes = node_ids(channel.comm)  # collective with the workers' (see open_worker_links)
    mine = channel.rank == owner
    window = open_window(channel, owner, size if mine else 0, layout.dtype, transport)
    shared = window.mine if mine else window.segment(owner)
    if shared is not None:
        start, stop = own if own is not None else (0, size)
        shared[start:stop] = weights[start:stop]  # the weights live where workers read them
        weights = shared
    links: List[Link] = []
    for rank in worker_ranks:
        seg = window.segment(rank)
        if seg is None:
            links.append(make_link("mpi", channel, rank, layout.empty(), None,
                                   streams=streams_between(channel, nodes, rank)))
            continue
        if len(seg) not in (size, 2 * size):
            raise ProtocolError(f"rank {rank} shares {len(seg)} elements; expected "
                                f"{size} or {2 * size}")
        copy = seg[size:] if len(seg) == 2 * size else None
        links.append(make_link("shared", channel, rank, seg[:size], copy, window=window,
                               server_writes=copy is not None))
    return window, weights, links


def open_worker_links(channel: Channel, layout: Any, servers: Sequence[int], transport: str,
                      reads_in_place: bool, backend: Any, on_device: bool
                      ) -> Tuple[SharedWindow, List[Link], Any]:
    """A worker's end: (window, one link per server, device weights). Collective with the
    servers' open_server_links. The model computes on the device weights: the links' own
    weights on NumPy (and on CUDA-aware MPI), a device copy of a pinned host buffer otherwise.

    Every link shares one gradient buffer and one weight buffer: each server reads and writes
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
        return window, [make_link("mpi", channel, s, gradient, weights,
                                  streams=streams_between(channel, nodes, s))
                        for s in servers], weights_dev
    if reads_in_place:
        served = window.segment(servers[0])
        assert served is not None  # every server is on this node (checked above)
        weights = served.view()
        weights.flags.writeable = False  # the servers' weights: never the worker's to write
    else:
        weights = segment[size:]
    gradient = segment[:size]
    links = [make_link("shared", channel, s, gradient, weights, window=window,
                       server_writes=not reads_in_place)
             if window.has(s) else make_link("mpi", channel, s, gradient, weights,
                                             streams=streams_between(channel, nodes, s))
             for s in servers]
    return window, links, weights


def streams_between(channel: Channel, nodes: Optional[Sequence[int]], peer: int) -> bool:
    """Whether pushes by message between this rank and ``peer`` are applied as they land
    ($PSFRAME_STREAM): by default only between nodes, where the reply's frames then travel
    while the push's still arrive. On one node MPI's copies share the cores with the update,
    and streaming measured slower (docs/operations.md). ``nodes``: each rank's node, or None
    where the run did not count them (a hand-built channel): then nothing is remote."""
    mode = env.stream()
    if mode != "remote":
        return mode == "always"
    return nodes is not None and nodes[channel.rank] != nodes[peer]
