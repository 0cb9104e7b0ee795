"""A worker whose gradient turns NaN: the server rejects it and fails the run clearly.

argv[1]: the transport ("auto": the server checks the shared gradient; "mpi": the worker
checks it and flags it, and the server refuses it at its header).
"""
import sys

import numpy as np
from mpi4py import MPI

import psframe as ps


class GoesNaN(ps.models.MLP):
    calls = 0

    def loss_and_grad(self, params, X, y):
        loss, grads = super().loss_and_grad(params, X, y)
        self.calls += 1
        if MPI.COMM_WORLD.Get_rank() == 1 and self.calls == 5:
            grads["0.W"][0, 0] = np.nan
        return loss, grads


rng = np.random.default_rng(0)
X, y = rng.normal(size=(100, 5)), rng.integers(0, 3, 100)
transport = sys.argv[1] if len(sys.argv) > 1 else "auto"
ps.train(GoesNaN([5, 16, 3]), (X, y), batch_size=8, steps=100, transport=transport)
