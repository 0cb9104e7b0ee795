"""What launch tests share: the environment their children start in (no inherited MPI or
psframe state), and the check that a job's processes are gone once it has ended."""
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)

# How long a job's processes may take to be gone after its mpiexec has exited. mpiexec's
# exit does not mean its ranks are gone: on an abort, Hydra's proxy sends them SIGKILL and
# exits without reaping them (they are re-parented to init), so a rank that was stopped
# (SIGSTOP) or waits for a core on a loaded machine can still be listed, with its command
# line, for a moment. That moment is ~10 ms here when idle; a rank still there after this
# bound was not taken down with its job.
ORPHAN_WAIT_S = 5.0
_ORPHAN_POLL_S = 0.05


def clean_env(**extra):
    """This environment minus any MPI or psframe launch state, so children start afresh."""
    drop = ("PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_", "PSFRAME_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def _listed(marker):
    """Pids of the processes whose command line holds ``marker`` (a job's own directory).
    One that is dying has no command line any more, and is not listed."""
    found = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout
    return [int(pid) for pid in found.split()]


def _state(pid):
    """The state letter of ``pid`` (R, S, T for stopped, ...), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def assert_no_processes(marker, wait_s=ORPHAN_WAIT_S):
    """Fail unless every process whose command line holds ``marker`` is gone within
    ``wait_s`` seconds (polled, so a clean end costs one look). Call it after the job's
    mpiexec (or launcher) has exited; see ORPHAN_WAIT_S for why it waits at all."""
    deadline = time.monotonic() + wait_s
    while True:
        leftover = _listed(marker)
        if not leftover or time.monotonic() >= deadline:
            break
        time.sleep(_ORPHAN_POLL_S)
    if not leftover:
        return
    states = {pid: _state(pid) for pid in leftover}
    for pid in leftover:  # a stopped rank would never end by itself: do not leave it behind
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    listed = ", ".join(f"{pid} (state {state})" for pid, state in states.items())
    raise AssertionError(f"processes left running {wait_s:g} s after the job ended "
                         f"(ORPHAN_WAIT_S), now killed: {listed}")
