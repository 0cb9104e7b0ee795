"""Models: parameter naming, construction errors, data validation, evaluation."""
import numpy as np
import pytest

from psframe.layers import Dense, ReLU, Tanh
from psframe.losses import MSE, SoftmaxCrossEntropy
from psframe.models import MLP, LinearRegression, Model, Sequential, SoftmaxRegression


def test_mlp_names_shapes_and_layers():
    model = MLP([64, 128, 10])
    assert isinstance(model, Sequential)
    assert [type(layer) for layer in model.layers] == [Dense, ReLU, Dense]
    assert isinstance(model.loss, SoftmaxCrossEntropy)
    assert model.param_shapes() == {
        "0.W": (64, 128), "0.b": (128,), "2.W": (128, 10), "2.b": (10,),
    }
    params = model.init_params(np.random.default_rng(0))
    assert list(params) == ["0.W", "0.b", "2.W", "2.b"]
    assert {k: v.shape for k, v in params.items()} == model.param_shapes()
    assert model.layer_param_names(0) == ["0.W", "0.b"]
    assert model.layer_param_names(1) == []
    assert model.n_features == 64 and model.n_outputs == 10
    assert repr(model) == "MLP([64, 128, 10])"


def test_mlp_deeper_and_tanh():
    model = MLP([5, 4, 3, 2], activation="tanh")
    assert [type(layer) for layer in model.layers] == [Dense, Tanh, Dense, Tanh, Dense]
    assert sorted(model.param_shapes()) == ["0.W", "0.b", "2.W", "2.b", "4.W", "4.b"]
    assert "tanh" in repr(model)


def test_init_params_is_deterministic_and_uses_one_rng():
    a = MLP([6, 5, 3]).init_params(np.random.default_rng(7))
    b = MLP([6, 5, 3]).init_params(np.random.default_rng(7))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # Layers draw in order from the same generator, so the two W differ.
    rng = np.random.default_rng(7)
    np.testing.assert_array_equal(a["0.W"], Dense(6, 5).init_params(rng)["W"])
    np.testing.assert_array_equal(a["2.W"], Dense(5, 3).init_params(rng)["W"])


def test_linear_models():
    sr = SoftmaxRegression(8, 3)
    assert isinstance(sr, Sequential) and isinstance(sr.loss, SoftmaxCrossEntropy)
    assert sr.param_shapes() == {"0.W": (8, 3), "0.b": (3,)}
    assert sr.layers[0].init == "glorot"
    lr = LinearRegression(5)
    assert isinstance(lr.loss, MSE)
    assert lr.param_shapes() == {"0.W": (5, 1), "0.b": (1,)}
    assert repr(sr) == "SoftmaxRegression(8, 3)" and repr(lr) == "LinearRegression(5)"


def test_sequential_construction_errors():
    with pytest.raises(ValueError, match="layer 1"):
        Sequential([Dense(4, 8), Dense(9, 3)], SoftmaxCrossEntropy())
    with pytest.raises(ValueError, match="layer 2"):
        Sequential([Dense(4, 8), ReLU(), Dense(9, 3)], SoftmaxCrossEntropy())
    with pytest.raises(TypeError, match="Layer"):
        Sequential([Dense(4, 8), "relu"], SoftmaxCrossEntropy())
    with pytest.raises(TypeError, match="Loss"):
        Sequential([Dense(4, 8)], "mse")
    with pytest.raises(ValueError):
        Sequential([], MSE())
    with pytest.raises(ValueError):
        MLP([10])
    with pytest.raises(ValueError, match="activation"):
        MLP([3, 2], activation="sigmoid")
    with pytest.raises(ValueError):
        MLP([3, 0, 2])


def test_sequential_repr_is_readable():
    model = Sequential([Dense(4, 8), ReLU(), Dense(8, 3)], SoftmaxCrossEntropy())
    assert repr(model) == "Sequential([Dense(4, 8), ReLU(), Dense(8, 3)], SoftmaxCrossEntropy())"


def test_validate_data_messages():
    model = MLP([64, 32, 10])
    y = np.zeros(5, dtype=int)
    model.validate_data(np.zeros((5, 64)), y)
    with pytest.raises(ValueError) as err:
        model.validate_data(np.zeros((5, 10)), y)
    assert "data has 10 features but the model's first layer expects 64" in str(err.value)
    with pytest.raises(ValueError, match="2-D"):
        model.validate_data(np.zeros(64), y)
    with pytest.raises(ValueError, match="5 rows but 4"):
        model.validate_data(np.zeros((5, 64)), y[:4])
    with pytest.raises(ValueError, match="non-finite"):
        model.validate_data(np.full((5, 64), np.nan), y)
    cases = [
        (np.array([0, 1, 12, 3, 4]), "found label 12"),
        (np.array([0, -1, 2, 3, 4]), "found label -1"),
        (np.array([0.0, 1.5, 2.0, 3.0, 4.0]), "found label 1.5"),
    ]
    for labels, found in cases:
        with pytest.raises(ValueError) as err:
            model.validate_data(np.zeros((5, 64)), labels)
        assert "labels must be integers in [0, 10) for a model with 10 outputs" in str(err.value)
        assert found in str(err.value)


