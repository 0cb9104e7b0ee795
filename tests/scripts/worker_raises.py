"""A user model that raises in one worker mid-run: the whole job must end, with the traceback."""
import sys

import numpy as np
from mpi4py import MPI

import psframe as ps

FAIL_RANK, FAIL_STEP = int(sys.argv[1]), int(sys.argv[2])


class Flaky(ps.models.MLP):
    calls = 0

    def loss_and_grad(self, params, X, y):
        if len(X) == 8:  # training batches only, not the two-row probe
            self.calls += 1
            if MPI.COMM_WORLD.Get_rank() == FAIL_RANK and self.calls == FAIL_STEP:
                raise RuntimeError(f"user bug at step {FAIL_STEP} on rank {FAIL_RANK}")
        return super().loss_and_grad(params, X, y)


rng = np.random.default_rng(0)
X, y = rng.normal(size=(200, 5)), rng.integers(0, 3, 200)
ps.train(Flaky([5, 16, 3]), (X, y), batch_size=8, steps=10_000)
print(f"UNREACHABLE: training finished on rank {MPI.COMM_WORLD.Get_rank()}", flush=True)
