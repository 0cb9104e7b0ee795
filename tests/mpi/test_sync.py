"""Sync data parallel against serial SGD/Adam computed independently, at every world size."""
import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
from psframe.transport.shm import node_ids
from serial_reference import (SerialAdam, SerialSGD, mlp_init, mlp_loss_and_grad,
                              serial_sync, worker_rows)

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1
SIZES = [6, 9, 7, 3]


def blobs(n_rows=103, n_features=6, n_classes=3, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n_rows)
    X = rng.normal(size=(n_classes, n_features))[y] + 0.7 * rng.normal(size=(n_rows, n_features))
    return X, y


class LogisticModel(ps.Model):
    """A custom model with its own parameter names, written against the ps.Model contract."""

    def __init__(self, n_in, n_classes):
        self.n_in, self.n_classes = n_in, n_classes

    def init_params(self, rng):
        return {"weights": rng.normal(0, 0.1, (self.n_in, self.n_classes)), "bias": np.zeros(self.n_classes)}

    def loss_and_grad(self, params, X, y):
        xp = ps.xp(X)
        z = X @ params["weights"] + params["bias"]
        z = z - z.max(axis=1, keepdims=True)
        p = xp.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        n = len(X)
        loss = float(-xp.log(p[xp.arange(n), y]).mean())
        p[xp.arange(n), y] -= 1.0
        p /= n
        return loss, {"weights": X.T @ p, "bias": p.sum(axis=0)}

    def predict(self, params, X):
        return (X @ params["weights"] + params["bias"]).argmax(axis=1)


def assert_params_close(result, expected, tol=1e-10):
    if WORLD.Get_rank() != 0:
        assert result is None
        return
    assert set(result.params) == set(expected)
    for k in expected:
        assert result.params[k].dtype == np.float64
        np.testing.assert_allclose(result.params[k], expected[k], rtol=tol, atol=tol, err_msg=k)


# Both payload paths: shared memory (the default on one node) and messages (across nodes).
TRANSPORTS = ["auto", "mpi"]


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("shuffle", [False, True])
def test_mlp_sync_equals_serial(opt_name, shuffle, transport):
    X, y = blobs()
    init = mlp_init(SIZES, np.random.default_rng(3))
    steps, batch = 11, 5
    make = {"sgd_momentum": (lambda: ps.SGD(lr=0.2, momentum=0.9), lambda: SerialSGD(0.2, 0.9)),
            "adam": (lambda: ps.Adam(lr=0.01), lambda: SerialAdam(0.01))}[opt_name]
    result = ps.train(ps.models.MLP(SIZES), (X, y), optimizer=make[0](), batch_size=batch,
                      steps=steps, shuffle=shuffle, seed=4, dtype="float64", init=init,
                      transport=transport)
    n_layers = len(SIZES) - 1
    expected = serial_sync(lambda p, Xb, yb: mlp_loss_and_grad(p, Xb, yb, n_layers), init, X, y,
                           N_WORKERS, batch, steps, make[1](), shuffle=shuffle, seed=4)
    assert_params_close(result, expected)


@pytest.mark.parametrize("stream", ["always", "never", "default"])
def test_pushes_by_message_applied_as_they_land_equal_serial(stream, monkeypatch):
    # By message, a push may be applied frame by frame as it lands (its worker checked it
    # whole first), here in frames of a few elements each: by default only a remote
    # worker's ($PSFRAME_STREAM=remote), "always" on one node too, "never" not at all.
    if stream == "default":  # whatever the shell that started the suite set
        monkeypatch.delenv("PSFRAME_STREAM", raising=False)
    else:
        monkeypatch.setenv("PSFRAME_STREAM", stream)
    nodes = node_ids(WORLD)
    X, y = blobs()
    init = mlp_init(SIZES, np.random.default_rng(5))
    result = ps.train(ps.models.MLP(SIZES), (X, y), optimizer=ps.SGD(lr=0.3, momentum=0.9),
                      batch_size=4, steps=7, shuffle=False, dtype="float64", init=init,
                      transport="mpi", shard_elems=8)
    n_layers = len(SIZES) - 1
    expected = serial_sync(lambda p, Xb, yb: mlp_loss_and_grad(p, Xb, yb, n_layers), init, X, y,
                           N_WORKERS, 4, 7, SerialSGD(0.3, 0.9))
    assert_params_close(result, expected)
    if WORLD.Get_rank() == 0:
        remote = sum(nodes[r] != nodes[0] for r in range(1, WORLD.Get_size()))
        streaming = {"always": N_WORKERS, "never": 0, "default": remote}[stream]
        assert result.stats["pushes_received"] == 7 * N_WORKERS
        assert result.stats["pushes_streamed"] == 7 * streaming


