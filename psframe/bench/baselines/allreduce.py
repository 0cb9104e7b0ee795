"""Allreduce data parallel by hand: every rank holds the model, sums gradients with one
MPI Allreduce per step and takes the same SGD step; rank 0 also evaluates."""
import sys
import time

import numpy as np
from mpi4py import MPI

import common
from mlp import MLP, SGD


def main(argv):
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    options, _, delays, out = common.load_spec(argv)
    sizes = common.mlp_sizes(options)
    X, y, X_test, y_test = common.load_data(options)
    threads, limit = common.thread_limit(options, ranks_here=size)
    model = MLP(sizes, options["dtype"])
    w = model.init(np.random.default_rng(options["seed"]))  # the same start on every rank
    # One buffer per step: the gradient and, in its last slot, the batch's summed loss, so
    # the loss needs no second collective.
    buf = np.empty(model.size + 1, w.dtype)
    g = buf[:-1]
    opt = SGD(model.size, w.dtype, options["lr"], options["momentum"],
              options["weight_decay"], options["nesterov"])
    b = options["batch_size"]
    shard = common.Shard(len(X), size, rank, b, options["shuffle"], options["seed"])
    steps = common.total_steps(options, len(X), size)
    evaluate = (lambda: model.evaluate(w, X_test, y_test)) if options["eval"] and rank == 0 \
        else None
    history = common.History(evaluate, options["eval_every"],
                             common.steps_per_epoch(len(X), size, b) * size * b)
    sleep = delays.get(rank, 0.0)
    waited = 0.0
    with limit:
        comm.Barrier()
        history.start()
        for t in range(steps):
            rows = shard.rows(t)
            buf[-1] = model.loss_and_grad(w, X[rows], y[rows], g) * b
            if sleep:
                time.sleep(sleep)  # a simulated straggler, as psframe's delay= sleeps
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            waited += time.perf_counter() - t0
            loss = float(buf[-1]) / (size * b)
            g /= size
            opt.step(w, g)
            if rank == 0:
                history.step(t + 1, (t + 1) * size * b, loss, size * b)
        wall = time.perf_counter() - history.t0
        if rank == 0:
            history.record(steps, steps * size * b)
    waits = comm.gather(waited, root=0)
    walls = comm.gather(wall, root=0)
    if rank:
        return
    samples = steps * size * b
    nbytes = buf.nbytes * steps  # each rank sends its gradient and receives the sum, per step
    stats = {"wall_s": wall, "samples": samples, "samples_per_s": samples / wall,
             "updates_applied": steps, "steps_per_worker": [steps] * size, "n_workers": size,
             "bytes_pushed": nbytes * size, "bytes_pulled": nbytes * size,
             "worker_wait_s": waits, "worker_wait_share": sum(waits) / max(sum(walls), 1e-12),
             "n_params": model.size}
    common.write_result(out, stats, history.rows, {"threads": threads, "sizes": sizes})


if __name__ == "__main__":
    main(sys.argv)
