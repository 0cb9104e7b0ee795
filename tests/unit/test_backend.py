"""Backend selection and the GPU data path, against fake CuPy modules: no GPU, no messages."""
import contextvars
import ctypes
import sys
import types

import numpy as np
import pytest

from psframe import backend as B
from psframe.data import BatchStream
from psframe.models import MLP, LinearRegression
from psframe.params import ParamLayout

# -- a fake CuPy: host memory that behaves like device memory ---------------------------------
_inside_cupy = contextvars.ContextVar("inside_fake_cupy", default=False)


class CUDARuntimeError(RuntimeError):
    pass


class DeviceArray(np.ndarray):
    """A "device" array: like CuPy's, NumPy functions and ufuncs on it give device arrays
    (CuPy answers them through __array_function__/__array_ufunc__), and any of them mixing it
    with a host array raises TypeError."""

    @property
    def data(self):  # CuPy's MemoryPointer: .ptr is the device address
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        out = kwargs.get("out", ())
        _refuse_host(ufunc.__name__, inputs + tuple(out))
        inputs = tuple(_host(x) for x in inputs)
        if out:
            kwargs["out"] = tuple(_host(x) for x in out)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if out:
            return out[0] if len(out) == 1 else out
        return _device(result)

    def __array_function__(self, func, types_, args, kwargs):
        if _inside_cupy.get():
            return super().__array_function__(func, types_, args, kwargs)
        _refuse_host(f"numpy.{func.__name__}", tuple(args) + tuple(kwargs.values()))
        return _cupy_function(func)(*args, **kwargs)


def _refuse_host(what, values):
    for x in values:
        if isinstance(x, np.ndarray) and not isinstance(x, DeviceArray) and x.ndim:
            raise TypeError(f"{what} mixes a device array with a host array")


DeviceArray.__module__ = "cupy"  # psframe.xp() recognises CuPy arrays by their module


def _host(x):
    return x.view(np.ndarray) if isinstance(x, DeviceArray) else x


def _device(x):
    if isinstance(x, np.ndarray) and not isinstance(x, DeviceArray):
        return x.view(DeviceArray)
    if isinstance(x, tuple):
        return tuple(_device(v) for v in x)
    return x


def _cupy_function(fn):
    def call(*args, **kwargs):
        token = _inside_cupy.set(True)
        try:
            return _device(fn(*args, **kwargs))
        finally:
            _inside_cupy.reset(token)

    return call


def fake_cupy(n_devices=1, count_error=None, kernel_error=None, free_bytes=1 << 40):
    """A module that imports as ``cupy``: ``count_error`` makes getDeviceCount raise (no
    driver), ``kernel_error`` makes the first kernel raise (a device that is not usable)."""
    cp = types.ModuleType("cupy")
    cp.ndarray = DeviceArray
    cp.calls = {"copies": [], "devices": [], "syncs": 0}

    def get_attr(name):
        value = getattr(np, name)
        return value if isinstance(value, type) or not callable(value) else _cupy_function(value)

    cp.__getattr__ = get_attr
    cp.asarray = lambda a, dtype=None: np.array(_host(a), dtype=dtype).view(DeviceArray)

    def arange(*args, **kwargs):
        if kernel_error:
            raise CUDARuntimeError(kernel_error)
        return np.arange(*args, **kwargs).view(DeviceArray)

    cp.arange = arange

    def get_device_count():
        if count_error:
            raise CUDARuntimeError(count_error)
        return n_devices

    def memcpy_async(dst, src, nbytes, kind, stream):
        cp.calls["copies"].append(kind)
        ctypes.memmove(dst, src, nbytes)

    class Stream:
        ptr = 0

        def __init__(self, non_blocking=False):
            pass

        def synchronize(self):
            cp.calls["syncs"] += 1

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    class Device:
        def __init__(self, index):
            self.index = index

        def use(self):
            cp.calls["devices"].append(self.index)

    runtime = types.SimpleNamespace(
        getDeviceCount=get_device_count, memGetInfo=lambda: (free_bytes, free_bytes),
        memcpyAsync=memcpy_async, memcpyHostToDevice=1, memcpyDeviceToHost=2,
        CUDARuntimeError=CUDARuntimeError)
    cp.cuda = types.SimpleNamespace(runtime=runtime, Stream=Stream, Device=Device)
    return cp


@pytest.fixture
def install(monkeypatch):
    """install(module_or_None): what ``import cupy`` gives; $PSFRAME_BACKEND unset."""
    monkeypatch.delenv(B.ENV_VAR, raising=False)  # select_backend asks no MPI unless told how

    def put(cp):
        cupyx = types.ModuleType("cupyx")
        cupyx.empty_pinned = lambda shape, dtype: np.empty(shape, dtype)
        monkeypatch.setitem(sys.modules, "cupy", cp)  # None: "import cupy" raises ImportError
        monkeypatch.setitem(sys.modules, "cupyx", cupyx)
        return cp

    return put


