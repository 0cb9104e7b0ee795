"""ps.TorchModel against torch's own autograd: names, start weights, gradients, dtypes, modes."""
import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import psframe as ps
from psframe.params import ParamLayout
from psframe.training.roles import labels_for as _labels


def conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.LayerNorm([3, 4, 4]), nn.Flatten(), nn.Linear(48, 5),
    )


def batch(n=7, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 64)), rng.integers(0, 5, n)


def torch_reference(module, X, y, loss_fn=None):
    """Loss and gradients as a plain torch user gets them: forward, backward, .grad."""
    net = copy.deepcopy(module).double()
    loss = (loss_fn or nn.CrossEntropyLoss())(net(torch.from_numpy(X)), torch.from_numpy(y))
    loss.backward()
    return loss.item(), {n: p.grad.numpy() for n, p in net.named_parameters()}


def test_names_and_shapes_come_from_named_parameters():
    module = conv_net()
    params = ps.TorchModel(module, nn.CrossEntropyLoss()).init_params(None)
    assert list(params) == [n for n, _ in module.named_parameters()]
    assert list(params) == ["1.weight", "1.bias", "4.weight", "4.bias", "6.weight", "6.bias"]
    assert {n: a.shape for n, a in params.items()} == {
        n: tuple(p.shape) for n, p in module.named_parameters()}


def test_tied_weights_are_one_parameter():
    emb = nn.Linear(4, 4, bias=False)
    module = nn.Sequential(emb, nn.ReLU(), emb)
    assert list(ps.TorchModel(module, nn.MSELoss()).init_params(None)) == ["0.weight"]


def test_init_weights_are_the_modules_own_and_copies():
    module = conv_net()
    params = ps.TorchModel(module, nn.CrossEntropyLoss()).init_params(np.random.default_rng(0))
    for name, p in module.named_parameters():
        assert params[name].dtype == np.float32
        np.testing.assert_array_equal(params[name], p.detach().numpy())
    params["1.weight"][...] = 0.0  # psframe may do what it likes with them; the module keeps its own
    assert float(module[1].weight.detach().abs().sum()) > 0


def test_loss_and_grad_equal_torch_backward_float64():
    module = conv_net()
    model = ps.TorchModel(module, nn.CrossEntropyLoss())
    X, y = batch()
    params = {n: a.astype(np.float64) for n, a in model.init_params(None).items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on float() of a graph tensor
        loss, grads = model.loss_and_grad(params, X, y)
    ref_loss, ref_grads = torch_reference(module, X, y)
    assert isinstance(loss, float)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    assert list(grads) == list(ref_grads)
    for n in ref_grads:
        assert grads[n].dtype == np.float64
        np.testing.assert_allclose(grads[n], ref_grads[n], rtol=1e-12, atol=1e-14, err_msg=n)


def test_the_weights_passed_in_are_used_and_the_module_is_untouched():
    module = conv_net()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    model = ps.TorchModel(module, nn.CrossEntropyLoss())
    other = conv_net(seed=5)
    params = {n: a.astype(np.float64) for n, a in
              ps.TorchModel(other, nn.CrossEntropyLoss()).init_params(None).items()}
    X, y = batch()
    loss, grads = model.loss_and_grad(params, X, y)
    ref_loss, ref_grads = torch_reference(other, X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-13)
    np.testing.assert_allclose(grads["6.weight"], ref_grads["6.weight"], rtol=1e-12, atol=1e-14)
    for n, p in module.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, before[n])


def test_weights_are_bound_without_copies_and_follow_in_place_updates():
    """A worker passes the same views of its flat buffer each step; the server rewrites them."""
    model = ps.TorchModel(conv_net(), nn.CrossEntropyLoss())
    init = model.init_params(None)
    layout = ParamLayout.from_params(init, "float64")
    flat = layout.flatten(init)
    views = layout.views(flat)
    X, y = batch()
    model.loss_and_grad(views, X, y)
    for name, p in model._net.named_parameters():
        assert p.data_ptr() == views[name].ctypes.data
    flat *= 0.5  # an update in place, as the server applies it
    loss, grads = model.loss_and_grad(views, X, y)
    halved = {n: v.copy() for n, v in views.items()}  # the same weights, freshly bound
    loss2, grads2 = ps.TorchModel(conv_net(), nn.CrossEntropyLoss()).loss_and_grad(halved, X, y)
    assert loss == loss2
    for n in grads:
        np.testing.assert_array_equal(grads[n], grads2[n])


