"""Idle server: CPU share of psframe's ranks when workers are slow, against a blocking MPI Recv."""
import argparse
import sys
import time

import numpy as np
from mpi4py import MPI

import psframe as ps
from psframe.training import abort_job
from psframe.transport import Waiter
from psframe.transport.topology import node_share


class SleepyModel(ps.Model):
    """A tiny model whose gradient takes ``sleep_s`` of wall time and no CPU."""

    def __init__(self, sleep_s, n_params=1000):
        self.sleep_s = sleep_s
        self.n = n_params

    def init_params(self, rng):
        return {"w": np.zeros(self.n)}

    def loss_and_grad(self, params, X, y):
        time.sleep(self.sleep_s)
        return 0.0, {"w": np.zeros(self.n, dtype=params["w"].dtype)}


def cpu_share(fn):
    """(CPU seconds / wall seconds of this process during fn(), wall seconds, fn's result)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return cpu / wall, wall, out


def psframe_run(comm, args):
    """ps.train, Sync, every worker sleeping per step; each rank's CPU share, gathered on 0."""
    X, y = np.zeros((64, 4)), np.zeros(64, dtype=np.int64)
    model = SleepyModel(args.sleep_ms / 1e3)
    share, wall, result = cpu_share(lambda: ps.train(
        model, (X, y), policy="sync", batch_size=1, steps=args.steps, threads=1, comm=comm))
    shares = comm.gather(share, root=0)
    if result is None:
        return None
    return {"server": result.stats["server_cpu_share"], "server_wall": result.stats["wall_s"],
            "workers": shares[1:]}


def quiet_barrier(comm, waiter):
    """A barrier that sleeps while it waits, so only the rank under test may spin a core."""
    waiter.wait(comm.Ibarrier())


def blocking_recv(comm, waiter, seconds, yielding):
    """Rank 0 receives one small message that rank 1 sends after ``seconds``; rank 0's share.

    yielding=False: plain blocking comm.Recv (what MPICH spins in).
    yielding=True: an Irecv finished by psframe's Waiter.wait (polling with backoff).
    """
    buf = np.zeros(8, dtype=np.int64)
    quiet_barrier(comm, waiter)
    share = None
    if comm.Get_rank() == 0:
        if yielding:
            share, _, _ = cpu_share(lambda: waiter.wait(comm.Irecv(buf, source=1, tag=7)))
        else:
            share, _, _ = cpu_share(lambda: comm.Recv(buf, source=1, tag=7))
    elif comm.Get_rank() == 1:
        time.sleep(seconds)
        comm.Send(buf, dest=0, tag=7)
    quiet_barrier(comm, waiter)
    return share


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sleep-ms", type=float, default=50.0,
                        help="wall time of each worker's loss_and_grad (default 50 ms)")
    parser.add_argument("--steps", type=int, default=40, help="steps per worker per run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each; medians")
    args = parser.parse_args()

    world = MPI.COMM_WORLD
    if world.Get_size() < 3:
        if world.Get_rank() == 0:
            print("run with: mpiexec -n 3 python benchmarks/idle_server.py", file=sys.stderr)
        return 2
    comm = world.Dup()
    local_ranks, cores = node_share(comm)
    waiter = Waiter(oversubscribed=local_ranks > cores)  # the wait ps.train gives this rank
    root = comm.Get_rank() == 0
    t_start = time.perf_counter()
    runs, spin, yielding = [], [], []
    for _ in range(args.repeats):
        r = psframe_run(comm, args)
        duration = comm.bcast(r["server_wall"] if root else None, root=0)
        spin.append(blocking_recv(comm, waiter, duration, yielding=False))
        yielding.append(blocking_recv(comm, waiter, duration, yielding=True))
        runs.append(r)

    if root:
        med = lambda v: float(np.median(v))  # noqa: E731
        base = med(spin)
        n_workers = comm.Get_size() - 1
        rows = [("psframe server (rank 0), result.stats['server_cpu_share']",
                 med([r["server"] for r in runs]))]
        rows += [(f"psframe worker {i} (rank {i + 1}), whole ps.train call",
                  med([r["workers"][i] for r in runs])) for i in range(n_workers)]
        rows += [("baseline: blocking comm.Recv on rank 0", base),
                 ("psframe's Waiter.wait on an Irecv on rank 0", med(yielding))]
        print(f"idle server: {n_workers} workers, loss_and_grad sleeps {args.sleep_ms:g} ms, "
              f"{args.steps} steps, Sync, threads=1; {args.repeats} repeats, medians; "
              f"run wall {med([r['server_wall'] for r in runs]):.2f} s; baselines wait as long; "
              f"{MPI.Get_library_version().splitlines()[0].strip()}")
        width = max(len(name) for name, _ in rows)
        head = f"{'rank waiting':<{width}} | {'CPU share':>9} | {'vs blocking Recv':>16}"
        print(head)
        print("-" * len(head))
        for name, share in rows:
            print(f"{name:<{width}} | {share:>9.1%} | {share / base:>16.3f}")
        print("CPU share = CPU seconds / wall seconds of that process (100% = one core busy).")
        print("per run: server " + ", ".join(f"{r['server']:.1%}" for r in runs)
              + "; blocking Recv " + ", ".join(f"{x:.1%}" for x in spin)
              + "; comm.wait " + ", ".join(f"{x:.1%}" for x in yielding))
        print(f"total {time.perf_counter() - t_start:.1f} s")
    comm.Free()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # one failing rank must not leave the others waiting in MPI
        abort_job(MPI.COMM_WORLD)
