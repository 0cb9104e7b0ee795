"""Policies: wall time to a target test accuracy under each update policy, one worker 3x slower."""
import os

# One BLAS thread per rank, set before NumPy loads: 5 ranks already oversubscribe a small node.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import psframe as ps  # noqa: E402
from psframe.data import steps_per_epoch  # noqa: E402

STRAGGLER = 0  # worker index of the slow worker
SLOWDOWN = 3.0  # its step takes this many times a normal step
CALIBRATION_RUNS = 3  # seeds per calibration measurement (their median counts)


# -- set-up -----------------------------------------------------------------------------------
def load(name, seed):
    """(train, test, MLP layer sizes) for digits (8x8) or the 5,000-image MNIST subset."""
    if name == "digits":
        train, test = ps.data.digits(seed=seed)
        return train, test, [64, 128, 10]
    train, test = ps.data.mnist(seed=seed)
    return train, test, [784, 128, 10]


def node_busy_seconds():
    """CPU-seconds the whole node has spent busy since boot (Linux /proc/stat), else None:
    compared with this job's own CPU time it tells whether anything else ran meanwhile."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def idle_barrier(comm):
    """A barrier that sleeps instead of spinning, so a rank timing alone gets a whole core."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.001)


def compute_seconds(comm, model, train, batch_size, reps=300):
    """Median seconds of one worker step's compute (row gather + loss_and_grad), timed on
    rank 1 while every other rank sleeps; the same number is returned on every rank."""
    value = None
    if comm.Get_rank() == 1:
        rng = np.random.default_rng(0)
        params = {k: v.astype(np.float32) for k, v in model.init_params(rng).items()}
        X = np.ascontiguousarray(train.X, dtype=np.float32)
        y = train.y.astype(np.int64)
        times = []
        for i in range(reps + 20):
            rows = rng.integers(0, len(X), batch_size)
            t0 = time.perf_counter()
            model.loss_and_grad(params, X[rows], y[rows])
            if i >= 20:  # warm-up
                times.append(time.perf_counter() - t0)
        value = statistics.median(times)
    idle_barrier(comm)
    return comm.bcast(value, root=1)


class Config:
    """One row of the table: a policy, a dispatch mode, and how many samples one update takes
    (so every row evaluates at the same cadence in samples)."""

    def __init__(self, label, policy, dispatch="static", grads_per_update=1, lr_scale=1.0):
        self.label = label
        self.policy = policy
        self.dispatch = dispatch
        self.grads_per_update = grads_per_update
        self.lr_scale = lr_scale  # only the optional diagnostic row changes the step size


def configs(n_workers, mixed_steps, with_dynamic_ssp=True, sync_lr_scale=None):
    rows = [
        Config("Sync", ps.Sync(), grads_per_update=n_workers),
        Config("Sync(backup=1)", ps.Sync(backup=1), grads_per_update=n_workers - 1),
        Config("Async", ps.Async()),
        Config("Async(staleness_lr)", ps.Async(staleness_lr=True)),
        Config("SSP(1)", ps.SSP(1)),
        Config("SSP(2)", ps.SSP(2)),
        Config("SSP(4)", ps.SSP(4)),
        # Sync for its first K updates, then one update per gradient: evaluated at the Async
        # cadence, which matches the other rows in samples after the switch (the Sync phase,
        # one epoch, gets at most one evaluation: far too early to reach a useful target).
        Config(f"Mixed({mixed_steps}, Async)", ps.Mixed(sync_steps=mixed_steps, then=ps.Async())),
        Config("Async + dynamic", ps.Async(), dispatch="dynamic"),
    ]
    if with_dynamic_ssp:
        rows.append(Config("SSP(2) + dynamic", ps.SSP(2), dispatch="dynamic"))
    if sync_lr_scale:
        # Diagnostic: Sync averages n_workers gradients into one step of size lr, where Async
        # takes n_workers steps of size lr; scaling Sync's lr separates that from the straggler.
        rows.append(Config(f"Sync, lr x{sync_lr_scale:g}", ps.Sync(), grads_per_update=n_workers,
                           lr_scale=sync_lr_scale))
    return rows


