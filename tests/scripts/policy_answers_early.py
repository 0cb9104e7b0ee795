"""A policy that answers a worker's pull while that worker's gradient still waits for an
update: the server must refuse it (on either transport), not let the gradient be overwritten."""
import sys

import numpy as np

import psframe as ps
from psframe.policies import Policy, PolicyState, PushDecision


class AnswersEarlyState(PolicyState):
    def may_answer(self, worker, clock):
        return True  # never holds a pull

    def push(self, worker, clock, pulled_version, accepted=True):
        self.count_push(worker, clock)
        return PushDecision(accumulate=True, release=self.releasable())  # never applies


class AnswersEarly(Policy):
    def state(self, n_workers, version=0):
        return AnswersEarlyState(n_workers, version)


rng = np.random.default_rng(0)
X, y = rng.normal(size=(100, 5)), rng.integers(0, 3, 100)
ps.train(ps.models.MLP([5, 16, 3]), (X, y), policy=AnswersEarly(), batch_size=8, steps=20,
         transport=sys.argv[1])
print("UNREACHABLE: the run finished")
