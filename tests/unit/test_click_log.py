"""ps.data.click_log, and data with several inputs through datasets, shards and batches."""
import types

import numpy as np
import pytest

import psframe as ps
from psframe.data import ArrayDataset, Features, block_range, features, zipf_ids
from psframe.worker.worker import Worker


def test_same_seed_same_log_other_seed_other_log():
    a_train, a_test = ps.data.click_log(600, seed=3)
    b_train, b_test = ps.data.click_log(600, seed=3)
    c_train, _ = ps.data.click_log(600, seed=4)
    for a, b in ((a_train, b_train), (a_test, b_test)):
        assert list(a.X.keys()) == list(b.X.keys())
        for name in a.X.keys():
            np.testing.assert_array_equal(a.X[name], b.X[name])
        np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a_train.X["c0"], c_train.X["c0"])


def test_shapes_dtypes_vocab_and_click_rate():
    train, test = ps.data.click_log(1000, fields=(50, 8), ids_per_field=3, dense_features=5)
    assert (len(train), len(test)) == (800, 200)
    assert list(train.X.keys()) == ["dense", "c0", "c1"]
    assert train.X["dense"].shape == (800, 5) and train.X["dense"].dtype == np.float64
    assert train.X["c0"].shape == (800, 3) and train.X["c0"].dtype == np.int64
    assert train.vocab == test.vocab == {"c0": 50, "c1": 8}
    assert train.X["c0"].max() < 50 and train.X["c1"].max() < 8 and train.X["c0"].min() >= 0
    assert set(np.unique(train.y)) == {0, 1}
    assert 0.2 < np.concatenate([train.y, test.y]).mean() < 0.45
    assert train.n_features == {"dense": 5, "c0": 3, "c1": 3}


def test_ids_follow_zipf():
    """Frequency by rank falls as rank**-s: the fitted log-log slope over the head is -s."""
    for s in (0.8, 1.1, 1.5):
        ids = zipf_ids(np.random.default_rng(0), 1000, s, 200000)
        counts = np.sort(np.bincount(ids, minlength=1000))[::-1]
        ranks = np.arange(1, 51)
        slope = np.polyfit(np.log(ranks), np.log(counts[:50]), 1)[0]
        assert abs(slope + s) < 0.1, (s, slope)
    # The popular ids are scattered over the table, not its first rows.
    ids = zipf_ids(np.random.default_rng(1), 1000, 1.1, 10000)
    top = np.argsort(np.bincount(ids, minlength=1000))[::-1][:10]
    assert top.max() > 100


@pytest.mark.parametrize("kwargs, message", [
    ({"n_samples": 1}, "n_samples must be an integer >= 2"),
    ({"fields": ()}, "non-empty sequence"),
    ({"fields": (10, 0)}, "id count must be an integer >= 1"),
    ({"ids_per_field": 0}, "ids_per_field must be an integer >= 1"),
    ({"zipf": -1.0}, "zipf must be a number >= 0"),
])
def test_bad_arguments_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ps.data.click_log(**kwargs)


def test_a_dlrm_learns_the_click_log_better_than_chance():
    """Plain SGD in-process: accuracy clearly above the majority class, AUC well above 0.5."""
    train, test = ps.data.click_log(6000, seed=0)
    model = ps.models.DLRM(8, train.vocab, dim=8, bottom=(16,), top=(16,))
    params = model.init_params(np.random.default_rng(0))
    X = features(train.X, np.float64, model.id_inputs())
    X_test = features(test.X, np.float64, model.id_inputs())
    before = model.evaluate(params, X_test, test.y)
    rng = np.random.default_rng(1)
    for _ in range(400):
        rows = rng.integers(0, len(train), 64)
        _, grads = model.loss_and_grad(params, X[rows], train.y[rows])
        for name in params:
            params[name] -= 0.5 * grads[name]
    after = model.evaluate(params, X_test, test.y)
    majority = max(test.y.mean(), 1 - test.y.mean())
    assert after["auc"] > 0.75 and after["auc"] > before["auc"] + 0.15
    assert after["accuracy"] > majority + 0.05
    assert after["loss"] < before["loss"]


