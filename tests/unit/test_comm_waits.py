"""The waits: spin, then yield the core (oversubscribed only), then sleep; frames as they land."""
import time

import numpy as np
import pytest
from mpi4py import MPI

from psframe.transport import waits
from psframe.transport.waits import Waiter


class LateRequest:
    """Completes ``after_s`` seconds after it is made; counts its tests."""

    def __init__(self, after_s):
        self.ready_at = time.perf_counter() + after_s
        self.tests = 0

    def Test(self, status=None):  # noqa: N802 - mpi4py's name
        self.tests += 1
        return time.perf_counter() >= self.ready_at


@pytest.fixture
def counted(monkeypatch):
    """Counts of sched_yield and sleep calls inside the waits."""
    calls = {"yield": 0, "sleep": 0}
    real_sleep = time.sleep

    def fake_yield():
        calls["yield"] += 1

    def fake_sleep(s):
        calls["sleep"] += 1
        real_sleep(s)

    monkeypatch.setattr(waits, "_sched_yield", fake_yield)
    monkeypatch.setattr(waits.time, "sleep", fake_sleep)
    monkeypatch.delenv("PSFRAME_YIELD_S", raising=False)
    return calls


def test_oversubscribed_wait_yields_before_it_sleeps(counted):
    Waiter(oversubscribed=True).wait(LateRequest(0.001))  # past the 100 us spin, in the 2 ms yield
    assert counted["yield"] > 0
    assert counted["sleep"] == 0


def test_a_rank_with_its_own_core_never_yields(counted):
    Waiter(oversubscribed=False).wait(LateRequest(0.003))  # past the 1 ms spin: sleeps
    assert counted["yield"] == 0
    assert counted["sleep"] > 0


def test_long_recent_waits_skip_the_yield(counted):
    waiter = Waiter(oversubscribed=True)
    waiter.recent_wait_s = 0.05  # an idle server: 50 ms between requests
    waiter.wait(LateRequest(0.001))
    assert counted["yield"] == 0
    assert counted["sleep"] > 0


def test_recent_wait_average_follows_the_waits(counted):
    waiter = Waiter(oversubscribed=True)
    for _ in range(12):
        waiter.wait(LateRequest(0.004))
    assert 0.002 < waiter.recent_wait_s < 0.05  # after a dozen 4 ms waits, about 4 ms


def test_each_waiter_keeps_its_own_state(counted):
    """The wait state lives in the object: one rank's long waits do not change another's."""
    idle, busy = Waiter(oversubscribed=True), Waiter(oversubscribed=False)
    for _ in range(12):
        idle.wait(LateRequest(0.004))
    assert idle.recent_wait_s > 0.002
    assert busy.recent_wait_s == 0.0
    assert (idle.idle_spin_s, busy.idle_spin_s) == (100e-6, 1e-3)
    assert busy.yield_s == 0.0


def test_yield_window_is_configurable_and_zero_turns_it_off(counted, monkeypatch):
    monkeypatch.setenv("PSFRAME_YIELD_S", "0")
    Waiter(oversubscribed=True).wait(LateRequest(0.001))
    assert counted["yield"] == 0


def test_completed_yields_every_frame_once():
    """Frames to self on COMM_SELF: each index comes out exactly once, whatever the order."""
    me = MPI.COMM_SELF
    src = np.arange(40, dtype=np.float32)
    dst = np.zeros_like(src)
    cuts = [(0, 10), (10, 25), (25, 26), (26, 40)]
    recvs = [me.Irecv([dst[a:b], MPI.FLOAT], source=0, tag=7) for a, b in cuts]
    sends = [me.Isend([src[a:b], MPI.FLOAT], dest=0, tag=7) for a, b in cuts]
    waiter = Waiter()
    seen = list(waiter.completed(recvs))
    waiter.wait_all(sends)
    assert sorted(seen) == [0, 1, 2, 3]
    np.testing.assert_array_equal(dst, src)