def test_validate_data_regression_targets():
    model = LinearRegression(3)
    model.validate_data(np.ones((4, 3)), np.ones(4))
    model.validate_data(np.ones((4, 3)), np.ones((4, 1)))
    with pytest.raises(ValueError, match="shape"):
        model.validate_data(np.ones((4, 3)), np.ones((4, 2)))


def test_sequential_evaluate_matches_manual_computation():
    rng = np.random.default_rng(1)
    model = MLP([5, 7, 4])
    params = model.init_params(rng)
    X = rng.normal(size=(23, 5))
    y = rng.integers(0, 4, size=23)
    hidden = np.maximum(X @ params["0.W"] + params["0.b"], 0)
    logits = hidden @ params["2.W"] + params["2.b"]
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    manual_loss = -logp[np.arange(23), y].mean()
    manual_acc = (logits.argmax(axis=1) == y).mean()
    for chunk in (4096, 5, 1):
        result = model.evaluate(params, X, y, chunk=chunk)
        assert result["loss"] == pytest.approx(manual_loss, rel=1e-10)
        assert result["accuracy"] == pytest.approx(manual_acc)
    np.testing.assert_array_equal(model.predict(params, X), logits.argmax(axis=1))
    assert model.loss_and_grad(params, X, y)[0] == pytest.approx(manual_loss, rel=1e-12)


def test_regression_evaluate_has_no_accuracy():
    rng = np.random.default_rng(2)
    model = LinearRegression(3)
    params = model.init_params(rng)
    X = rng.normal(size=(10, 3))
    y = rng.normal(size=10)
    result = model.evaluate(params, X, y, chunk=3)
    expected = ((X @ params["0.W"][:, 0] + params["0.b"][0] - y) ** 2).mean()
    assert result["loss"] == pytest.approx(expected, rel=1e-10)
    assert result["accuracy"] is None
    assert model.predict(params, X).shape == (10,)


class MeanModel(Model):
    """Custom model: predicts one constant c for every row; loss is mean (c - y)^2."""

    def init_params(self, rng):
        return {"c": np.zeros(1)}

    def loss_and_grad(self, params, X, y):
        diff = params["c"][0] - y
        return float((diff ** 2).mean()), {"c": np.array([2 * diff.mean()])}


class RoundingModel(MeanModel):
    def predict(self, params, X):
        return np.full(X.shape[0], np.round(params["c"][0]))


def test_custom_model_base_evaluate_without_predict():
    model = MeanModel()
    assert not model.has_predict()
    X = np.zeros((10, 2))
    y = np.arange(10)
    result = model.evaluate({"c": np.array([2.0])}, X, y, chunk=3)
    # Chunks of 3, 3, 3, 1 rows: the weighted mean must equal the plain mean.
    assert result["loss"] == pytest.approx(((2.0 - y) ** 2).mean(), rel=1e-12)
    assert result["accuracy"] is None
    assert model.validate_data(X, y) is None
    with pytest.raises(NotImplementedError):
        model.predict({}, X)


def test_custom_model_base_evaluate_with_predict():
    model = RoundingModel()
    assert model.has_predict()
    X = np.zeros((10, 2))
    y = np.array([2, 2, 2, 1, 0, 2, 3, 2, 5, 9])
    result = model.evaluate({"c": np.array([2.2])}, X, y, chunk=4)
    assert result["accuracy"] == pytest.approx(0.5)
    # Non-integer targets: accuracy is not defined.
    assert model.evaluate({"c": np.array([2.2])}, X, y + 0.5)["accuracy"] is None


def test_model_base_is_abstract():
    with pytest.raises(NotImplementedError, match="loss_and_grad"):
        Model().loss_and_grad({}, np.zeros((1, 1)), np.zeros(1))
    with pytest.raises(NotImplementedError, match="init_params"):
        Model().init_params(np.random.default_rng(0))


def test_sequential_hooks_see_each_layer_in_order_and_change_nothing():
    """The layer-wise overlap's seam: before_layer in forward order, after_forward with the
    loss, after_backward with each trained layer's gradients, last layer first."""
    model = MLP([5, 7, 4, 3])
    params = model.init_params(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(9, 5)), rng.integers(0, 3, 9)
    calls = []

    class Hooks:
        def before_layer(self, i):
            calls.append(("before", i))

        def after_forward(self, loss):
            calls.append(("loss", loss))

        def after_backward(self, i, grads):
            calls.append(("grads", i, sorted(grads)))

    loss, grads = model.loss_and_grad(params, X, y, hooks=Hooks())
    plain_loss, plain = model.loss_and_grad(params, X, y)
    assert loss == plain_loss and all(np.array_equal(grads[k], plain[k]) for k in plain)
    n = len(model.layers)
    assert calls[:n] == [("before", i) for i in range(n)]
    assert calls[n] == ("loss", loss)
    trained = [i for i in range(n) if model.layer_param_names(i)]
    assert calls[n + 1:] == [("grads", i, sorted(model.layer_param_names(i)))
                             for i in reversed(trained)]
