"""An in-process stand-in for psframe.transport.Channel: each rank of a run, a thread."""
from __future__ import annotations

import copy
import pickle
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from psframe.transport import Channel, Waiter
from psframe.transport.waits import transfer_idle_s
from psframe.transport.wire import Field, Op, Status, Tag, fill_header, new_header

__all__ = ["World", "FakeComm", "FakeChannel", "FakeRequest", "FakeRequestQueue", "FakeTimeout",
           "FakeMPIError", "WorldAborted", "Rank", "ScriptedWorker", "Pending",
           "train_inprocess"]

# Every wait gives up after this long: a test that deadlocks fails, it never hangs.
TIMEOUT_S = 10.0

Key = Tuple[int, int, int]  # (source, dest, tag): MPI's non-overtaking order holds per key


class FakeTimeout(TimeoutError):
    """A wait that nothing would ever end (a deadlock, or a message never sent)."""


class FakeMPIError(RuntimeError):
    """What real MPI would refuse: a truncated receive, a send buffer changed in flight."""


class WorldAborted(RuntimeError):
    """Another rank failed: this one's wait ends at once instead of timing out."""


class FakeRequest:
    """A nonblocking send or receive (mpi4py's Request, as far as psframe calls it).

    A send copies its buffer when posted and is complete at once; it keeps the buffer until
    its completion is first seen, so that a buffer changed before then (which real MPI may
    still be reading) is an error. A receive completes when a matching message is delivered
    into its buffer (or, for a pickled object, into ``obj``), or when it is cancelled."""

    def __init__(self, world: "World", buf: Optional[np.ndarray] = None) -> None:
        self.world = world
        self.buf = buf  # a receive's landing buffer (None: a send, or an object receive)
        self.complete = False
        self.cancelled = False
        self.nbytes = 0  # what the message brought: Get_count(MPI.BYTE)
        self.obj: Any = None
        self.seq = 0  # completion order, for each_index's "in arrival order"
        self.error: Optional[BaseException] = None
        self._sent: Optional[Tuple[np.ndarray, bytes]] = None  # (buffer, bytes at post)

    def _observe(self) -> bool:
        if self.error is not None:
            raise self.error
        if self.complete and self._sent is not None:
            buf, payload = self._sent
            self._sent = None
            if buf.tobytes() != payload:
                raise FakeMPIError("a send buffer changed before its send was seen complete")
        return self.complete

    # mpi4py's names (N802: not snake case).
    def Get_status(self, status: Any = None) -> bool:  # noqa: N802
        return self._observe()

    def Test(self, status: Any = None) -> bool:  # noqa: N802
        return self._observe()

    def Wait(self, status: Any = None) -> None:  # noqa: N802
        self.world.wait_until(self._observe, "a request")

    def Cancel(self) -> None:  # noqa: N802
        self.world.cancel(self)


class FakeStatus:
    """What a wait returns: the received message's size."""

    def __init__(self, request: FakeRequest) -> None:
        self.request = request

    def Get_count(self, datatype: Any = None) -> int:  # noqa: N802 - counted in bytes here
        return self.request.nbytes


class Rank:
    """One rank's thread: ``join`` returns what its function returned, or raises its error."""

    def __init__(self, world: "World", name: str, fn: Callable[[], Any]) -> None:
        self.world, self.name, self.fn = world, name, fn
        self.result: Any = None
        self.error: Optional[BaseException] = None
        # A daemon: a test that fails while a rank waits does not keep the process alive.
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as exc:  # noqa: B902 - handed to join(), and wakes the others
            self.error = exc
            self.world.abort(exc)
        finally:
            self.world.finished(threading.get_ident())

    def join(self, timeout: float = TIMEOUT_S) -> Any:
        self.thread.join(timeout)
        if self.thread.is_alive():
            error = FakeTimeout(f"{self.name} still runs after {timeout} s")
            self.world.abort(error)  # its waits (and the other ranks') end now
            raise error
        if self.error is not None:
            raise self.error
        return self.result


