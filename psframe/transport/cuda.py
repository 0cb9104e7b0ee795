"""Whether the MPI library takes CUDA device buffers, asked of the library already loaded."""
from __future__ import annotations

import ctypes
import os

__all__ = ["mpi_cuda_aware"]


def mpi_cuda_aware() -> bool:
    """Whether the MPI library takes device buffers; anything unclear counts as no."""
    try:
        from mpi4py import MPI  # here, not at the top: importing psframe must not start MPI

        query = getattr(MPI, "Query_cuda_support", None)
        if query is not None:
            return query() == 1
        # mpi4py exposes the query only where its build saw it; MPICH and Open MPI export
        # MPIX_Query_cuda_support from libmpi itself, so ask the library already loaded.
        for path in _loaded_libraries("libmpi"):
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD)
            fn = getattr(lib, "MPIX_Query_cuda_support", None)
            if fn is not None:
                fn.restype, fn.argtypes = ctypes.c_int, []
                return fn() == 1
    except Exception:  # noqa: B902 - a failed query must never break a run: stage on the host
        return False
    return False


def _loaded_libraries(prefix: str) -> list[str]:
    """Paths of the shared libraries this process has mapped whose file name starts so."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if len(line.split()) >= 6}
    except OSError:
        return []
    return sorted(p for p in paths if os.path.basename(p).startswith(prefix))
