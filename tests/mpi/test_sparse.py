"""Row-sparse tables over MPI: Sync equals PyTorch, only touched rows move, Hybrid, resume."""
import os

import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
from serial_reference import worker_rows

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD
N_WORKERS = WORLD.Get_size() - 1
ROWS, DIM, K, CLASSES = 40, 4, 3, 3
TRANSPORTS = ["auto", "mpi"]


def ids_data(n=96, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.integers(0, ROWS, size=(n, K))
    return X, X.sum(axis=1) % CLASSES


def bag_model(combine="mean", sparse=True):
    return ps.Sequential([ps.layers.Embedding(ROWS, DIM, combine, sparse=sparse),
                          ps.layers.Dense(DIM, CLASSES)], ps.losses.SoftmaxCrossEntropy())


def servers_for(n):
    """n servers where the world leaves at least one worker, else skip."""
    if WORLD.Get_size() <= n:
        pytest.skip(f"{n} servers need at least {n + 1} ranks")
    return n


def on(n_ranks):
    """A communicator of the first n_ranks ranks (None on the others)."""
    sub = WORLD.Split(0 if WORLD.Get_rank() < n_ranks else MPI.UNDEFINED)
    return None if sub == MPI.COMM_NULL else sub


def torch_sync(params, X, y, combine, batch, steps, lr, shuffle, seed, n_workers=N_WORKERS):
    """N-worker Sync restated serially in torch: EmbeddingBag + Linear, plain SGD, each step
    the mean of the workers' batch gradients."""
    bag = torch.nn.EmbeddingBag(ROWS, DIM, mode=combine).double()
    lin = torch.nn.Linear(DIM, CLASSES).double()
    with torch.no_grad():
        bag.weight.copy_(torch.tensor(params["0.W"]))
        lin.weight.copy_(torch.tensor(params["1.W"].T))
        lin.bias.copy_(torch.tensor(params["1.b"]))
    weights = [bag.weight, lin.weight, lin.bias]
    for t in range(steps):
        total = [torch.zeros_like(w) for w in weights]
        for rows in worker_rows(len(X), n_workers, batch, t, shuffle, seed):
            for w in weights:
                w.grad = None
            out = lin(bag(torch.tensor(X[rows])))
            torch.nn.functional.cross_entropy(out, torch.tensor(y[rows])).backward()
            for acc, w in zip(total, weights):
                acc += w.grad
        with torch.no_grad():
            for acc, w in zip(total, weights):
                w -= lr * (acc / n_workers)
    return {"0.W": bag.weight.detach().numpy(), "1.W": lin.weight.detach().numpy().T,
            "1.b": lin.bias.detach().numpy()}


def init_params(model, seed=3):
    return model.init_params(np.random.default_rng(seed))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("combine", ["mean", "sum"])
def test_sync_with_sparse_tables_equals_torch(transport, combine):
    X, y = ids_data()
    model = bag_model(combine)
    steps, batch, lr = 7, 5, 0.3
    result = ps.train(model, (X, y), policy="sync", optimizer=ps.SGD(lr), batch_size=batch,
                      steps=steps, seed=3, shuffle=True, dtype="float64", transport=transport,
                      verbose=False)
    if WORLD.Get_rank():
        assert result is None
        return
    expected = torch_sync(init_params(model), X, y, combine, batch, steps, lr, True, 3)
    for name, value in expected.items():
        np.testing.assert_allclose(result.params[name], value, rtol=1e-10, atol=1e-10,
                                   err_msg=name)
    assert result.stats["sparse"]["updates"] == steps


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sync_with_tables_split_over_two_servers_equals_torch(transport):
    servers = servers_for(2)
    X, y = ids_data()
    model = bag_model("sum")
    steps, batch, lr = 6, 5, 0.3
    # 20 rows x 4 of each server's 80 + 15 elements: the cut falls inside the table.
    result = ps.train(model, (X, y), optimizer=ps.SGD(lr), batch_size=batch, steps=steps,
                      seed=3, shuffle=True, dtype="float64", transport=transport,
                      servers=servers, verbose=False)
    if WORLD.Get_rank():
        return
    expected = torch_sync(init_params(model), X, y, "sum", batch, steps, lr, True, 3,
                          n_workers=WORLD.Get_size() - servers)
    for name, value in expected.items():
        np.testing.assert_allclose(result.params[name], value, rtol=1e-10, atol=1e-10,
                                   err_msg=name)
    per_server = result.stats["sparse"]["servers"]
    assert len(per_server) == 2 and all(s["rows_pushed"] > 0 for s in per_server)
    assert sum(s["rows_pushed"] for s in per_server) == result.stats["sparse"]["rows_pushed"]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sparse_run_equals_the_same_tables_kept_dense(transport):
    X, y = ids_data()
    runs = [ps.train(bag_model(sparse=sparse), (X, y), policy="sync",
                     optimizer=ps.SGD(0.2, momentum=0.0), batch_size=6, epochs=2, seed=1,
                     shuffle=True, dtype="float64", transport=transport, verbose=False)
            for sparse in (True, False)]
    if WORLD.Get_rank() == 0:
        for name in runs[1].params:
            np.testing.assert_array_equal(runs[0].params[name], runs[1].params[name], name)


def expected_bytes(X, batch, steps, itemsize=8):
    """(pushed, pulled) bytes of a Sync run with one table read from X: per worker and step,
    the dense parameters and the touched rows x dim each way, plus each request's ids."""
    dense = DIM * CLASSES + CLASSES
    pushed = pulled = 0
    for w in range(N_WORKERS):
        touched = [len(np.unique(X[worker_rows(len(X), N_WORKERS, batch, t)[w]]))
                   for t in range(steps)]
        rows = sum(touched)
        pulled += itemsize * (dense * steps + DIM * rows)
        # ids: a PULL (2 counts + its rows), PUSH_PULLs (2 counts + pushed + wanted), a PUSH
        ids = 2 * (steps + 1) + 2 * rows
        pushed += itemsize * (dense * steps + DIM * rows) + 8 * ids
    return pushed, pulled


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_bytes_per_step_are_the_touched_rows_and_the_dense_parameters(transport):
    X, y = ids_data()
    batch, steps = 4, 6
    result = ps.train(bag_model(), (X, y), optimizer=ps.SGD(0.1), batch_size=batch,
                      steps=steps, dtype="float64", transport=transport, shuffle=False,
                      verbose=False)
    if WORLD.Get_rank():
        return
    # One node: the rows go through the shared window (read in place under Sync), as the
    # dense weights do; only the ids are messages.
    assert result.stats["sparse"]["worker_paths"] == result.stats["worker_transport"]
    expected_path = "mpi" if transport == "mpi" else "shared-read"
    assert result.stats["worker_transport"] == [expected_path] * N_WORKERS
    pushed, pulled = expected_bytes(X, batch, steps)
    assert result.stats["bytes_pushed"] == pushed
    assert result.stats["bytes_pulled"] == pulled
    whole_table = ROWS * DIM * 8 * steps * N_WORKERS
    assert result.stats["bytes_pulled"] < whole_table


def test_hybrid_sync_dense_async_rows_records_row_staleness():
    X, y = ids_data(n=120)
    result = ps.train(bag_model(), (X, y), policy=ps.Hybrid(dense=ps.Sync(), sparse=ps.Async()),
                      optimizer=ps.SGD(0.3), batch_size=4, epochs=3, dtype="float64",
                      verbose=False)
    if WORLD.Get_rank():
        return
    sparse = result.stats["sparse"]
    pushes = result.stats["pushes_received"]
    assert sum(sparse["staleness"].values()) == pushes == sparse["updates"]
    # Pulls wait for each dense Sync step, so at most the other workers' rows come between.
    assert max(sparse["staleness"]) <= N_WORKERS - 1
    assert result.stats["max_staleness"] == 0  # the dense part is Sync
    # Rows change while workers compute: they get copies, never the tables in place.
    assert set(sparse["worker_paths"]) == {"shared-copy"}
    assert "sparse rows: on arrival" in result.stats["update_weighting"]
    losses = [h["train_loss"] for h in result.history]
    assert losses[-1] < losses[0]


def test_hybrid_with_one_worker_is_sync():
    if N_WORKERS != 1:
        pytest.skip("one worker applies its rows on arrival at weight 1: Sync's update")
    X, y = ids_data()
    runs = [ps.train(bag_model(), (X, y), policy=policy, optimizer=ps.SGD(0.2), batch_size=5,
                     steps=9, dtype="float64", verbose=False) for policy in ("sync", "hybrid")]
    if WORLD.Get_rank() == 0:
        for name in runs[0].params:
            np.testing.assert_array_equal(runs[0].params[name], runs[1].params[name], name)


@pytest.fixture
def shared_dir(tmp_path):
    return WORLD.bcast(str(tmp_path) if WORLD.Get_rank() == 0 else None)


@pytest.mark.parametrize("optimizer", [ps.SGD(0.2, momentum=0.9), ps.Adam(0.05), ps.Adagrad(0.3)],
                         ids=["sgd-momentum", "lazy-adam", "adagrad"])
def test_resume_with_sparse_tables_is_exact(shared_dir, optimizer):
    X, y = ids_data()

    def run(**kw):
        return ps.train(bag_model(), (X, y), optimizer=optimizer, batch_size=4, steps=10,
                        seed=2, shuffle=True, dtype="float64", verbose=False, **kw)

    full = run(checkpoint_dir=shared_dir, checkpoint_every=4, checkpoint_keep=5)
    WORLD.Barrier()
    resumed = run(resume=os.path.join(shared_dir, "ckpt-00000004.json"))
    if WORLD.Get_rank() == 0:
        for name in full.params:
            np.testing.assert_array_equal(resumed.params[name], full.params[name], name)


@pytest.mark.parametrize("optimizer", [ps.Adam(0.05), ps.Adagrad(0.3)],
                         ids=["lazy-adam", "adagrad"])
def test_resume_with_tables_on_two_servers_and_resharded_is_exact(shared_dir, optimizer):
    """Every run first, the checks after (a failed check must not leave ranks waiting)."""
    servers = servers_for(2)
    X, y = ids_data()

    def run(servers=servers, **kw):
        return ps.train(bag_model(), (X, y), optimizer=optimizer, batch_size=4, steps=10,
                        seed=2, shuffle=True, dtype="float64", servers=servers, verbose=False,
                        **kw)

    full = run(checkpoint_dir=shared_dir, checkpoint_every=4, checkpoint_keep=5)
    first = os.path.join(shared_dir, "ckpt-00000004.json")
    WORLD.Barrier()
    resumed = run(resume=first)
    sub = on(WORLD.Get_size() - 1)  # the same workers with one server: the rows resharded
    down = run(servers=1, resume=first, comm=sub) if sub is not None else None
    if sub is not None:
        sub.Free()
    WORLD.Barrier()
    if WORLD.Get_rank() == 0:
        for name in full.params:
            np.testing.assert_array_equal(resumed.params[name], full.params[name], name)
            np.testing.assert_array_equal(down.params[name], full.params[name], name)


class NaNRows(ps.Model):
    """A table read straight from X whose gradient turns NaN at one step of worker 0."""

    def __init__(self):
        self.calls = 0

    def init_params(self, rng):
        return {"T": rng.normal(size=(ROWS, 2)), "b": np.zeros(CLASSES)}

    def embedding_inputs(self):
        return {"T": None}

    def loss_and_grad(self, params, X, y):
        self.calls += 1
        h = params["T"][X].sum(axis=1)  # (batch, 2)
        z = np.concatenate([h, np.zeros((len(X), 1))], axis=1) + params["b"]
        loss = float(((z - np.eye(CLASSES)[y]) ** 2).mean())
        dz = 2 * (z - np.eye(CLASSES)[y]) / z.size
        gT = np.zeros_like(params["T"])
        np.add.at(gT, X.reshape(-1), np.repeat(dz[:, :2], X.shape[1], axis=0))
        if self.calls == 3 and WORLD.Get_rank() == 1:
            gT[0, 0] = np.nan
        return loss, {"T": gT, "b": dz.sum(axis=0)}


def test_non_finite_rows_are_refused_and_the_weights_untouched():
    X, y = ids_data()
    result = ps.train(NaNRows(), (X, y), optimizer=ps.SGD(0.1), batch_size=4, steps=5,
                      dtype="float64", on_bad_gradient="skip", verbose=False)
    if WORLD.Get_rank() == 0:
        assert result.stats["updates_rejected"] == 1
        assert all(np.isfinite(v).all() for v in result.params.values())


@pytest.mark.parametrize("options, match", [
    (dict(mode="model"), "needs mode='data'"),
    (dict(policy=ps.Async(compensation=ps.DelayCompensation())), "delay compensation"),
    (dict(dispatch="dynamic"), "dispatch='dynamic'"),
])
def test_what_sparse_tables_cannot_do_is_refused_on_every_rank(options, match):
    X, y = ids_data()
    with pytest.raises(ps.ConfigError, match=match):
        ps.train(bag_model(), (X, y), steps=2, verbose=False, **options)
    WORLD.Barrier()


def test_bad_ids_are_refused_on_every_rank():
    X, y = ids_data()
    X[5, 1] = ROWS
    with pytest.raises(ps.ConfigError, match="found id 40"):
        ps.train(bag_model(), (X, y), steps=2, verbose=False)
    WORLD.Barrier()


@pytest.mark.parametrize("n_servers", [1, 2])
def test_a_sparse_dlrm_equals_the_same_dlrm_kept_dense(n_servers):
    """Several id fields, several tables: each moves by its rows, and plain SGD gives the
    same weights bit for bit as moving every table whole."""
    servers = servers_for(n_servers)
    train, _ = ps.data.click_log(90, fields=(20, 6), ids_per_field=2, dense_features=3, seed=1)
    runs = [ps.train(ps.models.DLRM(3, train.vocab, dim=4, bottom=(5,), top=(6,), sparse=sparse),
                     train, optimizer=ps.SGD(0.2), batch_size=5, steps=8, shuffle=True, seed=2,
                     dtype="float64", servers=servers, verbose=False)
            for sparse in (True, False)]
    if WORLD.Get_rank() == 0:
        assert [t["input"] for t in runs[0].stats["sparse"]["tables"]] == ["c0", "c1"]
        for name in runs[1].params:
            np.testing.assert_array_equal(runs[0].params[name], runs[1].params[name], name)


@pytest.mark.parametrize("policy", ["sync", ps.Hybrid(dense=ps.Sync(), sparse=ps.Async())],
                         ids=["sync", "hybrid"])
def test_a_sparse_dlrm_learns_the_click_log(policy):
    train, test = ps.data.click_log(6000, seed=0)
    model = ps.models.DLRM(8, train.vocab, dim=8, bottom=(16,), top=(16,))
    result = ps.train(model, train, eval_data=test, policy=policy, optimizer=ps.SGD(lr=0.5),
                      batch_size=32, epochs=3, seed=0, verbose=False)
    if WORLD.Get_rank() != 0:
        return
    majority = max(test.y.mean(), 1 - test.y.mean())
    assert result.history[-1]["eval_accuracy"] > majority + 0.03
    X = ps.data.features(test.X, np.float32, model.id_inputs())
    assert model.evaluate(result.params, X, test.y)["auc"] > 0.7
    # Only the touched rows moved: far fewer bytes than the tables once per step each way.
    tables = sum(t["rows"] * t["dim"] for t in result.stats["sparse"]["tables"]) * 4
    assert result.stats["sparse"]["bytes_pulled"] < tables * result.stats["pulls_answered"]


@pytest.mark.parametrize("policy", ["async", "ssp:1", "sync:1", "mixed:4"])
def test_rows_follow_every_policy_s_decisions(policy):
    """Rows are applied exactly when the dense gradient they came with is (a backup's late
    push is dropped whole, SSP's bound holds, Mixed switches both)."""
    if policy == "sync:1" and N_WORKERS < 2:
        pytest.skip("a backup worker needs 2 workers")
    X, y = ids_data(n=120)
    result = ps.train(bag_model(), (X, y), policy=policy, optimizer=ps.SGD(0.2), batch_size=4,
                      epochs=2, dtype="float64", delay={0: 0.002}, verbose=False)
    if WORLD.Get_rank():
        return
    stats = result.stats
    assert stats["sparse"]["updates"] == stats["updates_applied"]
    assert all(np.isfinite(v).all() for v in result.params.values())
    if policy == "ssp:1":
        assert stats["max_clock_gap"] <= 1
    if policy == "sync:1":
        dropped = stats["updates_dropped"]
        assert stats["sparse"]["rows_pushed"] > 0 and stats["updates_applied"] > 0
        assert sum(stats["sparse"]["staleness"].values()) == stats["pushes_received"] - dropped


def test_a_hybrid_cannot_be_a_mixed_phase():
    with pytest.raises(ValueError, match="cannot be a Hybrid"):
        ps.Mixed(sync_steps=5, then=ps.Hybrid())
    WORLD.Barrier()


def test_a_hybrid_without_row_sparse_tables_is_its_dense_policy():
    X, y = ids_data()
    runs = [ps.train(bag_model(sparse=False), (X, y), policy=policy, optimizer=ps.SGD(0.2),
                     batch_size=4, steps=6, dtype="float64", verbose=False)
            for policy in (ps.Hybrid(), "sync")]
    if WORLD.Get_rank() == 0:
        assert runs[0].config["policy"] == "Sync()"
        assert runs[0].stats["worker_transport"] == runs[1].stats["worker_transport"]
        for name in runs[1].params:
            np.testing.assert_array_equal(runs[0].params[name], runs[1].params[name], name)