class World:
    """The in-memory communicator of ``size`` ranks that every FakeChannel of a run shares.

    Point-to-point as MPI does it: a message is matched by (source, tag) at its destination,
    in FIFO order per (source, dest, tag); a receive posted first waits for its message, a
    message sent first waits for its receive. One lock guards it all; every change notifies
    ``changed``, on which every wait blocks (with TIMEOUT_S), so nothing spins.
    """

    def __init__(self, size: int, timeout_s: float = TIMEOUT_S) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self.lock = threading.RLock()  # re-entered: a wait's predicate may send or post
        self.changed = threading.Condition(self.lock)
        self.quiet_changed = threading.Condition(self.lock)  # a rank blocked or finished
        self.unexpected: Dict[Key, Deque[Any]] = {}  # sent, not yet received
        self.posted: Dict[Key, Deque[FakeRequest]] = {}  # posted, not yet matched
        self.epoch = 0  # bumped on every change: a blocked rank at an older one may move
        self.blocked: Dict[Optional[int], int] = {}  # thread id -> epoch it blocked at
        self.running: set = set()  # thread ids of the spawned ranks still running
        self.error: Optional[BaseException] = None
        self.completions = 0
        self._barrier = (0, 0)  # (generation, ranks arrived)

    # -- ranks as threads -------------------------------------------------------------------
    def spawn(self, name: str, fn: Callable[[], Any]) -> Rank:
        """Run ``fn`` (a role's run) in a thread of its own; its error aborts every wait."""
        rank = Rank(self, name, fn)
        with self.lock:  # registered before it can finish (finished() takes the lock)
            rank.thread.start()
            self.running.add(rank.thread.ident)
        return rank

    def finished(self, ident: Optional[int]) -> None:
        with self.lock:
            self.running.discard(ident)
            self.blocked.pop(ident, None)
            self.quiet_changed.notify_all()

    def abort(self, exc: BaseException) -> None:
        with self.lock:
            if self.error is None:
                self.error = exc
            self._changed()

    def settle(self, timeout_s: Optional[float] = None) -> None:
        """Wait until every spawned rank is blocked on a wait that no change has ended since
        it began (or has finished): what is observable now stays so until the next message.
        The scripted peer's way to say "the server has done all it can"."""
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        with self.lock:
            while not all(self.blocked.get(t) == self.epoch for t in self.running):
                if self.error is not None:
                    raise WorldAborted(f"a rank failed: {self.error!r}") from self.error
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FakeTimeout(f"the ranks did not settle in {self.timeout_s} s")
                self.quiet_changed.wait(left)

    # -- waiting ----------------------------------------------------------------------------
    def _changed(self) -> None:
        self.epoch += 1
        self.changed.notify_all()
        self.quiet_changed.notify_all()

    def wait_until(self, done: Callable[[], bool], what: str) -> None:
        """Block until ``done()`` (evaluated under the lock, so no change slips between a
        false answer and the wait); raise FakeTimeout after ``timeout_s``, and WorldAborted
        at once when another rank has failed."""
        deadline = time.monotonic() + self.timeout_s
        me = threading.get_ident()
        with self.lock:
            while True:
                epoch = self.epoch
                if done():
                    return
                if self.error is not None:
                    raise WorldAborted(f"{threading.current_thread().name} gave up waiting "
                                       f"for {what}: a rank failed ({self.error!r})")
                if self.epoch != epoch:
                    continue  # done() itself moved something (posted, sent): ask again
                left = deadline - time.monotonic()
                if left <= 0:
                    raise FakeTimeout(f"{threading.current_thread().name} waited "
                                      f"{self.timeout_s} s for {what}; {self.describe()}")
                self.blocked[me] = epoch
                self.quiet_changed.notify_all()
                try:
                    self.changed.wait(left)
                finally:
                    self.blocked.pop(me, None)

    def describe(self) -> str:
        """What is in flight, in words (a timeout's diagnostic)."""
        tags = {int(t): t.name for t in Tag}
        def name(key: Key) -> str:
            return f"{key[0]}->{key[1]} {tags.get(key[2], key[2])}"
        posted = [f"{name(k)} x{len(q)}" for k, q in self.posted.items() if q]
        sent = [f"{name(k)} x{len(q)}" for k, q in self.unexpected.items() if q]
        return f"receives waiting: {posted or 'none'}; messages unreceived: {sent or 'none'}"

    # -- point to point ---------------------------------------------------------------------
    def send(self, source: int, dest: int, tag: int, payload: Any,
             buf: Optional[np.ndarray] = None) -> FakeRequest:
        """Post a send of ``payload`` (bytes, or ("obj", pickle)), a copy of ``buf`` taken
        now: it is complete at once."""
        self._check_rank(dest)
        request = FakeRequest(self)
        if buf is not None:
            request._sent = (buf, payload)  # checked when its completion is first seen
        with self.lock:
            self.unexpected.setdefault((source, dest, int(tag)), deque()).append(payload)
            self._complete(request)
            self._match((source, dest, int(tag)))
        return request

    def post(self, dest: int, source: int, tag: int,
             buf: Optional[np.ndarray]) -> FakeRequest:
        """Post rank ``dest``'s receive from ``source`` into ``buf`` (None: an object)."""
        self._check_rank(source)
        if buf is not None and not (isinstance(buf, np.ndarray) and buf.flags.c_contiguous):
            raise FakeMPIError("a receive buffer must be a contiguous NumPy array")
        request = FakeRequest(self, buf)
        with self.lock:
            self.posted.setdefault((source, dest, int(tag)), deque()).append(request)
            self._match((source, dest, int(tag)))
        return request

    def cancel(self, request: FakeRequest) -> None:
        """Withdraw a receive not yet matched (a matched one completes as usual, as in MPI)."""
        with self.lock:
            for queue in self.posted.values():
                if request in queue:
                    queue.remove(request)
                    request.cancelled = True
                    self._complete(request)
                    return

    def _match(self, key: Key) -> None:
        sent, posted = self.unexpected.get(key), self.posted.get(key)
        while sent and posted:
            self._deliver(posted.popleft(), sent.popleft())

    def _deliver(self, request: FakeRequest, payload: Any) -> None:
        if request.buf is None:
            request.obj = payload
        elif isinstance(payload, tuple):
            request.error = FakeMPIError("a pickled object arrived at a buffer's receive")
        else:
            target = request.buf.reshape(-1).view(np.uint8)
            if len(payload) > target.nbytes:  # MPI_ERR_TRUNCATE, raised where it is waited
                request.error = FakeMPIError(f"a message of {len(payload)} bytes arrived at a "
                                             f"receive of {target.nbytes}")
            else:
                target[:len(payload)] = np.frombuffer(payload, np.uint8)
                request.nbytes = len(payload)
        self._complete(request)

    def _complete(self, request: FakeRequest) -> None:
        self.completions += 1
        request.seq = self.completions
        request.complete = True
        self._changed()

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.size:
            raise FakeMPIError(f"rank {rank} is not in a world of {self.size}")

    def barrier(self) -> None:
        with self.lock:
            generation, arrived = self._barrier
            if arrived + 1 == self.size:
                self._barrier = (generation + 1, 0)
                self._changed()
                return
            self._barrier = (generation, arrived + 1)
        self.wait_until(lambda: self._barrier[0] != generation, "the barrier")