NO_DRIVER = "cudaErrorInsufficientDriver: CUDA driver version is insufficient"


# -- choosing a backend -----------------------------------------------------------------------
def test_keyword_wins_unless_auto_then_env_then_auto():
    assert B.resolve_name("auto", {}) == "auto"
    assert B.resolve_name("auto", {B.ENV_VAR: "cupy"}) == "cupy"
    assert B.resolve_name("auto", {B.ENV_VAR: " NumPy "}) == "numpy"
    assert B.resolve_name("auto", {B.ENV_VAR: ""}) == "auto"
    assert B.resolve_name("numpy", {B.ENV_VAR: "cupy"}) == "numpy"
    assert B.resolve_name("cupy", {B.ENV_VAR: "numpy"}) == "cupy"
    # An overridden variable is never read, so a stale bad value there does no harm.
    assert B.resolve_name("numpy", {B.ENV_VAR: "tpu"}) == "numpy"


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match=r"unknown backend 'torch'.*'auto', 'numpy', 'cupy'"):
        B.resolve_name("torch", {})
    with pytest.raises(ValueError, match=r"unknown \$PSFRAME_BACKEND 'gpu'"):
        B.resolve_name("auto", {B.ENV_VAR: "gpu"})
    with pytest.raises(ValueError, match="unknown backend None"):
        B.resolve_name(None, {})


def test_without_cupy_auto_is_numpy_and_cupy_is_an_error(install):
    install(None)
    chosen = B.select_backend("auto")
    assert isinstance(chosen, B.NumpyBackend)
    assert "CuPy does not import" in chosen.report()["note"]
    assert B.select_backend("numpy").report() == {
        "backend": "numpy", "device": "cpu", "transfer": "host"}
    with pytest.raises(ValueError, match="backend 'cupy' needs a usable CUDA GPU: CuPy does not"):
        B.select_backend("cupy")


@pytest.mark.parametrize("cp_kwargs, why", [
    ({"count_error": NO_DRIVER}, "CUDA is not usable (CUDARuntimeError: cudaErrorInsuffic"),
    ({"n_devices": 0}, "CUDA reports no GPU"),
])
def test_cupy_without_a_device_auto_is_numpy_and_cupy_is_an_error(install, cp_kwargs, why):
    install(fake_cupy(**cp_kwargs))
    chosen = B.select_backend("auto")
    assert isinstance(chosen, B.NumpyBackend)
    assert why in chosen.reason
    with pytest.raises(ValueError, match="needs a usable CUDA GPU") as info:
        B.select_backend("cupy")
    assert why in str(info.value)


def test_env_var_picks_the_backend_for_auto(install, monkeypatch):
    install(fake_cupy(count_error=NO_DRIVER))
    monkeypatch.setenv(B.ENV_VAR, "cupy")
    with pytest.raises(ValueError, match=r"backend 'cupy' \(from \$PSFRAME_BACKEND\) needs a"):
        B.select_backend("auto")
    assert isinstance(B.select_backend("numpy"), B.NumpyBackend)  # the keyword wins
    install(fake_cupy())
    assert isinstance(B.select_backend("auto"), B.CupyBackend)
    monkeypatch.setenv(B.ENV_VAR, "numpy")
    assert isinstance(B.select_backend("auto"), B.NumpyBackend)  # a GPU, but numpy asked for
    assert isinstance(B.select_backend("cupy"), B.CupyBackend)


def test_a_device_that_fails_its_first_kernel(install):
    install(fake_cupy(kernel_error="cudaErrorDevicesUnavailable: all CUDA devices are busy"))
    auto = B.select_backend("auto")
    assert isinstance(auto, B.CupyBackend)  # the count looked fine; bind tries for real
    fallback = auto.bind(0)
    assert isinstance(fallback, B.NumpyBackend)
    assert "GPU 0 of 1 is not usable (CUDARuntimeError: cudaErrorDevicesUnavailable" in (
        fallback.reason)
    with pytest.raises(ValueError, match="backend 'cupy': GPU 0 of 1 is not usable"):
        B.select_backend("cupy").bind(0)


@pytest.mark.parametrize("n_devices", [1, 2, 4])
def test_each_worker_takes_its_node_local_rank_modulo_the_device_count(install, n_devices):
    cp = install(fake_cupy(n_devices=n_devices))
    for local_rank in range(9):
        bound = B.select_backend("cupy").bind(local_rank)
        assert bound.device == local_rank % n_devices
        assert cp.calls["devices"][-1] == local_rank % n_devices
        assert bound.report() == {"backend": "cupy", "device": local_rank % n_devices,
                                  "transfer": "host-staged"}


