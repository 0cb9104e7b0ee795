"""Run across hosts: the last rank (on a remote host) kills itself with SIGKILL mid-run."""
import os
import signal

import numpy as np
from mpi4py import MPI

import psframe as ps


class Dies(ps.Model):
    """An MLP whose gradient on the last rank, at its third step, is a SIGKILL."""

    def __init__(self):
        self.inner = ps.models.MLP([5, 16, 3])
        self.calls = 0
        self.victim = MPI.COMM_WORLD.rank == MPI.COMM_WORLD.size - 1

    def init_params(self, rng):
        return self.inner.init_params(rng)

    def loss_and_grad(self, params, X, y):
        self.calls += 1
        if self.victim and self.calls == 4:  # the first call is the checks' probe
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner.loss_and_grad(params, X, y)


rng = np.random.default_rng(0)
X, y = rng.normal(size=(200, 5)), rng.integers(0, 3, 200)
ps.train(Dies(), (X, y), batch_size=8, steps=10_000)
print("UNREACHABLE: the run finished", flush=True)
