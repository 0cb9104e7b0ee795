"""SIGINT while the server runs its final evaluation: every worker has sent DONE and waits to
free the shared window. The signal must ask for a stop, never abort the job."""
import sys
import time

from mpi4py import MPI

import psframe as ps

marker, transport = sys.argv[1], sys.argv[2]


class SlowEval(ps.models.MLP):
    def evaluate(self, params, X, y):
        open(marker, "w").close()  # the server is past its loop: every worker is done
        time.sleep(4)
        return super().evaluate(params, X, y)


train, test = ps.data.digits(seed=0)
rank = MPI.COMM_WORLD.Get_rank()
try:
    ps.train(SlowEval([64, 32, 10]), train, eval_data=test, eval_every=10**6, batch_size=8,
             steps=20, seed=0, transport=transport)
    print(f"rank {rank}: returned", flush=True)
except ps.TrainingInterrupted as exc:
    print(f"rank {rank}: interrupted: {exc}", flush=True)
    sys.exit(3)
