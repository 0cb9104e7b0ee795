"""A long Sync run with a short stall timeout and stop bound; each rank leaves its pid.
Arguments: a directory for the pids, the stall timeout, the stop timeout (seconds)."""
import os
import sys

from mpi4py import MPI

import psframe as ps

pid_dir, stall, stop = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
os.makedirs(pid_dir, exist_ok=True)
with open(os.path.join(pid_dir, f"pid-{MPI.COMM_WORLD.Get_rank()}"), "w") as f:
    f.write(str(os.getpid()))
train, _ = ps.data.digits(seed=0)


class Started(ps.Callback):
    """Leaves a file once the server has applied a few updates: training is under way."""

    def on_update(self, step, stats):
        if step == 5:
            open(os.path.join(pid_dir, "started"), "w").close()


try:
    ps.train(ps.models.MLP([64, 32, 10]), train, batch_size=8, steps=1_000_000, seed=0,
             delay={0: 0.002}, stall_timeout=stall, stop_timeout=stop, callbacks=[Started()])
except ps.TrainingInterrupted as exc:
    print(f"rank {MPI.COMM_WORLD.Get_rank()}: {exc}", flush=True)
    sys.exit(3)
