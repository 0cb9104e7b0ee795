"""Wire protocol: message tags, the fixed int64 header, buffer frames, and a wait that yields."""
import enum
import os
import struct
import time

import numpy as np
from mpi4py import MPI

__all__ = ["Tag", "Op", "Field", "Status", "HEADER_LEN", "Channel", "new_header", "wait",
           "wait_for_work", "wait_all", "completed", "transfer_idle_s"]


class Tag(enum.IntEnum):
    """MPI tags; one per kind of message so frames never match a header's receive."""

    REQUEST = 11  # worker → server: header of a pull, push or done
    PUSH = 12  # worker → server: gradient frames of a push
    REPLY = 13  # server → worker: header answering a pull
    WEIGHTS = 14  # server → worker: weight frames of a pull
    CONTROL = 15  # either way: small pickled objects (final stats), never on the hot path
    ACT = 16  # pipeline stage k → k+1: a micro-batch's activations
    ACT_GRAD = 17  # pipeline stage k+1 → k: the gradient of those activations


class Op(enum.IntEnum):
    PULL = 1
    PUSH = 2
    DONE = 3
    PUSH_PULL = 4  # a push, then the pull of the worker's next step: one request per step


class Status(enum.IntEnum):
    """Carried in a REPLY header: whether weights follow or the worker must stop."""

    OK = 0
    STOP = 1  # no more work for this worker (dynamic dispatch ran out of batches)
    INTERRUPT = 2  # the run was interrupted (SIGINT/SIGTERM); in a PULL: please stop


class Field(enum.IntEnum):
    """Slots of the fixed int64 header; LOSS holds a float64 by bit pattern."""

    OP = 0
    WORKER = 1
    CLOCK = 2  # steps this worker has completed (a push carries the clock it computed at)
    SHARD_LO = 3
    SHARD_HI = 4
    COUNT = 5  # payload elements that follow, so the receiver can check the size
    VERSION = 6  # server version the weights came from (pull reply) or were pulled at (push)
    LOSS = 7
    SAMPLES = 8
    STATUS = 9
    BATCH = 10  # dynamic dispatch: the batch a pull reply assigns, and a push trained on


HEADER_LEN = len(Field)


def new_header():
    return np.zeros(HEADER_LEN, dtype=np.int64)


def loss_bits(loss):
    """The int64 that holds float64 ``loss`` bit for bit (the LOSS field)."""
    return struct.unpack("=q", struct.pack("=d", loss))[0]


def loss_of(bits):
    """The float64 loss whose bits a LOSS field holds."""
    return struct.unpack("=d", struct.pack("=q", bits))[0]


def fill_header(header, op, worker, clock, lo, hi, count, version, loss, samples, status,
                batch):
    """Every field at once, in Field order: one write instead of eleven, on every step."""
    header[:] = (op, worker, clock, lo, hi, count, version, loss_bits(loss), samples, status,
                 batch)


assert [f.name for f in Field] == ["OP", "WORKER", "CLOCK", "SHARD_LO", "SHARD_HI", "COUNT",
                                   "VERSION", "LOSS", "SAMPLES", "STATUS", "BATCH"], \
    "fill_header writes the fields in this order"


# Waiting. MPICH's blocking calls spin at 100% of a core; on a node where ranks outnumber cores
# that steals the CPU the other ranks need. But MPICH also moves a large message only while a
# rank is inside an MPI call, so sleeping while payload is in flight stalls the transfer
# (measured: a 64 MB round trip in 1 MiB frames took 10 ms with Waitall, 140 ms with a
# sleeping wait). So there are two waits:
# - wait(): for what may take long (the next request, a held pull): 100 us of tests (1 ms
#   when every rank has a core of its own), then sleep with exponential backoff from 20 us
#   to 1 ms;
# - wait_all(): for payload frames: test without sleeping as long as frames keep completing,
#   and back off once none has for ``idle_s``: about the time one frame takes to copy, so a
#   peer busy elsewhere (a server that has not started receiving this push) is not spun on.
#   Measured: spinning up to 50 ms there made 5 ranks on 2 cores 3-4x slower.
_SPIN_TESTS = 64
_MIN_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3
TRANSFER_IDLE_S = 2e-3
_MIN_IDLE_S = 100e-6
_SLOW_COPY_BYTES_PER_S = 2e9  # well below shared-memory MPI's 10+ GB/s: a generous budget


def transfer_idle_s(frame_bytes):
    """How long a frame may show no progress before waiting starts to sleep."""
    return max(_MIN_IDLE_S, frame_bytes / _SLOW_COPY_BYTES_PER_S)


def _backoff(done, yield_first=True):
    # Oversubscribed: first hand the core to whichever rank is runnable (sched_yield), testing
    # each time this rank runs again. That answers within a scheduler slice when a peer is
    # computing, where a sleep costs its wake-up delay (about 100 us for a 20 us sleep here).
    # Bounded, so an idle rank still ends up asleep.
    if _yield_s and yield_first:
        deadline = time.perf_counter() + _yield_s
        while time.perf_counter() < deadline:
            if done():
                return
            _sched_yield()
    pause = _MIN_SLEEP_S
    while not done():
        time.sleep(pause)
        pause = min(pause * 2, _MAX_SLEEP_S)


