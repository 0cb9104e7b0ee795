"""Several servers and the layer-wise overlap, measured against baselines of the same run.

    sudo .venv/bin/python benchmarks/servers.py [--cluster-steps 60] [--host-steps 300]

(a) Simulated cluster (needs root: psframe cluster): 4 hosts with 1gbit links, 4 workers
    under Async, an MLP of 1.86 M float32 weights, ranks round-robin so that each host holds
    one server and one worker; samples/s with servers = 1, 2 and 4, as a ratio to servers=1.
    Then Sync on the same hosts, servers = 1 and 4, with and without the layer-wise overlap,
    against the Allreduce loop of 4 ranks, one per host.
(b) One host: Sync at 1-4 workers against the hand-written Allreduce loop (mpi4py) and torch
    DDP of the same model and batch, with and without the layer-wise overlap, one and two
    servers. Skip either part with --no-cluster or --no-host.
"""
import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from psframe.bench import cells  # noqa: E402

PY = sys.executable
MPIEXEC = os.path.join(os.path.dirname(PY), "mpiexec")
BIG_MODEL = "mlp:784,1024,1024,10"  # 1,863,690 weights: 7.5 MB per push in float32
HOST_MODEL = "mlp:784,256,256,10"  # the MNIST MLP of the other benchmarks
BATCH = 64  # per worker, on one host (b)
CLUSTER_BATCH = 16  # per worker in (a): its compute on 2 cores stays below the links
ENV = {"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def train_args(model, steps, policy, servers, extra=(), batch=BATCH):
    return [PY, "-m", "mpi4py", "-m", "psframe", "train", "--model", model, "--data", "mnist",
            "--batch-size", str(batch), "--steps", str(steps), "--policy", policy,
            "--servers", str(servers), "--no-eval", "--quiet", *extra]


def summary_of(d):
    with open(os.path.join(d, "summary.json")) as f:
        return json.load(f)["stats"]


def cluster_part(steps, repeats, rate, sync=True):
    from psframe import cluster as psc

    c = psc.up(4, bandwidth=None if rate == "none" else rate, owner_pid=os.getpid())
    rows, sync_rows = [], []

    def run(servers, policy, extra=()):
        with tempfile.TemporaryDirectory() as d:
            proc = c.run(servers + 4, train_args(BIG_MODEL, steps, policy, servers,
                                                 ["--log-dir", d, *extra], CLUSTER_BATCH),
                         ppn=1, timeout=900, capture_output=True, text=True, env_extra=ENV,
                         cwd=ROOT)
            if proc.returncode != 0:
                raise SystemExit(f"servers={servers} failed:\n{proc.stderr[-3000:]}")
            return summary_of(d)

    try:
        print(f"\n(a) {c.name}: 4 hosts, links {rate}; 4 workers, Async, {BIG_MODEL}, batch "
              f"{CLUSTER_BATCH}, {steps} steps per worker, ranks round-robin (--ppn 1); median of "
              f"{repeats}")
        for servers in (1, 2, 4):
            runs = [run(servers, "async") for _ in range(repeats)]
            sps = statistics.median(r["samples_per_s"] for r in runs)
            rows.append((servers, sps, runs[-1]))
        allreduce = statistics.median(
            cluster_baseline(c, "allreduce", 4, steps) for _ in range(repeats)) if sync else 0
        for servers in (1, 4) if sync else ():
            for extra in ((), ("--overlap",)):
                sps = statistics.median(run(servers, "sync", extra)["samples_per_s"]
                                        for _ in range(repeats))
                sync_rows.append((servers, bool(extra), sps))
    finally:
        c.down()
    base = rows[0][1]
    print(f"{'servers':>7} | {'samples/s':>9} | {'vs S=1':>6} | worker ms per step: "
          f"compute, push, wait | server CPU shares | MB in per server")
    for servers, sps, st in rows:
        per = " ".join(f"{s['bytes_pushed'] / 1e6:.0f}" for s in st["servers"])
        cpu = " ".join(f"{s['cpu_share']:.0%}" for s in st["servers"])
        steps = sum(st["steps_per_worker"])
        split = ", ".join(f"{1e3 * sum(st[k]) / steps:.0f}" for k in
                          ("worker_compute_s", "worker_push_s", "worker_wait_s"))
        print(f"{servers:>7} | {sps:9,.0f} | {sps / base:6.2f} | {split:>30} | {cpu} | {per}")
    if not sync:
        return rows
    print(f"\nSync on the same hosts, samples/s and ratio to the Allreduce loop of 4 ranks "
          f"(one per host, same model and batch): {allreduce:,.0f}")
    print(f"{'servers':>7} | {'overlap':>7} | {'samples/s':>9} | {'vs Allreduce':>12}")
    for servers, overlap, sps in sync_rows:
        print(f"{servers:>7} | {'yes' if overlap else 'no':>7} | {sps:9,.0f} | "
              f"{sps / allreduce:12.2f}")
    return rows


def cluster_baseline(c, system, workers, steps):
    with tempfile.TemporaryDirectory() as d:
        program, out = cells.baseline_program(
            d, system, workers, baseline_options(BIG_MODEL, CLUSTER_BATCH, steps))
        proc = c.run(workers, program, ppn=1, timeout=900, capture_output=True, text=True,
                     env_extra=ENV, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{system} failed:\n{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)["stats"]["samples_per_s"]


def host_job(n, program, timeout=900):
    proc = subprocess.run(["timeout", "-k", "10", str(timeout), MPIEXEC, "-n", str(n),
                           *program], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **ENV))
    if proc.returncode != 0:
        raise SystemExit(f"job failed: {' '.join(program)}\n{proc.stderr[-3000:]}")


def host_psframe(workers, steps, servers, extra):
    with tempfile.TemporaryDirectory() as d:
        host_job(workers + servers, train_args(HOST_MODEL, steps, "sync", servers,
                                               ["--log-dir", d, *extra]))
        return summary_of(d)["samples_per_s"]


def baseline_options(model, batch, steps):
    return {"model": model, "data": "mnist", "batch_size": batch, "steps": steps,
            "eval": False, "lr": 0.05}


def host_baseline(system, workers, steps):
    with tempfile.TemporaryDirectory() as d:
        program, out = cells.baseline_program(d, system, workers,
                                              baseline_options(HOST_MODEL, BATCH, steps))
        host_job(workers, program)
        with open(out) as f:
            return json.load(f)["stats"]["samples_per_s"]


def host_part(steps, repeats, workers_list):
    med = statistics.median
    variants = [("psframe Sync", 1, []), ("psframe Sync, messages", 1, ["--transport", "mpi"]),
                ("  + overlap", 1, ["--transport", "mpi", "--overlap"]),
                ("psframe Sync, 2 servers", 2, []),
                ("  messages + overlap", 2, ["--transport", "mpi", "--overlap"])]
    torch = importlib.util.find_spec("torch") is not None
    print(f"\n(b) one host: Sync, {HOST_MODEL}, batch {BATCH} per worker, {steps} steps; "
          f"samples/s and ratio to the Allreduce loop of the same run; median of {repeats}")
    header = f"{'system':<26} | " + " | ".join(f"{w} workers".rjust(15) for w in workers_list)
    print(header)
    table = {}
    for w in workers_list:
        table[("allreduce", w)] = med(host_baseline("allreduce", w, steps)
                                      for _ in range(repeats))
        if torch:
            table[("ddp", w)] = med(host_baseline("torch_ddp", w, steps) for _ in range(repeats))
        for name, servers, extra in variants:
            table[(name, w)] = med(host_psframe(w, steps, servers, extra)
                                   for _ in range(repeats))
    names = ["allreduce"] + (["ddp"] if torch else []) + [v[0] for v in variants]
    labels = {"allreduce": "Allreduce loop (mpi4py)", "ddp": "torch DDP (gloo)"}
    for name in names:
        cells_ = [f"{table[(name, w)]:7,.0f} ({table[(name, w)] / table[('allreduce', w)]:.2f})"
                  .rjust(15) for w in workers_list]
        print(f"{labels.get(name, name):<26} | " + " | ".join(cells_))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster-steps", type=int, default=60)
    parser.add_argument("--host-steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--bandwidth", default="1gbit")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--no-cluster", action="store_true")
    parser.add_argument("--no-host", action="store_true")
    parser.add_argument("--no-sync", action="store_true", help="(a) without its Sync rows")
    args = parser.parse_args()
    t0 = time.perf_counter()
    if not args.no_cluster:
        cluster_part(args.cluster_steps, args.repeats, args.bandwidth, sync=not args.no_sync)
    if not args.no_host:
        host_part(args.host_steps, args.repeats, args.workers)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
