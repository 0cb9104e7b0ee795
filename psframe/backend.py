"""Array backends for workers: NumPy everywhere, CuPy where a GPU is usable."""
from __future__ import annotations

import contextlib
from typing import Callable, Mapping

import numpy as np

from . import env

__all__ = ["xp", "NumpyBackend", "CupyBackend", "select_backend", "resolve_name",
           "probe_cupy", "BACKENDS", "ENV_VAR"]

ENV_VAR = env.BACKEND
BACKENDS = ("auto", "numpy", "cupy")


def xp(array):
    """Return the array module (numpy or cupy) that owns ``array``."""
    module = type(array).__module__
    if module.startswith("cupy"):
        import cupy

        return cupy
    return np


class NumpyBackend:
    """Host arrays; transfers are no-ops so worker code is backend-agnostic.

    Every method here returns its argument (or copies into ``out``) so the NumPy data path
    costs exactly what it did before backends existed: no extra buffer, no extra copy.
    """

    name = "numpy"
    xp = np
    device = "cpu"
    transfer = "host"

    def __init__(self, reason=None):
        self.reason = reason  # why "auto" did not pick CuPy, for the run's report

    def bind(self, local_rank=0):
        return self

    def activate(self):
        return contextlib.nullcontext()

    def asarray(self, array, dtype=None):
        return np.ascontiguousarray(array, dtype=dtype)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def buffers(self, shape, dtype):
        """(MPI buffer, compute buffer): on the host they are one and the same array."""
        a = np.empty(shape, dtype)
        return a, a

    pair = buffers  # (host, compute) for data the worker stages itself: also one array

    def to_device(self, array, out=None):
        if out is None:
            return array
        if out is not array:
            np.copyto(out, array)
        return out

    def to_host(self, array, out=None):
        if out is None:
            return np.asarray(array)
        if out is not array:
            np.copyto(out, array)
        return out

    def put_data(self, X, y):
        return X, y

    def synchronize(self):
        pass

    def report(self):
        out = {"backend": self.name, "device": self.device, "transfer": self.transfer}
        if self.reason:
            out["note"] = self.reason
        return out


class CupyBackend:
    """Arrays on one GPU, computing on a stream of their own.

    MPI buffers are pinned host memory copied to and from the device asynchronously
    ("host-staged"), or device memory itself where the MPI library is CUDA-aware.
    """

    name = "cupy"
    # A worker's data stays on the device only if it takes at most this share of free memory:
    # the rest is for weights, activations and, on a shared GPU, the other workers.
    DATA_SHARE = 0.25

    def __init__(self, cupy, n_devices, cuda_aware=False, requested="cupy"):
        self.cupy = cupy
        self.requested = requested  # "auto" falls back to NumPy if the device fails in bind
        self.xp = cupy
        self.n_devices = int(n_devices)
        self.cuda_aware = bool(cuda_aware)
        self.transfer = "cuda-aware" if self.cuda_aware else "host-staged"
        self.device = None
        self.stream = None
        self.data_on_device = None

    def bind(self, local_rank=0):
        """Take device ``local_rank % n_devices`` and prove it with a real kernel.

        Returns the backend to use: this one, or for "auto" a NumPy backend saying why the
        device failed; "cupy" raises a ValueError instead.
        """
        cp = self.cupy
        self.device = int(local_rank) % self.n_devices
        try:
            cp.cuda.Device(self.device).use()
            self.stream = cp.cuda.Stream(non_blocking=True)
            with self.stream:
                total = float(cp.arange(4, dtype=cp.float32).sum())
            self.stream.synchronize()
            problem = None if total == 6.0 else f"0+1+2+3 came out as {total}"
        except Exception as exc:  # noqa: B902 - any CUDA failure means "not usable"
            problem = f"{type(exc).__name__}: {exc}"
        if problem is None:
            return self
        reason = f"GPU {self.device} of {self.n_devices} is not usable ({problem})"
        self.stream = None
        if self.requested == "auto":
            return NumpyBackend(reason=reason)
        raise ValueError(f"backend 'cupy': {reason}")

    def activate(self):
        """The worker's stream is current inside, so the model's kernels run on it."""
        return self.stream if self.stream is not None else contextlib.nullcontext()

    def asarray(self, array, dtype=None):
        return self.cupy.ascontiguousarray(self.cupy.asarray(array, dtype=dtype))

    def empty(self, shape, dtype):
        return self.cupy.empty(shape, dtype)

    def pinned(self, shape, dtype):
        # Page-locked: only from such memory does cudaMemcpyAsync run without blocking the host.
        import cupyx

        return cupyx.empty_pinned(shape, dtype)

    def pair(self, shape, dtype):
        """(pinned host, device) buffers for data copied over on the worker's stream."""
        return self.pinned(shape, dtype), self.cupy.empty(shape, dtype)

    def buffers(self, shape, dtype):
        """(MPI buffer, compute buffer): pinned host + device, or one device array where MPI
        is CUDA-aware."""
        if self.cuda_aware:
            dev = self.cupy.empty(shape, dtype)
            return dev, dev
        return self.pair(shape, dtype)

    def _copy(self, src, out):
        """Copy ``src`` into ``out`` on the worker's stream, host or device on either side."""
        cp = self.cupy
        if out is src:
            return out
        if src.shape != out.shape:
            raise ValueError(f"cannot copy shape {src.shape} into {out.shape}")
        if isinstance(out, cp.ndarray):
            if isinstance(src, cp.ndarray):
                with self.activate():
                    cp.copyto(out, src)  # on device: casts like np.copyto
                return out
            src = np.ascontiguousarray(src, dtype=out.dtype)
            kind = cp.cuda.runtime.memcpyHostToDevice
            dst_ptr, src_ptr = out.data.ptr, src.ctypes.data
        else:
            if not isinstance(src, cp.ndarray):
                np.copyto(out, src)
                return out
            if src.dtype != out.dtype or not src.flags.c_contiguous:
                with self.activate():
                    src = cp.ascontiguousarray(src, dtype=out.dtype)
            kind = cp.cuda.runtime.memcpyDeviceToHost
            dst_ptr, src_ptr = out.ctypes.data, src.data.ptr
        if not out.flags.c_contiguous:
            raise ValueError("transfers need a contiguous destination")
        if out.nbytes:
            # A temporary src freed after this call goes back to CuPy's pool for this stream,
            # so any reuse is ordered after the copy. Before bind: the default stream (0).
            stream = self.stream.ptr if self.stream is not None else 0
            cp.cuda.runtime.memcpyAsync(dst_ptr, src_ptr, out.nbytes, kind, stream)
        return out

    def to_device(self, array, out=None):
        if out is None:
            if isinstance(array, self.cupy.ndarray):
                return array
            out = self.cupy.empty(np.shape(array), np.asarray(array).dtype)
        return self._copy(array, out)

    def to_host(self, array, out=None):
        if out is None:
            if not isinstance(array, self.cupy.ndarray):
                return np.asarray(array)
            out = self.pinned(array.shape, array.dtype)
            self._copy(array, out)
            self.synchronize()
            return out
        return self._copy(array, out)

    def put_data(self, X, y):
        """Device copies of a worker's data if they fit, else None (gathered per step)."""
        free, _total = self.cupy.cuda.runtime.memGetInfo()
        if X.nbytes + y.nbytes > self.DATA_SHARE * free:
            self.data_on_device = False
            return None
        out = self.to_device(X), self.to_device(y)
        self.synchronize()  # once, at the start: the step loop may then assume they are there
        self.data_on_device = True
        return out

    def synchronize(self):
        if self.stream is not None:
            self.stream.synchronize()

    def report(self):
        out = {"backend": self.name, "device": self.device, "transfer": self.transfer}
        if self.data_on_device is not None:
            out["data_on_device"] = self.data_on_device
        return out