def test_gradients_of_one_step_survive_the_next():
    """Gradients are views of the tensors autograd made, fresh each step: never overwritten."""
    model = ps.TorchModel(conv_net(), nn.CrossEntropyLoss())
    params = model.init_params(None)
    X, y = batch()
    _, first = model.loss_and_grad(params, X.astype(np.float32), y)
    kept = {n: g.copy() for n, g in first.items()}
    model.loss_and_grad(params, 2 * X.astype(np.float32), y)
    for n in kept:
        np.testing.assert_array_equal(first[n], kept[n])


def test_read_only_weights_work_without_a_warning():
    """Under plain Sync a worker reads the server's weights in place, read-only."""
    model = ps.TorchModel(conv_net(), nn.CrossEntropyLoss())
    params = model.init_params(None)
    for a in params.values():
        a.flags.writeable = False
    X, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = model.loss_and_grad(params, X.astype(np.float32), y)
    assert np.isfinite(loss)


def test_float32_stays_float32_and_float64_module_follows_the_run():
    X, y = batch()
    model = ps.TorchModel(conv_net(), nn.CrossEntropyLoss())
    params32 = model.init_params(None)
    loss, grads = model.loss_and_grad(params32, X.astype(np.float32), y)
    assert all(g.dtype == np.float32 for g in grads.values())
    # A float64 module in a float32 run computes in float32; X in another dtype is cast.
    model64 = ps.TorchModel(conv_net().double(), nn.CrossEntropyLoss())
    loss64, grads64 = model64.loss_and_grad(params32, X, y)
    assert all(g.dtype == np.float32 for g in grads64.values())
    assert loss64 == pytest.approx(loss, rel=1e-6)
    # and a float32 module in a float64 run computes in float64
    params64 = {n: a.astype(np.float64) for n, a in params32.items()}
    _, grads = model.loss_and_grad(params64, X, y)
    assert all(g.dtype == np.float64 for g in grads.values())


def test_modules_with_buffers_are_refused():
    with pytest.raises(ValueError, match=r"buffers \(1\.running_mean, 1\.running_var, "
                                         r"1\.num_batches_tracked\).*track_running_stats=False"):
        ps.TorchModel(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), nn.CrossEntropyLoss())
    # Without running statistics BatchNorm has no buffers: accepted.
    ps.TorchModel(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)),
                  nn.CrossEntropyLoss())


def test_construction_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ps.TorchModel(lambda x: x, nn.MSELoss())
    with pytest.raises(ValueError, match="reduction='mean'"):
        ps.TorchModel(nn.Linear(3, 2), nn.CrossEntropyLoss(reduction="sum"))
    frozen = nn.Linear(3, 2)
    frozen.bias.requires_grad_(False)
    with pytest.raises(ValueError, match=r"\['bias'\] have requires_grad=False"):
        ps.TorchModel(frozen, nn.MSELoss())
    with pytest.raises(ValueError, match="no parameters"):
        ps.TorchModel(nn.ReLU(), nn.MSELoss())


def test_a_parameter_the_loss_does_not_reach_gets_zero_gradient():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            return self.used(x)

    model = ps.TorchModel(TwoHeads(), nn.CrossEntropyLoss())
    params = model.init_params(None)
    _, grads = model.loss_and_grad(params, np.ones((3, 4), np.float32), np.array([0, 1, 0]))
    assert grads["unused.weight"].shape == (2, 4) and not grads["unused.weight"].any()
    assert grads["used.weight"].any()


