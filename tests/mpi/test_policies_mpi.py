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
# Momentum 0.9, as a user tunes Sync: on-arrival pushes are weighted 1/N by default (before
# that weighting this test had to run at 0.5; at 0.9 Async and Mixed fell to 0.77-0.87).
MOMENTUM = 0.9
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
                             optimizer=ps.SGD(lr=0.1, momentum=MOMENTUM), batch_size=16, epochs=EPOCHS,
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


def constant_gradient_run(policy, optimizer, steps=25):
    X, y = np.zeros((64, 2)), np.zeros(64, dtype=np.int64)
    return ps.train(ConstantGradient(), (X, y), policy=policy, optimizer=optimizer,
                    batch_size=2, steps=steps, dtype="float64",
                    delay={w: 0.002 if w == 0 else 0.0005 for w in range(N_WORKERS)})


@pytest.mark.parametrize("policy", [ps.Async(), ps.SSP(1), ps.Mixed(sync_steps=3, then=ps.Async())],
                         ids=repr)
def test_default_weight_makes_a_round_of_pushes_one_sync_step(policy):
    # Read through the weights: with every gradient all ones and plain SGD, each applied
    # update moves w by exactly lr * weight, so w = -lr * (sum of the weights applied).
    lr = 0.1
    result = constant_gradient_run(policy, ps.SGD(lr=lr))

    def check():
        s = result.stats
        n_sync = 3 if isinstance(policy, ps.Mixed) else 0
        n_async = s["updates_applied"] - n_sync
        assert n_async == N_WORKERS * 25 - N_WORKERS * n_sync
        expected = -lr * (n_sync + n_async / N_WORKERS)
        np.testing.assert_allclose(result.params["w"], expected, rtol=1e-12)
        assert s["mean_update_weight"] == pytest.approx((n_sync + n_async / N_WORKERS)
                                                        / s["updates_applied"])
        assert f"1/{N_WORKERS} per push" in s["update_weighting"]
        assert "update weighting" in result.summary()
    on_server(check)


def test_raw_scale_applies_every_push_in_full():
    lr = 0.1
    result = constant_gradient_run(ps.Async(scale="none"), ps.SGD(lr=lr))

    def check():
        np.testing.assert_allclose(result.params["w"], -lr * result.stats["updates_applied"],
                                   rtol=1e-12)
        assert result.stats["mean_update_weight"] == 1.0
        assert "raw" in result.stats["update_weighting"]
    on_server(check)


def test_adam_takes_pushes_by_the_square_root_rule():
    # All-ones gradients: Adam's bias-corrected moments are exactly 1 from the first step,
    # so every push moves w by lr * sqrt(1/N) / (1 + eps).
    lr, eps = 0.01, 1e-8
    result = constant_gradient_run(ps.Async(), ps.Adam(lr=lr, eps=eps))

    def check():
        n = result.stats["updates_applied"]
        expected = -n * lr * math.sqrt(1 / N_WORKERS) / (1 + eps)
        np.testing.assert_allclose(result.params["w"], expected, rtol=1e-9)
        assert "square-root" in result.stats["update_weighting"]
    on_server(check)


def test_delay_compensation_corrects_stale_gradients_towards_the_present():
    # Weights only fall here (all-ones gradients), so w_now - w_stale < 0 for a stale push:
    # its corrected gradient 1 + lam (w_now - w_stale) is below 1, and the run moves less
    # than the uncompensated lr * sum(weights). A fresh push is left as it is.
    lr = 0.1
    dc = ps.DelayCompensation(0.5, adaptive=False)
    result = constant_gradient_run(ps.Async(compensation=dc), ps.SGD(lr=lr))

    def check():
        s = result.stats
        stale = sum(c for tau, c in s["staleness_hist"].items() if tau > 0)
        assert stale > 0
        plain = -lr * s["updates_applied"] / N_WORKERS
        w = result.params["w"][0]
        assert plain < w < 0.9 * plain  # moved, but less than uncompensated
        # Each corrected gradient is 1 - lam * lr/N * (pushes since its pull) at most a few
        # updates stale, so the run cannot have moved less than this bound.
        worst = 1 - 0.5 * lr / N_WORKERS * s["max_staleness"]
        assert w <= -lr / N_WORKERS * (s["updates_applied"] - stale + stale * worst) + 1e-12
        assert "delay-compensated, constant" in s["update_weighting"]
    on_server(check)


def test_delay_compensation_trains_digits_to_syncs_accuracy(digits):
    train, test = digits
    runs = {}
    for name, policy in (("sync", ps.Sync()), ("dc", ps.Async(compensation="dc"))):
        runs[name] = ps.train(ps.models.MLP([64, 48, 10]), train, eval_data=test,
                              policy=policy, optimizer=ps.SGD(lr=0.1, momentum=MOMENTUM),
                              batch_size=16, epochs=EPOCHS, seed=1, delay=STRAGGLER)

    def check():
        acc = {k: r.history[-1]["eval_accuracy"] for k, r in runs.items()}
        assert acc["dc"] >= acc["sync"] - 0.02, acc
        assert "adaptive" in runs["dc"].stats["update_weighting"]
    on_server(check)
