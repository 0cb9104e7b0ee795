"""Adagrad and the row-wise (lazy) optimizer steps: torch, per-row references, dense, errors."""
import math
import tracemalloc

import numpy as np
import pytest
import torch

import psframe as ps
from psframe.nn import sparse_optim
from psframe.nn.optim import SGD, Adagrad, Adam, Optimizer

N_ROWS, DIM = 10, 3
# Overlapping id sets: rows 0 and 9 are never touched, row 4 every step, others now and then.
ID_SETS = [[1, 4, 7], [2, 4], [1, 3, 4, 8], [4, 7], [2, 3, 4, 5, 6]]


def sparse_steps(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return [(np.array(ids, np.int64), rng.normal(size=(len(ids), DIM)).astype(dtype))
            for ids in ID_SETS]


def table0(dtype=np.float64):
    return np.random.default_rng(42).normal(size=(N_ROWS, DIM)).astype(dtype)


def run_rows(opt, steps, weights=None, dtype=np.float64):
    table = table0(dtype)
    state = opt.init_rows_state(N_ROWS, DIM, dtype)
    weights = [1.0] * len(steps) if weights is None else weights
    for (ids, g), s in zip(steps, weights):
        opt.apply_rows(state, table, ids, g, s)
    return table, state


def run_dense(opt, steps, weights=None):
    """The same gradients as dense ones: zero on the rows a step did not touch."""
    w = table0().reshape(-1)
    state = opt.init_state(w.size, np.float64)
    weights = [1.0] * len(steps) if weights is None else weights
    for step, ((ids, g), s) in enumerate(zip(steps, weights), start=1):
        dense = np.zeros((N_ROWS, DIM))
        dense[ids] = g
        opt.apply(state, w, dense.reshape(-1), 0, w.size, step, s)
    return w.reshape(N_ROWS, DIM), state


WEIGHTS = [1.0, 0.25, 0.5, 1 / 3, 1.0]

# --- dense Adagrad ------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{}, dict(lr=0.05, eps=1e-6, initial_accumulator_value=0.3,
                                         weight_decay=0.1)], ids=repr)