def test_evaluate_and_predict_run_in_eval_mode():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 5))
    model = ps.TorchModel(module, nn.CrossEntropyLoss())
    params = {n: a.astype(np.float64) for n, a in model.init_params(None).items()}
    X, y = batch(n=50)
    first = model.evaluate(params, X, y)
    # Training mode in between must not leak into evaluation.
    train_losses = {model.loss_and_grad(params, X, y)[0] for _ in range(3)}
    assert len(train_losses) == 3  # dropout drew different masks
    second = model.evaluate(params, X, y, chunk=16)
    net = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        out = net(torch.from_numpy(X))
    expected = float(nn.CrossEntropyLoss()(out, torch.from_numpy(y)))
    assert first["loss"] == pytest.approx(expected, rel=1e-12)
    assert second["loss"] == pytest.approx(expected, rel=1e-12)
    accuracy = float((out.argmax(1).numpy() == y).mean())
    assert first["accuracy"] == second["accuracy"] == pytest.approx(accuracy)
    pred = model.predict(params, X)
    assert isinstance(pred, np.ndarray) and pred.dtype == np.int64
    np.testing.assert_array_equal(pred, out.argmax(1).numpy())
    assert model.has_predict()


def test_regression_has_no_accuracy_and_keeps_float_targets():
    torch.manual_seed(0)
    model = ps.TorchModel(nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)), nn.MSELoss())
    assert not model.loss.classification
    params = model.init_params(None)
    X = np.arange(12, dtype=np.float32).reshape(4, 3)
    y = np.array([0.5, 1.0, 1.5, 2.0])
    y_run = _labels(model, y, np.float32)
    assert y_run.dtype == np.float32
    assert model.evaluate(params, X, y_run)["accuracy"] is None
    loss, _ = model.loss_and_grad(params, X, y_run)
    assert np.isfinite(loss)


def test_class_labels_become_int64_for_cross_entropy():
    model = ps.TorchModel(conv_net(), nn.CrossEntropyLoss())
    assert model.loss.classification
    assert ps.TorchModel(nn.Linear(64, 5), torch.nn.functional.cross_entropy).loss.classification
    X, y = batch()
    labels = _labels(model, y.astype(np.float64), np.float64)  # float-coded classes
    assert labels.dtype == np.int64
    params = {n: a.astype(np.float64) for n, a in model.init_params(None).items()}
    loss, _ = model.loss_and_grad(params, X, labels)
    assert loss == pytest.approx(torch_reference(conv_net(), X, y)[0], rel=1e-13)
    loss32, _ = model.loss_and_grad(params, X, y.astype(np.int32))  # other ints are cast
    assert loss32 == pytest.approx(loss, rel=1e-15)


def test_validate_data_checks_labels_against_the_modules_outputs():
    model = ps.TorchModel(conv_net(), nn.CrossEntropyLoss())
    X, y = batch()
    model.validate_data(X, y)
    bad = y.copy()
    bad[0] = 5
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\).*got \d\.\.5"):
        model.validate_data(X, bad)
    with pytest.raises(ValueError, match="must be integers"):
        model.validate_data(X, y + 0.5)
    with pytest.raises(ValueError, match="failed on the first row"):
        model.validate_data(np.ones((3, 10)), y[:3])


def test_load_params_copies_trained_weights_into_the_module():
    module = conv_net()
    model = ps.TorchModel(module, nn.CrossEntropyLoss())
    trained = {n: np.full(a.shape, 0.25) for n, a in model.init_params(None).items()}
    model.load_params(trained)
    for p in module.parameters():
        assert p.dtype == torch.float32 and torch.all(p == 0.25)


def _run(code):
    """A fresh interpreter (this one has torch loaded already)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)


def test_import_psframe_does_not_import_torch():
    proc = _run("import sys, psframe; print('torch' in sys.modules)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_without_torch_construction_names_the_extra():
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # as if torch were not installed\n"
        "import psframe as ps\n"
        "try:\n"
        "    ps.TorchModel(object(), object())\n"
        "except ImportError as exc:\n"
        "    print('IMPORTERROR', exc)\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTERROR" in proc.stdout
    assert "pip install 'psframe[torch]'" in proc.stdout and "make install-torch" in proc.stdout
