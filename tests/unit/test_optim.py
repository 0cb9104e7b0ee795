"""Optimizers: hand-computed and reference-formula updates, shards, dtype, scratch, validation."""
import math
import tracemalloc

import numpy as np
import pytest

import psframe as ps
import psframe.nn.optim
from psframe.nn.optim import SGD, Adam

W0 = [1.0, -2.0]
GRADS = [[0.5, 1.0], [0.25, -1.0], [1.0, 0.0]]


def run(opt, w0, grads, weight=1.0, dtype=np.float64):
    """Apply ``grads`` in turn; ``weight`` is one weight for all, or one per gradient."""
    w = np.array(w0, dtype=dtype)
    state = opt.init_state(w.size, dtype)
    weights = np.broadcast_to(weight, len(grads))
    history = []
    for step, (g, wt) in enumerate(zip(grads, weights), start=1):
        opt.apply(state, w, np.array(g, dtype=dtype), 0, w.size, step, float(wt))
        history.append(w.copy())
    return history


def test_sgd_momentum_by_hand():
    # v1 = [.5, 1]            w1 = [1 - .05, -2 - .1]      = [.95, -2.1]
    # v2 = .9 v1 + g2 = [.7, -.1]   w2 = [.95 - .07, -2.1 + .01] = [.88, -2.09]
    # v3 = .9 v2 + g3 = [1.63, -.09] w3 = [.88 - .163, -2.09 + .009] = [.717, -2.081]
    hist = run(SGD(lr=0.1, momentum=0.9), W0, GRADS)
    np.testing.assert_allclose(hist, [[0.95, -2.1], [0.88, -2.09], [0.717, -2.081]], rtol=1e-12)


def test_sgd_nesterov_by_hand():
    # d = g + .9 v with v as above:
    # d1 = [.95, 1.9]    w1 = [.905, -2.19]
    # d2 = [.88, -1.09]  w2 = [.817, -2.081]
    # d3 = [2.467, -.081] w3 = [.5703, -2.0729]
    hist = run(SGD(lr=0.1, momentum=0.9, nesterov=True), W0, GRADS)
    np.testing.assert_allclose(
        hist, [[0.905, -2.19], [0.817, -2.081], [0.5703, -2.0729]], rtol=1e-12
    )


def test_sgd_plain_and_weight_decay_by_hand():
    hist = run(SGD(lr=0.1), W0, GRADS)
    np.testing.assert_allclose(hist, [[0.95, -2.1], [0.925, -2.0], [0.825, -2.0]], rtol=1e-12)
    # g' = g + .5 w: step 1 g' = [1, 0] -> w = [.9, -2]; step 2 with the same g:
    # g' = [.95, 0] -> w = [.805, -2]
    hist = run(SGD(lr=0.1, weight_decay=0.5), W0, [[0.5, 1.0], [0.5, 1.0]])
    np.testing.assert_allclose(hist, [[0.9, -2.0], [0.805, -2.0]], rtol=1e-12)


def sgd_reference(w, grads, lr, mu, wd, nesterov):
    w = np.array(w, dtype=np.float64)
    v = np.zeros_like(w)
    for g in grads:
        gp = np.asarray(g) + wd * w
        v = mu * v + gp
        w = w - lr * (gp + mu * v if nesterov else v)
    return w


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_with_weight_decay_matches_formula(nesterov):
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=6)
    grads = rng.normal(size=(5, 6))
    opt = SGD(lr=0.05, momentum=0.8, weight_decay=0.01, nesterov=nesterov)
    got = run(opt, w0, grads)[-1]
    np.testing.assert_allclose(got, sgd_reference(w0, grads, 0.05, 0.8, 0.01, nesterov),
                               rtol=1e-12)


def adam_reference(w, grads, lr, b1, b2, eps, wd, lr_scale=1.0):
    """PyTorch Adam, written out from its documented update rule; ``lr_scale`` multiplies
    the step size, one factor for all steps or one per step."""
    w = np.array(w, dtype=np.float64)
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    scales = np.broadcast_to(lr_scale, len(grads))
    for t, (g, lr_scale) in enumerate(zip(grads, scales), start=1):
        g = np.asarray(g) + wd * w
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat = m / (1 - b1 ** t)
        vhat = v / (1 - b2 ** t)
        w = w - lr * lr_scale * mhat / (np.sqrt(vhat) + eps)
    return w


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adam_matches_reference(wd):
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=8)
    grads = rng.normal(size=(6, 8))
    opt = Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    got = run(opt, w0, grads)[-1]
    np.testing.assert_allclose(got, adam_reference(w0, grads, 0.01, 0.8, 0.99, 1e-6, wd),
                               rtol=1e-12)