def test_adagrad_matches_torch(kw):
    rng = np.random.default_rng(1)
    w0, grads = rng.normal(size=8), rng.normal(size=(6, 8))
    opt = Adagrad(**kw)
    assert opt.validate() is None
    w, state = w0.copy(), opt.init_state(8, np.float64)
    p = torch.tensor(w0, requires_grad=True)
    ref = torch.optim.Adagrad([p], **kw)
    for step, g in enumerate(grads, start=1):
        opt.apply(state, w, g.copy(), 0, 8, step)
        p.grad = torch.tensor(g)
        ref.step()
    np.testing.assert_allclose(w, p.detach().numpy(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(state["sum"], ref.state[p]["sum"].numpy(), rtol=1e-12)


def test_adagrad_defaults_are_torchs():
    opt, ref = Adagrad(), torch.optim.Adagrad([torch.zeros(1)]).defaults
    assert (opt.lr, opt.eps, opt.initial_accumulator_value, opt.weight_decay) == (
        ref["lr"], ref["eps"], ref["initial_accumulator_value"], ref["weight_decay"])
    assert opt.name == "adagrad" and ps.Adagrad is Adagrad
    assert repr(opt) == "Adagrad(lr=0.01, eps=1e-10)"


def adagrad_reference(w, grads, weights, lr, eps, acc0, wd):
    """Adagrad written out, each push counted as ``weight`` of a step."""
    w = np.array(w, dtype=np.float64)
    acc = np.full_like(w, acc0)
    for g, s in zip(grads, weights):
        g = np.asarray(g) + wd * w
        acc = acc + s * g * g
        w = w - lr * s * g / (np.sqrt(acc) + eps)
    return w


def test_adagrad_weight_scales_the_step_and_the_accumulator():
    rng = np.random.default_rng(2)
    w0, grads = rng.normal(size=6), rng.normal(size=(5, 6))
    opt = Adagrad(lr=0.1, initial_accumulator_value=0.1, weight_decay=0.01)
    w, state = w0.copy(), opt.init_state(6, np.float64)
    for step, (g, s) in enumerate(zip(grads, WEIGHTS), start=1):
        opt.apply(state, w, g, 0, 6, step, s)
    ref = adagrad_reference(w0, grads, WEIGHTS, 0.1, 1e-10, 0.1, 0.01)
    np.testing.assert_allclose(w, ref, rtol=1e-12)


@pytest.mark.parametrize("opt", [
    Adagrad(lr=0.0), Adagrad(lr=-1.0), Adagrad(eps=0.0), Adagrad(eps=math.nan),
    Adagrad(initial_accumulator_value=-0.1), Adagrad(weight_decay=-1e-4),
    Adagrad(initial_accumulator_value="1"),
], ids=repr)
def test_adagrad_validate_rejects_bad_hyperparameters(opt):
    with pytest.raises(ValueError):
        opt.validate()


# --- row-wise steps against dense and hand-written references -----------------------------


@pytest.mark.parametrize("opt", [SGD(lr=0.1), Adagrad(lr=0.1),
                                 Adagrad(lr=0.1, initial_accumulator_value=0.5)], ids=repr)
def test_rows_equal_dense_bitwise_where_zero_gradients_change_nothing(opt):
    # Plain SGD and Adagrad without decay leave a row with zero gradient exactly as it was,
    # so stepping only the touched rows is the dense step, bit for bit, weights included.
    steps = sparse_steps()
    table, state = run_rows(opt, steps, WEIGHTS)
    dense, dense_state = run_dense(opt, steps, WEIGHTS)
    np.testing.assert_array_equal(table, dense)
    np.testing.assert_array_equal(table[[0, 9]], table0()[[0, 9]])
    for key in state:
        if not key.startswith("_"):
            np.testing.assert_array_equal(state[key], dense_state[key].reshape(N_ROWS, DIM))


ALL_ROWS = [SGD(lr=0.1), SGD(lr=0.1, momentum=0.9, weight_decay=0.01),
            SGD(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01),
            Adagrad(lr=0.1, weight_decay=0.01), Adam(lr=0.01, weight_decay=0.01)]


@pytest.mark.parametrize("opt", ALL_ROWS, ids=repr)
def test_every_row_touched_every_step_is_the_dense_step_bitwise(opt):
    rng = np.random.default_rng(3)
    ids = np.arange(N_ROWS, dtype=np.int64)
    steps = [(ids, rng.normal(size=(N_ROWS, DIM))) for _ in range(4)]
    weights = [1.0, 0.5, 0.25, 1.0]
    table, state = run_rows(opt, steps, weights)
    dense, dense_state = run_dense(opt, steps, weights)
    np.testing.assert_array_equal(table, dense)
    for key in dense_state:
        if not key.startswith("_"):
            np.testing.assert_array_equal(state[key], dense_state[key].reshape(N_ROWS, DIM))


def lazy_sgd_reference(steps, weights, lr, mu, wd, nesterov):
    """SGD whose momentum, decay and step touch a row only when its id is pushed."""
    w, v = table0(), np.zeros((N_ROWS, DIM))
    for (ids, g), s in zip(steps, weights):
        for r, gr in zip(ids, g):
            gp = s * (gr + wd * w[r])
            v[r] = mu * v[r] + gp
            w[r] = w[r] - lr * (gp + mu * v[r] if nesterov else v[r])
    return w, v


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_rows_momentum_is_lazy(nesterov):
    steps = sparse_steps(4)
    opt = SGD(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=nesterov)
    table, state = run_rows(opt, steps, WEIGHTS)
    ref_w, ref_v = lazy_sgd_reference(steps, WEIGHTS, 0.1, 0.9, 0.01, nesterov)
    np.testing.assert_allclose(table, ref_w, rtol=1e-12)
    np.testing.assert_allclose(state["momentum"], ref_v, rtol=1e-12)
    # Dense momentum keeps moving (and decaying) a row after its last touch; lazy does not.
    dense, _ = run_dense(opt, steps, WEIGHTS)
    assert not np.allclose(dense[1], table[1], rtol=1e-6)  # row 1: last touched at step 3
    np.testing.assert_array_equal(table[[0, 9]], table0()[[0, 9]])


def lazy_adam_reference(steps, weights, lr, b1, b2, eps, wd):
    """Adam whose moments and step count are per row and move only when the row is pushed."""
    w, m, v = table0(), np.zeros((N_ROWS, DIM)), np.zeros((N_ROWS, DIM))
    count = np.zeros(N_ROWS, int)
    for (ids, g), s in zip(steps, weights):
        for r, gr in zip(ids, g):
            count[r] += 1
            gr = gr + wd * w[r]
            m[r] = b1 * m[r] + (1 - b1) * gr
            v[r] = b2 * v[r] + (1 - b2) * gr * gr
            mhat, vhat = m[r] / (1 - b1 ** count[r]), v[r] / (1 - b2 ** count[r])
            w[r] = w[r] - lr * math.sqrt(s) * mhat / (np.sqrt(vhat) + eps)
    return w, m, v, count


def test_adam_rows_have_lazy_moments_and_their_own_step_counts():
    steps = sparse_steps(5)
    opt = Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)
    table, state = run_rows(opt, steps, WEIGHTS)
    ref_w, ref_m, ref_v, count = lazy_adam_reference(steps, WEIGHTS, 0.01, 0.8, 0.99, 1e-6,
                                                     0.01)
    np.testing.assert_allclose(table, ref_w, rtol=1e-12)
    np.testing.assert_allclose(state["exp_avg"], ref_m, rtol=1e-12)
    np.testing.assert_allclose(state["exp_avg_sq"], ref_v, rtol=1e-12)
    np.testing.assert_array_equal(state["steps"], count)
    assert list(count) == [0, 2, 2, 2, 5, 1, 1, 2, 1, 0]
    # Dense Adam moves every row its moments reach, touched this step or not.
    dense, _ = run_dense(opt, steps, WEIGHTS)
    assert not np.allclose(dense, table, rtol=1e-6)
    assert not np.allclose(dense[1], table[1], rtol=1e-6)
    np.testing.assert_array_equal(table[[0, 9]], table0()[[0, 9]])


def test_rows_split_over_servers_equal_one_table():
    # Row state is partitioned by row: two halves stepped apart equal the whole, state too.
    opt = Adam(lr=0.01, weight_decay=0.01)
    steps = sparse_steps(6)
    whole, whole_state = run_rows(opt, steps)
    halves = [table0()[:5].copy(), table0()[5:].copy()]
    states = [opt.init_rows_state(5, DIM, np.float64) for _ in halves]
    for ids, g in steps:
        for k, (half, state) in enumerate(zip(halves, states)):
            mine = (ids >= 5 * k) & (ids < 5 * (k + 1))
            opt.apply_rows(state, half, ids[mine] - 5 * k, g[mine])
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    for key in ("exp_avg", "exp_avg_sq", "steps"):
        np.testing.assert_array_equal(np.concatenate([s[key] for s in states]),
                                      whole_state[key])


def test_bias_correction_table_is_pythons_pow_and_saturates():
    for beta, sqrt in ((0.9, False), (0.999, True)):
        corr = sparse_optim.BiasCorrection(beta, sqrt)
        steps = np.array([1, 7, 3, 40, 2000, 10 ** 9], np.int64)
        got = corr.take(steps, np.zeros(len(steps)))
        want = [math.sqrt(1 - beta ** k) if sqrt else 1 - beta ** k for k in steps.tolist()]
        assert list(got) == want
        assert corr.complete and len(corr.values) < 40_000


# --- the table, ids and state: views, dtypes, scratch, keys ------------------------------


def test_table_may_be_a_view_into_a_flat_buffer():
    flat = np.arange(40, dtype=np.float64)
    before = flat.copy()
    table = flat[5:5 + N_ROWS * DIM].reshape(N_ROWS, DIM)
    opt = SGD(lr=0.5)
    opt.apply_rows(opt.init_rows_state(N_ROWS, DIM, np.float64), table,
                   np.array([2, 6]), np.ones((2, DIM)))
    changed = np.flatnonzero(flat != before)
    assert list(changed) == [5 + 2 * DIM + j for j in range(DIM)] + \
        [5 + 6 * DIM + j for j in range(DIM)]
    np.testing.assert_array_equal(flat[changed], before[changed] - 0.5)


@pytest.mark.parametrize("opt", ALL_ROWS, ids=repr)
def test_a_strided_table_steps_as_a_contiguous_one(opt):
    # Rows that are not contiguous in memory take NumPy's general path; same result.
    wide = np.zeros((N_ROWS, DIM + 2))
    wide[:, 1:-1] = table0()
    table = wide[:, 1:-1]
    state = opt.init_rows_state(N_ROWS, DIM, np.float64)
    for ids, g in sparse_steps(10):
        opt.apply_rows(state, table, ids, g)
    np.testing.assert_array_equal(table, run_rows(opt, sparse_steps(10))[0])
    assert not wide[:, [0, -1]].any()


@pytest.mark.parametrize("opt", ALL_ROWS, ids=repr)
def test_float32_is_preserved(opt):
    steps32 = sparse_steps(7, np.float32)
    table, state = run_rows(opt, steps32, WEIGHTS, np.float32)
    assert table.dtype == np.float32
    for key, value in state.items():
        want = np.int64 if key in ("steps", "_steps") else (
            np.float64 if key in ("_c1", "_c2") else np.bool_ if key == "_ok" else np.float32)
        assert value.dtype == want, key
    ref, _ = run_rows(opt, [(i, g.astype(np.float64)) for i, g in steps32], WEIGHTS)
    np.testing.assert_allclose(table, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opt, keys", [
    (SGD(), set()), (SGD(momentum=0.9), {"momentum"}), (Adagrad(), {"sum"}),
    (Adam(), {"exp_avg", "exp_avg_sq", "steps"}),
], ids=repr)
def test_state_keys_and_shapes_are_stable(opt, keys):
    state = opt.init_rows_state(N_ROWS, DIM, np.float64)
    saved = {k for k in state if not k.startswith("_")}
    assert saved == keys
    for k in saved:
        assert state[k].shape == ((N_ROWS,) if k == "steps" else (N_ROWS, DIM))
    assert state.get("steps", np.zeros(1, np.int64)).dtype == np.int64
    before = set(state)
    for ids, g in sparse_steps(8):
        opt.apply_rows(state, table0(), ids, g)
    assert set(state) == before
    if isinstance(opt, Adagrad):
        assert (Adagrad(initial_accumulator_value=0.25).init_rows_state(2, 2, "f8")["sum"]
                == 0.25).all()