def resolve_name(name="auto", environ=None):
    """The backend a run asks for: the keyword unless it is "auto", then $PSFRAME_BACKEND,
    then "auto". An environment variable the keyword overrides is not even read."""
    name = _check_name(name, "backend")
    if name != "auto":
        return name
    return _check_name(env.backend(environ) or "auto", f"${ENV_VAR}")


def _check_name(value, where):
    if isinstance(value, str) and value.strip().lower() in BACKENDS:
        return value.strip().lower()
    raise ValueError(f"unknown {where} {value!r}; choose one of {list(BACKENDS)}")


def probe_cupy():
    """``(cupy, n_devices, None)`` when CuPy imports and sees a GPU, else ``(None, 0, why)``.

    ``import cupy`` succeeds on a machine without a driver; the device count is the first
    call that really talks to CUDA. It creates no context, so the server rank (which stays on
    the host) does not take GPU memory; the worker proves its own device in ``bind``.
    """
    try:
        import cupy
    except Exception as exc:  # noqa: B902 - a broken install is as good as none
        return None, 0, f"CuPy does not import ({type(exc).__name__}: {exc})"
    try:
        n = int(cupy.cuda.runtime.getDeviceCount())
    except Exception as exc:  # noqa: B902 - CUDARuntimeError without a driver, and the like
        return None, 0, f"CuPy imports but CUDA is not usable ({type(exc).__name__}: {exc})"
    if n < 1:
        return None, 0, "CuPy imports but CUDA reports no GPU"
    return cupy, n, None


def select_backend(name: str = "auto", environ: Mapping[str, str] | None = None,
                   cuda_aware: Callable[[], bool] | None = None) -> NumpyBackend | CupyBackend:
    """The backend for ``name`` ("auto", "numpy" or "cupy"; "auto" defers to $PSFRAME_BACKEND).

    "auto" takes CuPy only when it imports and CUDA sees a GPU; "cupy" without one raises a
    ValueError saying why, never falls back. Workers then ``bind`` a device.

    ``cuda_aware`` says whether MPI takes device buffers; it is called only when CuPy is
    chosen. The question belongs to the transport (``psframe.transport.cuda.mpi_cuda_aware``,
    which the training layer passes); this module sits below it, so None means "do not ask": a CuPy
    backend then stages every message through pinned host memory.
    """
    asked = name
    name = resolve_name(name, environ)
    if name == "numpy":
        return NumpyBackend()
    cupy, n_devices, reason = probe_cupy()
    if cupy is None:
        if name == "cupy":
            where = f" (from ${ENV_VAR})" if asked == "auto" else ""
            raise ValueError(f"backend 'cupy'{where} needs a usable CUDA GPU: {reason}; "
                             "use backend='numpy' (or 'auto') on this machine")
        return NumpyBackend(reason=reason)
    aware = cuda_aware() if cuda_aware is not None else False
    return CupyBackend(cupy, n_devices, cuda_aware=aware, requested=name)