class FakeComm:
    """The communicator as far as a run with transport="mpi" asks it: its rank and size
    (plan_run's checks). Anything else means a path that needs real MPI: it fails loudly."""

    def __init__(self, world: World, rank: int) -> None:
        self.world, self.rank = world, rank

    def Get_rank(self) -> int:  # noqa: N802
        return self.rank

    def Get_size(self) -> int:  # noqa: N802
        return self.world.size

    def __getattr__(self, name: str) -> Any:
        raise FakeMPIError(f"the in-process world has no communicator call {name!r} "
                           "(a path that needs MPI: transport='auto', a node census?)")


class FakeWaiter(Waiter):
    """The Waiter of a FakeChannel: every wait blocks on the world's condition instead of
    spinning on MPI (until_settled is the only one the roles call directly)."""

    def __init__(self, world: World) -> None:
        super().__init__(oversubscribed=True, yield_s=0.0)
        self.world = world

    def wait(self, request: Any, spin_s: Optional[float] = None) -> Any:
        self.world.wait_until(request.Test, "a request")
        return FakeStatus(request)

    def wait_for_work(self, request: Any, expected_s: float) -> Any:
        return self.wait(request)

    def until_settled(self, done: Callable[[], bool], moved: Callable[[], bool],
                      idle_s: float = 0.0) -> None:
        self.world.wait_until(done, "the next request")

    def wait_all(self, requests: Sequence[Any], idle_s: float = 0.0) -> None:
        self.world.wait_until(lambda: all(r.Test() for r in requests), "frames")

    def completed(self, requests: Sequence[Any], idle_s: float = 0.0) -> Iterator[int]:
        left = set(range(len(requests)))
        while left:
            ready: List[int] = []

            def some() -> bool:
                ready[:] = sorted((i for i in left if requests[i].Test()),
                                  key=lambda i: requests[i].seq)
                return bool(ready)

            self.world.wait_until(some, "frames")
            left.difference_update(ready)
            yield from ready  # outside the lock: the caller updates meanwhile