def test_bad_stream_setting_is_refused_on_every_rank(monkeypatch):
    monkeypatch.setenv("PSFRAME_STREAM", "sometimes")
    with pytest.raises(ps.ConfigError, match="PSFRAME_STREAM must be one of remote, always"):
        ps.train(LogisticModel(6, 3), blobs(), steps=1)
    WORLD.Barrier()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_custom_model_sync_equals_serial(transport):
    X, y = blobs(n_rows=57)
    model = LogisticModel(6, 3)
    init = model.init_params(np.random.default_rng(0))
    result = ps.train(model, ps.data.ArrayDataset(X, y), optimizer=ps.SGD(lr=0.5, momentum=0.5),
                      batch_size=4, steps=9, shuffle=False, dtype="float64", init=init,
                      transport=transport)
    expected = serial_sync(model.loss_and_grad, init, X, y, N_WORKERS, 4, 9, SerialSGD(0.5, 0.5))
    assert_params_close(result, expected)


def test_stats_bytes_history_and_float32():
    X, y = blobs()
    model = ps.models.MLP(SIZES)
    steps = 7
    result = ps.train(model, (X, y), eval_data=(X, y), batch_size=8, steps=steps, eval_every=3)
    if WORLD.Get_rank():
        assert result is None
        return
    n_params = sum(a * b + b for a, b in zip(SIZES[:-1], SIZES[1:]))
    assert all(v.dtype == np.float32 for v in result.params.values())
    s = result.stats
    assert s["updates_applied"] == steps
    assert s["updates_dropped"] == s["updates_rejected"] == s["max_staleness"] == 0
    assert s["staleness_hist"] == {0: steps}
    assert s["bytes_pulled"] == s["bytes_pushed"] == steps * N_WORKERS * n_params * 4
    assert s["samples"] == steps * N_WORKERS * 8
    assert s["steps_per_worker"] == [steps] * N_WORKERS
    assert s["samples_per_s"] > 0 and s["wall_s"] > 0
    assert [h["step"] for h in result.history] == [3, 6, 7]
    for h in result.history:
        assert set(h) >= {"step", "epoch", "time_s", "train_loss", "eval_loss", "eval_accuracy"}
        assert 0.0 <= h["eval_accuracy"] <= 1.0 and np.isfinite(h["train_loss"])
    assert "test accuracy" in result.summary()


def test_digits_reaches_95_percent():
    train, test = ps.data.digits(seed=0)
    result = ps.train(ps.models.MLP([64, 64, 10]), train, eval_data=test,
                      optimizer=ps.SGD(lr=0.1, momentum=0.9), batch_size=16, epochs=12, seed=0)
    if WORLD.Get_rank() == 0:
        assert result.history[-1]["eval_accuracy"] >= 0.95, result.history[-1]


def test_init_weights_are_the_start_point():
    X, y = blobs()
    init = mlp_init(SIZES, np.random.default_rng(9))
    # A zero learning rate would be refused, so take one tiny step and compare with serial.
    result = ps.train(ps.models.MLP(SIZES), (X, y), optimizer=ps.SGD(lr=1e-3), batch_size=3,
                      steps=1, shuffle=False, dtype="float64", init=init)
    expected = serial_sync(lambda p, a, b: mlp_loss_and_grad(p, a, b, 3), init, X, y, N_WORKERS, 3,
                           1, SerialSGD(1e-3))
    assert_params_close(result, expected)


class NaNOnce(LogisticModel):
    """Worker 0 returns a NaN gradient at its step 2; everything else is the logistic model."""

    def __init__(self, *a):
        super().__init__(*a)
        self.calls = 0

    def loss_and_grad(self, params, X, y):
        loss, grads = super().loss_and_grad(params, X, y)
        if WORLD.Get_rank() == 1 and len(X) == 4:  # len 4: training batches, not the probe
            self.calls += 1
            if self.calls == 3:
                grads["weights"] = grads["weights"] * np.nan
        return loss, grads


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_skip_bad_gradient_leaves_weights_clean(transport):
    X, y = blobs(n_rows=40)
    model = NaNOnce(6, 3)
    init = LogisticModel(6, 3).init_params(np.random.default_rng(0))
    result = ps.train(model, (X, y), optimizer=ps.SGD(lr=0.5), batch_size=4, steps=5,
                      shuffle=False, dtype="float64", init=init, on_bad_gradient="skip",
                      transport=transport)
    expected = serial_sync(LogisticModel(6, 3).loss_and_grad, init, X, y, N_WORKERS, 4, 5,
                           SerialSGD(0.5), skip={(0, 2)})
    assert_params_close(result, expected)
    if WORLD.Get_rank() == 0:
        assert result.stats["updates_rejected"] == 1
        assert result.stats["updates_applied"] == (5 if N_WORKERS > 1 else 4)


def test_worker_rows_contract_matches_array_split():
    # Guards the reference itself: the rows the test assumes are the documented ones.
    rows = worker_rows(10, 3, 4, 1)
    blocks = np.array_split(np.arange(10), 3)
    for w in range(3):
        np.testing.assert_array_equal(rows[w], blocks[w][(4 + np.arange(4)) % len(blocks[w])])
