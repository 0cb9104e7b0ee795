"""CuPy workers against NumPy workers on a real GPU: the same Sync steps, the same weights."""
import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
from psframe import backend as B

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1


def _why_no_gpu():
    """None when this rank computes on a GPU for real, else the reason it cannot."""
    try:
        B.select_backend("cupy").bind(0)
    except Exception as exc:  # noqa: B902 - any failure here means "skip", never "hang"
        return str(exc)
    return None


# Every rank must skip or none may: a rank left in ps.train alone would wait forever.
_REASON = _why_no_gpu()
if not WORLD.allreduce(_REASON is None, op=MPI.LAND):
    pytest.skip(f"no usable GPU: {_REASON or 'another rank has none'}", allow_module_level=True)

# float32 on a GPU sums in another order than BLAS on the CPU: after a few steps the weights
# agree to a few ulps of their size, far inside these bounds (float64 gets much tighter ones).
TOL = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-9, atol=1e-11)}


def blobs(n_rows=1200, n_features=64, n_classes=10, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_rows)
    X = rng.normal(size=(n_classes, n_features))[y] + 0.7 * rng.normal(size=(n_rows, n_features))
    return X, y


def both(model, data=None, dtype="float32", **kw):
    """The same run with NumPy workers, then CuPy workers: (numpy result, cupy result)."""
    data = blobs() if data is None else data
    init = model.init_params(np.random.default_rng(3))
    runs = [ps.train(model, data, backend=name, init=init, dtype=dtype, seed=4, steps=12,
                     batch_size=64, optimizer=ps.SGD(lr=0.05, momentum=0.9), **kw)
            for name in ("numpy", "cupy")]
    return runs if WORLD.Get_rank() == 0 else (None, None)


def assert_same_weights(host, gpu, dtype="float32"):
    if host is None:
        return
    assert set(host.params) == set(gpu.params)
    for k in host.params:
        assert gpu.params[k].dtype == np.dtype(dtype)
        np.testing.assert_allclose(gpu.params[k], host.params[k], err_msg=k, **TOL[dtype])
    assert [b["backend"] for b in host.stats["worker_backends"]] == ["numpy"] * N_WORKERS
    for b in gpu.stats["worker_backends"]:
        assert b["backend"] == "cupy" and b["transfer"] in ("host-staged", "cuda-aware")
    assert gpu.config["backend"] == "cupy"


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_data_parallel_sync_matches_numpy(dtype):
    host, gpu = both(ps.models.MLP([64, 256, 256, 10]), dtype=dtype)
    assert_same_weights(host, gpu, dtype)
    if gpu is not None:
        assert all(b["data_on_device"] for b in gpu.stats["worker_backends"])
        np.testing.assert_allclose([h["train_loss"] for h in gpu.history],
                                   [h["train_loss"] for h in host.history], rtol=1e-4)


def test_data_too_big_for_the_device_is_gathered_on_the_host(monkeypatch):
    monkeypatch.setattr(B.CupyBackend, "DATA_SHARE", 0.0)
    host, gpu = both(ps.models.MLP([64, 128, 10]))
    assert_same_weights(host, gpu)
    if gpu is not None:
        assert not any(b["data_on_device"] for b in gpu.stats["worker_backends"])


@pytest.mark.mpi(min_size=3)
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_pipeline_matches_numpy(micro_batches):
    sizes = [64, 128, 128, 96, 10]  # four Dense layers: up to four stages
    if N_WORKERS <= 4:
        mode = dict(mode="model")
    elif N_WORKERS % 2 == 0:
        mode = dict(mode="hybrid", stages=2)
    else:
        pytest.skip(f"{N_WORKERS} workers fit neither one pipeline nor 2-stage ones")
    host, gpu = both(ps.models.MLP(sizes), micro_batches=micro_batches, **mode)
    assert_same_weights(host, gpu)


def test_custom_model_written_with_ps_xp_runs_on_the_gpu():
    class Logistic(ps.Model):
        def init_params(self, rng):
            return {"w": rng.normal(0, 0.1, (64, 10)), "b": np.zeros(10)}

        def loss_and_grad(self, params, X, y):
            xp = ps.xp(X)
            z = X @ params["w"] + params["b"]
            p = xp.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            n = len(X)
            loss = -xp.log(p[xp.arange(n), y]).mean()  # a device scalar: the worker floats it
            p[xp.arange(n), y] -= 1.0
            return loss, {"w": X.T @ p / n, "b": p.sum(axis=0) / n}

    host, gpu = both(Logistic())
    assert_same_weights(host, gpu)


def test_each_worker_on_one_node_takes_its_own_device():
    node = WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = node.Get_size() == WORLD.Get_size()
    node.Free()
    if not one_node:
        pytest.skip("device numbering per node is checked on a single node")
    import cupy

    n_devices = cupy.cuda.runtime.getDeviceCount()
    _, gpu = both(ps.models.MLP([64, 32, 10]))
    if gpu is not None:
        devices = [b["device"] for b in gpu.stats["worker_backends"]]
        assert devices == [w % n_devices for w in range(N_WORKERS)]