def slowdown(steps_per_worker):
    """How many times slower the straggler is: the others' mean batch count over its own,
    from a dynamic-dispatch run (each worker takes a new batch as soon as it is free)."""
    fast = [n for i, n in enumerate(steps_per_worker) if i != STRAGGLER]
    return statistics.mean(fast) / max(1, steps_per_worker[STRAGGLER])


def calibrate(comm, run_dynamic, n_batches, runs=CALIBRATION_RUNS, rounds=4,
              tolerance=0.1):
    """Sleep per step that makes worker 0 SLOWDOWN times slower, as this node measures it.

    A worker's step here is mostly transport, backoff and waiting for a core (5 ranks, few
    cores), and a sleeping rank frees its core for the rest, so the sleep is found by
    measurement: ``run_dynamic(delay, seed)`` runs the table's Async + dynamic row and returns
    its stats; a measurement is the median over ``runs`` seeds. Start from (SLOWDOWN - 1) x
    the undelayed step, then rescale the sleep by (SLOWDOWN - 1) / (measured - 1) until the
    batch counts agree. Returns the sleep and the trail of (sleep, measured slowdown, walls);
    identical on every rank."""
    def measure(delay):
        walls, ratios = [], []
        for seed in range(runs):
            stats = run_dynamic(delay, seed)
            if stats is not None:
                walls.append(stats["wall_s"])
                ratios.append(slowdown(stats["steps_per_worker"]))
        out = (statistics.median(walls), statistics.median(ratios)) if walls else None
        return comm.bcast(out, root=0)

    wall, _ = measure(0.0)
    step = wall * (comm.Get_size() - 1) / n_batches  # one worker's undelayed step
    delay, trail = (SLOWDOWN - 1) * step, [(0.0, 1.0, wall)]
    for _ in range(rounds):
        wall, measured = measure(delay)
        trail.append((delay, measured, wall))
        if abs(measured - SLOWDOWN) <= tolerance * SLOWDOWN:
            break
        delay *= (SLOWDOWN - 1) / max(measured - 1, 0.25)
    best = min(trail[1:], key=lambda t: abs(t[1] - SLOWDOWN))  # the closest measurement wins
    return best[0], trail


# -- one run ----------------------------------------------------------------------------------
def run_one(cfg, args, model, train, test, seed, delay, eval_every_sync, n_workers, raw=False):
    """ps.train on every rank; on rank 0 a dict of what the table shows (``raw``: the run's
    stats), else None."""
    eval_every = max(1, round(eval_every_sync * n_workers / cfg.grads_per_update))
    result = ps.train(
        model, train, eval_data=test, policy=cfg.policy,
        optimizer=make_optimizer(args, cfg.lr_scale),
        batch_size=args.batch_size, epochs=args.epochs, seed=seed, eval_every=eval_every,
        dispatch=cfg.dispatch, delay=delay, threads=1,
    )
    if result is None:
        return None
    if raw:
        return result.stats
    s = result.stats
    hit = next((r for r in result.history
                if r["eval_accuracy"] is not None and r["eval_accuracy"] >= args.target), None)
    return {
        "t_target": hit["time_s"] if hit else math.inf,
        "ep_target": hit["epoch"] if hit else math.inf,
        "final_acc": result.history[-1]["eval_accuracy"],
        "wall_s": s["wall_s"],
        "updates": s["updates_applied"],
        "dropped": s["updates_dropped"],
        "max_stale": s["max_staleness"],
        "max_gap": s["max_clock_gap"],
        "wait_share": s["worker_wait_share"],
        "steps": s["steps_per_worker"],
    }


