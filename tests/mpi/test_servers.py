"""Several servers (servers=S): Sync equals serial SGD in every mode, resume is bitwise exact,
the policies mean what they mean with one server, and bad values are refused."""
import os

import numpy as np
import pytest
from mpi4py import MPI

import psframe as ps
from serial_reference import SerialAdam, SerialSGD, assert_params_match, mlp_init, serial_mlp

pytestmark = pytest.mark.mpi(min_size=3)

WORLD = MPI.COMM_WORLD
SIZE = WORLD.Get_size()
SIZES = [6, 9, 8, 7, 3]  # four Dense layers: up to four pipeline stages
# Small shards, so that the servers' cuts fall inside tensors: one tensor spans two servers.
SHARD_ELEMS = 16


def blobs(n_rows=61, seed=1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n_rows)
    return rng.normal(size=(3, 6))[y] + 0.7 * rng.normal(size=(n_rows, 6)), y


def servers_for(n):
    if SIZE <= n:
        pytest.skip(f"servers={n} needs more than {n} ranks")
    return n


def sync_run(servers, mode="data", n_pipelines=None, optimizer="sgd", shuffle=True, **kw):
    """A Sync run with ``servers`` servers against serial SGD (or Adam) on rank 0."""
    X, y = blobs()
    init = mlp_init(SIZES, np.random.default_rng(3))
    steps, batch = 9, 6
    make = {"sgd": (lambda: ps.SGD(lr=0.2, momentum=0.9), lambda: SerialSGD(0.2, 0.9)),
            "adam": (lambda: ps.Adam(lr=0.01), lambda: SerialAdam(0.01))}[optimizer]
    result = ps.train(ps.models.MLP(SIZES), (X, y), mode=mode, optimizer=make[0](),
                      batch_size=batch, steps=steps, shuffle=shuffle, seed=5, dtype="float64",
                      init=init, servers=servers, shard_elems=SHARD_ELEMS, **kw)
    if WORLD.Get_rank():
        assert result is None
        return None
    n_workers = SIZE - servers
    assert_params_match(result.params, serial_mlp(SIZES, init, X, y, n_pipelines or n_workers,
                                                  batch, steps, make[1](), shuffle, seed=5))
    return result


