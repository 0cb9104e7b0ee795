"""Embedding tables as dense parameters over MPI: Sync equals serial SGD; DLRM trains."""
import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
from serial_reference import SerialSGD, assert_params_match, serial_sync

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1
ROWS, DIM, K, CLASSES = 30, 4, 3, 3


def ids_data(n=77, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, ROWS, size=(n, K))
    X[:, 1] = np.where(rng.random(n) < 0.3, X[:, 0], X[:, 1])  # duplicates within bags
    return X, X.sum(axis=1) % CLASSES


def bag_loss_and_grad(params, X, y, combine):
    """Embedding bag, ReLU, Dense and softmax cross-entropy restated with np.add.at."""
    rows = params["0.W"][X]
    h = rows.mean(axis=1) if combine == "mean" else rows.sum(axis=1)
    a = np.maximum(h, 0)
    z = a @ params["2.W"] + params["2.b"]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n = len(X)
    loss = -np.log(p[np.arange(n), y]).mean()
    p[np.arange(n), y] -= 1
    p /= n
    dh = (p @ params["2.W"].T) * (h > 0)
    dW = np.zeros_like(params["0.W"])
    share = dh / K if combine == "mean" else dh
    for j in range(K):
        np.add.at(dW, X[:, j], share)
    return loss, {"0.W": dW, "2.W": a.T @ p, "2.b": p.sum(axis=0)}


@pytest.mark.parametrize("combine, shuffle, overlap", [
    ("mean", False, False), ("sum", False, False), ("mean", True, False), ("sum", True, True)])
def test_sync_with_a_dense_embedding_equals_serial_sgd(combine, shuffle, overlap):
    X, y = ids_data()
    model = ps.Sequential([ps.layers.Embedding(ROWS, DIM, combine, sparse=False),
                           ps.layers.ReLU(), ps.layers.Dense(DIM, CLASSES)],
                          ps.losses.SoftmaxCrossEntropy())
    init = model.init_params(np.random.default_rng(2))
    steps, batch = 9, 4
    result = ps.train(model, (X, y), optimizer=ps.SGD(lr=0.3), batch_size=batch, steps=steps,
                      shuffle=shuffle, seed=5, dtype="float64", init=init, overlap=overlap)
    if WORLD.Get_rank() != 0:
        assert result is None
        return
    expected = serial_sync(lambda p, a, b: bag_loss_and_grad(p, a, b, combine), init, X, y,
                           N_WORKERS, batch, steps, SerialSGD(0.3), shuffle=shuffle, seed=5)
    assert_params_match(result.params, expected)


def test_sync_with_a_dense_dlrm_equals_serial_sgd():
    """Several inputs sharded and batched per worker: the same steps as serially (the model's
    own gradient, which tests/unit/test_dlrm.py checks against torch)."""
    train, _ = ps.data.click_log(90, fields=(20, 6), ids_per_field=2, dense_features=3, seed=1)
    model = ps.models.DLRM(3, train.vocab, dim=4, bottom=(5,), top=(6,), sparse=False)
    init = model.init_params(np.random.default_rng(3))
    steps, batch = 7, 5
    result = ps.train(model, train, optimizer=ps.SGD(lr=0.2, momentum=0.9), batch_size=batch,
                      steps=steps, shuffle=True, seed=2, dtype="float64", init=init)
    if WORLD.Get_rank() != 0:
        return
    expected = serial_sync(model.loss_and_grad, init, train.X, train.y, N_WORKERS, batch, steps,
                           SerialSGD(0.2, 0.9), shuffle=True, seed=2)
    assert_params_match(result.params, expected)


def test_a_dlrm_trains_on_the_click_log_through_ps_train():
    train, test = ps.data.click_log(6000, seed=0)
    model = ps.models.DLRM(8, train.vocab, dim=8, bottom=(16,), top=(16,), sparse=False)
    result = ps.train(model, train, eval_data=test, optimizer=ps.SGD(lr=0.5), batch_size=32,
                      epochs=3, seed=0)
    if WORLD.Get_rank() != 0:
        return
    majority = max(test.y.mean(), 1 - test.y.mean())
    assert result.history[-1]["eval_accuracy"] > majority + 0.03
    assert result.history[-1]["eval_loss"] < result.history[0]["eval_loss"]
    assert result.params["emb.c0.W"].dtype == np.float32
    X = ps.data.features(test.X, np.float32, model.id_inputs())
    assert model.evaluate(result.params, X, test.y)["auc"] > 0.7


@pytest.mark.parametrize("change, match", [
    (lambda X: X["c1"].__setitem__((3, 0), 99), "input 'c1' .* found id 99"),
    (lambda X: X["c0"].__setitem__((0, 1), -1), "input 'c0' .* found id -1"),
])
def test_bad_ids_fail_on_every_rank_before_training(change, match):
    train, _ = ps.data.click_log(60, fields=(10, 5), seed=0)
    X = {k: v.copy() for k, v in train.X.items()}
    change(X)
    with pytest.raises(ps.ConfigError, match=match):
        ps.train(ps.models.DLRM(8, train.vocab), (X, train.y), steps=2)
    WORLD.Barrier()  # every rank raised: none is stuck in training


def test_ids_need_mode_data():
    X, y = ids_data()
    model = ps.Sequential([ps.layers.Embedding(ROWS, DIM, sparse=False),
                           ps.layers.Dense(DIM, CLASSES)], ps.losses.SoftmaxCrossEntropy())
    with pytest.raises(ps.ConfigError, match="integer ids .* needs mode='data'"):
        ps.train(model, (X, y), steps=2, mode="model")
    WORLD.Barrier()
