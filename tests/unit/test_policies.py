"""Policy state machines driven without MPI through thousands of random interleavings."""
import random

import numpy as np
import pytest

from psframe.errors import ProtocolError
from psframe.policies import (SSP, Async, DelayCompensation, Mixed, Sync, delay_compensate,
                              policy_from_spec)


class Simulation:
    """Workers that pull, compute and push in a random global order, as MPI could deliver.

    Records every decision, so the tests can check the policy's promises after the fact.
    """

    def __init__(self, policy, n_workers, steps, seed, reject=frozenset(), slow=None):
        self.rng = random.Random(seed)
        self.state = policy.state(n_workers)
        self.n, self.steps = n_workers, steps
        self.reject, self.slow = reject, slow
        self.clock = [0] * n_workers
        self.pulled = [None] * n_workers  # version a worker's weights came from
        self.phase = ["pull"] * n_workers
        self.held = set()
        self.pending = []
        self.events = []  # dicts: kind, worker, clock, version, decision ...
        self.gaps = []  # clock gap at each answered pull, computed here independently

    def _answer(self, w):
        active = [self.clock[v] for v in range(self.n) if self.phase[v] != "done"]
        self.gaps.append(self.clock[w] - min(active))
        self.pulled[w] = self.state.version
        self.phase[w] = "push"

    def run(self):
        while True:
            ready = [w for w in range(self.n) if self.phase[w] != "done" and w not in self.held]
            if not ready:
                assert not self.held, "deadlock: pulls held with nobody able to move"
                return self
            # A slow worker moves only rarely: stragglers make the interesting interleavings.
            weights = [0.15 if w == self.slow else 1.0 for w in ready]
            w = self.rng.choices(ready, weights)[0]
            if self.phase[w] == "pull":
                if self.clock[w] == self.steps:
                    self.phase[w] = "done"
                    self._carry(self.state.finish(w), w, "finish", None)
                elif self.state.pull(w, self.clock[w]):
                    self._answer(w)
                else:
                    self.held.add(w)
                continue
            accepted = (w, self.clock[w]) not in self.reject
            version_before = self.state.version
            decision = self.state.push(w, self.clock[w], self.pulled[w], accepted=accepted)
            self.clock[w] += 1
            self.phase[w] = "pull"
            self._carry(decision, w, "push", version_before, accepted)

    def _carry(self, decision, w, kind, version_before, accepted=True):
        event = {"kind": kind, "worker": w, "pulled": self.pulled[w], "decision": decision,
                 "version_before": version_before, "accepted": accepted, "group": None,
                 "n_done": self.phase.count("done")}
        if decision.accumulate:
            self.pending.append(w)
        if decision.complete:
            event["group"] = sorted(self.pending)
            self.pending = []
        self.events.append(event)
        for r in decision.release:
            assert r in self.held
            self.held.discard(r)
            self._answer(r)

    def updates(self):
        return [e for e in self.events if e["decision"].complete or e["decision"].apply]


SEEDS = range(1000)


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5])
def test_sync_applies_one_update_per_step_with_the_mean_of_all(n_workers):
    for seed in SEEDS if n_workers == 3 else range(200):
        sim = Simulation(Sync(), n_workers, steps=4, seed=seed).run()
        assert sim.state.version == 4
        updates = sim.updates()
        assert len(updates) == 4
        for e in updates:
            assert e["group"] == list(range(n_workers))
            assert e["decision"].scale == pytest.approx(1.0 / n_workers)
            assert e["decision"].staleness == 0
        assert max(sim.gaps) == 0 and sim.state.max_clock_gap == 0  # lock-step