@pytest.mark.parametrize("opt", ALL_ROWS, ids=repr)
def test_blocks_of_rows_give_the_same_steps(monkeypatch, opt):
    # Rows are stepped a scratch-sized block at a time; many small blocks equal one.
    results = []
    for elems in (1 << 16, 2 * DIM):
        monkeypatch.setattr(sparse_optim, "ROW_SCRATCH_ELEMS", elems)
        results.append(run_rows(opt, sparse_steps(9), WEIGHTS))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    for key in results[0][1]:
        if not key.startswith("_"):
            np.testing.assert_array_equal(results[0][1][key], results[1][1][key])


@pytest.mark.parametrize("opt", ALL_ROWS, ids=repr)
def test_scratch_grows_to_a_block_and_steps_do_not_allocate(opt):
    n_rows, dim, n = 100_000, 32, 3000  # two blocks of rows
    table = np.zeros((n_rows, dim))
    state = opt.init_rows_state(n_rows, dim, np.float64)
    assert state["_w"].shape == (64, dim)  # small until a step needs more
    ids = np.arange(0, 3 * n, 3, dtype=np.int64)
    g = np.full((n, dim), 0.5)
    opt.apply_rows(state, table, ids, g)
    block = sparse_optim.block_rows(dim)
    assert state["_w"].shape == (min(n, block), dim)
    tracemalloc.start()
    try:
        opt.apply_rows(state, table, ids, g)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Far below one block's gathered rows (NumPy's broadcasting holds a fixed 64 KiB buffer).
    assert peak < block * dim * 8 // 4