class FakeRequestQueue:
    """RequestQueue over the world: one header receive posted per source; ``arrived`` says
    whose are here, ``take`` reads one and posts that source's next."""

    def __init__(self, channel: "FakeChannel", sources: Sequence[int], tag: int) -> None:
        self.channel = channel
        self.sources = list(sources)
        self.tag = tag
        self.headers = [new_header() for _ in self.sources]
        self.requests: List[Optional[FakeRequest]] = [
            channel.irecv_header(h, s, tag) for h, s in zip(self.headers, self.sources)]
        self.ready: List[int] = []

    def arrived(self) -> List[int]:
        done = [i for i, r in enumerate(self.requests) if r is not None and r.Test()]
        self.ready = sorted(set(self.ready) | set(done))
        return list(self.ready)

    def take(self, i: int) -> List[int]:
        if i in self.ready:
            self.ready.remove(i)
        else:
            self.channel.wait(self.requests[i])
        fields = self.headers[i].tolist()
        self.requests[i] = self.channel.irecv_header(self.headers[i], self.sources[i], self.tag)
        return fields

    def close(self, i: int) -> None:
        request = self.requests[i]
        if request is not None:
            request.Cancel()
        self.requests[i] = None
        if i in self.ready:
            self.ready.remove(i)


def _payload(array: Any) -> bytes:
    """A send's copy, taken at post time (the buffer may be reused once it completes)."""
    return np.ascontiguousarray(array).tobytes()


class FakeChannel(Channel):
    """Channel's interface on a World: every method the roles and links call, none reaching
    MPI. A subclass, so ParameterServer, ShardServer and Worker take it as it is (they wrap
    anything else in a real Channel)."""

    def __init__(self, world: World, rank: int, layout: Any,
                 nodes: Optional[Sequence[int]] = None) -> None:
        # Channel.__init__ is not called: it would keep an MPI communicator.
        self.world = world
        self._rank = rank
        self.comm: Any = FakeComm(world, rank)  # Channel types it as an MPI.Comm
        self.layout = layout
        self.nodes = nodes  # None: no rank is remote (PSFRAME_STREAM=always still streams)
        self.waiter = FakeWaiter(world)
        largest = min(layout.size, layout.shard_elems) * layout.dtype.itemsize
        self.idle_s = transfer_idle_s(largest)

    @property
    def rank(self) -> int:
        return self._rank

    # -- waiting ----------------------------------------------------------------------------
    def wait(self, request: Any, spin_s: Optional[float] = None) -> Any:
        return self.waiter.wait(request)

    def wait_for_work(self, request: Any, expected_s: float) -> Any:
        return self.waiter.wait(request)

    def wait_frames(self, requests: Sequence[Any]) -> None:
        self.waiter.wait_all(requests)

    def each_frame(self, requests: Sequence[Any],
                   frames: Sequence[Tuple[int, int]]) -> Iterator[Tuple[int, int]]:
        for i in self.waiter.completed(requests):
            yield frames[i]

    def each_index(self, requests: Sequence[Any]) -> Iterator[int]:
        return self.waiter.completed(requests)

    def await_frames(self, needed: Sequence[Any], watched: Sequence[Any]) -> None:
        self.waiter.wait_all(needed)

    def progress(self, requests: Sequence[Any]) -> None:
        """Nothing to move along: a send is delivered when posted."""

    @staticmethod
    def done(requests: Sequence[Any]) -> bool:
        return all(r.Get_status() for r in requests)

    @staticmethod
    def count_done(requests: Sequence[Any]) -> int:
        return sum(r.Get_status() for r in requests)

    def cancel(self, requests: Sequence[Any]) -> None:
        for r in requests:
            r.Cancel()

    def wait_received(self, request: Any, itemsize: int) -> int:
        self.wait(request)
        return request.nbytes // itemsize

    def until_received(self, request: Any, itemsize: int, while_waiting: Any = None,
                       moved: Any = None) -> int:
        def done() -> bool:
            if while_waiting is not None:
                while_waiting()
            return bool(request.Test())

        self.world.wait_until(done, "a message")
        return request.nbytes // itemsize

    def barrier(self) -> None:
        self.world.barrier()

    # -- headers ----------------------------------------------------------------------------
    def send_header(self, header: np.ndarray, dest: int, tag: int) -> None:
        self.world.send(self._rank, dest, tag, _payload(header))

    def requests_from(self, sources: Sequence[int], tag: int) -> Any:
        return FakeRequestQueue(self, sources, tag)

    def irecv_header(self, header: np.ndarray, source: int, tag: int) -> Any:
        return self.world.post(self._rank, source, tag, header)

    # -- flat-buffer frames -----------------------------------------------------------------
    def isend(self, flat: np.ndarray, a: int, b: int, dest: int, tag: int) -> Any:
        return self.isend_array(flat[a:b], dest, tag)

    def irecv(self, flat: np.ndarray, a: int, b: int, source: int, tag: int) -> Any:
        return self.irecv_array(flat[a:b], source, tag)

    def isend_frames(self, flat: np.ndarray, lo: int, hi: int, dest: int, tag: int,
                     frames: Optional[Sequence[Tuple[int, int]]] = None) -> List[Any]:
        frames = self.layout.frames(lo, hi) if frames is None else frames
        return [self.isend(flat, a, b, dest, tag) for a, b in frames]

    def irecv_frames(self, flat: np.ndarray, lo: int, hi: int, source: int, tag: int,
                     frames: Optional[Sequence[Tuple[int, int]]] = None) -> List[Any]:
        frames = self.layout.frames(lo, hi) if frames is None else frames
        return [self.irecv(flat, a, b, source, tag) for a, b in frames]

    # -- whole arrays -----------------------------------------------------------------------
    def isend_array(self, array: Any, dest: int, tag: int) -> Any:
        buf = array if isinstance(array, np.ndarray) else None
        return self.world.send(self._rank, dest, tag, _payload(array), buf)

    def irecv_array(self, out: Any, source: int, tag: int) -> Any:
        return self.world.post(self._rank, source, tag, out)

    def recv_array(self, out: Any, source: int, tag: int) -> None:
        self.wait(self.irecv_array(out, source, tag))

    # -- control objects --------------------------------------------------------------------
    def send_object(self, obj: Any, dest: int, tag: int) -> None:
        self.world.send(self._rank, dest, tag, ("obj", pickle.dumps(obj)))

    def recv_object(self, source: int, tag: int) -> Any:
        request = self.world.post(self._rank, source, tag, None)
        self.wait(request)
        if not isinstance(request.obj, tuple):
            raise FakeMPIError("a buffer's message arrived at an object's receive")
        return pickle.loads(request.obj[1])