@pytest.mark.parametrize("s", [0, 1, 2, 3])
def test_ssp_never_lets_a_clock_run_more_than_s_ahead(s):
    worst = 0
    for seed in SEEDS:
        sim = Simulation(SSP(s), 4, steps=8, seed=seed, slow=seed % 4).run()
        assert max(sim.gaps) <= s
        assert sim.state.max_clock_gap == max(sim.gaps)
        assert sim.state.version == 4 * 8  # every gradient applied, on arrival
        worst = max(worst, max(sim.gaps))
    assert worst == s  # the bound is reached, so the test could see a violation


def test_async_gap_is_unbounded_and_staleness_is_measured():
    gaps, stalest = 0, 0
    for seed in range(300):
        sim = Simulation(Async(), 4, steps=8, seed=seed, slow=0).run()
        for e in sim.updates():
            assert e["decision"].staleness == e["version_before"] - e["pulled"]
            assert e["decision"].weight == pytest.approx(1 / 4)  # scale="auto": 1/N
            assert e["decision"].compensation is None
        gaps = max(gaps, max(sim.gaps))
        stalest = max(stalest, max(e["decision"].staleness for e in sim.updates()))
    assert gaps > 3 and stalest > 3


def test_staleness_lr_scales_each_update():
    for seed in range(300):
        sim = Simulation(Async(staleness_lr=True), 3, steps=6, seed=seed, slow=1).run()
        for e in sim.updates():
            tau = e["version_before"] - e["pulled"]
            assert e["decision"].weight == pytest.approx(1.0 / max(1, tau))


@pytest.mark.parametrize("n", [2, 3, 8, 16])
@pytest.mark.parametrize("make", [Async, lambda **kw: SSP(1, **kw)])
def test_on_arrival_weights_follow_the_scale_option(make, n):
    def weights(**kw):
        sim = Simulation(make(**kw), n, steps=5, seed=n, slow=0).run()
        return [(e["decision"].weight, e["decision"].staleness) for e in sim.updates()]
    assert {w for w, _ in weights()} == {1 / n}  # a round of N moves as far as one Sync step
    assert {w for w, _ in weights(scale="none")} == {1.0}  # the raw behaviour, by name
    assert {w for w, _ in weights(scale=0.3)} == {0.3}
    for w, tau in weights(scale="staleness"):
        assert w == pytest.approx(1 / max(1, tau))
    assert make(staleness_lr=True) == make(scale="staleness")


def test_delay_compensation_rides_on_every_on_arrival_update():
    # Fresh ones too: their correction is exactly 0, but adaptive DC's mean square sees them.
    dc = DelayCompensation(lam=1.0)
    for seed in range(100):
        sim = Simulation(Mixed(sync_steps=2, then=SSP(1, compensation=dc)), 3, steps=6,
                         seed=seed, slow=0).run()
        updates = sim.updates()
        assert all(e["decision"].compensation is None for e in updates[:2])  # the Sync phase
        assert all(e["decision"].compensation is dc for e in updates[2:])


def test_backup_tail_steps_are_weighted_by_gradients_over_quorum():
    n, backup = 4, 1
    tails = 0
    for seed in range(300):
        for scale in ("auto", "none"):
            sim = Simulation(Sync(backup=backup, scale=scale), n, steps=6, seed=seed,
                             slow=seed % n).run()
            for e in sim.updates():
                size = len(e["group"])
                want = size / (n - backup) if scale == "auto" else 1.0
                assert e["decision"].weight == pytest.approx(want)
                assert e["decision"].scale == pytest.approx(1 / size)
                tails += size < n - backup
    assert tails > 50  # short tail steps did happen


def test_plain_sync_steps_keep_weight_one():
    for seed in range(200):
        sim = Simulation(Sync(), 3, steps=4, seed=seed).run()
        assert {e["decision"].weight for e in sim.updates()} == {1.0}


