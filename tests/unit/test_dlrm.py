"""DLRM against the same network written in torch, finite differences, compact tables, inputs."""
import numpy as np
import pytest

import psframe as ps
from psframe.data import Features
from psframe.nn.losses import BinaryCrossEntropy, roc_auc

torch = pytest.importorskip("torch")

TOL = 1e-10
FIELDS = {"user": 11, "item": 7, "site": 5}


def inputs(n=9, dense_in=4, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = {"dense": rng.normal(size=(n, dense_in))}
    for name, rows in FIELDS.items():
        X[name] = rng.integers(0, rows, size=(n, k))
    X["user"][1] = X["user"][0]  # a repeated bag, and a duplicate id within one
    X["user"][0, 1] = X["user"][0, 0]
    return X, rng.integers(0, 2, n)


def model(**kw):
    return ps.models.DLRM(4, FIELDS, dim=3, bottom=(5,), top=(6, 4), **kw)


def torch_loss(m, params, X, y):
    """The loss of DLRM ``m`` restated in torch (its own layers, not psframe's), and the torch
    leaf tensor of every parameter."""
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}

    def mlp(prefix, h, n_dense, relu_last):
        for i in range(n_dense):
            h = h @ leaves[f"{prefix}.{2 * i}.W"] + leaves[f"{prefix}.{2 * i}.b"]
            if relu_last or i < n_dense - 1:
                h = torch.relu(h)
        return h

    b = mlp("bottom", torch.from_numpy(X["dense"]), 2, True)
    vectors = [b] + [torch.nn.functional.embedding_bag(torch.from_numpy(X[f]),
                                                       leaves[f"emb.{f}.W"], mode=m.combine)
                     for f in FIELDS]
    if m.interaction == "dot":
        T = torch.stack(vectors, dim=1)
        Z = T @ T.transpose(1, 2)
        i, j = torch.tril_indices(len(vectors), len(vectors), offset=-1)
        z = torch.cat([b, Z[:, i, j]], dim=1)
    else:
        z = torch.cat(vectors, dim=1)
    logit = mlp("top", z, 3, False)[:, 0]
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        logit, torch.from_numpy(y).double())
    return loss, leaves


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_loss_and_grad_equal_torch(interaction, combine):
    m = model(interaction=interaction, combine=combine)
    params = m.init_params(np.random.default_rng(1))
    X, y = inputs()
    loss, grads = m.loss_and_grad(params, Features(X), y)
    ref, leaves = torch_loss(m, params, X, y)
    ref.backward()
    assert set(grads) == set(params) == set(m.param_shapes())
    assert abs(loss - ref.item()) < TOL
    for name, leaf in leaves.items():
        assert grads[name].shape == params[name].shape
        np.testing.assert_allclose(grads[name], leaf.grad.numpy(), rtol=TOL, atol=TOL,
                                   err_msg=name)


def test_plain_dict_input_works_as_features():
    m = model()
    params = m.init_params(np.random.default_rng(2))
    X, y = inputs()
    assert m.loss_and_grad(params, X, y)[0] == m.loss_and_grad(params, Features(X), y)[0]


@pytest.mark.parametrize("interaction", ["dot", "cat"])
def test_gradient_matches_finite_differences(interaction):
    m = model(interaction=interaction)
    params = m.init_params(np.random.default_rng(3))
    X, y = inputs(n=6, seed=4)
    _, grads = m.loss_and_grad(params, X, y)
    eps = 1e-6
    rng = np.random.default_rng(5)
    for name in params:
        for _ in range(3):  # a few entries of every parameter
            index = tuple(rng.integers(0, s) for s in params[name].shape)
            up = {k: v.copy() for k, v in params.items()}
            down = {k: v.copy() for k, v in params.items()}
            up[name][index] += eps
            down[name][index] -= eps
            numeric = (m.loss_and_grad(up, X, y)[0] - m.loss_and_grad(down, X, y)[0]) / (2 * eps)
            assert abs(grads[name][index] - numeric) < 1e-7, (name, index)


def test_compact_tables_give_the_full_gradient_rows():
    """Every table as a worker holds it under the row-sparse protocol: the batch's unique
    rows, the ids remapped into them."""
    m = model()
    params = m.init_params(np.random.default_rng(6))
    X, y = inputs()
    full_loss, full = m.loss_and_grad(params, X, y)
    compact_params, compact_X, kept = dict(params), dict(X), {}
    for field in FIELDS:
        unique, remapped = np.unique(X[field], return_inverse=True)
        compact_X[field] = remapped.reshape(X[field].shape)
        compact_params[f"emb.{field}.W"] = params[f"emb.{field}.W"][unique]
        kept[field] = unique
    loss, grads = m.loss_and_grad(compact_params, compact_X, y)
    assert loss == full_loss
    for name in params:
        if name.startswith("emb."):
            rows = kept[name.split(".")[1]]
            assert grads[name].shape == (len(rows), 3)
            np.testing.assert_allclose(grads[name], full[name][rows], rtol=TOL, atol=TOL)
        else:
            np.testing.assert_allclose(grads[name], full[name], rtol=TOL, atol=TOL)


