"""Bad input fails with one clear ConfigError on every rank, before any work, and no hang."""
import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD


def data(n=40, f=6, classes=3):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, f)), rng.integers(0, classes, n)


def expect_error(match, model=None, train_data=None, **kw):
    model = model or ps.models.MLP([6, 8, 3])
    train_data = data() if train_data is None else train_data
    with pytest.raises(ps.ConfigError, match=match):
        ps.train(model, train_data, steps=2, **kw)
    # Every rank raised, so every rank reaches this barrier: nobody is stuck in training.
    WORLD.Barrier()


def test_wrong_feature_count():
    expect_error("features", train_data=data(f=5))


def test_labels_out_of_range():
    X, y = data()
    y[7] = 3
    expect_error("labels", train_data=(X, y))


def test_negative_label():
    X, y = data()
    y[0] = -1
    expect_error("labels", train_data=(X, y))


def test_non_finite_data():
    X, y = data()
    X[3, 2] = np.nan
    expect_error("non-finite", train_data=(X, y))


def test_non_finite_eval_data():
    X, y = data()
    X[0, 0] = np.inf
    expect_error("non-finite", eval_data=(X, y))


def test_too_few_ranks():
    with pytest.raises(ps.ConfigError, match="at least 2 MPI ranks"):
        ps.train(ps.models.MLP([6, 8, 3]), data(), steps=1, comm=MPI.COMM_SELF)


@pytest.mark.parametrize("kw, match", [
    ({"policy": "bogus"}, "unknown policy"),
    ({"mode": "pipeline"}, "unknown mode"),
    ({"batch_size": 0}, "batch_size"),
    ({"dtype": "float16"}, "dtype"),
    ({"optimizer": ps.SGD(lr=-1.0)}, "lr"),
    ({"init": {"0.W": np.zeros((6, 8))}}, "missing"),
    ({"on_bad_gradient": "ignore"}, "on_bad_gradient"),
    ({"stall_timeout": -1}, "stall_timeout must be a positive number"),
    ({"stall_timeout": True}, "stall_timeout must be a positive number"),
    ({"stop_timeout": 0}, "stop_timeout must be a positive number"),
    ({"stop_timeout": float("nan")}, "stop_timeout must be a positive number"),
])
def test_bad_options(kw, match):
    expect_error(match, **kw)


def test_unknown_keyword_is_a_type_error_everywhere():
    with pytest.raises(TypeError, match="unexpected keyword"):
        ps.train(ps.models.MLP([6, 8, 3]), data(), steps=1, learning_rate=0.1)


def test_error_on_one_rank_only_reaches_all():
    class RankSensitive(ps.models.MLP):
        def validate_data(self, X, y):
            if WORLD.Get_rank() == WORLD.Get_size() - 1:
                raise ValueError("this rank's copy of the data is bad")

    expect_error("this rank's copy", model=RankSensitive([6, 8, 3]))


def test_model_that_crashes_on_data_is_refused_before_training():
    class Broken(ps.Model):
        def init_params(self, rng):
            return {"w": np.zeros(3)}

        def loss_and_grad(self, params, X, y):
            return 0.0, {"w": np.zeros(4)}

    expect_error("gradient 'w' has shape", model=Broken())
