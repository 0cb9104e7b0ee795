"""Convolutional layers and Dropout against torch (float64) and finite differences; the CNN."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from psframe.layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU, Reshape
from psframe.losses import SoftmaxCrossEntropy
from psframe.models import CNN, MLP, Sequential
from test_layers import check_layer
from torch_reference import torch_twin

torch.set_num_threads(1)

# (in, out, kernel, stride, padding, image (h, w)): stride 1 (the wide path) and strided.
CONV_CASES = [
    (3, 4, 3, 1, 0, (7, 8)),
    (2, 5, 3, 1, 1, (6, 6)),
    (1, 3, 5, 1, 2, (9, 7)),
    (2, 3, (3, 2), 2, 1, (9, 10)),
    (1, 3, 5, (2, 1), (2, 0), (11, 12)),
    (4, 2, 1, 1, 0, (3, 5)),
    (2, 2, 2, 3, 0, (8, 8)),
]


def torch_conv(params, x, dy, stride, padding):
    """(y, dx, dW, db) of torch's conv2d with the same weights."""
    xt = torch.tensor(x, requires_grad=True)
    Wt = torch.tensor(params["W"], requires_grad=True)
    bt = torch.tensor(params["b"], requires_grad=True)
    yt = F.conv2d(xt, Wt, bt, stride=stride, padding=padding)
    yt.backward(torch.tensor(dy))
    return yt.detach().numpy(), xt.grad.numpy(), Wt.grad.numpy(), bt.grad.numpy()


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_matches_torch(case):
    c_in, c_out, k, stride, pad, (h, w) = case
    rng = np.random.default_rng(0)
    layer = Conv2D(c_in, c_out, k, stride=stride, padding=pad)
    params = layer.init_params(rng)
    x = rng.normal(size=(4, c_in, h, w))
    y, cache = layer.forward(params, x)
    assert layer.out_features((c_in, h, w)) == y.shape[1:]
    dy = rng.normal(size=y.shape)
    grads, dx = layer.backward(params, cache, dy)
    y_t, dx_t, dW_t, db_t = torch_conv(params, x, dy, layer.stride, layer.padding)
    assert y.shape == y_t.shape and dx.shape == x.shape
    close(y, y_t)
    close(dx, dx_t)
    close(grads["W"], dW_t)
    close(grads["b"], db_t)
    close(layer.infer(params, x), y_t)
    skipped, none = layer.backward(params, cache, dy, need_dx=False)
    assert none is None
    close(skipped["W"], grads["W"])


@pytest.mark.parametrize("case", [CONV_CASES[1], CONV_CASES[3]])
def test_conv2d_finite_differences(case):
    c_in, c_out, k, stride, pad, _ = case
    rng = np.random.default_rng(1)
    layer = Conv2D(c_in, c_out, k, stride=stride, padding=pad)
    check_layer(layer, layer.init_params(rng), rng.normal(size=(2, c_in, 5, 6)), rng)


def test_conv2d_infer_in_pieces_and_any_memory_layout():
    rng = np.random.default_rng(2)
    layer = Conv2D(3, 4, 3, padding=1)
    params = layer.init_params(rng)
    x = rng.normal(size=(9, 3, 6, 6))
    expect, _ = layer.forward(params, x)
    layer.INFER_BYTES = 1  # one sample per piece
    close(layer.infer(params, x), expect)
    channels_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    close(layer.forward(params, channels_last)[0], expect)


def test_conv2d_init_metadata_and_errors():
    rng = np.random.default_rng(3)
    layer = Conv2D(8, 16, 3)
    p = layer.init_params(rng)
    assert p["W"].shape == (16, 8, 3, 3) and p["b"].shape == (16,)
    bound = 1 / np.sqrt(8 * 9)  # torch's default: kaiming_uniform(a=sqrt(5)) and its bias
    assert np.abs(p["W"]).max() <= bound and np.abs(p["W"]).max() > 0.95 * bound
    assert np.abs(p["b"]).max() <= bound
    he = Conv2D(8, 16, 3, init="he").init_params(rng)
    assert abs(he["W"].std() - np.sqrt(2 / 72)) < 0.1 * np.sqrt(2 / 72)
    np.testing.assert_array_equal(he["b"], 0)
    assert layer.param_shapes() == {"W": (16, 8, 3, 3), "b": (16,)}
    assert Conv2D(1, 2, (3, 5), stride=2, padding=(1, 2)).out_features((1, 28, 28)) == (2, 14, 14)
    assert repr(Conv2D(1, 2, 3, padding=1)) == "Conv2D(1, 2, 3, padding=1)"
    assert layer.flops(10) == 0 and layer.out_features((8, 10, 10)) == (16, 8, 8)
    assert layer.flops(10) == 10 * 64 * 16 * (2 * 72 + 1)
    with pytest.raises(ValueError, match="expects 8 channels but receives 3"):
        layer.out_features((3, 10, 10))
    with pytest.raises(ValueError, match="Reshape"):
        layer.out_features(784)
    with pytest.raises(ValueError, match="smaller than its kernel"):
        layer.out_features((8, 2, 2))
    for bad in [dict(kernel_size=0), dict(kernel_size=(3,)), dict(stride=0),
                dict(padding=-1), dict(kernel_size=2.5)]:
        with pytest.raises(ValueError):
            Conv2D(**{"in_channels": 1, "out_channels": 2, "kernel_size": 3, **bad})
    with pytest.raises(ValueError, match="init"):
        Conv2D(1, 2, 3, init="zeros")


