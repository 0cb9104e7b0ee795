"""Servers and workers in one process (tests/fake_channel.py): each policy's decisions, streamed
landing, bad pushes, the stop and checkpoints, asserted request by request."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

import numpy as np
import pytest

import psframe as ps
from psframe.errors import GradientError, ProtocolError, TrainingInterrupted
from psframe.params import ParamLayout
from psframe.server import Group, ParameterServer
from psframe.transport import Field, Flag, Status

from fake_channel import (FakeChannel, FakeMPIError, Rank, ScriptedWorker, World,
                          train_inprocess)
from serial_reference import SerialSGD, assert_params_match, mlp_init, serial_mlp

LR = 0.1
# Three tensors in frames of at most 6 elements: a push and a pull are several messages.
LAYOUT = ParamLayout({"W": (5, 4), "b": (4,), "c": (3,)}, "float64", shard_elems=6)
N_FRAMES = len(LAYOUT.frames())


@pytest.fixture(autouse=True)
def one_node(monkeypatch):
    """Workers ask MPI for their place on the node (to pick a GPU): every one is first here."""
    import psframe.worker.worker

    monkeypatch.setattr(psframe.worker.worker, "node_local_index", lambda comm, servers: 0)
    monkeypatch.delenv("PSFRAME_STREAM", raising=False)


def grad(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=LAYOUT.size)


def sgd(w: np.ndarray, g: np.ndarray, weight: float = 1.0) -> np.ndarray:
    """One plain SGD step, restated: w - lr * weight * g."""
    return w - LR * (weight * g)


def close(a: Optional[np.ndarray], b: np.ndarray) -> None:
    assert a is not None, "no weights came back"
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@dataclass
class Served:
    """A ParameterServer (rank 0) in a thread, and its workers scripted from the test."""

    world: World
    server: ParameterServer
    run: Rank
    peers: List[ScriptedWorker]
    w0: np.ndarray

    def finish(self, steps: int) -> Any:
        for peer in self.peers:
            peer.done(steps)
        return self.run.join()


def serve(policy: Any, n_workers: int, **options: Any) -> Served:
    world = World(1 + n_workers)
    w0 = np.random.default_rng(0).normal(size=LAYOUT.size)
    groups = [Group(policy.state(n_workers), range(n_workers), (0, LAYOUT.n_shards))]
    server = ParameterServer(FakeChannel(world, 0, LAYOUT), LAYOUT, w0.copy(),
                             optimizer=ps.SGD(lr=LR), groups=groups,
                             worker_ranks=range(1, n_workers + 1),
                             keep_sent_weights=policy.keeps_sent_weights(), **options)
    peers = [ScriptedWorker(world, 1 + i, LAYOUT, i) for i in range(n_workers)]
    return Served(world, server, world.spawn("server", server.run), peers, w0)


def first_pulls(s: Served) -> None:
    """Every worker pulls step 0: version 0, the initial weights."""
    for peer in s.peers:
        fields, weights = peer.got(peer.pull(0))
        assert (fields[Field.STATUS], fields[Field.VERSION]) == (Status.OK, 0)
        np.testing.assert_array_equal(weights, s.w0)


# -- the decision table of each policy -------------------------------------------------------
def test_sync_holds_the_first_pull_until_the_step_is_whole():
    s = serve(ps.Sync(), 2)
    a, b = s.peers
    first_pulls(s)
    ga, gb = grad(1), grad(2)
    qa = a.push_pull(0, ga)
    s.world.settle()
    assert not qa.answered()  # its step waits for b's gradient
    qb = b.push_pull(0, gb)
    expected = sgd(s.w0, (ga + gb) / 2)
    for peer, q in ((a, qa), (b, qb)):
        fields, weights = peer.got(q)
        assert (fields[Field.STATUS], fields[Field.VERSION]) == (Status.OK, 1)
        close(weights, expected)
    stats = s.finish(1).stats
    assert stats["updates_applied"] == 1 and stats["pushes_received"] == 2
    assert stats["staleness_hist"] == {0: 1}


def test_sync_with_a_backup_steps_on_the_first_two_and_drops_the_third():
    s = serve(ps.Sync(backup=1), 3)
    a, b, c = s.peers
    first_pulls(s)
    ga, gb, gc = grad(1), grad(2), grad(3)
    qa = a.push_pull(0, ga)
    s.world.settle()
    assert not qa.answered()
    qb = b.push_pull(0, gb)  # two of three: the step is whole
    expected = sgd(s.w0, (ga + gb) / 2)
    for peer, q in ((a, qa), (b, qb)):
        fields, weights = peer.got(q)
        assert fields[Field.VERSION] == 1
        close(weights, expected)
    fields, weights = c.got(c.push_pull(0, gc))  # too late: dropped, answered at once
    assert (fields[Field.STATUS], fields[Field.VERSION]) == (Status.OK, 1)
    close(weights, expected)
    stats = s.finish(1).stats
    assert (stats["updates_applied"], stats["updates_dropped"]) == (1, 1)


def test_async_applies_each_push_alone_at_once_weighted_one_over_n():
    s = serve(ps.Async(), 2)
    a, b = s.peers
    first_pulls(s)
    ga, gb = grad(1), grad(2)
    fields, wa = a.got(a.push_pull(0, ga))  # b has pushed nothing: a is answered anyway
    w1 = sgd(s.w0, ga, 0.5)
    assert fields[Field.VERSION] == 1
    close(wa, w1)
    fields, wb = b.got(b.push_pull(0, gb))  # computed on version 0: staleness 1
    assert fields[Field.VERSION] == 2
    close(wb, sgd(w1, gb, 0.5))
    stats = s.finish(1).stats
    assert stats["updates_applied"] == 2 and stats["staleness_hist"] == {0: 1, 1: 1}


def test_ssp_holds_a_worker_more_than_the_bound_ahead():
    s = serve(ps.SSP(staleness=1, scale="none"), 2)
    a, b = s.peers
    first_pulls(s)
    ga0, ga1, gb0 = grad(1), grad(2), grad(3)
    fields, w1 = a.got(a.push_pull(0, ga0))  # clock 1, b at 0: within the bound
    assert fields[Field.VERSION] == 1
    close(w1, sgd(s.w0, ga0))
    qa = a.push_pull(1, ga1)  # clock 2, b at 0: two ahead
    s.world.settle()
    assert not qa.answered()
    assert s.server.version == 2  # its push was applied all the same
    qb = b.push_pull(0, gb0)  # b reaches clock 1: a is one ahead again, released
    expected = sgd(sgd(sgd(s.w0, ga0), ga1), gb0)
    for peer, q in ((a, qa), (b, qb)):
        fields, weights = peer.got(q)
        assert fields[Field.VERSION] == 3
        close(weights, expected)
    stats = s.finish(2).stats
    assert stats["max_clock_gap"] == 1


def test_mixed_runs_sync_for_its_steps_then_async():
    s = serve(ps.Mixed(sync_steps=1, then=ps.Async(scale="none")), 2)
    a, b = s.peers
    first_pulls(s)
    ga, gb, ga1 = grad(1), grad(2), grad(3)
    qa = a.push_pull(0, ga)
    s.world.settle()
    assert not qa.answered()  # phase 1: Sync
    qb = b.push_pull(0, gb)
    w1 = sgd(s.w0, (ga + gb) / 2)
    for peer, q in ((a, qa), (b, qb)):
        fields, weights = peer.got(q)
        assert fields[Field.VERSION] == 1
        close(weights, w1)
    fields, weights = a.got(a.push_pull(1, ga1))  # phase 2: Async, applied alone at once
    assert fields[Field.VERSION] == 2
    close(weights, sgd(w1, ga1))
    assert s.finish(2).stats["policy_switches"] == [1]


def test_delay_compensation_corrects_a_stale_gradient_towards_the_weights_now():
    lam = 0.5
    s = serve(ps.Async(scale="none", compensation=ps.DelayCompensation(lam, adaptive=False)), 2)
    a, b = s.peers
    first_pulls(s)
    ga, gb = grad(1), grad(2)
    _, w1 = a.got(a.push_pull(0, ga))
    close(w1, sgd(s.w0, ga))  # fresh: its correction is exactly 0
    _, w2 = b.got(b.push_pull(0, gb))
    # DC-ASGD (Zheng et al. 2017): g + lam * g * g * (w_now - w_it_was_computed_on).
    close(w2, sgd(w1, gb + lam * gb * gb * (w1 - s.w0)))
    s.finish(1)


# -- streamed landing ------------------------------------------------------------------------
def _two_steps(stream: str, monkeypatch, g0: np.ndarray, g1: np.ndarray,
               piecewise: bool) -> Any:
    """One worker, Sync: step 0 pushed and pulled (its frames one at a time when
    ``piecewise``), step 1 pushed; both flagged finite as a worker does before streaming."""
    monkeypatch.setenv("PSFRAME_STREAM", stream)
    s = serve(ps.Sync(), 1)
    (a,) = s.peers
    first_pulls(s)
    q = a.push_pull(0, g0, frames=not piecewise, flags=Flag.FINITE)
    if piecewise:
        s.world.settle()
        # Decided at its header: the reply is out before any frame of the push is in, and
        # each frame of new weights follows the frame of gradient it was updated from.
        assert q.answered() and q.frames_landed() == 0
        for i in range(N_FRAMES):
            a.frames(g0, [i])
            s.world.settle()
            assert q.frames_landed() == i + 1
    fields, weights = a.got(q)
    assert fields[Field.VERSION] == 1
    close(weights, sgd(s.w0, g0))
    a.push(1, g1, flags=Flag.FINITE)
    return s.finish(2)


def test_a_streamed_push_is_applied_frame_by_frame_and_equals_one_landed_whole(monkeypatch):
    g0, g1 = grad(1), grad(2)
    streamed = _two_steps("always", monkeypatch, g0, g1, piecewise=True)
    whole = _two_steps("never", monkeypatch, g0, g1, piecewise=False)
    assert streamed.stats["pushes_streamed"] == 2 and whole.stats["pushes_streamed"] == 0
    for name in LAYOUT.names:
        np.testing.assert_array_equal(streamed.params[name], whole.params[name])
    w0 = np.random.default_rng(0).normal(size=LAYOUT.size)
    close(LAYOUT.flatten(streamed.params, out=LAYOUT.empty()), sgd(sgd(w0, g0), g1))


def test_a_push_flagged_finite_that_lands_non_finite_ends_the_run(monkeypatch):
    monkeypatch.setenv("PSFRAME_STREAM", "always")
    s = serve(ps.Sync(), 1, on_bad_gradient="skip")  # no skipping once the update has begun
    (a,) = s.peers
    first_pulls(s)
    g = grad(1)
    bad_frame = 2
    g[LAYOUT.frames()[bad_frame][0]] = np.nan
    q = a.push_pull(0, g, flags=Flag.FINITE)
    with pytest.raises(GradientError, match=r"checked finite where it was computed, but "
                                            r"elements \[12, 18\) arrived non-finite"):
        s.run.join()
    # The frames before it were applied and sent already.
    assert [r.complete for r in q.frames] == [i < bad_frame for i in range(N_FRAMES)]


# -- bad pushes ------------------------------------------------------------------------------
def test_a_push_of_the_wrong_size_is_refused():
    s = serve(ps.Sync(), 1)
    (a,) = s.peers
    first_pulls(s)
    a.push_pull(0, grad(1), count=LAYOUT.size - 1)
    with pytest.raises(GradientError, match=f"pushed {LAYOUT.size - 1} elements for step 0, "
                                            f"but shards \\[0, {LAYOUT.n_shards}\\) hold "
                                            f"{LAYOUT.size}"):
        s.run.join()


def test_a_push_for_shards_its_group_does_not_own_is_a_protocol_error():
    s = serve(ps.Sync(), 1)
    (a,) = s.peers
    first_pulls(s)
    a.push_pull(0, grad(1), shards=(0, 1))
    with pytest.raises(ProtocolError, match="asked for shards \\[0, 1\\)"):
        s.run.join()


def test_a_non_finite_push_skipped_leaves_the_weights_untouched():
    s = serve(ps.Async(scale="none"), 1, on_bad_gradient="skip")
    (a,) = s.peers
    first_pulls(s)
    g = grad(1)
    g[3] = np.inf
    fields, weights = a.got(a.push_pull(0, g))
    assert fields[Field.VERSION] == 0  # no update
    np.testing.assert_array_equal(weights, s.w0)
    g1 = grad(2)
    fields, weights = a.got(a.push_pull(1, g1))  # the next good push applies as usual
    assert fields[Field.VERSION] == 1
    close(weights, sgd(s.w0, g1))
    stats = s.finish(2).stats
    assert (stats["updates_rejected"], stats["updates_applied"]) == (1, 1)


def test_a_non_finite_push_skipped_under_sync_is_left_out_of_the_mean():
    s = serve(ps.Sync(), 2, on_bad_gradient="skip")
    a, b = s.peers
    first_pulls(s)
    bad, gb = grad(1), grad(2)
    bad[0] = np.nan
    qa = a.push_pull(0, bad)
    qb = b.push_pull(0, gb)
    for peer, q in ((a, qa), (b, qb)):
        fields, weights = peer.got(q)
        assert fields[Field.VERSION] == 1
        close(weights, sgd(s.w0, gb))  # the mean of the one gradient accepted
    assert s.finish(1).stats["updates_rejected"] == 1


def test_a_non_finite_push_raises_by_default():
    s = serve(ps.Sync(), 1)
    (a,) = s.peers
    first_pulls(s)
    g = grad(1)
    g[-1] = np.nan
    a.push_pull(0, g)
    with pytest.raises(GradientError, match="non-finite gradient \\(NaN or inf\\) for step 0"):
        s.run.join()
    np.testing.assert_array_equal(s.server.weights, s.w0)


# -- the stop protocol -----------------------------------------------------------------------
def test_a_stop_on_the_server_answers_the_next_pulls_with_interrupt():
    s = serve(ps.Sync(), 2, stop_units=[0, 0])  # lockstep: both stop at the same step
    first_pulls(s)
    g = {(w, t): grad(10 * w + t) for w in range(2) for t in range(2)}
    qs = [p.push_pull(0, g[p.index, 0]) for p in s.peers]
    w1 = sgd(s.w0, (g[0, 0] + g[1, 0]) / 2)
    for peer, q in zip(s.peers, qs):
        fields, weights = peer.got(q)
        assert (fields[Field.STATUS], fields[Field.VERSION]) == (Status.OK, 1)
        close(weights, w1)
    s.server.request_stop()  # as a signal handler does
    qs = [p.push_pull(1, g[p.index, 1]) for p in s.peers]
    for peer, q in zip(s.peers, qs):
        fields, weights = peer.got(q)
        # The push of step 1 is applied; the pull of step 2 is answered with INTERRUPT and
        # no weights (the worker withdraws its frames' receives).
        assert (fields[Field.STATUS], fields[Field.COUNT], weights) == (Status.INTERRUPT, 0, None)
    for peer in s.peers:
        peer.done(2)
    with pytest.raises(TrainingInterrupted, match="run interrupted at step 2"):
        s.run.join()
    close(s.server.weights, sgd(w1, (g[0, 1] + g[1, 1]) / 2))


def test_a_worker_that_caught_the_signal_stops_the_run():
    s = serve(ps.Async(), 1)
    (a,) = s.peers
    fields, weights = a.got(a.pull(0, status=Status.INTERRUPT))
    assert fields[Field.STATUS] == Status.INTERRUPT and weights is None
    a.done(0)
    with pytest.raises(TrainingInterrupted, match="at step 0"):
        s.run.join()


# -- whole runs: a ParameterServer (and a ShardServer) and real Workers ----------------------
SIZES = [6, 9, 7, 3]


def blobs(n_rows: int = 103, seed: int = 1):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n_rows)
    X = rng.normal(size=(3, 6))[y] + 0.7 * rng.normal(size=(n_rows, 6))
    return X, y


def mlp_run(**options: Any) -> Any:
    init = mlp_init(SIZES, np.random.default_rng(3))
    options = dict(dict(optimizer=ps.SGD(lr=0.2, momentum=0.9), batch_size=5, shuffle=False,
                        dtype="float64", init=init, shard_elems=16), **options)
    return train_inprocess(ps.models.MLP(SIZES), blobs(), **options)


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("stream", ["never", "always"])
def test_a_sync_run_in_threads_equals_serial_sgd(monkeypatch, servers, stream):
    monkeypatch.setenv("PSFRAME_STREAM", stream)
    steps = 7
    result, roles = mlp_run(n_workers=2, servers=servers, steps=steps)
    X, y = blobs()
    init = mlp_init(SIZES, np.random.default_rng(3))
    assert_params_match(result.params, serial_mlp(SIZES, init, X, y, 2, 5, steps,
                                                  SerialSGD(0.2, 0.9)))
    s = result.stats
    assert s["updates_applied"] == steps and s["pushes_received"] == 2 * steps
    assert s["pushes_streamed"] == (2 * steps if stream == "always" else 0)
    assert s["samples"] == 2 * steps * 5 and s["steps_per_worker"] == [steps, steps]


@pytest.mark.parametrize("servers", [1, 2])
def test_a_run_resumed_from_its_checkpoint_equals_one_unbroken(tmp_path, servers):
    whole, _ = mlp_run(steps=6, servers=servers, shuffle=True, seed=4)
    first, _ = mlp_run(steps=3, servers=servers, shuffle=True, seed=4,
                       checkpoint_dir=str(tmp_path), checkpoint_every=2)
    resumed, _ = mlp_run(steps=6, servers=servers, shuffle=True, seed=4,
                         resume=str(tmp_path))
    assert resumed.stats["updates_applied"] == 3  # the three steps after the checkpoint
    for name, value in whole.params.items():
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name)
        assert not np.array_equal(first.params[name], value)


def test_a_run_stopped_on_the_server_resumes_exactly(tmp_path):
    class StopAfter(ps.callbacks.Callback):
        server: Any = None

        def on_update(self, version, stats):
            if version == 2:
                self.server.request_stop()

    stop = StopAfter()
    whole, _ = mlp_run(steps=6, shuffle=True, seed=4)
    with pytest.raises(TrainingInterrupted, match="run interrupted at step 3; last checkpoint"):
        # Stopped after step 2, whose pulls of step 2 were already answered: step 2's
        # pushes make update 3, and the pulls of step 3 are told to stop.
        mlp_run(steps=6, shuffle=True, seed=4, checkpoint_dir=str(tmp_path),
                callbacks=[stop], on_server=lambda server: setattr(stop, "server", server))
    resumed, roles = mlp_run(steps=6, shuffle=True, seed=4, resume=str(tmp_path))
    assert [w.start_step for w in roles[1:]] == [3, 3]
    for name, value in whole.params.items():
        np.testing.assert_array_equal(resumed.params[name], value, err_msg=name)


# -- the fake itself -------------------------------------------------------------------------
def test_the_fake_matches_by_source_and_tag_in_order_and_refuses_truncation():
    world = World(3)
    zero, one, two = (FakeChannel(world, r, LAYOUT) for r in range(3))
    one.isend_array(np.array([1.0]), 0, 5)
    two.isend_array(np.array([2.0]), 0, 5)
    one.isend_array(np.array([3.0]), 0, 5)
    one.isend_array(np.array([4.0]), 0, 6)
    got = [np.zeros(1) for _ in range(4)]
    reqs = [zero.irecv_array(got[0], 1, 6), zero.irecv_array(got[1], 1, 5),
            zero.irecv_array(got[2], 1, 5), zero.irecv_array(got[3], 2, 5)]
    zero.wait_frames(reqs)
    assert [float(g[0]) for g in got] == [4.0, 1.0, 3.0, 2.0]
    assert zero.wait_received(reqs[0], 8) == 1  # elements of 8 bytes it brought
    one.isend_array(np.arange(3.0), 0, 8)
    with pytest.raises(FakeMPIError, match="24 bytes arrived at a receive of 16"):
        zero.wait(zero.irecv_array(np.zeros(2), 1, 8))


def test_the_fake_refuses_a_send_buffer_changed_in_flight():
    world = World(2)
    _, one = FakeChannel(world, 0, LAYOUT), FakeChannel(world, 1, LAYOUT)
    buf = np.zeros(4)
    request = one.isend_array(buf, 0, 5)
    buf[0] = 1.0  # before the send was seen complete: MPI may still be reading it
    with pytest.raises(FakeMPIError, match="changed before its send was seen complete"):
        one.wait(request)