@pytest.mark.parametrize("transport", ["auto", "mpi"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("servers", [2, 3])
def test_data_mode_sync_equals_serial(servers, optimizer, transport, monkeypatch):
    if transport == "mpi":  # every server applies each push as it lands, as from other nodes
        monkeypatch.setenv("PSFRAME_STREAM", "always")
    result = sync_run(servers_for(servers), optimizer=optimizer, transport=transport)
    if result is None:
        return
    per_server = result.stats["servers"]
    assert [s["rank"] for s in per_server] == list(range(servers))
    # The ranges are contiguous, cover every shard and are balanced by elements.
    shards = [tuple(s["shards"]) for s in per_server]
    assert shards[0][0] == 0 and shards[-1][1] == result.stats["n_shards"]
    assert all(a[1] == b[0] for a, b in zip(shards, shards[1:]))
    sizes = [s["params"] for s in per_server]
    assert sum(sizes) == result.stats["n_params"]
    assert max(sizes) - min(sizes) <= 1
    # Every server took each step once, and moved its share of every push and pull.
    assert {s["updates"] for s in per_server} == {9}
    steps = sum(result.stats["steps_per_worker"])
    assert result.stats["bytes_pushed"] == steps * result.stats["n_params"] * 8
    for s in per_server:
        assert s["bytes_pushed"] == steps * s["params"] * 8
        # By message every server applies each push frame by frame as it lands.
        if transport == "mpi":
            assert s["pushes_streamed"] == steps
    assert "servers" in result.summary()


def test_model_mode_sync_equals_serial():
    servers = servers_for(2)
    if not 2 <= SIZE - servers <= len(SIZES) - 1:
        pytest.skip("model mode here needs 2 to 4 workers")
    sync_run(servers, mode="model", n_pipelines=1, micro_batches=2)


def test_hybrid_mode_sync_equals_serial():
    servers = servers_for(2)
    if SIZE - servers != 4:
        pytest.skip("hybrid 2x2 needs exactly 4 workers")
    sync_run(servers, mode="hybrid", n_pipelines=2, stages=2)


@pytest.fixture
def shared_dir(tmp_path):
    return WORLD.bcast(str(tmp_path) if WORLD.Get_rank() == 0 else None)


@pytest.mark.parametrize("optimizer", [ps.SGD(lr=0.1, momentum=0.9), ps.Adam(lr=0.01)],
                         ids=["sgd", "adam"])
def test_resume_with_two_servers_is_bitwise_exact(shared_dir, optimizer):
    """Every run first, the checks after: a failed check on rank 0 must not leave the other
    ranks waiting in a run it skipped."""
    servers = servers_for(2)
    X, y = blobs(90)

    def run(servers=servers, **kw):
        return ps.train(ps.models.MLP([6, 12, 3]), (X, y), batch_size=4, steps=10, seed=3,
                        dtype="float64", optimizer=optimizer, servers=servers,
                        shard_elems=SHARD_ELEMS, **kw)

    def on(n_ranks):
        """A communicator of the first n_ranks ranks (None on the others)."""
        sub = WORLD.Split(0 if WORLD.Get_rank() < n_ranks else MPI.UNDEFINED)
        return None if sub == MPI.COMM_NULL else sub

    full = run(checkpoint_dir=shared_dir, checkpoint_every=4, checkpoint_keep=5)
    first = os.path.join(shared_dir, "ckpt-00000004.json")
    WORLD.Barrier()
    resumed = run(resume=first)
    # Down: the same workers with one server, resharded (each element's arithmetic is the
    # same whichever server does it).
    sub = on(SIZE - 1)
    down = run(servers=1, resume=first, comm=sub) if sub is not None else None
    # And up: a checkpoint of one server resumed by two.
    one_dir = os.path.join(shared_dir, "one-server")
    one = (run(servers=1, comm=sub, checkpoint_dir=one_dir, checkpoint_every=4,
               checkpoint_keep=5) if sub is not None else None)
    if sub is not None:
        sub.Free()
    WORLD.Barrier()
    up = run(servers=2, resume=os.path.join(one_dir, "ckpt-00000004.json"))
    if WORLD.Get_rank() != 0:
        return
    for k in full.params:
        np.testing.assert_array_equal(resumed.params[k], full.params[k], err_msg=k)
        np.testing.assert_array_equal(down.params[k], full.params[k], err_msg=k)
        np.testing.assert_array_equal(up.params[k], one.params[k], err_msg=k)
    assert [h["step"] for h in resumed.history] == [h["step"] for h in full.history]
    # Server 1 wrote its own range, named by the one manifest.
    assert "ckpt-00000004.server1.npz" in os.listdir(shared_dir)


STRAGGLER = {0: 0.004}


def straggler_run(servers, policy, **kw):
    train, test = ps.data.digits(seed=0)
    return ps.train(ps.models.MLP([64, 48, 10]), train, eval_data=test,
                    optimizer=ps.SGD(lr=0.1, momentum=0.9), batch_size=16, epochs=6, seed=1,
                    delay=STRAGGLER, policy=policy, servers=servers, **kw)


@pytest.mark.mpi(min_size=4)
def test_ssp_bound_holds_across_servers_and_async_exceeds_it():
    servers = servers_for(2)
    ssp = straggler_run(servers, ps.SSP(1))
    free = straggler_run(servers, ps.Async())
    if WORLD.Get_rank():
        return
    assert ssp.stats["max_clock_gap"] <= 1
    assert free.stats["max_clock_gap"] > 1
    for run in (ssp, free):
        assert len({s["updates"] for s in run.stats["servers"]}) == 1
        assert run.history[-1]["eval_accuracy"] >= 0.85


@pytest.mark.mpi(min_size=4)
def test_backup_and_mixed_agree_on_every_server():
    servers = servers_for(2)
    backup = straggler_run(servers, ps.Sync(backup=1))
    mixed = straggler_run(servers, ps.Mixed(sync_steps=20, then=ps.Async()))
    if WORLD.Get_rank():
        return
    s = backup.stats
    assert s["updates_dropped"] > 0
    assert s["pushes_received"] == sum(s["steps_per_worker"])
    # The same late gradients are dropped everywhere: every server took the same steps.
    assert len({srv["updates"] for srv in s["servers"]}) == 1
    assert mixed.stats["policy_switches"] == [20]
    assert len({srv["updates"] for srv in mixed.stats["servers"]}) == 1
    for run in (backup, mixed):
        assert run.history[-1]["eval_accuracy"] >= 0.85


def expect_error(match, model=None, train_data=None, **kw):
    with pytest.raises(ps.ConfigError, match=match):
        ps.train(model or ps.models.MLP([6, 8, 3]), train_data or blobs(), steps=2, **kw)
    WORLD.Barrier()  # every rank raised: nobody is left in training


@pytest.mark.parametrize("servers, match", [
    (0, "servers must be an integer >= 1"), (-1, "servers must be an integer >= 1"),
    (SIZE, "leaves no worker"), (SIZE + 3, "leaves no worker"),
    (1.5, "servers must be an integer"), (True, "servers must be an integer"),
])
def test_bad_servers_are_refused(servers, match):
    expect_error(match, servers=servers)


def test_a_model_too_small_for_the_servers_is_refused():
    servers = servers_for(3)
    # Least squares on one feature: two weights, and three servers to give them to.
    rng = np.random.default_rng(0)
    expect_error("too few to give each", model=ps.models.LinearRegression(1),
                 train_data=(rng.normal(size=(8, 1)), rng.normal(size=(8, 1))),
                 servers=servers)


def test_each_server_holds_an_equal_share_with_default_shards():
    servers = servers_for(2)
    train, _ = ps.data.digits(seed=0)
    result = ps.train(ps.models.MLP([64, 48, 10]), train, steps=2, servers=servers)
    if WORLD.Get_rank() == 0:  # 3,610 weights in four tensors: the cut falls inside 0.W
        sizes = [v["params"] for v in result.stats["servers"]]
        assert sum(sizes) == 3610 and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("policy", [ps.Async(), ps.Async(compensation="dc"), ps.SSP(0)],
                         ids=["async", "dc", "ssp0"])
def test_on_arrival_updates_with_one_worker_equal_serial(policy):
    """With one worker, Async, delay compensation (staleness 0: no correction) and SSP apply
    each gradient in turn: serial SGD, on every server's range."""
    servers = servers_for(SIZE - 1)
    X, y = blobs()
    init = mlp_init(SIZES, np.random.default_rng(3))
    result = ps.train(ps.models.MLP(SIZES), (X, y), policy=policy,
                      optimizer=ps.SGD(lr=0.2, momentum=0.9), batch_size=6, steps=9, seed=5,
                      dtype="float64", init=init, servers=servers, shard_elems=SHARD_ELEMS)
    if WORLD.Get_rank():
        return
    assert_params_match(result.params, serial_mlp(SIZES, init, X, y, 1, 6, 9,
                                                  SerialSGD(0.2, 0.9), shuffle=True, seed=5))


def test_dynamic_dispatch_keeps_one_dispatcher():
    servers = servers_for(2)
    X, y = blobs()
    result = ps.train(ps.models.MLP(SIZES), (X, y), policy=ps.Async(), dispatch="dynamic",
                      batch_size=6, epochs=2, seed=5, servers=servers, shard_elems=SHARD_ELEMS)
    if WORLD.Get_rank():
        return
    s = result.stats
    assert len(s["batch_counts"]) == 2 * int(np.ceil(len(X) / 6))
    assert set(s["batch_counts"]) == {1}  # every batch handed out once, by rank 0 alone
    assert {v["updates"] for v in s["servers"]} == {len(s["batch_counts"])}


def test_workers_read_in_place_where_every_server_shares_their_node():
    """On rank 0's node the servers update one shared weight buffer, which that node's
    workers read in place under Sync; if a server is on another node (tests/cluster runs
    this file across hosts), those workers keep a copy of their own, written by the servers
    on their node and filled by messages from the others; workers elsewhere take messages."""
    from psframe.transport.shm import node_ids

    servers = servers_for(2)
    nodes = node_ids(WORLD)
    result = sync_run(servers, transport="auto")
    if result is None:
        return
    local = all(nodes[s] == nodes[0] for s in range(servers))
    expected = ["mpi" if nodes[r] != nodes[0] else "shared-read" if local else "shared-copy"
                for r in range(servers, SIZE)]
    assert result.stats["worker_transport"] == expected


@pytest.mark.parametrize("transport", ["mpi", "auto"])
@pytest.mark.parametrize("servers", [1, 2])
def test_layerwise_overlap_keeps_sync_exact(servers, transport):
    sync_run(servers_for(servers), overlap=True, transport=transport, optimizer="adam")


class OneLayer(ps.Model):
    """A model of its own, not a Sequential: it has no layers to overlap."""

    def init_params(self, rng):
        return {"w": rng.normal(size=(6, 3))}

    def loss_and_grad(self, params, X, y):
        return 0.0, {"w": ps.xp(X).zeros_like(params["w"])}


@pytest.mark.parametrize("kw, match", [
    (dict(mode="model"), "needs mode='data'"),
    (dict(policy=ps.Async()), "needs Sync without backup"),
    (dict(policy=ps.Sync(backup=1)), "needs Sync without backup"),
    (dict(overlap="yes"), "overlap must be True or False"),
    (dict(model=OneLayer()), "needs a ps.Sequential model"),
])
def test_overlap_where_it_cannot_run_is_refused(kw, match):
    if SIZE < 3 and "backup" in repr(kw.get("policy")):
        pytest.skip("a backup worker needs two workers")
    kw = dict(kw)
    expect_error(match, overlap=kw.pop("overlap", True), **kw)