# -- a scripted peer: a worker driven step by step from the test's own thread ----------------
class Pending:
    """A pull in flight: the reply header's receive and the weight frames' receives, posted
    before the request went (as psframe.worker.Worker does)."""

    def __init__(self, channel: FakeChannel, server: int) -> None:
        layout = channel.layout
        self.channel = channel
        self.header = new_header()
        self.weights = np.full(layout.size, np.nan, layout.dtype)  # untouched until landed
        self.reply = channel.irecv_header(self.header, server, Tag.REPLY)
        self.frames = channel.irecv_frames(self.weights, 0, layout.n_shards, server,
                                           Tag.WEIGHTS)

    def answered(self) -> bool:
        """Whether the reply header is here (a held pull's is not)."""
        return bool(self.reply.Test())

    def frames_landed(self) -> int:
        return sum(bool(r.Test()) for r in self.frames)

    def wait(self) -> Tuple[List[int], Optional[np.ndarray]]:
        """(reply fields, the weights or None): the weights when the status is OK, else the
        frames' receives are withdrawn."""
        self.channel.wait(self.reply)
        fields = self.header.tolist()
        if fields[Field.STATUS] != Status.OK:
            self.channel.cancel(self.frames)
            return fields, None
        self.channel.wait_frames(self.frames)
        return fields, self.weights.copy()