@pytest.mark.parametrize("then", [Async(), SSP(1)])
def test_mixed_switches_at_exactly_k(then):
    k = 5
    for seed in SEEDS:
        sim = Simulation(Mixed(sync_steps=k, then=then), 3, steps=10, seed=seed, slow=2).run()
        updates = sim.updates()
        assert all(e["decision"].complete and e["group"] == [0, 1, 2] for e in updates[:k])
        assert all(e["decision"].apply for e in updates[k:])
        assert sim.state.switches == [k]
        assert len(updates) == k + 3 * (10 - k)
        if isinstance(then, SSP):
            assert max(sim.gaps) <= 1


def test_mixed_phase_list_and_held_pulls_carry_over():
    policy = Mixed([(4, SSP(0)), (3, Sync()), (None, Async())])
    for seed in range(300):
        sim = Simulation(policy, 3, steps=9, seed=seed, slow=1).run()
        kinds = ["apply" if e["decision"].apply else "sync" for e in sim.updates()]
        assert kinds[:4] == ["apply"] * 4
        assert kinds[4:7] == ["sync"] * 3
        assert set(kinds[7:]) == {"apply"}
        assert sim.state.switches == [4, 7]


@pytest.mark.parametrize("backup", [1, 2])
def test_backup_drops_exactly_the_late_gradients(backup):
    n, drops = 4, 0
    for seed in SEEDS:
        sim = Simulation(Sync(backup=backup), n, steps=6, seed=seed, slow=seed % n).run()
        for e in sim.events:
            if e["kind"] != "push":
                continue
            late = e["pulled"] < e["version_before"]
            assert e["decision"].drop == late
            assert e["decision"].accumulate == (not late)
        for e in sim.updates():
            # The first N-k gradients make a step; fewer only once workers have finished.
            if e["n_done"] == 0:
                assert len(e["group"]) == n - backup
            else:
                assert 1 <= len(e["group"]) <= n - backup
        drops += sum(e["decision"].drop for e in sim.events)
    assert drops > 100  # late gradients did happen, so the check above had teeth


def test_rejected_gradients_leave_the_mean_of_the_rest():
    for seed in range(300):
        sim = Simulation(Sync(), 3, steps=3, seed=seed,
                         reject={(1, 0), (0, 2), (2, 2)}).run()
        assert [e["group"] for e in sim.updates()] == [[0, 2], [0, 1, 2], [1]]
        assert [e["decision"].scale for e in sim.updates()] == pytest.approx([0.5, 1 / 3, 1.0])


def test_pull_ahead_is_held_until_the_step_applies():
    state = Sync().state(2)
    assert state.pull(0, 0) and state.pull(1, 0)
    assert not state.push(0, 0, 0).complete
    assert state.pull(0, 1) is False
    decision = state.push(1, 0, 0)
    assert decision.complete and decision.release == (0,) and state.version == 1


def test_protocol_violations_are_caught():
    state = Sync().state(2)
    state.push(0, 0, 0)
    with pytest.raises(ProtocolError):
        state.push(0, 0, 0)  # its clock is 1 now
    with pytest.raises(ProtocolError):
        state.push(1, 3, 0)
    with pytest.raises(ProtocolError):
        state.pull(1, 5)
    state = Async().state(1)
    with pytest.raises(ProtocolError, match="ahead"):
        state.push(0, 0, 3)


def test_policy_specs():
    assert policy_from_spec("sync") == Sync()
    assert policy_from_spec(" SYNC ") == Sync()
    assert policy_from_spec("backup:1") == Sync(backup=1)
    assert policy_from_spec("async") == Async()
    assert policy_from_spec("async:lr") == Async(staleness_lr=True)
    assert policy_from_spec("ssp:3") == SSP(3)
    mixed = policy_from_spec("mixed:100:ssp:2")
    assert isinstance(mixed, Mixed) and mixed.phases == [(100, Sync()), (None, SSP(2))]
    assert repr(mixed) == "Mixed(sync_steps=100, then=SSP(staleness=2))"
    for bad in ("bogus", "ssp:x", "ssp:-1"):
        with pytest.raises(ValueError):
            policy_from_spec(bad)
    with pytest.raises(ValueError):
        policy_from_spec(3)


