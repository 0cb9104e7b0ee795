"""ps.TorchModel under Sync equals serial torch (torch.optim.SGD on the union of the batches)."""
import copy

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

import psframe as ps
from serial_reference import worker_rows

pytestmark = [pytest.mark.mpi(min_size=3)]

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1
THREADS_SEEN = []  # torch's intra-op threads, as each forward on this rank saw them


class RecordThreads(nn.Module):
    def forward(self, x):
        THREADS_SEEN.append(torch.get_num_threads())
        return x


def conv_net(seed=0):
    """Conv2d, MaxPool2d, LayerNorm and Linear on 8x8 digits (rows arrive flat: Unflatten)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.LayerNorm([4, 4, 4]), nn.Flatten(), nn.Linear(64, 10),
    )


def digits(n_rows=150):
    train, test = ps.data.digits(seed=0)
    return train.X[:n_rows].astype(np.float64), train.y[:n_rows], test


def serial_torch(module, X, y, n_workers, batch, steps, lr, momentum):
    """Serial torch: per step, the mean of each worker's batch loss (DESIGN §3's rows), then
    torch.optim.SGD, which psframe's SGD follows (v = mu v + g, w -= lr v)."""
    net = copy.deepcopy(module).double()
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    loss_fn = nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y.astype(np.int64))
    for t in range(steps):
        opt.zero_grad()
        rows = worker_rows(len(X), n_workers, batch, t)
        loss = sum(loss_fn(net(Xt[r]), yt[r]) for r in rows) / len(rows)
        loss.backward()
        opt.step()
    return {n: p.detach().numpy() for n, p in net.named_parameters()}


@pytest.mark.parametrize("transport", ["auto", "mpi"])
def test_sync_equals_serial_torch_sgd_momentum(transport):
    X, y, _ = digits()
    module = conv_net()
    steps, batch, lr, mu = 9, 6, 0.1, 0.9
    result = ps.train(ps.TorchModel(module, nn.CrossEntropyLoss()), (X, y), policy=ps.Sync(),
                      optimizer=ps.SGD(lr=lr, momentum=mu), batch_size=batch, steps=steps,
                      shuffle=False, dtype="float64", transport=transport)
    if WORLD.Get_rank() != 0:
        assert result is None
        return
    expected = serial_torch(module, X, y, N_WORKERS, batch, steps, lr, mu)
    assert list(result.params) == [n for n, _ in module.named_parameters()]
    moved = 0.0
    for name, p in module.named_parameters():
        got = result.params[name]
        assert got.dtype == np.float64 and got.shape == tuple(p.shape)
        np.testing.assert_allclose(got, expected[name], rtol=1e-9, atol=1e-9, err_msg=name)
        moved = max(moved, float(np.abs(got - p.detach().numpy()).max()))
    assert moved > 1e-3  # the weights really trained away from the module's own


def test_start_is_rank_0s_module_and_accuracy_is_reported():
    """Every rank builds its module with another seed: the run starts from rank 0's."""
    X, y, test = digits()
    rank = WORLD.Get_rank()
    model = ps.TorchModel(conv_net(seed=10 + rank), nn.CrossEntropyLoss())
    steps, batch, lr = 3, 8, 0.05
    result = ps.train(model, (X, y), eval_data=test, optimizer=ps.SGD(lr=lr), batch_size=batch,
                      steps=steps, shuffle=False, dtype="float64")
    if rank != 0:
        return
    expected = serial_torch(conv_net(seed=10), X, y, N_WORKERS, batch, steps, lr, 0.0)
    for name in expected:
        np.testing.assert_allclose(result.params[name], expected[name], rtol=1e-9, atol=1e-9,
                                   err_msg=name)
    last = result.history[-1]  # evaluated on the final weights, in eval mode, by the server
    scores = ps.TorchModel(conv_net(), nn.CrossEntropyLoss()).evaluate(
        expected, test.X.astype(np.float64), test.y)
    assert last["eval_accuracy"] is not None
    assert last["eval_loss"] == pytest.approx(scores["loss"], rel=1e-8)
    assert last["eval_accuracy"] == pytest.approx(scores["accuracy"])


def test_float32_run_and_torch_threads_follow_psframes_limit():
    X, y, test = digits()
    module = nn.Sequential(RecordThreads(), conv_net())
    THREADS_SEEN.clear()
    result = ps.train(ps.TorchModel(module, nn.CrossEntropyLoss()), (X, y), eval_data=test,
                      optimizer=ps.SGD(lr=0.05), batch_size=8, steps=3, threads=1)
    # The last forwards ran inside the run (worker steps; the server's evaluation).
    assert THREADS_SEEN and THREADS_SEEN[-1] == 1
    if WORLD.Get_rank() == 0:
        assert all(a.dtype == np.float32 for a in result.params.values())
        assert np.isfinite(result.history[-1]["train_loss"])


@pytest.mark.parametrize("mode", ["model", "hybrid"])
def test_model_and_hybrid_modes_are_refused(mode):
    X, y, _ = digits()
    with pytest.raises(ps.ConfigError, match="TorchModel has no layers to cut"):
        ps.train(ps.TorchModel(conv_net(), nn.CrossEntropyLoss()), (X, y), mode=mode,
                 stages=1 if mode == "hybrid" else None, batch_size=4, steps=1)