def test_embedding_inputs_id_inputs_and_names():
    m = model()
    assert m.embedding_inputs() == {"emb.user.W": "user", "emb.item.W": "item",
                                    "emb.site.W": "site"}
    assert m.id_inputs() == set(FIELDS)
    assert model(sparse=False).embedding_inputs() == {}
    assert model(sparse=False).id_inputs() == set(FIELDS)
    shapes = m.param_shapes()
    assert shapes["bottom.0.W"] == (4, 5) and shapes["bottom.2.W"] == (5, 3)
    assert shapes["emb.user.W"] == (11, 3)
    assert shapes["top.0.W"] == (3 + 6, 6)  # dot: the bottom vector and 4*3/2 pairs
    assert model(interaction="cat").param_shapes()["top.0.W"] == (4 * 3, 6)
    assert ps.models.DLRM(2, [5, 6]).fields == {"c0": 5, "c1": 6}
    assert m.classification


@pytest.mark.parametrize("change, message", [
    (lambda X: X.pop("site"), r"lacks \['site'\]"),
    (lambda X: X.update(extra=X["dense"]), r"unread \['extra'\]"),
    (lambda X: X.update(dense=X["dense"][:, :3]), r"input 'dense' must be \(rows, 4\)"),
    (lambda X: X["item"].__setitem__((2, 0), 7), "input 'item' .* found id 7"),
    (lambda X: X["item"].__setitem__((2, 0), -3), "input 'item' .* found id -3"),
    (lambda X: X.update(site=X["site"].astype(float)), "input 'site' .* got dtype float64"),
    (lambda X: X["dense"].__setitem__((0, 0), np.nan), "non-finite"),
])
def test_bad_inputs_are_refused_with_one_clear_error(change, message):
    X, y = inputs()
    change(X)
    with pytest.raises(ValueError, match=message):
        model().validate_data(X, y)


def test_bad_labels_and_plain_arrays_are_refused():
    X, y = inputs()
    model().validate_data(X, y)
    with pytest.raises(ValueError, match="labels must be 0 or 1; found label 2"):
        model().validate_data(X, y + 1)
    with pytest.raises(ValueError, match="takes several inputs"):
        model().validate_data(X["dense"], y)
    with pytest.raises(ValueError, match="takes one input array"):
        ps.models.MLP([4, 2]).validate_data(X, y)


def test_binary_cross_entropy_equals_torch_and_predicts_the_class():
    z = np.array([[-30.0], [-1.0], [0.0], [2.0], [40.0]])
    y = np.array([0, 1, 1, 0, 1])
    loss_fn = BinaryCrossEntropy()
    loss, cache = loss_fn.forward(z, y)
    t = torch.tensor(z, requires_grad=True)
    ref = torch.nn.functional.binary_cross_entropy_with_logits(t[:, 0], torch.tensor(y).double())
    ref.backward()
    assert abs(loss - ref.item()) < TOL
    np.testing.assert_allclose(loss_fn.backward(cache), t.grad.numpy(), rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(loss_fn.predict(z), [0, 0, 0, 1, 1])


def test_roc_auc_counts_ordered_pairs_and_ties():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5
    y = np.array([0, 1, 0, 1, 1])
    s = np.array([0.3, 0.3, 0.1, 0.9, 0.2])
    pairs = [(p, q) for p in s[y == 1] for q in s[y == 0]]
    expected = np.mean([1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs])
    assert roc_auc(y, s) == pytest.approx(expected)
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc([1, 1], [0.1, 0.2])


def test_evaluate_in_chunks_reports_loss_accuracy_and_auc():
    m = model()
    params = m.init_params(np.random.default_rng(7))
    X, y = inputs(n=50, seed=8)
    X = Features(X)
    whole = m.evaluate(params, X, y)
    chunked = m.evaluate(params, X, y, chunk=7)
    assert chunked["loss"] == pytest.approx(whole["loss"], abs=1e-12)
    assert chunked["accuracy"] == whole["accuracy"]
    assert whole["loss"] == pytest.approx(m.loss_and_grad(params, X, y)[0], abs=1e-12)
    logits = m._infer(params, X).reshape(-1)
    assert whole["auc"] == roc_auc(y, logits)
    assert whole["accuracy"] == np.mean((logits > 0) == y)


def test_bad_arguments_are_refused():
    for kwargs, message in [({"interaction": "sum"}, "unknown interaction"),
                            ({"combine": None}, "combine must be 'mean' or 'sum'")]:
        with pytest.raises(ValueError, match=message):
            model(**kwargs)
    with pytest.raises(ValueError, match="at least one id field"):
        ps.models.DLRM(4, {})
    with pytest.raises(ValueError, match="differ from 'dense'"):
        ps.models.DLRM(4, {"dense": 3})
