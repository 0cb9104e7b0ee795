"""Data vs model (pipeline) vs hybrid parallel at equal worker counts, with the measured bubble.

Run:  .venv/bin/mpiexec -n 5 .venv/bin/python benchmarks/modes.py [--epochs 2] [--batch-size 64]

One job: the MNIST MLP (784-128-10, two Dense layers, so at most two stages) runs on a
sub-communicator of 1 server + 2 workers; the deep MLP (784-1024-1024-1024-10) on all
5 ranks (1 server + 4 workers). Every mode sees the same data, optimizer, batch and seed.
"""
import argparse
import time

from mpi4py import MPI

import psframe as ps
from psframe.worker import gpipe_bubble


def parse():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--micro-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def cells(m):
    """(model name, sizes, workers, label, train kwargs, stages P, micro-batches)."""
    small, deep = [784, 128, 10], [784, 1024, 1024, 1024, 10]
    return [
        ("mnist-mlp", small, 2, "data", {"mode": "data"}, 1, 1),
        ("mnist-mlp", small, 2, "model m=1", {"mode": "model"}, 2, 1),
        ("mnist-mlp", small, 2, f"model m={m}", {"mode": "model", "micro_batches": m}, 2, m),
        ("deep-mlp", deep, 4, "data", {"mode": "data"}, 1, 1),
        ("deep-mlp", deep, 4, "model m=1", {"mode": "model"}, 4, 1),
        ("deep-mlp", deep, 4, f"model m={m}", {"mode": "model", "micro_batches": m}, 4, m),
        ("deep-mlp", deep, 4, "hybrid 2x2 m=1", {"mode": "hybrid", "stages": 2}, 2, 1),
        ("deep-mlp", deep, 4, f"hybrid 2x2 m={m}",
         {"mode": "hybrid", "stages": 2, "micro_batches": m}, 2, m),
    ]


def main():
    args = parse()
    world = MPI.COMM_WORLD
    if world.Get_size() != 5:
        raise SystemExit("run with mpiexec -n 5 (1 server + 4 workers)")
    train, test = ps.data.mnist(seed=args.seed)
    sub = world.Split(0 if world.Get_rank() < 3 else MPI.UNDEFINED, world.Get_rank())
    rows = []
    for name, sizes, workers, label, kw, n_stages, m in cells(args.micro_batches):
        comm = world if workers == 4 else sub
        if comm != MPI.COMM_NULL:
            start = time.perf_counter()
            result = ps.train(ps.models.MLP(sizes), train, eval_data=test,
                              optimizer=ps.SGD(lr=args.lr, momentum=0.9),
                              batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
                              comm=comm, **kw)
            if result is not None:
                rows.append(row(name, label, workers, n_stages, m, result,
                                time.perf_counter() - start))
        world.Barrier()  # the ranks outside the sub-communicator wait here, idle
    if world.Get_rank() == 0:
        report(rows, args)


def row(name, label, workers, n_stages, m, result, elapsed):
    s = result.stats
    idle = s.get("stage_idle_share")
    return {
        "model": name, "mode": label, "workers": workers, "wall_s": s["wall_s"],
        "samples_per_s": s["samples_per_s"],
        "mb_moved": (s["bytes_pulled"] + s["bytes_pushed"]) / 2**20,
        "bytes_per_sample": (s["bytes_pulled"] + s["bytes_pushed"]) / max(s["samples"], 1),
        "accuracy": result.history[-1]["eval_accuracy"],
        "idle": None if idle is None else sum(idle) / len(idle),
        "gpipe": None if n_stages == 1 else gpipe_bubble(n_stages, m),
    }


def report(rows, args):
    print(f"MNIST subset, {args.epochs} epochs, batch {args.batch_size} per worker or pipeline, "
          f"SGD lr {args.lr} momentum 0.9; {MPI.Get_library_version().splitlines()[0]}")
    header = (f"{'model':10} {'mode':16} {'workers':>7} {'wall s':>7} {'samples/s':>10} "
              f"{'MiB moved':>10} {'B/sample':>10} {'test acc':>8} {'stage idle':>10} "
              f"{'GPipe est':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        def pct(x):
            return "      -" if x is None else f"{x:9.1%}"
        print(f"{r['model']:10} {r['mode']:16} {r['workers']:7d} {r['wall_s']:7.2f} "
              f"{r['samples_per_s']:10,.0f} {r['mb_moved']:10.1f} {r['bytes_per_sample']:10,.0f} "
              f"{r['accuracy']:8.4f} {pct(r['idle']):>10} {pct(r['gpipe']):>9}")
    print("stage idle: mean over stages of (time waiting for neighbours' activations or "
          "gradients, or for pulls) / wall time; GPipe est: (P-1)/(m+P-1)")


if __name__ == "__main__":
    main()
