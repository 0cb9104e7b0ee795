"""Running one benchmark cell as its own job, under a time limit, and reading what it left."""
import json
import os
import re
import signal
import subprocess
import sys
import time

from .. import env
from ..training import launch
from .metrics import compact_history, summarize

__all__ = ["BASELINES", "baseline_script", "cell_dir", "command", "execute", "collect",
           "child_env", "stderr_tail"]

# The hand-written peers: psframe/bench/baselines/<system>.py, installed with the package.
BASELINES = {"serial": "serial.py", "allreduce": "allreduce.py", "torch_ddp": "torch_ddp.py",
             "torch_rpc_ps": "torch_rpc_ps.py"}
TORCH_SYSTEMS = ("torch_ddp", "torch_rpc_ps")
STDERR_TAIL = 2000  # characters of a failed job's stderr kept in its record
KILL_GRACE_S = 5.0


def package_root():
    import psframe

    return os.path.dirname(os.path.dirname(os.path.abspath(psframe.__file__)))


def baselines_dir():
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "baselines")


def baseline_script(system):
    """Path of a baseline's script, or None for psframe itself."""
    return os.path.join(baselines_dir(), BASELINES[system]) if system in BASELINES else None


def baseline_program(directory, system, workers, options):
    """A hand-written peer's run outside the harness (the benchmarks' baselines): writes
    its cell spec into ``directory``; (argv to start under mpiexec, result path)."""
    spec, out = os.path.join(directory, "cell.json"), os.path.join(directory, "result.json")
    with open(spec, "w") as f:
        json.dump({"system": system, "workers": workers, "delay": None,
                   "options": dict(options)}, f)
    return [sys.executable, "-m", "mpi4py", baseline_script(system), spec, out], out


def cell_dir(root, cell):
    """A directory per cell, named after its id with path-safe characters."""
    return os.path.join(root, re.sub(r"[^A-Za-z0-9._-]+", "_", cell.id.replace("/", "__")))


def child_env():
    """This environment without MPI state (a bench run under mpiexec must not leak its rank
    into the jobs), psframe's checkout on PYTHONPATH so every job imports this same psframe."""
    drop = ("PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_", env.LAUNCHED, env.TTY)
    out = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    out["PYTHONPATH"] = os.pathsep.join(p for p in (package_root(), out.get("PYTHONPATH")) if p)
    return out


def _mpiexec(n):
    return [launch.find_mpiexec(), *env.mpiexec_args(), "-n", str(n)]


def command(cell, directory, delays):
    """The job's argv; writes the files it reads into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    delay = {str(w): s for w, s in (delays or {}).items()} or None
    if cell.system == "psframe":
        path = os.path.join(directory, "options.json")
        with open(path, "w") as f:
            json.dump({**cell.options, "delay": delay}, f, indent=1)
        return [*_mpiexec(cell.ranks), sys.executable, "-m", "mpi4py", "-m", "psframe", "train",
                "--config", path, "--log-dir", directory, "--quiet"]
    path = os.path.join(directory, "cell.json")
    with open(path, "w") as f:
        json.dump({"system": cell.system, "workers": cell.workers, "delay": delay,
                   "options": cell.options}, f, indent=1)
    argv = [baseline_script(cell.system), path, os.path.join(directory, "result.json")]
    if cell.system == "serial":
        return [sys.executable, *argv]
    return [*_mpiexec(cell.ranks), sys.executable, "-m", "mpi4py", *argv]


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill(proc):
    """End the job's whole process group (mpiexec, its proxies and every rank): TERM, then
    KILL after a grace period. The group is the job's own (start_new_session)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + KILL_GRACE_S
    # mpiexec may be gone while a rank lingers: wait for the group, not just its leader.
    while time.monotonic() < deadline:
        if proc.poll() is not None and not _group_alive(proc.pid):
            return
        time.sleep(0.05)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def execute(cmd, directory, timeout):
    """Run ``cmd`` with output to files in ``directory``; (status, returncode, seconds).

    status is "ok", "failed" (non-zero exit) or "timeout". Ctrl-C ends the job, then re-raises.
    """
    t0 = time.perf_counter()
    with open(os.path.join(directory, "stdout.txt"), "w") as out, \
            open(os.path.join(directory, "stderr.txt"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=child_env(), start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            return "timeout", None, time.perf_counter() - t0
        except BaseException:
            _kill(proc)
            raise
    return ("ok" if rc == 0 else "failed"), rc, time.perf_counter() - t0


def stderr_tail(directory):
    try:
        with open(os.path.join(directory, "stderr.txt"), errors="replace") as f:
            text = f.read()
    except OSError:
        return ""
    return text[-STDERR_TAIL:].strip()


def _psframe_outputs(directory):
    with open(os.path.join(directory, "summary.json")) as f:
        summary = json.load(f)
    history = []
    with open(os.path.join(directory, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("kind") == "eval":
                history.append(row)
    return summary["stats"], history, summary.get("config", {})


def _baseline_outputs(directory):
    with open(os.path.join(directory, "result.json")) as f:
        result = json.load(f)
    return result["stats"], result["history"], result.get("config", {})


def collect(cell, directory, target):
    """(metrics, stats, history, run config) from a finished job's files."""
    read = _psframe_outputs if cell.system == "psframe" else _baseline_outputs
    stats, history, run_config = read(directory)
    stats.pop("batch_counts", None)  # one count per batch: long, and only for dispatch tests
    return summarize(stats, history, target), stats, compact_history(history), run_config