def several(n=10):
    rng = np.random.default_rng(0)
    return {"dense": rng.normal(size=(n, 2)), "c0": rng.integers(0, 5, size=(n, 3))}, \
        np.arange(n) % 2


def test_a_dataset_of_several_inputs_splits_and_checks_by_rows():
    X, y = several()
    data = ArrayDataset(X, y)
    assert isinstance(data.X, Features) and len(data) == 10
    part = data.subset(np.array([7, 2]))
    np.testing.assert_array_equal(part.X["c0"], X["c0"][[7, 2]])
    np.testing.assert_array_equal(part.y, y[[7, 2]])
    assert data.X[3:5].shape == (2,)
    X["dense"][4, 1] = np.inf
    with pytest.raises(ValueError, match="data dense has 1 non-finite values"):
        ArrayDataset(X, y).check_finite()
    with pytest.raises(ValueError, match="same number of rows"):
        ArrayDataset({"dense": np.ones((3, 2)), "c0": np.ones((4, 1), int)}, np.zeros(3))
    with pytest.raises(ValueError, match=r"c0 must be 2-D"):
        ArrayDataset({"dense": np.ones((3, 2)), "c0": np.ones(3, int)}, np.zeros(3))


def test_chunked_check_names_the_rows_of_a_bad_id():
    train, _ = ps.data.click_log(400, fields=(30, 6))
    model = ps.models.DLRM(8, {"c0": 30, "c1": 5})  # c1 has ids up to 5: one too many
    with pytest.raises(ValueError, match="input 'c1' .* found id 5"):
        train.check(model)


def test_worker_blocks_and_batches_gather_every_input():
    """Block sharding (a slice of every input, as roles.build_worker takes it) and the
    worker's gather of a batch's rows into its preallocated buffers."""
    X, y = several(11)
    data = ArrayDataset(X, y)
    lo, hi = block_range(len(data), 3, 1)
    block = features(data.X[slice(lo, hi)], np.float32, {"c0"})
    assert block["dense"].dtype == np.float32 and block["c0"].dtype == np.int64
    np.testing.assert_array_equal(block["c0"], X["c0"][lo:hi])
    stub = types.SimpleNamespace(_device=False, _batches={}, X=block, y=y[lo:hi])
    rows = np.array([3, 0, 3])
    xb, yb = Worker._gather(stub, rows)
    np.testing.assert_array_equal(xb["c0"], X["c0"][lo:hi][rows])
    np.testing.assert_array_equal(xb["dense"], X["dense"][lo:hi][rows].astype(np.float32))
    np.testing.assert_array_equal(yb, y[lo:hi][rows])
    again, _ = Worker._gather(stub, np.array([1, 2, 0]))
    assert again["c0"] is xb["c0"]  # the same buffers, refilled
    np.testing.assert_array_equal(again["c0"], X["c0"][lo:hi][[1, 2, 0]])


def test_the_cli_builds_a_click_log_and_a_dlrm_sized_for_it():
    from psframe.cli import app

    train, test = app.parse_data("clicklog:500", seed=2)
    assert (len(train), len(test)) == (400, 100)
    model = app.parse_model("dlrm:8", train.n_features, 2, data=train)
    assert isinstance(model, ps.models.DLRM) and model.dim == 8
    assert model.fields == train.vocab and model.dense_in == 8
    model.validate_data(test.X, test.y)
    vocab_free = ArrayDataset(train.X, train.y)  # no vocab: the largest id + 1
    assert app.parse_model("dlrm", data=vocab_free).fields == {
        name: int(train.X[name].max()) + 1 for name in train.vocab}
    with pytest.raises(ValueError, match="--model dlrm needs data of several inputs"):
        app.parse_model("dlrm", 8, 2, data=ArrayDataset(np.ones((4, 8)), np.zeros(4)))
