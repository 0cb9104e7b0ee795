"""The Sync state machine, driven without MPI through many random interleavings."""
import random

import pytest

from psframe.policies import ProtocolError, Sync, policy_from_spec


def simulate(n_workers, steps, seed, reject=frozenset()):
    """Workers that pull, compute and push in a random global order, as MPI could deliver."""
    rng = random.Random(seed)
    state = Sync().state(n_workers)
    clock = [0] * n_workers  # next step each worker pulls for
    phase = ["pull"] * n_workers
    held, applied = set(), []
    pending = []
    while True:
        ready = [w for w in range(n_workers) if phase[w] != "done" and w not in held]
        if not ready:
            assert not held, "deadlock: pulls held with nobody able to move"
            return state, applied
        w = rng.choice(ready)
        if phase[w] == "pull":
            if clock[w] == steps:
                decision = state.finish(w)
                phase[w] = "done"
            elif state.pull(w, clock[w]):
                phase[w] = "push"
                continue
            else:
                held.add(w)
                continue
        else:
            accepted = (w, clock[w]) not in reject
            decision = state.push(w, clock[w], state.version, accepted=accepted)
            assert decision.accumulate == accepted
            if decision.accumulate:
                pending.append(w)
            clock[w] += 1
            phase[w] = "pull"
        if decision.complete:
            applied.append((state.version, sorted(pending), decision.scale))
            pending = []
        for r in decision.release:
            assert r in held
            held.discard(r)
            phase[r] = "push"


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5])
def test_one_update_per_step_with_the_mean_of_all(n_workers):
    for seed in range(300):
        state, applied = simulate(n_workers, steps=4, seed=seed)
        assert state.version == 4
        assert [v for v, _, _ in applied] == [1, 2, 3, 4]
        for _, workers, scale in applied:
            assert workers == list(range(n_workers))
            assert scale == pytest.approx(1.0 / n_workers)


def test_rejected_gradients_leave_the_mean_of_the_rest():
    for seed in range(200):
        state, applied = simulate(3, steps=3, seed=seed, reject={(1, 0), (0, 2), (2, 2)})
        assert [w for _, w, _ in applied] == [[0, 2], [0, 1, 2], [1]]
        assert [s for _, _, s in applied] == pytest.approx([0.5, 1 / 3, 1.0])


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
    with pytest.raises(ProtocolError, match="twice"):
        state.push(0, 0, 0)
    with pytest.raises(ProtocolError):
        state.push(1, 3, 0)
    with pytest.raises(ProtocolError):
        state.pull(1, 5)


def test_policy_specs():
    assert isinstance(policy_from_spec("sync"), Sync)
    assert isinstance(policy_from_spec(" SYNC "), Sync)
    with pytest.raises(ValueError, match="unknown policy"):
        policy_from_spec("bogus")
    with pytest.raises(ValueError):
        policy_from_spec(3)
    with pytest.raises(ValueError, match="backup"):
        Sync(backup=1)