def make_optimizer(args, lr_scale=1.0):
    return ps.SGD(lr=args.lr * lr_scale, momentum=args.momentum)


# -- output -----------------------------------------------------------------------------------
def median(values):
    return statistics.median(values)  # a miss counts as inf: a majority of misses gives inf


def fmt_time(t):
    return "not reached" if math.isinf(t) else f"{t:.3f}"


def table(rows, runs, repeats):
    """rows: Configs; runs: label -> list of per-seed dicts. Medians over seeds."""
    sync_t = median([r["t_target"] for r in runs["Sync"]])
    sync_acc = median([r["final_acc"] for r in runs["Sync"]])
    head = (f"{'policy':<22} {'t->target s':>11} {'vs Sync':>7} {'reached':>7} {'ep->tgt':>7} "
            f"{'final acc':>9} {'d pts':>6} {'wall s':>7} {'updates':>7} {'dropped':>7} "
            f"{'max stale':>9} {'max gap':>7} {'wait':>6}")
    lines = [head, "-" * len(head)]
    for cfg in rows:
        rs = runs[cfg.label]
        t = median([r["t_target"] for r in rs])
        ep = median([r["ep_target"] for r in rs])
        acc = median([r["final_acc"] for r in rs])
        ratio = "-" if math.isinf(t) or math.isinf(sync_t) else f"{t / sync_t:.2f}"
        reached = sum(not math.isinf(r["t_target"]) for r in rs)
        lines.append(
            f"{cfg.label:<22} {fmt_time(t):>11} {ratio:>7} {f'{reached}/{repeats}':>7} "
            f"{'-' if math.isinf(ep) else f'{ep:.2f}':>7} {acc:>9.4f} "
            f"{100 * (acc - sync_acc):>+6.1f} {median([r['wall_s'] for r in rs]):>7.2f} "
            f"{median([r['updates'] for r in rs]):>7.0f} "
            f"{median([r['dropped'] for r in rs]):>7.0f} "
            f"{max(r['max_stale'] for r in rs):>9} {max(r['max_gap'] for r in rs):>7} "
            f"{median([r['wait_share'] for r in rs]):>6.1%}"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", choices=("digits", "mnist"), default="digits")
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy to reach")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="seeds 0..R-1; medians reported")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--evals-per-epoch", type=float, default=4.0,
                        help="evaluation cadence, the same in samples for every policy")
    parser.add_argument("--straggler-basis", choices=("measured", "compute"), default="measured",
                        help="measured: calibrate worker 0's sleep until runs of the Async + "
                        "dynamic row show it taking 1/3 of the others' batches; compute: sleep "
                        "2x the model's compute time per step (timed on rank 1), ignoring "
                        "transport and contention")
    parser.add_argument("--delay", type=float, default=None,
                        help="seconds added to each of worker 0's steps (overrides the basis)")
    parser.add_argument("--no-dynamic-ssp", action="store_true", help="skip SSP(2) + dynamic")
    parser.add_argument("--sync-lr-scale", type=float, default=None, metavar="K",
                        help="add a diagnostic row: Sync with lr x K (e.g. 4 = the number of "
                        "workers), the only row whose optimizer differs")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        raise SystemExit("run with at least 3 ranks, e.g. mpiexec -n 5 (1 server + 4 workers)")
    n_workers = size - 1
    comm.Barrier()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    busy0 = node_busy_seconds() if rank == 0 else None

    train, test, sizes = load(args.data, seed=0)
    model = ps.models.MLP(sizes)
    per_epoch = steps_per_epoch(len(train), n_workers, args.batch_size)
    eval_every_sync = max(1, round(per_epoch / args.evals_per_epoch))
    rows = configs(n_workers, mixed_steps=per_epoch, with_dynamic_ssp=not args.no_dynamic_ssp,
                   sync_lr_scale=args.sync_lr_scale)

    compute_s = compute_seconds(comm, model, train, args.batch_size)
    trail = []
    if args.delay is not None:
        delay_s, basis = args.delay, "given"
    elif args.straggler_basis == "compute":
        delay_s, basis = (SLOWDOWN - 1) * compute_s, "compute"
    else:
        dynamic = next(cfg for cfg in rows if cfg.label == "Async + dynamic")
        delay_s, trail = calibrate(
            comm,
            lambda d, seed: run_one(dynamic, args, model, train, test, seed,
                                    {STRAGGLER: d} if d else None, eval_every_sync, n_workers,
                                    raw=True),
            n_batches=args.epochs * math.ceil(len(train) / args.batch_size),
        )
        basis = "measured"
    delay = {STRAGGLER: delay_s} if delay_s > 0 else None

    if rank == 0:
        print(f"policies: {args.data} MLP {'-'.join(map(str, sizes))}, {len(train)} train / "
              f"{len(test)} test rows, {n_workers} workers + 1 server = {size} ranks on "
              f"{os.cpu_count()} cores; {' '.join(MPI.Get_library_version().split()[:3])}; "
              f"Python {platform.python_version()}")
        print(f"  SGD lr={args.lr} momentum={args.momentum}, batch {args.batch_size}, "
              f"{args.epochs} epochs ({per_epoch} Sync steps/epoch), target acc {args.target}, "
              f"seeds 0..{args.repeats - 1}")
        print(f"  compute per step (rank 1, others asleep): {compute_s * 1e3:.3f} ms")
        for d, r, wall in trail:
            print(f"  calibration: sleep {d * 1e3:6.3f} ms -> worker {STRAGGLER} {r:.2f}x slower, "
                  f"wall {wall:.2f} s (Async + dynamic row, median of {CALIBRATION_RUNS} seeds)")
        print(f"  straggler: worker {STRAGGLER} sleeps {delay_s * 1e3:.3f} ms per step "
              f"({basis} basis, aiming at {SLOWDOWN:g}x)")
        print(f"  evaluation every {eval_every_sync * n_workers * args.batch_size} samples "
              f"({eval_every_sync} Sync updates, {eval_every_sync * n_workers} Async updates), "
              f"Mixed switches to Async after {per_epoch} updates", flush=True)

    runs = {cfg.label: [] for cfg in rows}
    for seed in range(args.repeats):
        for cfg in rows:
            out = run_one(cfg, args, model, train, test, seed, delay, eval_every_sync, n_workers)
            if rank == 0:
                runs[cfg.label].append(out)
                print(f"  seed {seed} {cfg.label:<22} t->target {fmt_time(out['t_target']):>11}  "
                      f"final {out['final_acc']:.4f}  wall {out['wall_s']:.2f} s  "
                      f"steps/worker {out['steps']}", flush=True)

    own_cpu = comm.gather(time.process_time() - cpu_start, root=0)
    if rank == 0:
        print()
        print(table(rows, runs, args.repeats))
        dyn = runs.get("Async + dynamic")
        if dyn:
            ratios = [slowdown(r["steps"]) for r in dyn]
            print(f"effective slowdown of worker {STRAGGLER} (the others' batches / its own under "
                  f"Async + dynamic): median {statistics.median(ratios):.2f}x, per seed "
                  + ", ".join(f"{r:.2f}" for r in ratios))
        print("medians over seeds; 'vs Sync' = time to target / Sync's; 'd pts' = final accuracy "
              "minus Sync's, in points; max stale / max gap = largest over seeds; wait = worker "
              "wait share")
        elapsed = time.perf_counter() - t_start
        line = f"total {elapsed:.1f} s"
        if busy0 is not None:
            other = node_busy_seconds() - busy0 - sum(own_cpu)
            line += (f"; other processes used {max(other, 0.0):.1f} CPU-s of the node's "
                     f"{elapsed * (os.cpu_count() or 1):.0f} meanwhile (near 0: a quiet node)")
        print(line)


if __name__ == "__main__":
    main()
