"""Watchdog: a stalled rank, or a stop that cannot finish, ends the job with a diagnostic."""
from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from typing import Callable, Optional

__all__ = ["Watchdog"]

_TICK_S = 0.25  # how often the watchdog looks; the bounds are seconds, so this is plenty


class Watchdog:
    """One daemon thread per rank, armed while its role runs its loop.

    - ``stall_timeout``: the role calls ``beat()`` at each sign of progress (the server at
      each update and answered request, a worker at each reply); none for that long, and
      the rank prints what it waits for (``role.waiting_for()``) and every thread's Python
      stack (faulthandler), then aborts the job. None: no stall check.
    - ``stop_bound``: after ``stop_requested()`` (the first SIGINT or SIGTERM), a role still
      in its loop that long later cannot stop cleanly (a frozen rank, a stalled transfer):
      the same report, saying so, then the abort.

    ``abort`` ends the job (MPI_Abort on the world communicator); it runs on this thread,
    which MPI allows since mpi4py asks for MPI_THREAD_MULTIPLE.
    """

    def __init__(self, rank: int, role, abort: Callable[[], None],
                 stall_timeout: Optional[float], stop_bound: float):
        self.rank = rank
        self.role = role
        self.abort = abort
        self.stall_timeout = stall_timeout
        self.stop_bound = stop_bound
        self.last = time.monotonic()
        self.stop_at: Optional[float] = None
        self._armed = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="psframe-watchdog",
                                        daemon=True)

    def __enter__(self):
        self.last = time.monotonic()
        self._armed.set()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.disarm()
        return False

    def beat(self) -> None:
        """Progress: the stall clock starts again (one attribute write: cheap per step)."""
        self.last = time.monotonic()

    def stop_requested(self) -> None:
        if self.stop_at is None:
            self.stop_at = time.monotonic()

    def disarm(self) -> None:
        """The role's loop is over: what follows (the last evaluation and checkpoint, the
        final barrier) is not watched."""
        self._armed.clear()
        self._done.set()

    def _watch(self) -> None:
        while not self._done.wait(_TICK_S):
            if not self._armed.is_set():
                continue
            now = time.monotonic()
            if self.stop_at is not None and now - self.stop_at > self.stop_bound:
                self._fire(f"the clean stop did not finish within {self.stop_bound:g} s of "
                           "the signal (a rank frozen, or a transfer stalled)")
            elif (self.stall_timeout is not None and now - self.last > self.stall_timeout):
                self._fire(f"no progress for {self.stall_timeout:g} s (stall_timeout)")

    def _fire(self, why: str) -> None:
        if not self._armed.is_set():
            return
        try:
            waits = self.role.waiting_for()
        except Exception as exc:  # noqa: B902 - the diagnostic must not stop the abort
            waits = f"(could not tell: {exc!r})"
        head = (f"psframe: rank {self.rank} stalled: {why}; it waits for {waits}. "
                "Its Python stack:\n")
        os.write(2, head.encode(errors="replace"))
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()
        # Let the other ranks' watchdogs, which see the same stall, print theirs too.
        time.sleep(1.0)
        os.write(2, f"psframe: rank {self.rank}: aborting the job\n".encode())
        self.abort()