def test_policy_spec_modifiers():
    assert policy_from_spec("async+raw") == Async(scale="none")
    assert policy_from_spec("sync+raw") == Sync(scale="none")
    assert policy_from_spec("backup:2+raw") == Sync(backup=2, scale="none")
    assert policy_from_spec("ssp:2+scale=0.5") == SSP(2, scale=0.5)
    assert policy_from_spec("async+scale=staleness") == Async(staleness_lr=True)
    assert policy_from_spec("async+dc") == Async(compensation=DelayCompensation())
    assert policy_from_spec("ssp:1+dc=0.5") == SSP(1, compensation=DelayCompensation(0.5))
    assert policy_from_spec("async+dc-c") == Async(
        compensation=DelayCompensation(0.04, adaptive=False))
    mixed = policy_from_spec("mixed:50:ssp:2+dc")
    assert mixed.phases[1][1] == SSP(2, compensation=DelayCompensation())
    assert policy_from_spec("mixed:50+raw").phases[1][1] == Async(scale="none")
    assert repr(Async(scale="none")) == "Async(scale='none')"
    assert repr(Async()) == "Async()" and repr(SSP(2)) == "SSP(staleness=2)"
    for bad, message in (("async:x", "lr"), ("async+foo", "unknown modifier"),
                         ("sync+dc", "no stale gradients"), ("ssp:2+scale=-1", "positive"),
                         ("async:lr+raw", "cannot be combined"), ("async+dc=0", "positive"),
                         ("async+scale=", "unknown modifier")):
        with pytest.raises(ValueError, match=message):
            policy_from_spec(bad)


def test_scale_and_compensation_are_checked():
    for bad in (0, -1, float("nan"), "fast", True):
        with pytest.raises(ValueError, match="scale"):
            Async(scale=bad)
    with pytest.raises(ValueError, match="scale"):
        Sync(scale="staleness")
    with pytest.raises(ValueError, match="compensation"):
        SSP(2, compensation="magic")
    with pytest.raises(ValueError, match="decay"):
        DelayCompensation(decay=1.0)


def test_delay_compensate_matches_the_formula():
    rng = np.random.default_rng(0)
    g, w_now, w_stale = rng.normal(size=(3, 7))
    out = np.empty(7)
    constant = DelayCompensation(0.3, adaptive=False)
    delay_compensate(g, w_now, w_stale, constant, out)
    np.testing.assert_allclose(out, g + 0.3 * g * g * (w_now - w_stale), rtol=1e-14)
    # Adaptive (DC-ASGD-a): MS is updated with g first, then lam / sqrt(MS) is used.
    adaptive = DelayCompensation(2.0, decay=0.9)
    ms = rng.uniform(0.1, 1.0, size=7)
    ms_want = 0.9 * ms + 0.1 * g * g
    delay_compensate(g, w_now, w_stale, adaptive, out, mean_square=ms, scratch=np.empty(7))
    np.testing.assert_allclose(ms, ms_want, rtol=1e-14)
    np.testing.assert_allclose(out, g + 2.0 / np.sqrt(ms_want) * g * g * (w_now - w_stale),
                               rtol=1e-10)  # up to the 1e-12 floor under sqrt(MS)
    # Fresh weights (w_now == w_stale): the gradient is returned unchanged.
    delay_compensate(g, w_now, w_now, adaptive, out, mean_square=ms, scratch=np.empty(7))
    np.testing.assert_array_equal(out, g)


def test_policy_validation():
    with pytest.raises(ValueError, match="backup"):
        Sync(backup=-1)
    with pytest.raises(ValueError, match="more than 2 workers"):
        Sync(backup=2).validate(2)
    with pytest.raises(ValueError):
        SSP(staleness=1.5)
    with pytest.raises(ValueError):
        Mixed()
    with pytest.raises(ValueError):
        Mixed([(0, Sync()), (None, Async())])