def test_no_ids_is_a_no_op():
    table = table0()
    opt = Adam()
    state = opt.init_rows_state(N_ROWS, DIM, np.float64)
    opt.apply_rows(state, table, np.zeros(0, np.int64), np.zeros((0, DIM)))
    np.testing.assert_array_equal(table, table0())
    assert not state["steps"].any()


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize("table, ids, g, words", [
    (np.zeros(N_ROWS * DIM), [1], np.zeros((1, DIM)), "table must be"),
    (None, np.array([[1]]), np.zeros((1, DIM)), "ids must be a 1-d integer"),
    (None, np.array([1.0]), np.zeros((1, DIM)), "ids must be a 1-d integer"),
    (None, [1], np.zeros((1, DIM)), "ids must be a 1-d integer"),
    (None, np.array([1, 2]), np.zeros((1, DIM)), "does not fit 2 ids"),
    (None, np.array([1]), np.zeros((1, DIM + 1)), "of dim 3"),
    (None, np.array([-1, 2]), np.zeros((2, DIM)), r"in \[0, 10\)"),
    (None, np.array([2, N_ROWS]), np.zeros((2, DIM)), r"in \[0, 10\)"),
    (None, np.array([3, 2]), np.zeros((2, DIM)), "unique and sorted"),
    (None, np.array([1, 2, 2, 5]), np.zeros((4, DIM)), "unique and sorted"),
], ids=lambda v: v if isinstance(v, str) else None)
@pytest.mark.parametrize("opt", [SGD(momentum=0.9), Adagrad(), Adam()], ids=repr)
def test_bad_rows_are_refused_and_nothing_is_written(opt, table, ids, g, words):
    state = opt.init_rows_state(N_ROWS, DIM, np.float64)
    table = table0() if table is None else table
    saved = {k: v.copy() for k, v in state.items() if not k.startswith("_")}
    before = table.copy()
    with pytest.raises(ValueError, match=words):
        opt.apply_rows(state, table, ids, np.ones_like(g))
    np.testing.assert_array_equal(table, before)
    for k, v in saved.items():
        np.testing.assert_array_equal(state[k], v)