@pytest.mark.parametrize("kernel,stride", [(2, None), (3, 2), ((2, 3), (1, 2)), (3, 1)])
def test_maxpool_matches_torch_with_ties(kernel, stride):
    rng = np.random.default_rng(4)
    # Small integers, half of them zero: many windows hold equal maxima.
    x = np.maximum(rng.integers(-3, 3, size=(3, 2, 7, 8)), 0).astype(np.float64)
    layer = MaxPool2D(kernel, stride)
    y, cache = layer.forward({}, x)
    dy = rng.normal(size=y.shape)
    _, dx = layer.backward({}, cache, dy)
    xt = torch.tensor(x, requires_grad=True)
    yt = F.max_pool2d(xt, kernel, stride)
    yt.backward(torch.tensor(dy))
    close(y, yt.detach().numpy())
    close(dx, xt.grad.numpy())
    assert layer.out_features((2, 7, 8)) == y.shape[1:]


def test_maxpool_finite_differences_and_metadata():
    rng = np.random.default_rng(5)
    x = rng.permutation(2 * 3 * 6 * 6).reshape(2, 3, 6, 6) / 10.0  # distinct: no ties
    check_layer(MaxPool2D(2), {}, x, rng)
    check_layer(MaxPool2D(3, 2), {}, x, rng)
    assert MaxPool2D(2).stride == (2, 2) and repr(MaxPool2D(2)) == "MaxPool2D(2)"
    with pytest.raises(ValueError, match="smaller than its kernel"):
        MaxPool2D(4).out_features((1, 3, 3))


def test_flatten_and_reshape_match_torch():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 2, 3, 4))
    flat, cache = Flatten().forward({}, x)
    close(flat, torch.flatten(torch.tensor(x), 1).numpy())
    dy = rng.normal(size=flat.shape)
    _, dx = Flatten().backward({}, cache, dy)
    xt = torch.tensor(x, requires_grad=True)
    torch.flatten(xt, 1).backward(torch.tensor(dy))
    close(dx, xt.grad.numpy())
    back, cache = Reshape((2, 3, 4)).forward({}, flat)
    close(back, torch.tensor(flat).view(5, 2, 3, 4).numpy())
    _, dflat = Reshape((2, 3, 4)).backward({}, cache, x)
    close(dflat, flat)
    check_layer(Reshape((4, 6)), {}, rng.normal(size=(2, 24)), rng)
    check_layer(Flatten(), {}, x[:2], rng)
    assert Flatten().out_features((2, 3, 4)) == 24 and Flatten().out_features(7) == 7
    assert Reshape((1, 28, 28)).out_features(784) == (1, 28, 28)
    assert Reshape(12).out_features((3, 4)) == 12
    with pytest.raises(ValueError, match="needs 784 values per sample but receives 780"):
        Reshape((1, 28, 28)).out_features(780)


def test_dropout_training_scales_and_evaluation_is_identity():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(200, 50)) + 3.0  # no zeros of its own
    layer = Dropout(0.3, seed=1)
    y, mask = layer.forward({}, x)
    dropped = y == 0
    assert abs(dropped.mean() - 0.3) < 0.02
    close(y[~dropped], x[~dropped] / 0.7)
    dy = rng.normal(size=x.shape)
    _, dx = layer.backward({}, mask, dy)
    # torch's dropout keeps the same convention: kept values scaled by 1/(1-p).
    xt = torch.tensor(x, requires_grad=True)
    yt = F.dropout(xt, 0.3, training=True)
    kept = yt.detach().numpy() != 0
    close(yt.detach().numpy()[kept], x[kept] / 0.7)
    (yt * torch.tensor(dy)).sum().backward()
    close(xt.grad.numpy()[kept], dy[kept] / 0.7)
    close(dx, np.where(dropped, 0.0, dy / 0.7))
    close(layer.infer({}, x), F.dropout(torch.tensor(x), 0.3, training=False).numpy())
    assert Dropout(0.0).forward({}, x)[0] is x


