"""Embedding against torch's EmbeddingBag and Embedding, finite differences, compact tables, ids."""
import numpy as np
import pytest

import psframe as ps
from psframe.data import Features, features
from psframe.nn.layers import Embedding, scatter_rows

torch = pytest.importorskip("torch")

TOL = 1e-10


def bags(n_rows=7, k=4, batch=6, seed=0):
    """Ids with a duplicate inside a bag and ids repeated across bags."""
    ids = np.random.default_rng(seed).integers(0, n_rows, size=(batch, k))
    ids[0, 1] = ids[0, 0]
    ids[1] = ids[0]
    return ids


def torch_reference(W, ids, dy, combine):
    """(output, dW) of torch's module for the same table, ids and upstream gradient."""
    if combine is None:
        module = torch.nn.Embedding(*W.shape).double()
    else:
        module = torch.nn.EmbeddingBag(*W.shape, mode=combine).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(W))
    out = module(torch.from_numpy(ids))
    out = out.reshape(ids.shape[0], -1)
    (out * torch.from_numpy(dy)).sum().backward()
    return out.detach().numpy(), module.weight.grad.numpy()


@pytest.mark.parametrize("combine", ["mean", "sum", None])
def test_forward_and_backward_equal_torch(combine):
    layer = Embedding(7, 3, combine=combine)
    W = layer.init_params(np.random.default_rng(1))["W"]
    ids = bags()
    width = 3 if combine else 3 * ids.shape[1]
    dy = np.random.default_rng(2).normal(size=(ids.shape[0], width))
    y, cache = layer.forward({"W": W}, ids)
    grads, dx = layer.backward({"W": W}, cache, dy)
    ref_y, ref_dW = torch_reference(W, ids, dy, combine)
    np.testing.assert_allclose(y, ref_y, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(layer.infer({"W": W}, ids), ref_y, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grads["W"], ref_dW, rtol=TOL, atol=TOL)
    assert dx is None and grads["W"].shape == W.shape


@pytest.mark.parametrize("combine", ["mean", "sum", None])
def test_gradient_matches_finite_differences(combine):
    layer = Embedding(5, 2, combine=combine)
    W = layer.init_params(np.random.default_rng(3))["W"]
    ids = bags(n_rows=5, k=3, batch=4)
    dy = np.random.default_rng(4).normal(size=layer.forward({"W": W}, ids)[0].shape)
    grad = layer.backward({"W": W}, ids, dy)[0]["W"]
    eps = 1e-6
    numeric = np.zeros_like(W)
    for index in np.ndindex(*W.shape):
        up, down = W.copy(), W.copy()
        up[index] += eps
        down[index] -= eps
        f = [float((layer.forward({"W": w}, ids)[0] * dy).sum()) for w in (up, down)]
        numeric[index] = (f[0] - f[1]) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("combine", ["mean", "sum", None])
def test_compact_table_gives_the_full_gradient_rows(combine):
    """A worker's compact table (the batch's unique rows, ids remapped) gives the full
    table's output and the gradient rows of the ids it holds; the layer never checks ids
    against num_embeddings per step."""
    layer = Embedding(50, 4, combine=combine)
    W = layer.init_params(np.random.default_rng(5))["W"]
    ids = np.random.default_rng(6).integers(0, 50, size=(8, 3))
    unique, remapped = np.unique(ids, return_inverse=True)
    remapped = remapped.reshape(ids.shape)
    compact = W[unique]
    dy = np.random.default_rng(7).normal(size=layer.forward({"W": W}, ids)[0].shape)
    y_full, _ = layer.forward({"W": W}, ids)
    y_compact, cache = layer.forward({"W": compact}, remapped)
    np.testing.assert_array_equal(y_compact, y_full)
    full = layer.backward({"W": W}, ids, dy)[0]["W"]
    part = layer.backward({"W": compact}, cache, dy)[0]["W"]
    assert part.shape == compact.shape
    np.testing.assert_allclose(part, full[unique], rtol=TOL, atol=TOL)
    untouched = np.setdiff1d(np.arange(50), unique)
    assert not full[untouched].any()


def test_scatter_rows_sums_duplicates_as_np_add_at():
    rng = np.random.default_rng(8)
    ids = rng.integers(0, 30, size=500)
    values = rng.normal(size=(500, 5))
    expected = np.zeros((30, 5))
    np.add.at(expected, ids, values)
    np.testing.assert_allclose(scatter_rows(values, ids, 30), expected, rtol=TOL, atol=TOL)
    assert not scatter_rows(values[:0], ids[:0], 30).any()


def test_sequential_with_an_embedding_equals_torch():
    model = ps.Sequential([Embedding(9, 4, combine="sum"), ps.layers.ReLU(),
                           ps.layers.Dense(4, 3)], ps.losses.SoftmaxCrossEntropy())
    params = model.init_params(np.random.default_rng(9))
    ids = bags(n_rows=9, k=3, batch=10)
    y = np.random.default_rng(10).integers(0, 3, 10)
    loss, grads = model.loss_and_grad(params, ids, y)
    bag = torch.nn.EmbeddingBag(9, 4, mode="sum").double()
    dense = torch.nn.Linear(4, 3).double()
    with torch.no_grad():
        bag.weight.copy_(torch.from_numpy(params["0.W"]))
        dense.weight.copy_(torch.from_numpy(params["2.W"].T))
        dense.bias.copy_(torch.from_numpy(params["2.b"]))
    ref = torch.nn.functional.cross_entropy(dense(torch.relu(bag(torch.from_numpy(ids)))),
                                            torch.from_numpy(y))
    ref.backward()
    assert abs(loss - ref.item()) < TOL
    np.testing.assert_allclose(grads["0.W"], bag.weight.grad.numpy(), rtol=TOL, atol=TOL)
    np.testing.assert_allclose(grads["2.W"], dense.weight.grad.numpy().T, rtol=TOL, atol=TOL)


def embedding_model(**kw):
    return ps.Sequential([Embedding(6, 2, **kw), ps.layers.Dense(2, 3)],
                         ps.losses.SoftmaxCrossEntropy())


@pytest.mark.parametrize("ids, message", [
    (np.array([[0, -1], [2, 3]]), "found id -1"),
    (np.array([[0, 6], [2, 3]]), "found id 6"),
    (np.array([[0.0, 1.0], [2.0, 3.0]]), "got dtype float64"),
    (np.array([0, 1]), r"got shape \(2,\)"),
    (np.zeros((2, 0), dtype=np.int64), "empty bag"),
])
def test_bad_ids_are_refused_by_validate_data(ids, message):
    with pytest.raises(ValueError, match=message):
        embedding_model().validate_data(ids, np.zeros(len(ids), dtype=np.int64))


def test_good_ids_pass_and_labels_are_still_checked():
    model = embedding_model()
    model.validate_data(np.array([[0, 5], [2, 3]]), np.array([0, 2]))
    with pytest.raises(ValueError, match="labels must be integers in"):
        model.validate_data(np.array([[0, 5], [2, 3]]), np.array([0, 3]))


def test_an_empty_bag_is_refused_in_forward_too():
    layer = Embedding(4, 2)
    with pytest.raises(ValueError, match="k >= 1"):
        layer.forward(layer.init_params(np.random.default_rng(0)), np.zeros((3, 0), np.int64))


def test_an_embedding_must_come_first_and_arguments_are_checked():
    with pytest.raises(ValueError, match="only be a Sequential's first layer"):
        ps.Sequential([ps.layers.Dense(2, 2), Embedding(4, 2)], ps.losses.MSE())
    for kwargs, message in [({"combine": "max"}, "unknown combine"),
                            ({"init": "zeros"}, "unknown init"),
                            ({"sparse": 1}, "sparse must be True or False")]:
        with pytest.raises(ValueError, match=message):
            Embedding(4, 2, **kwargs)
    with pytest.raises(ValueError, match="num_embeddings must be a positive integer"):
        Embedding(0, 2)


def test_init_is_normal_with_variance_one_over_dim_or_torchs_unit():
    W = Embedding(4000, 16).init_params(np.random.default_rng(0))["W"]
    assert abs(W.std() - 0.25) < 0.005 and abs(W.mean()) < 0.005
    W = Embedding(4000, 16, init="torch").init_params(np.random.default_rng(0))["W"]
    assert abs(W.std() - 1.0) < 0.02


def test_embedding_inputs_and_id_inputs():
    assert embedding_model().embedding_inputs() == {"0.W": None}
    assert embedding_model().id_inputs() == {None}
    assert embedding_model(sparse=False).embedding_inputs() == {}
    assert embedding_model(sparse=False).id_inputs() == {None}
    assert ps.models.MLP([3, 2]).embedding_inputs() == {}
    assert ps.models.MLP([3, 2]).id_inputs() == set()
    assert ps.Model().embedding_inputs() == {}


def test_combine_none_widths_follow_k():
    model = ps.Sequential([Embedding(6, 2, combine=None), ps.layers.Dense(6, 2)],
                          ps.losses.SoftmaxCrossEntropy())
    model.validate_data(np.array([[0, 1, 2]]), np.array([1]))
    with pytest.raises(ValueError, match="expects 6 inputs but receives 4"):
        model.validate_data(np.array([[0, 1]]), np.array([1]))


def test_features_keeps_ids_as_int64_and_casts_the_rest():
    ids = np.array([[1, 2]], dtype=np.int32)
    assert features(ids, np.float32).dtype == np.int64  # ids=None: integers are ids
    assert features(ids, np.float32, ids=set()).dtype == np.float32  # an MLP's int features
    assert features(ids, np.float32, ids={None}).dtype == np.int64
    out = features({"dense": np.ones((1, 3)), "c0": ids}, np.float32, ids={"c0"})
    assert isinstance(out, Features)
    assert out["dense"].dtype == np.float32 and out["c0"].dtype == np.int64
    assert all(a.flags.c_contiguous for a in out.values())
