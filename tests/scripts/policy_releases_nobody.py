"""A policy that releases a worker whose pull it never held: the server must refuse it, not
send that worker a reply it did not ask for."""
import numpy as np

import psframe as ps


class ReleasesNobodyState(ps.PolicyState):
    def may_answer(self, worker, clock):
        return True

    def push(self, worker, clock, pulled_version, accepted=True):
        self.count_push(worker, clock)
        self.version += 1
        # Worker 0's pull was answered, not held: releasing it again is a bug.
        return ps.PushDecision.apply_now(1.0, release=(0,))


class ReleasesNobody(ps.Policy):
    def state(self, n_workers, version=0):
        return ReleasesNobodyState(n_workers, version)


rng = np.random.default_rng(0)
X, y = rng.normal(size=(100, 5)), rng.integers(0, 3, 100)
ps.train(ps.models.MLP([5, 16, 3]), (X, y), policy=ReleasesNobody(), batch_size=8, steps=20)
print("UNREACHABLE: the run finished")