def test_cuda_aware_mpi_gets_device_buffers(install):
    install(fake_cupy())
    staged = B.select_backend("cupy").bind(0)
    wire, dev = staged.buffers(5, np.float32)
    assert type(wire) is np.ndarray and type(dev) is DeviceArray
    aware = B.select_backend("cupy", cuda_aware=lambda: True).bind(0)
    wire, dev = aware.buffers(5, np.float32)
    assert wire is dev and type(dev) is DeviceArray
    assert aware.report()["transfer"] == "cuda-aware"


@pytest.mark.parametrize("answer, expected", [(True, True), (1, True), (False, False),
                                              (-1, False), (RuntimeError("x"), False)])
def test_mpi_cuda_aware_trusts_only_a_clear_yes(monkeypatch, answer, expected):
    import mpi4py

    from psframe.transport.cuda import mpi_cuda_aware  # before the fake: it loads mpi4py.MPI

    def query():
        if isinstance(answer, Exception):
            raise answer
        return answer

    fake_mpi = types.SimpleNamespace(Query_cuda_support=query)
    monkeypatch.setitem(sys.modules, "mpi4py.MPI", fake_mpi)
    monkeypatch.setattr(mpi4py, "MPI", fake_mpi, raising=False)
    assert mpi_cuda_aware() is expected


# -- NumPy: no copies, no new buffers ---------------------------------------------------------
def test_numpy_backend_moves_nothing():
    be = B.NumpyBackend().bind(3)
    a = np.arange(6, dtype=np.float32)
    assert be.to_device(a) is a
    assert be.to_host(a) is a
    assert be.to_device(a, out=a) is a and be.to_host(a, out=a) is a
    wire, dev = be.buffers(4, np.float64)
    assert wire is dev and wire.dtype == np.float64
    X, y = np.zeros((3, 2)), np.zeros(3)
    Xd, yd = be.put_data(X, y)
    assert Xd is X and yd is y
    out = np.empty(6, np.float32)
    assert be.to_host(a * 2, out=out) is out  # the one copy asked for, into the given buffer
    np.testing.assert_array_equal(out, a * 2)
    with be.activate():
        be.synchronize()


# -- CuPy semantics of the copies, the layers and the worker -----------------------------------
def test_cupy_copies_each_way_with_the_dtype_of_the_destination(install):
    cp = install(fake_cupy())
    be = B.select_backend("cupy").bind(0)
    host = np.arange(6, dtype=np.float64).reshape(2, 3)
    dev = be.to_device(host)
    assert type(dev) is DeviceArray and not np.shares_memory(_host(dev), host)
    np.testing.assert_array_equal(_host(dev), host)
    pinned = be.pinned((2, 3), np.float32)
    assert be.to_host(dev * 2, out=pinned) is pinned
    np.testing.assert_array_equal(pinned, host * 2)
    again = be.empty((2, 3), np.float32)
    be.to_device(pinned, out=again)
    assert cp.calls["copies"] == [1, 2, 1]  # H2D, D2H (after a cast on the device), H2D
    back = be.to_host(again.T)  # non-contiguous: made contiguous on the device first
    np.testing.assert_array_equal(back, (host * 2).T)
    with pytest.raises(ValueError, match="cannot copy shape"):
        be.to_host(dev, out=np.empty(5))


def _device_params(params):
    return {k: _device(v.copy()) for k, v in params.items()}


@pytest.mark.parametrize("model", [MLP([5, 7, 3]), MLP([5, 4, 4, 3], activation="tanh"),
                                   LinearRegression(5)])
def test_models_layers_and_losses_run_unchanged_on_device_arrays(install, model):
    install(fake_cupy())
    rng = np.random.default_rng(0)
    params = {k: v.astype(np.float32) for k, v in model.init_params(rng).items()}
    X = rng.normal(size=(11, 5)).astype(np.float32)
    y = rng.integers(0, 3, 11) if model.loss.classification else rng.normal(size=11)
    loss, grads = model.loss_and_grad(params, X, y)
    dloss, dgrads = model.loss_and_grad(_device_params(params), _device(X), _device(y))
    assert isinstance(dloss, float) and dloss == loss
    for k in grads:
        assert type(dgrads[k]) is DeviceArray and dgrads[k].dtype == grads[k].dtype
        np.testing.assert_array_equal(_host(dgrads[k]), grads[k])
    assert model.evaluate(_device_params(params), _device(X), _device(y), chunk=4) == (
        model.evaluate(params, X, y, chunk=4))
    np.testing.assert_array_equal(_host(model.predict(_device_params(params), _device(X))),
                                  model.predict(params, X))


