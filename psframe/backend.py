"""Array backends for workers: NumPy everywhere, CuPy where a GPU is usable."""
import numpy as np

__all__ = ["xp", "NumpyBackend", "select_backend"]


def xp(array):
    """Return the array module (numpy or cupy) that owns ``array``."""
    module = type(array).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy
    return np


class NumpyBackend:
    """Host arrays; transfers are no-ops so worker code is backend-agnostic."""

    name = "numpy"
    xp = np

    def asarray(self, array, dtype=None):
        return np.ascontiguousarray(array, dtype=dtype)

    def to_host(self, array, out=None):
        if out is None:
            return np.asarray(array)
        np.copyto(out, array)
        return out

    def synchronize(self):
        pass


_BACKENDS = {"numpy": NumpyBackend, "auto": NumpyBackend}


def select_backend(name="auto"):
    """Backend by name; the CuPy path arrives with GPU support (issue 5)."""
    try:
        return _BACKENDS[name]()
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; choose one of {sorted(_BACKENDS)}"
        ) from None