def test_dropout_masks_are_seeded():
    x = np.ones((4, 100))

    def masks(layer, n=3):
        return [layer.forward({}, x)[0] != 0 for _ in range(n)]

    a, b = masks(Dropout(0.5, seed=2)), masks(Dropout(0.5, seed=2))
    for ma, mb in zip(a, b):
        np.testing.assert_array_equal(ma, mb)
    assert not (a[0] == a[1]).all()  # a fresh mask every training forward
    assert not (a[0] == masks(Dropout(0.5, seed=3), 1)[0]).all()
    # init_params reseeds from the run's generator: the run's seed decides the masks.
    run = [Dropout(0.5) for _ in range(3)]
    for layer, seed in zip(run, (10, 10, 11)):
        layer.init_params(np.random.default_rng(seed))
    first = [masks(layer, 1)[0] for layer in run]
    np.testing.assert_array_equal(first[0], first[1])
    assert not (first[0] == first[2]).all()
    # reseed(seed, worker) gives each worker its own masks.
    w0, w1 = Dropout(0.5), Dropout(0.5)
    w0.reseed(10, 0)
    w1.reseed(10, 1)
    assert not (masks(w0, 1)[0] == masks(w1, 1)[0]).all()
    with pytest.raises(ValueError, match="probability"):
        Dropout(1.0)


def test_sequential_with_dropout_evaluates_without_it():
    rng = np.random.default_rng(8)
    with_dropout = Sequential([Dense(6, 20), ReLU(), Dropout(0.5), Dense(20, 3)],
                              SoftmaxCrossEntropy())
    plain = Sequential([Dense(6, 20), ReLU(), Dense(20, 3)], SoftmaxCrossEntropy())
    params = with_dropout.init_params(rng)
    same = {"0.W": params["0.W"], "0.b": params["0.b"], "2.W": params["3.W"],
            "2.b": params["3.b"]}
    assert plain.init_params(np.random.default_rng(8)).keys() == same.keys()
    X, y = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
    assert with_dropout.evaluate(params, X, y) == plain.evaluate(same, X, y)
    np.testing.assert_array_equal(with_dropout.predict(params, X), plain.predict(same, X))
    train_loss, _ = with_dropout.loss_and_grad(params, X, y)
    assert train_loss != pytest.approx(plain.loss_and_grad(same, X, y)[0])
    # Dropout takes no draws from the weights' generator: the same weights with or without.
    np.testing.assert_array_equal(same["2.W"], plain.init_params(np.random.default_rng(8))["2.W"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layers_keep_the_dtype(dtype):
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 2, 8, 8)).astype(dtype)
    for layer in [Conv2D(2, 3, 3, padding=1), Conv2D(2, 3, 3, stride=2), MaxPool2D(2),
                  Flatten(), Reshape((2, 64)), Dropout(0.5)]:
        params = {k: v.astype(dtype) for k, v in layer.init_params(rng).items()}
        y, cache = layer.forward(params, x)
        grads, dx = layer.backward(params, cache, np.ones_like(y))
        assert y.dtype == dtype and dx.dtype == dtype, layer
        assert layer.infer(params, x).dtype == dtype, layer
        assert all(g.dtype == dtype for g in grads.values()), layer


def test_cnn_loss_and_grad_matches_torch():
    rng = np.random.default_rng(10)
    model = CNN(input_shape=(2, 12, 10), n_classes=4, channels=(3, 5), hidden=(7,),
                dropout=0.0)
    params = model.init_params(rng)
    X, y = rng.normal(size=(6, 240)), rng.integers(0, 4, 6)
    loss, grads = model.loss_and_grad(params, X, y)
    net = torch_twin(model, params)
    loss_t = F.cross_entropy(net(torch.tensor(X)), torch.tensor(y))
    loss_t.backward()
    assert loss == pytest.approx(loss_t.item(), rel=1e-12)
    for i, layer in enumerate(model.layers):
        if layer.param_shapes():
            mod = net[i]
            dW = mod.weight.grad.numpy()
            close(grads[f"{i}.W"], dW.T if isinstance(layer, Dense) else dW)
            close(grads[f"{i}.b"], mod.bias.grad.numpy())
    # Images (N, C, H, W) fit the same model as the flat rows.
    loss4, _ = model.loss_and_grad(params, X.reshape(6, 2, 12, 10), y)
    assert loss4 == pytest.approx(loss, rel=1e-12)


