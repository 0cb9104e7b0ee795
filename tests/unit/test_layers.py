"""Layers and losses: finite-difference gradients, dtype preservation, stability, target checks."""
import numpy as np
import pytest

from psframe.layers import Dense, Layer, ReLU, Tanh
from psframe.losses import MSE, SoftmaxCrossEntropy
from psframe.models import MLP, Sequential

H = 1e-5


def numeric_grad(f, x):
    """Central differences of the scalar f() with respect to every entry of x (perturbed in place)."""
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + H
        up = f()
        x[i] = old - H
        down = f()
        x[i] = old
        grad[i] = (up - down) / (2 * H)
    return grad


def assert_grad_close(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


def check_layer(layer, params, x, rng):
    """Gradient check of sum(R * layer(x)) with a fixed random R, for every param and x."""
    y, cache = layer.forward(params, x)
    r = rng.normal(size=y.shape)
    grads, dx = layer.backward(params, cache, r)
    assert set(grads) == set(params)

    def f():
        return float((layer.forward(params, x)[0] * r).sum())

    for name, value in params.items():
        assert grads[name].shape == value.shape
        assert_grad_close(grads[name], numeric_grad(f, value))
    assert dx.shape == x.shape
    assert_grad_close(dx, numeric_grad(f, x))


def test_dense_gradients():
    rng = np.random.default_rng(0)
    layer = Dense(4, 3)
    params = layer.init_params(rng)
    params["b"] = rng.normal(size=3)  # non-zero bias so its term is exercised
    check_layer(layer, params, rng.normal(size=(5, 4)), rng)


def test_dense_forward_is_affine():
    rng = np.random.default_rng(1)
    layer = Dense(3, 2)
    params = {"W": rng.normal(size=(3, 2)), "b": np.array([1.0, -2.0])}
    x = rng.normal(size=(4, 3))
    y, _ = layer.forward(params, x)
    np.testing.assert_allclose(y, x @ params["W"] + params["b"])


def test_relu_gradients_away_from_kink():
    rng = np.random.default_rng(2)
    x = rng.uniform(0.1, 1.0, size=(5, 4)) * rng.choice([-1.0, 1.0], size=(5, 4))
    check_layer(ReLU(), {}, x, rng)
    y, _ = ReLU().forward({}, x)
    np.testing.assert_array_equal(y, np.maximum(x, 0))


def test_tanh_gradients():
    rng = np.random.default_rng(3)
    check_layer(Tanh(), {}, rng.normal(size=(5, 4)), rng)


def test_dense_init_and_validation():
    rng = np.random.default_rng(4)
    he = Dense(400, 300).init_params(rng)
    assert he["W"].shape == (400, 300) and he["b"].shape == (300,)
    assert he["W"].dtype == np.float64
    np.testing.assert_array_equal(he["b"], 0)
    assert abs(he["W"].std() - np.sqrt(2 / 400)) < 0.01 * np.sqrt(2 / 400)
    glorot = Dense(400, 300, init="glorot").init_params(rng)["W"]
    limit = np.sqrt(6 / 700)
    assert glorot.max() <= limit and glorot.min() >= -limit
    assert glorot.max() > 0.95 * limit  # uniform, not a narrower distribution
    with pytest.raises(ValueError, match="init"):
        Dense(3, 2, init="zeros")
    for bad in [(0, 2), (3, -1), (2.5, 3), (True, 3), ("3", 2)]:
        with pytest.raises(ValueError, match="positive integer"):
            Dense(*bad)
    assert Dense(np.int64(3), 2).n_in == 3


def test_layer_metadata():
    d = Dense(5, 7)
    assert d.param_shapes() == {"W": (5, 7), "b": (7,)}
    assert d.out_features(5) == 7
    with pytest.raises(ValueError):
        d.out_features(6)
    assert d.flops(10) >= 2 * 10 * 5 * 7
    assert ReLU().param_shapes() == {} and ReLU().init_params(None) == {}
    assert ReLU().out_features(7) == 7
    assert repr(d) == "Dense(5, 7)" and repr(Tanh()) == "Tanh()"
    with pytest.raises(NotImplementedError):
        Layer().forward({}, np.zeros((1, 1)))


def test_dense_backward_can_skip_dx():
    rng = np.random.default_rng(5)
    layer = Dense(3, 2)
    params = layer.init_params(rng)
    x = rng.normal(size=(4, 3))
    _, cache = layer.forward(params, x)
    dy = rng.normal(size=(4, 2))
    full, dx = layer.backward(params, cache, dy)
    part, none = layer.backward(params, cache, dy, need_dx=False)
    assert none is None and dx is not None
    np.testing.assert_array_equal(full["W"], part["W"])


def check_loss(loss, pred, y):
    value, cache = loss.forward(pred, y)
    assert isinstance(value, float)
    dpred = loss.backward(cache)
    assert dpred.shape == pred.shape
    assert_grad_close(dpred, numeric_grad(lambda: loss.forward(pred, y)[0], pred))
    return value


def test_softmax_cross_entropy_gradient_and_value():
    rng = np.random.default_rng(6)
    pred = rng.normal(size=(6, 4))
    y = np.array([0, 3, 1, 1, 2, 3])
    value = check_loss(SoftmaxCrossEntropy(), pred, y)
    p = np.exp(pred) / np.exp(pred).sum(axis=1, keepdims=True)
    assert value == pytest.approx(-np.log(p[np.arange(6), y]).mean(), rel=1e-12)
    # Float labels holding integers behave like int labels.
    assert SoftmaxCrossEntropy().forward(pred, y.astype(np.float64))[0] == value


def test_mse_gradient_and_value_both_target_shapes():
    rng = np.random.default_rng(7)
    pred = rng.normal(size=(5, 1))
    y = rng.normal(size=5)
    v1 = check_loss(MSE(), pred, y)
    v2 = check_loss(MSE(), pred, y.reshape(5, 1))
    assert v1 == v2 == pytest.approx(((pred[:, 0] - y) ** 2).mean(), rel=1e-12)
    pred3 = rng.normal(size=(4, 3))
    y3 = rng.normal(size=(4, 3))
    assert check_loss(MSE(), pred3, y3) == pytest.approx(((pred3 - y3) ** 2).mean())
    with pytest.raises(ValueError, match="shape"):
        MSE().forward(pred3, y)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_sequential_mlp_gradients(activation):
    rng = np.random.default_rng(8)
    model = MLP([4, 6, 5, 3], activation=activation)
    params = model.init_params(rng)
    for name in params:
        if name.endswith(".b"):
            params[name] = rng.normal(scale=0.1, size=params[name].shape)
    X = rng.normal(size=(7, 4))
    y = rng.integers(0, 3, size=7)
    loss, grads = model.loss_and_grad(params, X, y)
    assert set(grads) == set(params)
    for name, value in params.items():
        numeric = numeric_grad(lambda: model.loss_and_grad(params, X, y)[0], value)
        assert_grad_close(grads[name], numeric)


def test_sequential_regression_gradients():
    rng = np.random.default_rng(9)
    model = Sequential([Dense(3, 4), Tanh(), Dense(4, 1)], MSE())
    params = model.init_params(rng)
    X = rng.normal(size=(6, 3))
    y = rng.normal(size=6)
    _, grads = model.loss_and_grad(params, X, y)
    for name, value in params.items():
        numeric = numeric_grad(lambda: model.loss_and_grad(params, X, y)[0], value)
        assert_grad_close(grads[name], numeric)


def test_float32_is_preserved_everywhere():
    rng = np.random.default_rng(10)
    model = Sequential([Dense(4, 5), ReLU(), Dense(5, 5), Tanh(), Dense(5, 3)],
                       SoftmaxCrossEntropy())
    params = {k: v.astype(np.float32) for k, v in model.init_params(rng).items()}
    X = rng.normal(size=(8, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=8)
    loss, grads = model.loss_and_grad(params, X, y)
    assert np.isfinite(loss)
    assert all(g.dtype == np.float32 for g in grads.values())
    for layer in [Dense(4, 2), ReLU(), Tanh()]:
        p = {k: v.astype(np.float32) for k, v in layer.init_params(rng).items()}
        out, cache = layer.forward(p, X)
        g, dx = layer.backward(p, cache, np.ones_like(out))
        assert out.dtype == dx.dtype == np.float32
        assert all(v.dtype == np.float32 for v in g.values())
    pred = rng.normal(size=(8, 1)).astype(np.float32)
    _, cache = MSE().forward(pred, rng.normal(size=8))  # float64 targets
    assert MSE().backward(cache).dtype == np.float32
    _, cache = SoftmaxCrossEntropy().forward(pred.repeat(3, axis=1), y.astype(np.float64))
    assert SoftmaxCrossEntropy().backward(cache).dtype == np.float32


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(11)
    model = MLP([3, 4, 2])
    params = model.init_params(rng)
    X = rng.normal(size=(5, 3))
    y = np.array([0, 1, 1, 0, 1])
    before = ({k: v.copy() for k, v in params.items()}, X.copy(), y.copy())
    model.loss_and_grad(params, X, y)
    model.evaluate(params, X, y)
    for k in params:
        np.testing.assert_array_equal(params[k], before[0][k])
    np.testing.assert_array_equal(X, before[1])
    np.testing.assert_array_equal(y, before[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_is_stable_for_huge_logits(dtype):
    pred = np.array([[1e4, 0.0, -1e4], [-1e4, 1e4, 1e4], [0.0, 0.0, 0.0]], dtype=dtype)
    y = np.array([0, 0, 2])
    loss = SoftmaxCrossEntropy()
    value, cache = loss.forward(pred, y)
    dpred = loss.backward(cache)
    assert np.isfinite(value) and np.isfinite(dpred).all()
    # Row 0 is right with certainty (0), row 1 is off by 2e4 (-log(e^-2e4/2)), row 2 is uniform.
    expected = (0.0 + (2e4 + np.log(2)) + np.log(3)) / 3
    assert value == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(dpred.sum(axis=1), 0, atol=1e-6)


@pytest.mark.parametrize(
    "y, found",
    [
        (np.array([0, 3, 12]), "found label 12"),
        (np.array([0, -1, 2]), "found label -1"),
        (np.array([0.0, 2.5, 1.0]), "found label 2.5"),
        (np.array([0.0, np.nan]), "found label nan"),
        (np.array([1.0, 10.0]), "found label 10"),
    ],
)
def test_softmax_check_targets_rejects_bad_labels(y, found):
    with pytest.raises(ValueError) as err:
        SoftmaxCrossEntropy().check_targets(y, 10)
    msg = str(err.value)
    assert "labels must be integers in [0, 10) for a model with 10 outputs" in msg
    assert found in msg


def test_softmax_check_targets_accepts_good_labels_and_rejects_shapes():
    loss = SoftmaxCrossEntropy()
    loss.check_targets(np.array([0, 9, 3]), 10)
    loss.check_targets(np.array([0.0, 9.0]), 10)
    loss.check_targets(np.array([0, 1], dtype=np.uint8), 2)
    with pytest.raises(ValueError, match="1-D"):
        loss.check_targets(np.zeros((3, 2), dtype=int), 10)
    with pytest.raises(ValueError, match="dtype"):
        loss.check_targets(np.array(["a", "b"]), 10)
    np.testing.assert_array_equal(loss.predict(np.array([[0.1, 0.9], [2.0, 1.0]])), [1, 0])
    assert loss.classification is True


def test_mse_check_targets_and_predict():
    loss = MSE()
    loss.check_targets(np.zeros(4), 1)
    loss.check_targets(np.zeros((4, 1)), 1)
    loss.check_targets(np.zeros((4, 3)), 3)
    with pytest.raises(ValueError, match="shape"):
        loss.check_targets(np.zeros((4, 2)), 1)
    with pytest.raises(ValueError, match="shape"):
        loss.check_targets(np.zeros(4), 3)
    with pytest.raises(ValueError, match="non-finite"):
        loss.check_targets(np.array([1.0, np.inf]), 1)
    assert loss.predict(np.ones((4, 1))).shape == (4,)
    assert loss.predict(np.ones((4, 2))).shape == (4, 2)
    assert loss.classification is False