_idle_spin_s = 100e-6
_yield_s = 0.0
_oversubscribed = True  # until configure_waits says otherwise: never spin long by default
# How long recent waits took (moving average): a rank whose waits run long (an idle server
# whose workers take 50 ms a step) skips the yielding, which would only burn its CPU share.
_recent_wait_s = 0.0
_sched_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def configure_waits(oversubscribed):
    """Set how long wait() tests before it sleeps, once per run.

    With a core per rank, spinning up to 1 ms costs no one anything and catches a reply
    without a sleep's wake-up delay (an idle server still sleeps most of the time); with more
    ranks than cores, spin only 100 us, since every spin takes a core from another rank.
    """
    global _idle_spin_s, _yield_s, _oversubscribed
    _oversubscribed = bool(oversubscribed)
    _idle_spin_s = 100e-6 if oversubscribed else 1e-3
    _yield_s = float(os.environ.get("PSFRAME_YIELD_S", 2e-3)) if oversubscribed else 0.0


def wait(request, spin_s=None):
    """Wait for one request without burning a core; returns its MPI.Status."""
    global _recent_wait_s
    status = MPI.Status()
    start = time.perf_counter()
    deadline = start + (_idle_spin_s if spin_s is None else spin_s)
    tests = 0
    while tests < _SPIN_TESTS or time.perf_counter() < deadline:
        if request.Test(status):
            return status
        tests += 1
    _backoff(lambda: request.Test(status), yield_first=_recent_wait_s < 4 * _yield_s)
    # Only waits that outlast the spin count: the many instant ones (a header's send) would
    # pull the average down and make an idle server yield, costing it its CPU share.
    _recent_wait_s += 0.25 * (time.perf_counter() - start - _recent_wait_s)
    return status


def wait_for_work(request, expected_s):
    """Wait for a reply that comes once a peer has done about ``expected_s`` of work (a
    server's update, which a shared-memory pull waits on with no transfer in flight): with a
    core per rank, test for that long, since a sleep's late wake-up would add to every step;
    oversubscribed, wait as wait() does, leaving the core to the peer doing the work."""
    return wait(request, spin_s=None if _oversubscribed else max(_idle_spin_s, expected_s))


def wait_all(requests, idle_s=TRANSFER_IDLE_S):
    """Wait for payload frames: keep MPI progressing while they move, back off when stalled."""
    for _ in completed(requests, idle_s):
        pass


def completed(requests, idle_s=TRANSFER_IDLE_S):
    """Yield the index of each request as it completes, waiting as wait_all does."""
    pending = len(requests)
    last_progress = time.perf_counter()
    pause = _MIN_SLEEP_S
    while pending:
        done = MPI.Request.Testsome(requests)
        if done is None:  # every request is already complete (inactive)
            return
        now = time.perf_counter()
        if done:
            pending -= len(done)
            last_progress, pause = now, _MIN_SLEEP_S
            yield from done
        elif now - last_progress > idle_s + _yield_s:
            time.sleep(pause)
            pause = min(pause * 2, _MAX_SLEEP_S)
        elif now - last_progress > idle_s:
            _sched_yield()  # oversubscribed: let the peer we wait on have the core first


class Channel:
    """Buffer send/receive of headers and flat-buffer frames on one communicator."""

    def __init__(self, comm, layout):
        self.comm = comm
        self.layout = layout
        self.mpi_dtype = MPI.DOUBLE if layout.dtype == np.float64 else MPI.FLOAT
        largest = min(layout.size, layout.shard_elems) * layout.dtype.itemsize
        self.idle_s = transfer_idle_s(largest)

    def wait_frames(self, requests):
        """Wait for frames in flight (see wait_all), with this layout's frame-size budget."""
        wait_all(requests, self.idle_s)

    def each_frame(self, requests, frames):
        """Yield each frame's (start, stop) as its request completes, in arrival order."""
        for i in completed(requests, self.idle_s):
            yield frames[i]

    def send_header(self, header, dest, tag):
        wait(self.comm.Isend([header, MPI.INT64_T], dest=dest, tag=tag))

    def recv_header(self, header, source, tag):
        return wait(self.comm.Irecv([header, MPI.INT64_T], source=source, tag=tag))

    def isend(self, flat, a, b, dest, tag):
        """Send elements [a, b) of ``flat``: one frame."""
        return self.comm.Isend([flat[a:b], self.mpi_dtype], dest=dest, tag=tag)

    def isend_frames(self, flat, lo, hi, dest, tag):
        return [self.isend(flat, a, b, dest, tag) for a, b in self.layout.frames(lo, hi)]

    def irecv_frames(self, flat, lo, hi, source, tag):
        return [
            self.comm.Irecv([flat[a:b], self.mpi_dtype], source=source, tag=tag)
            for a, b in self.layout.frames(lo, hi)
        ]