class ScriptedWorker:
    """Worker ``index`` at ``rank``, driven from the test's thread: it sends the headers and
    frames psframe.worker.Worker would (psframe.transport.wire) to the one server at
    ``server``, and hands back its replies, so each decision of the server is observable."""

    def __init__(self, world: World, rank: int, layout: Any, index: int, server: int = 0) -> None:
        self.channel = FakeChannel(world, rank, layout)
        self.layout = layout
        self.index = index
        self.server = server
        self.version = 0  # the version of the last weights pulled (a push says it)

    def header(self, op: int, clock: int, count: int = 0, *, version: Optional[int] = None,
               status: int = Status.OK, flags: int = 0, samples: int = 1, loss: float = 0.5,
               shards: Optional[Tuple[int, int]] = None) -> None:
        lo, hi = shards if shards is not None else (0, self.layout.n_shards)
        h = new_header()
        fill_header(h, op, self.index, clock, lo, hi, count,
                    self.version if version is None else version, loss, samples, status, 0,
                    flags)
        self.channel.send_header(h, self.server, Tag.REQUEST)

    def frames(self, grad: np.ndarray, which: Optional[Sequence[int]] = None) -> None:
        """The gradient's frames (``which``: only these, by index: a push in pieces)."""
        frames = self.layout.frames()
        for i in range(len(frames)) if which is None else which:
            a, b = frames[i]
            self.channel.isend(np.ascontiguousarray(grad, self.layout.dtype), a, b,
                               self.server, Tag.PUSH)

    def pull(self, clock: int, status: int = Status.OK) -> Pending:
        pending = Pending(self.channel, self.server)
        self.header(Op.PULL, clock, status=status)
        return pending

    def push_pull(self, clock: int, grad: Optional[np.ndarray], *, frames: bool = True,
                  **header: Any) -> Pending:
        """A push of ``grad`` for step ``clock`` and the pull of the next step; ``frames``:
        send its frames now (else the test sends them, with ``frames()``)."""
        pending = Pending(self.channel, self.server)
        self.header(Op.PUSH_PULL, clock, header.pop("count", self.layout.size), **header)
        if frames and grad is not None:
            self.frames(grad)
        return pending

    def push(self, clock: int, grad: np.ndarray, **header: Any) -> None:
        self.header(Op.PUSH, clock, header.pop("count", self.layout.size), **header)
        self.frames(grad)

    def got(self, pending: Pending) -> Tuple[List[int], Optional[np.ndarray]]:
        """Wait for a pull's reply; remembers its version for the next push."""
        fields, weights = pending.wait()
        self.version = fields[Field.VERSION]
        return fields, weights

    def done(self, steps: int) -> None:
        self.header(Op.DONE, steps)
        self.channel.send_object({"steps": steps}, self.server, Tag.CONTROL)


# -- a whole run, every rank a thread -------------------------------------------------------
def train_inprocess(model: Any, data: Any, *, n_workers: int = 2, callbacks: Any = None,
                    on_server: Optional[Callable[[Any], None]] = None,
                    **options: Any) -> Tuple[Any, List[Any]]:
    """What ``ps.train(model, data, **options)`` does over MPI with ``servers`` + ``n_workers``
    ranks, in threads: the same plan (psframe.training.planning.plan_run, once per rank) and
    the same roles (psframe.training.roles), over FakeChannels with transport="mpi".
    Returns (rank 0's result, every role); rank 0's error (e.g. TrainingInterrupted) is
    raised, the others' after it. Workers call node_local_index: patch it first.
    ``on_server(server)``: called with rank 0's ParameterServer before the run starts."""
    from psframe.training.options import RunOptions
    from psframe.training.planning import plan_run
    from psframe.training.roles import build_server, build_shard_server, build_worker

    options = {"transport": "mpi", "backend": "numpy", **options}
    run_options = RunOptions.from_keywords(options)
    world = World(run_options.servers + n_workers)
    roles = []
    for rank in range(world.size):
        # Each rank plans on its own, as over MPI: its own model, weights and optimizer.
        plan = plan_run(FakeComm(world, rank), copy.deepcopy(model), data, run_options)
        channel = FakeChannel(world, rank, plan.layout)
        if rank == 0:
            role = build_server(channel, plan, False, callbacks, 1)
        elif rank < plan.n_servers:
            role = build_shard_server(channel, plan)
        else:
            role = build_worker(channel, plan)
        roles.append(role)
    if on_server is not None:
        on_server(roles[0])
    threads = [world.spawn(f"rank {r}", role.run) for r, role in enumerate(roles)]
    errors: List[BaseException] = []
    results = []
    for thread in threads:
        try:
            results.append(thread.join())
        except BaseException as exc:  # noqa: B902 - rank 0's first: the cause, not the echo
            errors.append(exc)
            results.append(None)
    if errors:
        causes = [e for e in errors if not isinstance(e, WorldAborted)]
        raise (causes or errors)[0]
    return results[0], roles
