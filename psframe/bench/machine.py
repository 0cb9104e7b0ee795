"""Where a benchmark ran: MPI library, backend, cores, BLAS, versions and git revision."""
import datetime
import importlib.util
import os
import platform
import socket
import subprocess
import sys

__all__ = ["environment", "load_average", "torch_version", "now"]


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def load_average():
    """The 1-minute load average: a number next to each run that says how busy the node was."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _cores():
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu_count": os.cpu_count(), "usable": usable}


def _mpi():
    """The MPI library mpi4py loads, asked without starting MPI (the benchmark process only
    launches jobs; initializing here would make it a 1-rank MPI job)."""
    try:
        import mpi4py

        if "mpi4py.MPI" not in sys.modules:
            mpi4py.rc.initialize = False
        from mpi4py import MPI

        vendor, version = MPI.get_vendor()
        library = MPI.Get_library_version().strip().splitlines()
        return {"vendor": vendor, "version": ".".join(map(str, version)),
                "standard": ".".join(map(str, MPI.Get_version())),
                "library": library[0] if library else "", "mpi4py": mpi4py.__version__}
    except Exception as exc:  # noqa: B902 - the record says what failed instead of no record
        return {"error": f"{type(exc).__name__}: {exc}"}


def _mpiexec():
    from ..training.launch import find_mpiexec

    try:
        return find_mpiexec()
    except ValueError:
        return None


def _blas():
    import numpy  # noqa: F401 - loaded first, so threadpoolctl can see its BLAS
    from threadpoolctl import threadpool_info

    return [{"api": i.get("internal_api"), "version": i.get("version"),
             "threads": i.get("num_threads")} for i in threadpool_info()]


def _git(root):
    """Revision of the checkout psframe runs from, and whether it has local changes.

    Plumbing commands only: they read the repository and never touch its index."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=10)

    try:
        rev = git("rev-parse", "HEAD")
        if rev.returncode:
            return {"revision": None}
        dirty = git("diff-index", "--quiet", "HEAD", "--").returncode != 0
        return {"revision": rev.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None}


def torch_version():
    """torch's version if this Python can import it, else None (its baselines are skipped)."""
    if importlib.util.find_spec("torch") is None:
        return None
    try:
        import torch

        return torch.__version__
    except Exception:  # noqa: B902 - a broken install counts as missing
        return None


def environment():
    import numpy

    import psframe
    from ..backend import select_backend

    root = os.path.dirname(os.path.dirname(os.path.abspath(psframe.__file__)))
    return {
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cores": _cores(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "blas": _blas(),
        "psframe": psframe.__version__,
        "backend": select_backend("auto").name,
        "mpi": _mpi(),
        "mpiexec": _mpiexec(),
        "torch": torch_version(),
        "git": _git(root),
    }
