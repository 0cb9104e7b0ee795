"""The supervising launcher: mpiexec as a child, signals forwarded, a dead job restarted."""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from typing import Mapping, Optional, Sequence

from .. import env as environ
from ..errors import ConfigError
from ..server.checkpoints import CheckpointError, load_checkpoint, manifests
from . import leftovers

__all__ = ["LaunchResult", "launch", "supervise", "supervised_resume", "check_restarts",
           "NO_RESTART"]

# Exit statuses a restart cannot mend: the run finished, its input is bad (the CLI's status,
# and every ps.ConfigError under launch()), or it stopped cleanly after SIGINT/SIGTERM.
NO_RESTART = {0: "finished", 2: "bad input", 130: "stopped by a signal"}
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1
END_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True)
class LaunchResult:
    """How a supervised job ended: its exit status, and how many times it was restarted."""

    returncode: int
    restarts: int


def check_restarts(max_restarts, checkpoint_dir) -> None:
    """A ConfigError unless ``max_restarts`` is a count and restarts have checkpoints."""
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise ConfigError(f"max_restarts must be an integer >= 0, got {max_restarts!r}")
    if max_restarts and not checkpoint_dir:
        raise ConfigError("max_restarts needs checkpoint_dir: a restart continues from the "
                          "newest checkpoint there (--checkpoint-dir DIR --checkpoint-every K)")


def launch(nprocs: int, script: str, *args: str, max_restarts: int = 0,
           checkpoint_dir: Optional[str] = None) -> LaunchResult:
    """Run ``script`` (which calls ps.train) as an MPI job of ``nprocs`` ranks, and restart it
    from the newest checkpoint in ``checkpoint_dir`` up to ``max_restarts`` times if it dies.

    ``checkpoint_dir`` is the one the script gives ps.train: a restart's ps.train call with
    that checkpoint_dir continues from the checkpoint the launcher names. The mpiexec is the
    one `psframe train -n N` uses. Call it from a plain process, not from a rank.
    """
    from .launch import child_env, python_command

    check_restarts(max_restarts, checkpoint_dir)
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ConfigError(f"nprocs must be a positive integer, got {nprocs!r}")
    if not os.path.isfile(script):
        raise ConfigError(f"no script {script}")
    # The runner turns a ps.ConfigError into status 2, which is never restarted.
    cmd = python_command(nprocs, ["-m", "psframe.training.runner", script, *map(str, args)])
    return supervise(cmd, max_restarts=max_restarts, checkpoint_dir=checkpoint_dir,
                     env=child_env())


def supervise(cmd: Sequence[str], *, max_restarts: int = 0,
              checkpoint_dir: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
              err=None) -> LaunchResult:
    """Run ``cmd`` (an mpiexec command line) to its end, forwarding SIGINT, SIGTERM and SIGHUP
    to it; when it fails, start it again from this run's newest checkpoint, up to
    ``max_restarts`` times. A stop the user asked for, bad input and success end it."""
    check_restarts(max_restarts, checkpoint_dir)
    err = sys.stderr if err is None else err
    env = {k: v for k, v in (os.environ if env is None else env).items()
           if k not in (environ.RESUME, environ.RESTART)}
    # Checkpoints already there belong to an earlier run: a restart never resumes from them
    # (the job's own resume= still may, as when it was first started).
    earlier = _identities(checkpoint_dir)
    restarts = 0
    with _Child() as child:
        while True:
            before = leftovers.shm_files()
            status = child.run(cmd, env)
            if status != 0:  # a killed rank's shared-memory segments stay behind
                leftovers.remove_unused(before)
            if status in NO_RESTART or child.signals or restarts >= max_restarts:
                break
            restarts += 1
            found = _newest(checkpoint_dir, earlier)
            env[environ.RESTART] = str(restarts)
            if found is None:
                env.pop(environ.RESUME, None)
                where = "from the start (no checkpoint of this run yet)"
            else:
                env[environ.RESUME] = found[0]
                where = f"from step {found[1]} (checkpoint {found[0]})"
            _say(err, f"psframe: the job failed (exit status {status}); "
                      f"restart {restarts}/{max_restarts} {where}")
    if max_restarts and status not in NO_RESTART and not child.signals:
        _say(err, f"psframe: the job failed (exit status {status}) and no restarts are left "
                  f"({restarts} of max_restarts {max_restarts} used); giving up")
    return LaunchResult(status, restarts)


def supervised_resume(options, env: Optional[Mapping[str, str]] = None):
    """``options`` resuming from the checkpoint the launcher named, when this run writes its
    checkpoints where that one lies; else ``options`` as given."""
    path = environ.resume(env)
    if path is None or options.checkpoint_dir is None:
        return options
    if os.path.realpath(os.path.dirname(path)) != os.path.realpath(options.checkpoint_dir):
        return options  # another train() call of the same program, with its own checkpoints
    return dataclasses.replace(options, resume=path)


def _say(err, line):
    print(line, file=err, flush=True)


def _identities(directory):
    out = set()
    for path in manifests(directory) if directory else ():
        try:
            st = os.stat(path)
        except FileNotFoundError:  # pruned meanwhile
            continue
        out.add((path, st.st_ino, st.st_mtime_ns))
    return out


def _newest(directory, earlier):
    """(path, step) of this run's newest checkpoint that verifies, or None."""
    for path in manifests(directory):
        try:
            st = os.stat(path)
            if (path, st.st_ino, st.st_mtime_ns) in earlier:
                continue
            manifest, _ = load_checkpoint(path)  # checks every part's SHA-256
        except (OSError, CheckpointError):  # pruned, or unusable: the next older one
            continue
        return path, int(manifest["version"])
    return None


class _Child:
    """One mpiexec at a time, in its own process group, getting the signals sent to us."""

    def __init__(self):
        self.proc = None
        self.signals = []  # the ones the user sent: no restart after any of them
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():  # else: no handlers
            for sig in _FORWARDED:
                self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self.proc is not None and self.proc.returncode is None:
            # We are leaving on an error of our own: never leave the job running.
            _end(self.proc)

    def _forward(self, signum, frame):
        self.signals.append(signum)
        if self.proc is not None and self.proc.returncode is None:
            os.kill(self.proc.pid, signum)  # mpiexec passes it on to every rank

    def run(self, cmd, env):
        """Start ``cmd``, wait for it, return its exit status (128 + N for signal N)."""
        if self.signals:
            return 128 + self.signals[0]
        # Blocked while starting, so that a signal cannot fall between the start and
        # self.proc: it is delivered, and forwarded, once self.proc is set.
        signal.pthread_sigmask(signal.SIG_BLOCK, _FORWARDED)
        try:
            # Its own process group: a terminal's Ctrl-C reaches mpiexec once, through us,
            # not twice (a second SIGINT makes mpiexec kill the job at once). stdin: a
            # background group reading the terminal would be stopped.
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                         start_new_session=True, preexec_fn=_child_setup())
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        status = self.proc.wait()
        return status if status >= 0 else 128 - status


def _child_setup():
    """What mpiexec runs before exec: the signals we blocked unblocked, and a death signal.
    libc is loaded here, in the parent: a forked child must not import."""
    prctl = None
    if sys.platform.startswith("linux"):
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _FORWARDED)
        if prctl is not None:
            # If this launcher is killed outright, mpiexec gets SIGTERM and ends the job,
            # instead of running on unsupervised.
            prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))

    return setup


def _end(proc):
    """End the job as its death signal would (mpiexec stops the ranks on SIGTERM), or kill
    mpiexec if that takes longer than a stop may."""
    proc.terminate()
    try:
        proc.wait(timeout=END_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