def test_adam_first_step_moves_by_lr_times_sign():
    # Step 1: mhat = g and vhat = g^2, so the update is lr * g / (|g| + eps).
    hist = run(Adam(lr=0.01), [1.0, 1.0, 1.0], [[3.0, -0.5, 0.0]])
    np.testing.assert_allclose(hist[0], [0.99, 1.01, 1.0], rtol=1e-7)


def test_a_constant_weight_follows_each_optimizers_scaling_rule():
    rng = np.random.default_rng(2)
    w0 = rng.normal(size=5)
    grads = rng.normal(size=(3, 5))
    # SGD, linear rule: weight 0.5 throughout is SGD at half the learning rate.
    half = run(SGD(lr=0.1, momentum=0.9), w0, grads, weight=0.5)[-1]
    np.testing.assert_allclose(half, run(SGD(lr=0.05, momentum=0.9), w0, grads)[-1], rtol=1e-12)
    # Adam, square-root rule: weight 0.25 is a step of lr * 0.5, moments of the raw gradient.
    got = run(Adam(lr=0.01), w0, grads, weight=0.25)[-1]
    ref = adam_reference(w0, grads, 0.01, 0.9, 0.999, 1e-8, 0.0, lr_scale=0.5)
    np.testing.assert_allclose(got, ref, rtol=1e-12)


def weighted_sgd_reference(w, grads, weights, lr, mu, wd=0.0, nesterov=False):
    """PyTorch's SGD with each update's own contribution weighted: v = mu v + s (g + wd w)."""
    w, v = np.array(w, dtype=np.float64), 0.0
    for g, s in zip(grads, weights):
        gp = s * (np.asarray(g) + wd * w)
        v = mu * v + gp
        w = w - lr * (gp + mu * v if nesterov else v)
    return w


@pytest.mark.parametrize("nesterov, wd", [(False, 0.0), (False, 0.01), (True, 0.0), (True, 0.01)])
def test_varying_weights_scale_only_their_own_contribution_to_momentum(nesterov, wd):
    # Pushes of different weights (staleness_lr, a Mixed switch, a short last Sync step) must
    # leave the momentum buffer holding each gradient at the weight it was applied with.
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=6)
    grads = rng.normal(size=(5, 6))
    weights = [1.0, 0.25, 0.5, 1 / 3, 1.0]
    opt = SGD(lr=0.1, momentum=0.9, weight_decay=wd, nesterov=nesterov)
    got = run(opt, w0, grads, weight=weights)[-1]
    np.testing.assert_allclose(got, weighted_sgd_reference(w0, grads, weights, 0.1, 0.9, wd, nesterov),
                               rtol=1e-12)
    # Scaling the step instead (lr * s * v) would give something else: the test can tell.
    wrong = w0.copy()
    v = np.zeros(6)
    for g, s in zip(grads, weights):
        v = 0.9 * v + g + wd * wrong
        wrong = wrong - 0.1 * s * ((g + wd * wrong) + 0.9 * v if nesterov else v)
    assert not np.allclose(got, wrong, rtol=1e-6)


def test_varying_weights_in_adam_feed_raw_moments_and_count_every_step():
    rng = np.random.default_rng(8)
    w0 = rng.normal(size=6)
    grads = rng.normal(size=(5, 6))
    weights = np.array([1.0, 0.25, 0.5, 1 / 3, 1.0])
    got = run(Adam(lr=0.01, weight_decay=0.01), w0, grads, weight=weights)[-1]
    ref = adam_reference(w0, grads, 0.01, 0.9, 0.999, 1e-8, 0.01, lr_scale=np.sqrt(weights))
    np.testing.assert_allclose(got, ref, rtol=1e-12)


