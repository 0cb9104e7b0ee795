"""When a rank fails or is told to stop: agree on errors, stop cleanly on signals, or abort."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback
from typing import Callable, NoReturn, Optional

from ..errors import ConfigError

__all__ = ["agree_or_raise", "abort_job", "abort_now", "stop_on_signals"]


def agree_or_raise(world, local_error: Optional[BaseException]) -> None:
    """Every rank learns of any rank's error and raises the same ConfigError."""
    if local_error is None:
        mine = None
    elif isinstance(local_error, ValueError):
        mine = str(local_error)
    else:  # a TypeError or a user model's own exception: its type is part of the story
        mine = f"{type(local_error).__name__}: {local_error}"
    errors = world.allgather(mine)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return
    rank, message = failed[0]
    if len(failed) < len(errors):
        message = f"{message} (on rank {rank})"
    raise ConfigError(message) from local_error


def abort_job(world) -> NoReturn:
    """End every rank of ``world``'s job now, after printing this rank's traceback (call it
    from an except block). Never returns."""
    rank = world.Get_rank()
    sys.stdout.flush()
    report = f"psframe: rank {rank} failed; aborting all ranks\n{traceback.format_exc()}"
    # One write, then a moment for mpiexec's proxy to forward it: on abort, hydra drops
    # output it has not forwarded yet, and the traceback is the one thing the user needs.
    os.write(2, report.encode(errors="replace"))
    time.sleep(0.3)
    abort_now(world)


def abort_now(world) -> NoReturn:
    """End every rank of ``world``'s job now, from any thread. Never returns."""
    world.Abort(1)
    # MPICH's Abort can return before the process manager kills us; never let a failed
    # rank run on as if training had finished.
    os._exit(1)


@contextlib.contextmanager
def stop_on_signals(request_stop: Callable[[], None]):
    """SIGINT/SIGTERM ask for a clean stop (mpiexec forwards them to every rank)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: request_stop())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
