"""Waiting on MPI requests without burning a core: a Waiter per run holds how long to spin."""
from __future__ import annotations

import os
import time
from typing import Callable, Iterator, Optional, Sequence

from mpi4py import MPI

from .. import env

__all__ = ["Waiter", "TRANSFER_IDLE_S", "transfer_idle_s"]

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
_MIN_SLEEP_S = 20e-6
_MAX_SLEEP_S = 1e-3
TRANSFER_IDLE_S = 2e-3
_MIN_IDLE_S = 100e-6
_SLOW_COPY_BYTES_PER_S = 2e9  # well below shared-memory MPI's 10+ GB/s: a generous budget
_DEFAULT_YIELD_S = 2e-3
_sched_yield = getattr(os, "sched_yield", lambda: time.sleep(0))


def transfer_idle_s(frame_bytes: int) -> float:
    """How long a frame may show no progress before waiting starts to sleep."""
    return max(_MIN_IDLE_S, frame_bytes / _SLOW_COPY_BYTES_PER_S)


class Waiter:
    """How one rank waits, and what it has learnt from its recent waits.

    ``oversubscribed``: more ranks than cores on this node. With a core per rank, spinning up
    to 1 ms costs no one anything and catches a reply without a sleep's wake-up delay (an
    idle server still sleeps most of the time); with more ranks than cores, spin only 100 us,
    since every spin takes a core from another rank, and first hand the core to whichever
    rank is runnable (sched_yield) for ``yield_s`` ($PSFRAME_YIELD_S, default 2 ms).
    """

    # Tests made before a wait may sleep. A diagnostic knob: benchmarks raise it (on the class,
    # before any run) to make every wait spin, which is never right for users.
    spin_tests = 64

    def __init__(self, oversubscribed: bool = True, yield_s: Optional[float] = None) -> None:
        self.oversubscribed = bool(oversubscribed)
        self.idle_spin_s = 100e-6 if oversubscribed else 1e-3
        if yield_s is None:
            yield_s = env.yield_s(_DEFAULT_YIELD_S) if oversubscribed else 0.0
        self.yield_s = float(yield_s)
        # How long recent waits took (moving average): a rank whose waits run long (an idle
        # server whose workers take 50 ms a step) skips the yielding, which would only burn
        # its CPU share.
        self.recent_wait_s = 0.0

    def wait(self, request: MPI.Request, spin_s: Optional[float] = None) -> MPI.Status:
        """Wait for one request without burning a core; returns its MPI.Status."""
        status = MPI.Status()
        self._until(lambda: request.Test(status), spin_s)
        return status

    def until_settled(self, done: Callable[[], bool], moved: Callable[[], bool],
                      idle_s: float = TRANSFER_IDLE_S) -> None:
        """Wait until ``done()``, testing without a pause while ``moved()`` says transfers
        are still completing (within ``idle_s``), as completed() does for frames: a sleep
        then would stall a transfer that needs this rank's progress."""
        # Nothing moving yet: spin only as long as wait() would before it backs off.
        last_progress = time.perf_counter() - idle_s + self.idle_spin_s
        pause = _MIN_SLEEP_S
        while not done():
            now = time.perf_counter()
            if moved():
                last_progress, pause = now, _MIN_SLEEP_S
            elif now - last_progress > idle_s + self.yield_s:
                time.sleep(pause)
                pause = min(pause * 2, _MAX_SLEEP_S)
            elif now - last_progress > idle_s:
                _sched_yield()

    def _until(self, done: Callable[[], bool], spin_s: Optional[float]) -> None:
        start = time.perf_counter()
        deadline = start + (self.idle_spin_s if spin_s is None else spin_s)
        tests = 0
        while tests < self.spin_tests or time.perf_counter() < deadline:
            if done():
                return
            tests += 1
        self._backoff(done, yield_first=self.recent_wait_s < 4 * self.yield_s)
        # Only waits that outlast the spin count: the many instant ones (a header's send)
        # would pull the average down and make an idle server yield, costing it its CPU share.
        self.recent_wait_s += 0.25 * (time.perf_counter() - start - self.recent_wait_s)

    def wait_for_work(self, request: MPI.Request, expected_s: float) -> MPI.Status:
        """Wait for a reply that comes once a peer has done about ``expected_s`` of work (a
        server's update, which a shared-memory pull waits on with no transfer in flight):
        with a core per rank, test for that long, since a sleep's late wake-up would add to
        every step; oversubscribed, wait as wait() does, leaving the core to the peer."""
        spin = None if self.oversubscribed else max(self.idle_spin_s, expected_s)
        return self.wait(request, spin_s=spin)

    def wait_all(self, requests: Sequence[MPI.Request], idle_s: float = TRANSFER_IDLE_S) -> None:
        """Wait for payload frames: keep MPI progressing while they move, back off when stalled."""
        for _ in self.completed(requests, idle_s):
            pass

    def completed(self, requests: Sequence[MPI.Request],
                  idle_s: float = TRANSFER_IDLE_S) -> Iterator[int]:
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
            elif now - last_progress > idle_s + self.yield_s:
                time.sleep(pause)
                pause = min(pause * 2, _MAX_SLEEP_S)
            elif now - last_progress > idle_s:
                _sched_yield()  # oversubscribed: let the peer we wait on have the core first

    def _backoff(self, done: Callable[[], bool], yield_first: bool = True) -> None:
        # Oversubscribed: first hand the core to whichever rank is runnable (sched_yield),
        # testing each time this rank runs again. That answers within a scheduler slice when
        # a peer is computing, where a sleep costs its wake-up delay (about 100 us for a 20 us
        # sleep here). Bounded, so an idle rank still ends up asleep.
        if self.yield_s and yield_first:
            deadline = time.perf_counter() + self.yield_s
            while time.perf_counter() < deadline:
                if done():
                    return
                _sched_yield()
        pause = _MIN_SLEEP_S
        while not done():
            time.sleep(pause)
            pause = min(pause * 2, _MAX_SLEEP_S)