def test_state_of_another_table_is_refused():
    opt = Adam()
    for rows, dim in ((N_ROWS + 1, DIM), (N_ROWS, DIM + 1)):
        state = opt.init_rows_state(rows, dim, np.float64)
        with pytest.raises(ValueError, match="was not made for a table of shape"):
            opt.apply_rows(state, table0(), np.array([1]), np.zeros((1, DIM)))
    state = SGD().init_rows_state(N_ROWS, DIM + 1, np.float64)  # scratch only, still checked
    with pytest.raises(ValueError, match="was not made for"):
        SGD().apply_rows(state, table0(), np.array([1]), np.zeros((1, DIM)))
    state = opt.init_rows_state(N_ROWS, DIM, np.float32)
    with pytest.raises(ValueError, match="made for float32 tables does not fit a float64"):
        opt.apply_rows(state, table0(), np.array([1]), np.zeros((1, DIM)))


@pytest.mark.parametrize("n_rows, dim", [(0, 3), (3, 0), (-1, 3), (2.5, 3), (True, 3),
                                         (3, "4")])
def test_init_rows_state_refuses_bad_sizes(n_rows, dim):
    with pytest.raises(ValueError, match="must be a positive integer"):
        SGD().init_rows_state(n_rows, dim, np.float64)


def test_an_optimizer_without_a_row_step_says_so():
    opt = Optimizer(lr=0.1)
    state = opt.init_rows_state(N_ROWS, DIM, np.float64)
    with pytest.raises(NotImplementedError, match="no row-wise step"):
        opt.apply_rows(state, table0(), np.array([1]), np.zeros((1, DIM)))
