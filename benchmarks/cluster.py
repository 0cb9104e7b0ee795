"""Many nodes, simulated: psframe across hosts against the Allreduce loop, torch DDP and raw
Send/Recv between the same hosts, links unshaped and shaped. Needs root (psframe cluster).

    sudo .venv/bin/python benchmarks/cluster.py [--bandwidth none 1gbit] [--steps 300]

Every figure is measured in this run, side by side, on one `psframe cluster up --nodes 5`
per link setting: the server on host 0 and each worker on a host of its own; and on a
cluster of 2 hosts, where a server sits beside each worker, against the loop on those 2.
"""
import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from psframe import cluster as psc  # noqa: E402
from psframe.bench import cells  # noqa: E402

PY = sys.executable
MODEL = "mlp:784,256,256,10"  # the MNIST MLP of the multi-node issue, batch 64 per worker
BATCH = 64
STATS = ("samples_per_s", "wall_s", "worker_wait_share", "worker_transport", "max_staleness",
         "pushes_streamed")


def job(cluster, n, program, ppn=1, timeout=600):
    proc = cluster.run(n, program, ppn=ppn, timeout=timeout, capture_output=True, text=True,
                       env_extra={"PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}): {' '.join(program)}\n"
                         f"{proc.stderr[-3000:]}")
    return proc.stdout


def psframe_run(cluster, workers, policy, steps, servers=1, extra=()):
    """samples/s (and stats) of ps.train, one rank per host in rank order: with one server,
    the server on host 0 and worker i on host i+1."""
    with tempfile.TemporaryDirectory() as d:
        job(cluster, workers + servers, [
            PY, "-m", "mpi4py", "-m", "psframe", "train", "--model", MODEL, "--data", "mnist",
            "--batch-size", str(BATCH), "--steps", str(steps), "--policy", policy, "--no-eval",
            "--quiet", "--log-dir", d, "--servers", str(servers), *extra])
        with open(os.path.join(d, "summary.json")) as f:
            stats = json.load(f)["stats"]
    return {k: stats.get(k) for k in STATS}


def baseline_run(cluster, system, workers, steps):
    """samples/s of a hand-written peer (psframe/bench/baselines), one rank per host."""
    with tempfile.TemporaryDirectory() as d:
        program, out = cells.baseline_program(d, system, workers, {
            "model": MODEL, "data": "mnist", "batch_size": BATCH, "steps": steps,
            "eval": False, "lr": 0.05})
        job(cluster, workers, program)
        with open(out) as f:
            return {k: v for k, v in json.load(f)["stats"].items() if k in STATS}


def transport_rows(cluster):
    """benchmarks/transport.py between host 0 and host 1: the by-message rows."""
    out = job(cluster, 2, [PY, os.path.join(ROOT, "benchmarks", "transport.py"), "--sizes",
                           "1", "4", "16", "64", "--sweep-sizes", "--messages-only", "--reps", "8",
                           "--rounds", "2"])
    rows = []
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("(a)-(c)"))
    for line in lines[start + 3:]:
        if not line.strip() or not line.strip()[0].isdigit():
            break
        cols = [c.split() for c in line.split("|")]
        rows.append((cols[0][0], float(cols[1][0]), float(cols[2][0]), float(cols[2][2])))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidth", nargs="+", default=["none", "1gbit"],
                        help="link settings: none (unshaped) or a tc rate")
    parser.add_argument("--steps", type=int, default=300, help="steps per worker per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; medians")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3, 4],
                        help="remote workers for the Async and SSP rows")
    parser.add_argument("--torch", action="store_true",
                        help="also torch DDP (gloo), where torch is installed")
    args = parser.parse_args()
    t_start = time.perf_counter()
    torch = args.torch and importlib.util.find_spec("torch") is not None
    med = statistics.median
    print(f"psframe cluster benchmark: {MODEL}, batch {BATCH} per worker, {args.steps} steps, "
          f"{args.repeats} repeats (medians); every job's ranks one per host, server on host 0")
    for rate in args.bandwidth:
        c = psc.up(5, bandwidth=None if rate == "none" else rate, owner_pid=os.getpid())
        try:
            link = "unshaped" if rate == "none" else rate
            print(f"\n== links {link}: {c.name}, {len(c.hosts)} hosts")
            rows = transport_rows(c)
            print("push+pull round trip by message between two hosts, vs raw Send/Recv of the "
                  "same bytes between them (benchmarks/transport.py across hosts)")
            print(f"{'size':>6} | {'raw ms':>8} | {'psframe ms':>10} | {'ratio':>5}")
            for size, raw, ps_ms, ratio in rows:
                print(f"{size:>6} | {raw:8.2f} | {ps_ms:10.2f} | {ratio:5.2f}")

            def runs(fn, *a):
                out = [fn(c, *a) for _ in range(args.repeats)]
                return med(r["samples_per_s"] for r in out), out[-1]

            ar, _ = runs(baseline_run, "allreduce", 2, args.steps)
            sync, sync_stats = runs(psframe_run, 2, "sync", args.steps)
            print(f"\n2 workers on 2 hosts (psframe: + the server on a third), samples/s")
            print(f"{'system':<28} | {'samples/s':>9} | {'vs Allreduce':>12}")
            print(f"{'Allreduce loop (mpi4py)':<28} | {ar:9,.0f} | {1.0:12.2f}")
            if torch:
                ddp, _ = runs(baseline_run, "torch_ddp", 2, args.steps)
                print(f"{'torch DDP (gloo)':<28} | {ddp:9,.0f} | {ddp / ar:12.2f}")
            print(f"{'psframe Sync':<28} | {sync:9,.0f} | {sync / ar:12.2f}   "
                  f"paths {sync_stats['worker_transport']}")
            small, _ = runs(psframe_run, 2, "sync", args.steps, 1, ("--shard-elems", "65536"))
            print(f"{'  frames of 64Ki elements':<28} | {small:9,.0f} | {small / ar:12.2f}")
            # The link bound of one server: its link carries both gradients in and both
            # replies out (2 models each way a step), a 2-rank Allreduce one model each way.
            print(f"{'  (one server: link bound)':<28} | {'':9} | {0.5:12.2f}   "
                  "2x the bytes on the server's link")
            pair = psc.up(2, bandwidth=None if rate == "none" else rate, owner_pid=os.getpid())
            try:
                ar2 = med(baseline_run(pair, "allreduce", 2, args.steps)["samples_per_s"]
                          for _ in range(args.repeats))
                beside = med(psframe_run(pair, 2, "sync", args.steps, 2)["samples_per_s"]
                             for _ in range(args.repeats))
            finally:
                pair.down()
            print(f"\nthe loop's 2 hosts, a server beside each worker (--servers 2: servers on "
                  "hosts 0 and 1, then the workers)")
            print(f"{'Allreduce loop (mpi4py)':<28} | {ar2:9,.0f} | {1.0:12.2f}")
            print(f"{'psframe Sync, 2 servers':<28} | {beside:9,.0f} | {beside / ar2:12.2f}")
            print(f"\npsframe by policy and remote workers, samples/s (max staleness)")
            print(f"{'policy':<8} | " + " | ".join(f"{w} workers".rjust(14)
                                                  for w in args.workers))
            for policy in ("sync", "async", "ssp:2"):
                cells_ = []
                for w in args.workers:
                    sps, st = runs(psframe_run, w, policy, args.steps)
                    cells_.append(f"{sps:8,.0f} ({st['max_staleness']})".rjust(14))
                print(f"{policy:<8} | " + " | ".join(cells_))
        finally:
            c.down()
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