def test_cnn_shapes_validation_and_float32():
    model = CNN()
    assert [type(layer) for layer in model.layers] == [
        Reshape, Conv2D, ReLU, MaxPool2D, Conv2D, ReLU, MaxPool2D, Flatten, Dense, ReLU,
        Dropout, Dense]
    assert model.n_features == 784 and model.n_outputs == 10
    assert model.out_features(784, stop=4) == (16, 14, 14)
    assert model.param_shapes()["1.W"] == (16, 1, 5, 5)
    assert model.param_shapes()["8.W"] == (32 * 7 * 7, 128)
    assert repr(model) == "CNN()"
    assert repr(CNN(channels=(4,), dropout=0.0)) == "CNN(channels=(4,), dropout=0.0)"
    y = np.zeros(3, dtype=int)
    model.validate_data(np.zeros((3, 784)), y)
    model.validate_data(np.zeros((3, 1, 28, 28)), y)
    with pytest.raises(ValueError, match="data has 780 features but the model's first layer "
                                         "expects 784"):
        model.validate_data(np.zeros((3, 780)), y)
    with pytest.raises(ValueError, match="needs 784 values per sample"):
        model.validate_data(np.zeros((3, 1, 28, 27)), y)
    bare = Sequential([Conv2D(1, 2, 3), Flatten(), Dense(2 * 26 * 26, 10)], SoftmaxCrossEntropy())
    assert bare.n_features is None
    bare.validate_data(np.zeros((3, 1, 28, 28)), y)
    with pytest.raises(ValueError, match="expects 1 channels but receives 3"):
        bare.validate_data(np.zeros((3, 3, 28, 28)), y)
    with pytest.raises(ValueError, match="expects 1352 inputs but receives 1250"):
        bare.validate_data(np.zeros((3, 1, 27, 27)), y)
    with pytest.raises(ValueError, match="put a Reshape"):
        bare.validate_data(np.zeros((3, 784)), y)
    with pytest.raises(ValueError, match="put a Flatten"):
        MLP([784, 10]).validate_data(np.zeros((3, 1, 28, 28)), y)
    with pytest.raises(ValueError, match="layer 1: .*put a Flatten"):
        Sequential([Conv2D(1, 2, 3), Dense(8, 10)], SoftmaxCrossEntropy()).validate_data(
            np.zeros((3, 1, 5, 5)), y)
    params = {k: v.astype(np.float32) for k, v in model.init_params(np.random.default_rng(0))
              .items()}
    X = np.random.default_rng(1).random((4, 784), dtype=np.float32)
    _, grads = model.loss_and_grad(params, X, np.arange(4))
    assert all(g.dtype == np.float32 for g in grads.values())


def test_first_parameterised_layer_skips_dx():
    calls = []

    class Recording(Conv2D):
        def backward(self, params, cache, dy, need_dx=True):
            calls.append(need_dx)
            return super().backward(params, cache, dy, need_dx)

    model = Sequential([Reshape((1, 6, 6)), Recording(1, 2, 3), ReLU(), Recording(2, 2, 3),
                        Flatten(), Dense(8, 3)], SoftmaxCrossEntropy())
    assert model.first_trained == 1
    rng = np.random.default_rng(11)
    model.loss_and_grad(model.init_params(rng), rng.normal(size=(2, 36)), np.array([0, 2]))
    assert calls == [True, False]


def test_training_steps_reuse_the_conv_buffers():
    model = CNN(input_shape=(1, 8, 8), n_classes=3, channels=(2, 3), hidden=(), dropout=0.0)
    rng = np.random.default_rng(12)
    params = model.init_params(rng)
    X, y = rng.normal(size=(4, 64)), np.array([0, 1, 2, 0])
    first = model.loss_and_grad(params, X, y)
    for _ in range(5):
        again = model.loss_and_grad(params, X, y)
    assert again[0] == first[0]
    for name in first[1]:
        np.testing.assert_array_equal(again[1][name], first[1][name])
    for layer in model.layers:
        if isinstance(layer, Conv2D):  # one window matrix, handed back by each backward
            assert [len(v) for v in layer._spare.values()] == [1]


def test_each_worker_draws_its_own_dropout_masks():
    # Every rank builds the same model from the same seed; the runtime reseeds each worker's
    # Dropout layers by (run seed, worker index), so the workers' masks differ.
    def mask(seed, worker):
        model = Sequential([Dense(4, 6), Dropout(0.5)], SoftmaxCrossEntropy())
        model.init_params(np.random.default_rng(0))
        model.reseed(seed, worker)  # what the runtime does on worker `worker`
        y, _ = model.layers[1].forward({}, np.ones((8, 6)))
        return y
    np.testing.assert_array_equal(mask(0, 1), mask(0, 1))
    assert not np.array_equal(mask(0, 0), mask(0, 1))
    assert not np.array_equal(mask(0, 0), mask(1, 0))
