"""GPU: a worker's step on CuPy against NumPy on every core, and 4-worker Sync runs of each.

    python benchmarks/gpu.py step [--batches 1024 4096] [--steps 20] [--json out.json]
    mpiexec -n 5 python -m mpi4py benchmarks/gpu.py e2e [--batch 1024] [--steps 60]
                                                    [--json out.json]

``step`` times one worker's step in one process, through the worker's own data path: the
pulled weights land on the device from pinned memory, the batch is gathered where the data
lives, forward and backward run, the gradient goes back to pinned memory and the stream is
synchronized. ``e2e`` trains the same MLP with 1 server + 4 workers under Sync, once with
NumPy workers (threads shared out as ps.train does) and once with CuPy workers sharing one
GPU. Without a usable GPU both exit with status 1 and say why, having measured nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
from mpi4py import MPI

import psframe as ps
from psframe import backend as B
from psframe.params import ParamLayout
from psframe.transport.cuda import mpi_cuda_aware

SIZES = [784, 1024, 1024, 10]


def why_no_gpu():
    """None when CuPy computes on GPU 0 of this node, else the reason it cannot."""
    try:
        B.select_backend("cupy").bind(0)
    except ValueError as exc:
        return str(exc)
    return None


def gpu_name():
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(0)["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def data(n_rows, seed=0):
    train, _ = ps.data.synthetic(n_rows=n_rows, n_features=SIZES[0], n_classes=SIZES[-1],
                                 seed=seed, test_fraction=0.01)
    return train


def time_worker_step(backend_name: str, batch: int, steps: int,
                     warmup: int = 3) -> tuple[float, float, dict]:
    """Median seconds of one worker step on this backend, and the step's loss at the end."""
    from psframe.worker import Worker

    model = ps.models.MLP(SIZES)
    train = data(batch * 4)
    rng = np.random.default_rng(0)
    layout = ParamLayout.from_params(model.init_params(rng), "float32")
    X = np.ascontiguousarray(train.X, dtype=np.float32)
    y = train.y.astype(np.int64)
    schedule = ps.data.BatchSchedule(np.arange(len(X)), batch, True, 0, 0)
    # COMM_SELF with this rank as the "server": no messages, node_local_index gives 0.
    backend = B.select_backend(backend_name, cuda_aware=mpi_cuda_aware)  # as ps.train asks
    worker = Worker(MPI.COMM_SELF, 0, 0, layout, model, backend, X, y, schedule, steps)
    worker.set_weights(layout.flatten(model.init_params(rng), out=layout.empty()))
    times, loss = [], None
    with worker.backend.activate():
        for step in range(warmup + steps):
            t = time.perf_counter()
            worker.set_weights()  # the pulled weights on to the device, as every step does
            loss, _ = worker.compute(step)
            worker.backend.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - t)
    return statistics.median(times), float(loss), worker.backend.report()


def run_step(args):
    reason = why_no_gpu()
    if reason:
        sys.exit(f"benchmarks/gpu.py: no usable GPU, nothing measured ({reason})")
    from threadpoolctl import threadpool_limits

    rows = []
    for batch in args.batches:
        with threadpool_limits(limits=cores()):  # NumPy gets every core of the node
            cpu_s, cpu_loss, _ = time_worker_step("numpy", batch, args.steps)
        gpu_s, gpu_loss, report = time_worker_step("cupy", batch, args.steps)
        rows.append({"batch": batch, "numpy_ms": cpu_s * 1e3, "cupy_ms": gpu_s * 1e3,
                     "numpy_samples_per_s": batch / cpu_s, "cupy_samples_per_s": batch / gpu_s,
                     "speedup": cpu_s / gpu_s, "numpy_loss": cpu_loss, "cupy_loss": gpu_loss,
                     "cupy_path": report})
    print(f"worker step, MLP {'-'.join(map(str, SIZES))}, float32, median of {args.steps} "
          f"steps; NumPy on {cores()} cores, CuPy on {gpu_name()}")
    print(f"{'batch':>6} {'numpy ms':>10} {'cupy ms':>9} {'speedup':>8} {'numpy samp/s':>13} "
          f"{'cupy samp/s':>12}  path")
    for r in rows:
        print(f"{r['batch']:>6} {r['numpy_ms']:>10.2f} {r['cupy_ms']:>9.2f} {r['speedup']:>7.1f}x "
              f"{r['numpy_samples_per_s']:>13,.0f} {r['cupy_samples_per_s']:>12,.0f}  "
              f"{r['cupy_path']['transfer']}")
    return {"part": "step", "cores": cores(), "gpu": gpu_name(), "steps": args.steps,
            "rows": rows}


def run_e2e(args):
    world = MPI.COMM_WORLD
    reason = why_no_gpu()
    if not world.allreduce(reason is None, op=MPI.LAND):
        if world.Get_rank() == 0:
            print(f"benchmarks/gpu.py: no usable GPU, nothing measured "
                  f"({reason or 'another rank has none'})", file=sys.stderr)
        sys.exit(1)
    if world.Get_size() != 5:
        if world.Get_rank() == 0:
            print("benchmarks/gpu.py e2e wants 1 server + 4 workers: mpiexec -n 5 ...",
                  file=sys.stderr)
        sys.exit(1)
    train = data(args.rows)
    model = ps.models.MLP(SIZES)
    init = model.init_params(np.random.default_rng(0))
    results = {}
    for name in ("numpy", "cupy"):
        world.Barrier()
        result = ps.train(model, train, backend=name, init=init, policy=ps.Sync(),
                          optimizer=ps.SGD(lr=0.05, momentum=0.9), batch_size=args.batch,
                          steps=args.steps, seed=0)
        if result is not None:
            s = result.stats
            results[name] = {
                "wall_s": s["wall_s"], "samples_per_s": s["samples_per_s"],
                "worker_wait_share": s["worker_wait_share"],
                "server_cpu_share": s["server_cpu_share"],
                "threads_per_rank": result.config.get("threads"),
                "final_train_loss": result.history[-1]["train_loss"] if result.history else None,
                "worker_backends": s["worker_backends"],
            }
    if world.Get_rank() != 0:
        return None
    print(f"Sync, 1 server + 4 workers, MLP {'-'.join(map(str, SIZES))}, batch {args.batch}, "
          f"{args.steps} steps per worker, {cores()} cores, GPU {gpu_name()} shared by 4 workers")
    for name, r in results.items():
        print(f"  {name:>5}: {r['samples_per_s']:>10,.0f} samples/s  wall {r['wall_s']:.2f} s  "
              f"worker wait {r['worker_wait_share']:.1%}  server CPU {r['server_cpu_share']:.1%}  "
              f"path {r['worker_backends'][0].get('transfer')}")
    return {"part": "e2e", "cores": cores(), "gpu": gpu_name(), "batch": args.batch,
            "steps": args.steps, "rows": args.rows, "results": results}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    step = sub.add_parser("step", help="one worker's step, CuPy against NumPy (one process)")
    step.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    step.add_argument("--steps", type=int, default=20)
    e2e = sub.add_parser("e2e", help="Sync training, 4 CuPy workers against 4 NumPy workers")
    e2e.add_argument("--batch", type=int, default=1024)
    e2e.add_argument("--steps", type=int, default=60)
    e2e.add_argument("--rows", type=int, default=32768)
    for p in (step, e2e):
        p.add_argument("--json", help="also write the figures here (rank 0)")
    args = parser.parse_args(argv)
    out = run_step(args) if args.part == "step" else run_e2e(args)
    if out is not None and args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
