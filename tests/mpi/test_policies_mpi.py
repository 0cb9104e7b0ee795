"""Every policy under a real straggler: bounds enforced, staleness measured, accuracy reached."""
import math

import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps

pytestmark = [pytest.mark.mpi(min_size=3)]

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1
EPOCHS = 15  # every policy at 2 to 4 workers clears 0.93 by 0.02 or more (10 left dynamic at 0.92)
# Momentum 0.5, not 0.9: at 4 workers staleness adds momentum of its own, and with 0.9
# Async and Mixed fell to 0.77-0.87 (docs/policies.md, "Learning rate under Async and SSP").
STRAGGLER = {0: 0.004}  # worker 0 sleeps 4 ms per step: several times a fast step here

POLICIES = {
    "sync": dict(policy=ps.Sync()),
    "ssp0": dict(policy=ps.SSP(0)),
    "ssp2": dict(policy=ps.SSP(2)),
    "async": dict(policy=ps.Async()),
    "async_lr": dict(policy=ps.Async(staleness_lr=True)),
    "backup": dict(policy=ps.Sync(backup=1)),
    "mixed": dict(policy=ps.Mixed(sync_steps=30, then=ps.Async())),
    "dynamic": dict(policy=ps.Async(), dispatch="dynamic"),
}


@pytest.fixture(scope="module")
def digits():
    return ps.data.digits(seed=0)


@pytest.fixture(scope="module")
def runs(digits):
    """One straggler run per policy, shared by the tests below (all ranks, same order)."""
    train, test = digits
    out = {}
    for name, kw in POLICIES.items():
        out[name] = ps.train(ps.models.MLP([64, 48, 10]), train, eval_data=test,
                             optimizer=ps.SGD(lr=0.1, momentum=0.5), batch_size=16, epochs=EPOCHS,
                             seed=1, delay=STRAGGLER, **kw)
    return out


def on_server(fn):
    return fn() if WORLD.Get_rank() == 0 else None


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_reaches_93_percent_on_digits(runs, name):
    result = runs[name]
    if WORLD.Get_rank():
        assert result is None
        return
    assert result.history[-1]["eval_accuracy"] >= 0.93, (name, result.history[-1])


def test_ssp2_bounds_the_clock_gap_and_async_does_not(runs):
    def check():
        assert runs["ssp2"].stats["max_clock_gap"] <= 2
        assert max(runs["ssp2"].stats["clock_gap_hist"]) <= 2
        # Same straggler, no bound: the fast workers run far ahead. So the bound is real.
        assert runs["async"].stats["max_clock_gap"] > 2
        assert runs["async"].stats["max_staleness"] > 0
    on_server(check)


@pytest.mark.parametrize("name", ["sync", "ssp0"])
def test_sync_and_ssp0_keep_lock_step(runs, name):
    on_server(lambda: _lock_step(runs[name]))


def _lock_step(result):
    assert result.stats["max_clock_gap"] == 0
    assert set(result.stats["clock_gap_hist"]) == {0}


def test_sync_staleness_is_zero_and_async_is_recorded(runs):
    def check():
        assert runs["sync"].stats["staleness_hist"] == {0: runs["sync"].stats["updates_applied"]}
        hist = runs["async"].stats["staleness_hist"]
        assert sum(hist.values()) == runs["async"].stats["updates_applied"]
    on_server(check)


def test_backup_worker_gradients_are_dropped(runs):
    def check():
        s = runs["backup"].stats
        assert s["updates_dropped"] > 0
        assert s["pushes_received"] == sum(s["steps_per_worker"])
    on_server(check)


def test_mixed_switches_once_at_k(runs):
    def check():
        assert runs["mixed"].stats["policy_switches"] == [30]
    on_server(check)


def test_dynamic_dispatch_trains_every_batch_once(runs, digits):
    def check():
        s = runs["dynamic"].stats
        n_batches = EPOCHS * math.ceil(len(digits[0]) / 16)
        assert len(s["batch_counts"]) == n_batches
        assert set(s["batch_counts"]) == {1}
        assert sum(s["steps_per_worker"]) == n_batches
        # The straggler takes fewer batches: that is the point of dispatching on request.
        assert s["steps_per_worker"][0] < min(s["steps_per_worker"][1:])
    on_server(check)


class ConstantGradient(ps.Model):
    """loss = sum(w): every gradient is ones, so the weights record the applied step sizes."""

    def init_params(self, rng):
        return {"w": np.zeros(4)}

    def loss_and_grad(self, params, X, y):
        return float(params["w"].sum()), {"w": np.ones_like(params["w"])}


def test_staleness_lr_applies_lr_over_tau():
    X, y = np.zeros((64, 2)), np.zeros(64, dtype=np.int64)
    lr = 0.1
    result = ps.train(ConstantGradient(), (X, y), policy=ps.Async(staleness_lr=True),
                      optimizer=ps.SGD(lr=lr), batch_size=2, steps=25, dtype="float64",
                      # Every worker sleeps, so the fast ones' 25 steps cannot all fit before
                      # or after the slow one's (that left every update at staleness 0, 2 in 15).
                      delay={w: 0.002 if w == 0 else 0.0005 for w in range(N_WORKERS)})

    def check():
        hist = result.stats["staleness_hist"]
        assert max(hist) >= 2  # some updates were stale enough for the scaling to matter
        expected = -lr * sum(count / max(1, tau) for tau, count in hist.items())
        np.testing.assert_allclose(result.params["w"], expected, rtol=1e-12)
        plain = -lr * sum(hist.values())
        assert not np.isclose(result.params["w"][0], plain)
    on_server(check)