def test_the_fake_refuses_what_cupy_refuses():
    d = _device(np.ones(3))
    with pytest.raises(TypeError, match="add mixes a device array with a host array"):
        d + np.ones(3)
    with pytest.raises(TypeError, match="numpy.take mixes a device array with a host array"):
        np.take(d, np.array([0]))
    assert type(np.ones_like(d)) is DeviceArray and type(d * 2.0) is DeviceArray


class _Arrived:
    """An MPI request that has already completed."""

    def Test(self, status=None):
        return True


@pytest.fixture
def worker_parts(monkeypatch):
    import psframe.worker.worker

    monkeypatch.setattr(psframe.worker.worker, "node_local_index", lambda comm, server: 0)
    model = MLP([6, 8, 8, 3])
    rng = np.random.default_rng(1)
    # shard_elems 20: several frames, so weights land frame by frame
    layout = ParamLayout.from_params(model.init_params(rng), "float32", shard_elems=20)
    weights = layout.flatten(model.init_params(rng), out=layout.empty())
    X = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    return model, layout, weights, X, y


def _worker(cls, backend, parts, **kwargs):
    model, layout, weights, X, y = parts
    stream = BatchStream(np.arange(len(X)), 10, True, 0, 0)
    w = cls(object(), 0, 0, layout, model, backend, X, y, stream, 3, **kwargs)
    w.weights[:] = weights  # as if MPI had written the pulled weights
    if w._staged:
        w._land([_Arrived() for _ in layout.frames()], 0, layout.n_shards)
    return w, stream


@pytest.mark.parametrize("resident", [True, False])
@pytest.mark.parametrize("cuda_aware", [False, True])
def test_worker_step_on_the_device_matches_numpy(install, monkeypatch, worker_parts, resident,
                                                 cuda_aware):
    from psframe.worker import Worker

    install(fake_cupy())
    monkeypatch.setattr(B.CupyBackend, "DATA_SHARE", 1.0 if resident else 0.0)
    host, stream = _worker(Worker, B.NumpyBackend(), worker_parts)
    gpu, _ = _worker(Worker, B.select_backend("cupy", cuda_aware=lambda: cuda_aware),
                     worker_parts)
    assert gpu._staged is not cuda_aware
    assert all(type(v) is DeviceArray for v in gpu.params.values())
    assert (type(gpu.grad) is DeviceArray) is cuda_aware  # what MPI sends
    for step in range(3):
        rows = stream.rows(step)
        for w in (host, gpu):
            xb, yb = w._gather(rows)
            loss, grads = w.model.loss_and_grad(w.params, xb, yb)
            w._pack(grads, step)
            w.backend.synchronize()
        assert type(xb) is DeviceArray and type(yb) is DeviceArray
        np.testing.assert_array_equal(_host(gpu.grad), host.grad)
    assert gpu.backend.report()["data_on_device"] is resident
    assert host.backend.report() == {"backend": "numpy", "device": "cpu", "transfer": "host"}


@pytest.mark.parametrize("micro_batches", [1, 3])
def test_pipeline_stage_on_the_device_matches_numpy(install, worker_parts, micro_batches):
    from psframe.worker import StageWorker

    install(fake_cupy())
    model, layout = worker_parts[:2]
    stage = dict(layer_ids=list(range(len(model.layers))), stage=0, n_stages=1, prev_rank=None,
                 next_rank=None, micro_batches=micro_batches)
    host, stream = _worker(StageWorker, B.NumpyBackend(), worker_parts, **stage)
    gpu, _ = _worker(StageWorker, B.select_backend("cupy"), worker_parts, **stage)
    rows = stream.rows(0)
    for w in (host, gpu):
        acc, w._acc_views = w._accumulator(w.grad, 0)
        assert (acc is w.grad) is (w.backend.name == "numpy")  # NumPy sums in place: no copy
        acc[:] = 0
        loss, sends, caches, douts = w._forward(rows)
        sends += w._backward(caches, douts)
        assert sends == []
        w.backend.to_host(acc, out=w.grad)
        w.backend.synchronize()
        w.loss = loss
    assert type(acc) is DeviceArray  # summed on the device, copied out once
    assert gpu.loss == host.loss
    np.testing.assert_array_equal(gpu.grad, host.grad)
    sent = gpu._outgoing(_device(np.ones((10, 8), np.float32)), [np.zeros((10, 8), np.float32)], 0)
    assert type(sent) is np.ndarray and sent.sum() == 80
