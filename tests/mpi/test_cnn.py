"""A CNN under Sync and cut into pipeline stages, against serial torch SGD on the same rows."""
import numpy as np
import pytest
import torch
from mpi4py import MPI

import psframe as ps
from serial_reference import worker_rows
from torch_reference import torch_twin

pytestmark = [pytest.mark.mpi(min_size=3)]

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1
LR, MOMENTUM, STEPS, BATCH = 0.1, 0.9, 6, 5


def small_cnn():
    # Four parameterised layers (two Conv2D, two Dense): up to four pipeline stages.
    return ps.models.CNN(input_shape=(1, 8, 8), n_classes=3, channels=(3, 4), hidden=(6,),
                         dropout=0.0)


def images(n_rows=47, seed=1):
    """Flat 8x8 images of three classes: a class pattern plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n_rows)
    return rng.normal(size=(3, 64))[y] + 0.5 * rng.normal(size=(n_rows, 64)), y


def serial_torch(model, init, X, y, n_pipelines):
    """Sync restated in torch: each step, the mean of every pipeline's batch-mean gradient."""
    net = torch_twin(model, init)
    opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    for step in range(STEPS):
        opt.zero_grad()
        losses = [torch.nn.functional.cross_entropy(net(Xt[rows]), yt[rows])
                  for rows in worker_rows(len(X), n_pipelines, BATCH, step)]
        (sum(losses) / len(losses)).backward()
        opt.step()
    out = {}
    for i, layer in enumerate(model.layers):
        if layer.param_shapes():
            W = net[i].weight.detach().numpy()
            out[f"{i}.W"] = W.T if isinstance(layer, ps.layers.Dense) else W
            out[f"{i}.b"] = net[i].bias.detach().numpy()
    return out


def check(mode, n_pipelines, **kw):
    X, y = images()
    model = small_cnn()
    init = model.init_params(np.random.default_rng(3))
    result = ps.train(model, (X, y), mode=mode, optimizer=ps.SGD(lr=LR, momentum=MOMENTUM),
                      batch_size=BATCH, steps=STEPS, shuffle=False, dtype="float64",
                      init=init, **kw)
    if WORLD.Get_rank():
        assert result is None
        return None
    expected = serial_torch(model, init, X, y, n_pipelines)
    assert set(result.params) == set(expected)
    for k in expected:
        assert result.params[k].dtype == np.float64
        assert not np.allclose(result.params[k], init[k]), k  # the run moved every weight
        np.testing.assert_allclose(result.params[k], expected[k], rtol=1e-9, atol=1e-9,
                                   err_msg=k)
    return result


def test_cnn_sync_equals_serial_torch():
    check("data", N_WORKERS, policy=ps.Sync())


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_cnn_cut_into_stages_equals_serial_torch(micro_batches):
    if N_WORKERS > 4:
        pytest.skip("the small CNN has four parameterised layers: at most four stages")
    result = check("model", 1, micro_batches=micro_batches)
    if result is not None:
        assert len(result.stats["stage_idle_share"]) == N_WORKERS
