"""Every PSFRAME_* environment variable psframe reads, named and parsed in this one place."""
from __future__ import annotations

import os
import shlex
from typing import List, Mapping, Optional

__all__ = ["BACKEND", "CACHE", "CLUSTER_DIR", "LAUNCHED", "MPIEXEC", "MPIEXEC_ARGS", "RESTART",
           "RESUME", "STREAM", "STREAM_CHOICES", "TTY", "YIELD_S", "backend", "cache_dir",
           "cluster_dir", "launched", "mpiexec", "mpiexec_args", "restart", "resume", "stream",
           "tty_columns", "yield_s"]

BACKEND = "PSFRAME_BACKEND"  # the worker array backend when train(backend="auto")
CACHE = "PSFRAME_CACHE"  # where downloaded datasets are kept
MPIEXEC = "PSFRAME_MPIEXEC"  # the mpiexec `psframe train -n N` and `psframe bench` start
MPIEXEC_ARGS = "PSFRAME_MPIEXEC_ARGS"  # extra mpiexec arguments, split as a shell would
# Set in the ranks psframe starts: even if their MPI sets no rank variable, they must train,
# never launch again.
LAUNCHED = "PSFRAME_LAUNCHED"
# Terminal width of the launching shell, when its stdout is a terminal: the ranks' stdout is
# a pipe to mpiexec, so they cannot see for themselves that a person is watching.
TTY = "PSFRAME_TTY"
YIELD_S = "PSFRAME_YIELD_S"  # oversubscribed waits: how long to sched_yield before sleeping
# Which pushes by message a server applies frame by frame as they land: those from workers on
# other nodes (the default; across a network the reply then overlaps the push), every one
# (on one node too: the tests' way to run that path), or none.
STREAM = "PSFRAME_STREAM"
STREAM_CHOICES = ("remote", "always", "never")
CLUSTER_DIR = "PSFRAME_CLUSTER_DIR"  # where `psframe cluster` keeps its clusters' state
# Set by the supervising launcher (psframe.training.supervisor) in a restarted job: which
# restart it is, and the checkpoint manifest its ps.train(checkpoint_dir=...) continues from.
RESTART = "PSFRAME_RESTART"
RESUME = "PSFRAME_RESUME"


def _env(environ: Optional[Mapping[str, str]]) -> Mapping[str, str]:
    return os.environ if environ is None else environ


def backend(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """$PSFRAME_BACKEND, or None when unset or empty."""
    return _env(environ).get(BACKEND) or None


def cache_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """$PSFRAME_CACHE, else $XDG_CACHE_HOME/psframe, else ~/.cache/psframe."""
    env = _env(environ)
    return env.get(CACHE) or os.path.join(
        env.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "psframe")


def mpiexec(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """$PSFRAME_MPIEXEC, the mpiexec to use instead of searching, or None."""
    return _env(environ).get(MPIEXEC) or None


def mpiexec_args(environ: Optional[Mapping[str, str]] = None) -> List[str]:
    """$PSFRAME_MPIEXEC_ARGS as arguments, split with shell quoting rules."""
    return shlex.split(_env(environ).get(MPIEXEC_ARGS, ""))


def launched(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether psframe started this process as a rank."""
    return LAUNCHED in _env(environ)


def tty_columns(environ: Optional[Mapping[str, str]] = None) -> Optional[int]:
    """The launching terminal's width, or None when the launcher's stdout was no terminal."""
    try:
        return int(_env(environ)[TTY])
    except (KeyError, ValueError):
        return None


def yield_s(default: float, environ: Optional[Mapping[str, str]] = None) -> float:
    """$PSFRAME_YIELD_S in seconds, else ``default``."""
    value = _env(environ).get(YIELD_S)
    return float(value) if value else default


def stream(environ: Optional[Mapping[str, str]] = None) -> str:
    """$PSFRAME_STREAM, one of STREAM_CHOICES; "remote" when unset or empty."""
    value = _env(environ).get(STREAM) or "remote"
    if value not in STREAM_CHOICES:
        raise ValueError(f"{STREAM} must be one of {', '.join(STREAM_CHOICES)}; got {value!r}")
    return value


def cluster_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """$PSFRAME_CLUSTER_DIR, else /run/psframe/clusters (a tmpfs: gone at reboot, as the
    namespaces it describes are)."""
    return _env(environ).get(CLUSTER_DIR) or "/run/psframe/clusters"


def restart(environ: Optional[Mapping[str, str]] = None) -> int:
    """$PSFRAME_RESTART: 0 in a job's first start, K in its K-th restart."""
    try:
        return int(_env(environ).get(RESTART, 0))
    except ValueError:
        return 0


def resume(environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """$PSFRAME_RESUME, the checkpoint a restarted job continues from, or None."""
    return _env(environ).get(RESUME) or None
