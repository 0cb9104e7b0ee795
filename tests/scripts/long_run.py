"""A long Sync run that checkpoints often; each rank leaves its pid, for the fault tests.
Arguments: the checkpoint directory, then optionally the number of servers."""
import os
import sys

from mpi4py import MPI

import psframe as ps

ckpt_dir = sys.argv[1]
servers = int(sys.argv[2]) if len(sys.argv) > 2 else 1
os.makedirs(ckpt_dir, exist_ok=True)
with open(os.path.join(ckpt_dir, f"pid-{MPI.COMM_WORLD.Get_rank()}"), "w") as f:
    f.write(str(os.getpid()))
train, _ = ps.data.digits(seed=0)
try:
    ps.train(ps.models.MLP([64, 32, 10]), train, batch_size=8, steps=1_000_000, seed=0,
             checkpoint_dir=ckpt_dir, checkpoint_every=20, delay={0: 0.002}, servers=servers)
except ps.TrainingInterrupted as exc:
    print(f"rank {MPI.COMM_WORLD.Get_rank()}: {exc}", flush=True)
    sys.exit(3)
