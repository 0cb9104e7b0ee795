"""Model and hybrid parallel against serial SGD, bytes per stage, accuracy, and refused splits."""
import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
from psframe.worker import gpipe_bubble, plan_stages
from serial_reference import SerialSGD, assert_params_match, mlp_init, serial_mlp

pytestmark = pytest.mark.mpi(min_size=3)

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1
SIZES = [6, 9, 8, 7, 3]  # four Dense layers: up to four stages


def blobs(n_rows=61, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n_rows)
    return rng.normal(size=(3, 6))[y] + 0.7 * rng.normal(size=(n_rows, 6)), y


def check_against_serial(mode, micro_batches, shuffle, n_pipelines, **kw):
    X, y = blobs()
    init = mlp_init(SIZES, np.random.default_rng(3))
    steps, batch = 9, 8
    result = ps.train(ps.models.MLP(SIZES), (X, y), mode=mode, micro_batches=micro_batches,
                      optimizer=ps.SGD(lr=0.2, momentum=0.9), batch_size=batch, steps=steps,
                      shuffle=shuffle, seed=5, dtype="float64", init=init, **kw)
    if WORLD.Get_rank():
        assert result is None
        return None
    assert_params_match(result.params, serial_mlp(SIZES, init, X, y, n_pipelines, batch, steps,
                                                  SerialSGD(0.2, 0.9), shuffle, seed=5))
    return result


@pytest.mark.parametrize("transport", ["auto", "mpi"])
@pytest.mark.parametrize("micro_batches", [1, 4])
@pytest.mark.parametrize("shuffle", [False, True])
def test_model_mode_equals_serial(micro_batches, shuffle, transport):
    result = check_against_serial("model", micro_batches, shuffle, n_pipelines=1,
                                  transport=transport)
    if result is not None:
        assert result.stats["n_workers"] == N_WORKERS
        assert len(result.stats["stage_idle_share"]) == N_WORKERS


@pytest.mark.mpi(min_size=5)
@pytest.mark.parametrize("micro_batches", [1, 4])
def test_hybrid_2x2_equals_serial(micro_batches):
    if N_WORKERS != 4:
        pytest.skip("hybrid 2x2 needs exactly 4 workers")
    check_against_serial("hybrid", micro_batches, False, n_pipelines=2, stages=2)


def test_each_stage_moves_only_its_slice():
    X, y = blobs()
    steps = 5
    model = ps.models.MLP(SIZES)
    result = ps.train(model, (X, y), mode="model", batch_size=4, steps=steps, micro_batches=2)
    if WORLD.Get_rank():
        return
    stages = plan_stages(model, N_WORKERS, 4)
    shapes = model.param_shapes()
    for k, layers in enumerate(stages):
        n = sum(int(np.prod(shapes[name])) for i in layers for name in model.layer_param_names(i))
        assert result.stats["bytes_pulled_per_worker"][k] == n * 4 * steps
        assert result.stats["bytes_pushed_per_worker"][k] == n * 4 * steps
    assert result.stats["bytes_pulled"] == sum(result.stats["bytes_pulled_per_worker"])


def test_model_mode_reaches_95_percent_on_digits():
    train, test = ps.data.digits(seed=0)
    result = ps.train(ps.models.MLP([64, 96, 64, 48, 10]), train, eval_data=test, mode="model",
                      micro_batches=4, optimizer=ps.SGD(lr=0.1, momentum=0.9), batch_size=32,
                      epochs=15, seed=0)
    if WORLD.Get_rank() == 0:
        assert result.history[-1]["eval_accuracy"] >= 0.95, result.history[-1]


@pytest.mark.mpi(min_size=5)
def test_hybrid_reaches_95_percent_on_digits():
    if N_WORKERS % 2:
        pytest.skip("hybrid with 2 stages needs an even worker count")
    train, test = ps.data.digits(seed=0)
    result = ps.train(ps.models.MLP([64, 128, 10]), train, eval_data=test, mode="hybrid",
                      stages=2, micro_batches=2, optimizer=ps.SGD(lr=0.1, momentum=0.9),
                      batch_size=32, epochs=15, seed=0)
    if WORLD.Get_rank() == 0:
        assert result.history[-1]["eval_accuracy"] >= 0.95, result.history[-1]


def refused(match, model=None, **kw):
    X, y = blobs()
    with pytest.raises(ps.ConfigError, match=match):
        ps.train(model or ps.models.MLP(SIZES), (X, y), steps=1, **kw)
    WORLD.Barrier()


def test_too_few_layers_for_the_stages_is_refused():
    refused("too few", model=ps.models.MLP([6, 3]), mode="model")


def test_custom_model_without_layers_is_refused():
    class Custom(ps.Model):
        def init_params(self, rng):
            return {"w": np.zeros((6, 3))}

        def loss_and_grad(self, params, X, y):
            return 0.0, {"w": np.zeros((6, 3))}

    refused("no layers to cut", model=Custom(), mode="model")


def test_bad_manual_stages_are_refused():
    # MLP(SIZES) is Dense, ReLU, Dense, ReLU, Dense, ReLU, Dense: layers 0..6.
    refused("cover layers", mode="model", stages=[[0, 1]] * N_WORKERS)
    refused("no parameters", mode="model", stages=[list(range(7))] + [[]] * (N_WORKERS - 1))
    if N_WORKERS == 3:
        refused("no parameters", mode="model", stages=[[0, 1, 2, 3, 4], [5], [6]])
    refused("stages lists", mode="model", stages=[list(range(7))])


def test_hybrid_needs_divisible_workers():
    if N_WORKERS % 2:
        refused("divisible", mode="hybrid", stages=2)
    refused("needs stages", mode="hybrid")
    refused("micro_batches", mode="model", micro_batches=100, batch_size=4)
    refused("apply to mode", micro_batches=2)


def test_gpipe_estimate():
    assert gpipe_bubble(1, 4) == 0.0
    assert gpipe_bubble(4, 1) == pytest.approx(0.75)
    assert gpipe_bubble(3, 4) == pytest.approx(2 / 6)