OPTIMIZERS = [
    SGD(lr=0.1),
    SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
    SGD(lr=0.1, momentum=0.9, nesterov=True),
    Adam(lr=0.01, weight_decay=0.01),
]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_shards_equal_whole_buffer(opt):
    rng = np.random.default_rng(3)
    w_whole = rng.normal(size=10)
    w_shard = w_whole.copy()
    s_whole = opt.init_state(10, np.float64)
    s_shard = opt.init_state(10, np.float64)
    bounds = [(0, 3), (3, 7), (7, 10)]
    for step in range(1, 4):
        g = rng.normal(size=10)
        opt.apply(s_whole, w_whole, g, 0, 10, step)
        for lo, hi in bounds:
            opt.apply(s_shard, w_shard, g[lo:hi].copy(), lo, hi, step)
    np.testing.assert_array_equal(w_shard, w_whole)
    for key in s_whole:
        if not key.startswith("_"):
            np.testing.assert_array_equal(s_shard[key], s_whole[key])


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_only_the_shard_changes_and_gradient_is_untouched(opt):
    rng = np.random.default_rng(4)
    w = rng.normal(size=10)
    before = w.copy()
    state = opt.init_state(10, np.float64)
    g = rng.normal(size=4)
    g_copy = g.copy()
    opt.apply(state, w, g, 3, 7, 1)
    np.testing.assert_array_equal(w[:3], before[:3])
    np.testing.assert_array_equal(w[7:], before[7:])
    assert not np.array_equal(w[3:7], before[3:7])
    np.testing.assert_array_equal(g, g_copy)
    with pytest.raises(ValueError, match="shard"):
        opt.apply(state, w, g, 0, 5, 2)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_float32_is_preserved(opt):
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=6)
    grads = rng.normal(size=(3, 6))
    w = w0.astype(np.float32)
    state = opt.init_state(6, np.float32)
    assert all(a.dtype == np.float32 and a.shape == (6,) for a in state.values())
    for step, g in enumerate(grads, start=1):
        opt.apply(state, w, g.astype(np.float32), 0, 6, step, weight=np.float64(0.5))
    assert w.dtype == np.float32
    assert all(a.dtype == np.float32 for a in state.values())
    ref = run(opt, w0, grads, weight=0.5)[-1]
    np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=repr)
def test_apply_does_not_allocate_buffers(opt):
    n = 200_000
    w = np.ones(n)
    g = np.full(n, 0.5)
    state = opt.init_state(n, np.float64)
    opt.apply(state, w, g, 0, n, 1)
    tracemalloc.start()
    try:
        opt.apply(state, w, g, 0, n, 2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < n * 8 // 10  # far below one shard-sized temporary


@pytest.mark.parametrize(
    "opt",
    [
        SGD(lr=0.0), SGD(lr=-0.1), SGD(lr=math.inf), SGD(lr=math.nan), SGD(lr="0.1"),
        SGD(momentum=1.0), SGD(momentum=-0.1), SGD(weight_decay=-1e-4),
        SGD(nesterov=True),
        Adam(lr=0.0), Adam(betas=(1.0, 0.999)), Adam(betas=(0.9, -0.1)),
        Adam(betas=(0.9,)), Adam(eps=0.0), Adam(eps=-1e-8), Adam(weight_decay=-1.0),
    ],
    ids=repr,
)
def test_validate_rejects_bad_hyperparameters(opt):
    with pytest.raises(ValueError):
        opt.validate()


def test_validate_accepts_defaults_and_repr_names():
    for opt in [SGD(), SGD(lr=0.1, momentum=0.9, nesterov=True), Adam(), Adam(weight_decay=0.1)]:
        assert opt.validate() is None
    assert repr(SGD(lr=0.1, momentum=0.9)) == "SGD(lr=0.1, momentum=0.9)"
    assert repr(Adam()) == "Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08)"
    assert SGD().name == "sgd" and Adam().name == "adam"


def test_adam_rejects_step_zero():
    opt = Adam()
    state = opt.init_state(2, np.float64)
    with pytest.raises(ValueError, match="step"):
        opt.apply(state, np.zeros(2), np.zeros(2), 0, 2, 0)


@pytest.mark.parametrize("make", [
    lambda: ps.SGD(lr=0.1),
    lambda: ps.SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
    lambda: ps.SGD(lr=0.1, momentum=0.9, nesterov=True),
    lambda: ps.Adam(lr=0.01, weight_decay=0.01),
])
def test_chunked_scratch_gives_the_same_steps(monkeypatch, make):
    # Scratch holds one chunk; a shard longer than a chunk (and not a multiple of it) must be
    # stepped exactly as in one piece.
    rng = np.random.default_rng(0)
    n, lo, hi = 50, 3, 48
    grads = [rng.normal(size=hi - lo) for _ in range(3)]
    results = []
    for chunk in (1 << 18, 7):
        monkeypatch.setattr(psframe.nn.optim, "SCRATCH_ELEMS", chunk)
        opt = make()
        state = opt.init_state(n, np.float64)
        w = np.linspace(-1, 1, n)
        for step, g in enumerate(grads, start=1):
            opt.apply(state, w, g, lo, hi, step)
        results.append(w)
    np.testing.assert_array_equal(results[0], results[1])
