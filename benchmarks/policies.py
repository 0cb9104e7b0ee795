"""Policies: wall time to a target test accuracy under every update policy, one worker a 3x straggler."""
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


# -- set-up -----------------------------------------------------------------------------------
def load(name, seed):
    """(train, test, MLP layer sizes) for digits (8x8) or the 5,000-image MNIST subset."""
    if name == "digits":
        train, test = ps.data.digits(seed=seed)
        return train, test, [64, 128, 10]
    train, test = ps.data.mnist(seed=seed)
    return train, test, [784, 128, 10]


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

    def __init__(self, label, policy, dispatch="static", grads_per_update=1):
        self.label = label
        self.policy = policy
        self.dispatch = dispatch
        self.grads_per_update = grads_per_update


def configs(n_workers, mixed_steps, with_dynamic_ssp=True):
    rows = [
        Config("Sync", ps.Sync(), grads_per_update=n_workers),
        Config("Sync(backup=1)", ps.Sync(backup=1), grads_per_update=n_workers - 1),
        Config("Async", ps.Async()),
        Config("Async(staleness_lr)", ps.Async(staleness_lr=True)),
        Config("SSP(1)", ps.SSP(1)),
        Config("SSP(2)", ps.SSP(2)),
        Config("SSP(4)", ps.SSP(4)),
        # Sync for its first K updates (n_workers gradients each), then one per gradient: the
        # Sync cadence keeps the first phase's evaluations as dense as Sync's; the second
        # phase is then evaluated n_workers times as often in samples as the other rows.
        Config(f"Mixed({mixed_steps}, Async)", ps.Mixed(sync_steps=mixed_steps, then=ps.Async()),
               grads_per_update=n_workers),
        Config("Async + dynamic", ps.Async(), dispatch="dynamic"),
    ]
    if with_dynamic_ssp:
        rows.append(Config("SSP(2) + dynamic", ps.SSP(2), dispatch="dynamic"))
    return rows


# -- one run ----------------------------------------------------------------------------------
def run_one(cfg, args, model, train, test, seed, delay, eval_every_sync, n_workers):
    """ps.train on every rank; on rank 0 a dict of what the table shows, else None."""
    eval_every = max(1, round(eval_every_sync * n_workers / cfg.grads_per_update))
    result = ps.train(
        model, train, eval_data=test, policy=cfg.policy, optimizer=make_optimizer(args),
        batch_size=args.batch_size, epochs=args.epochs, seed=seed, eval_every=eval_every,
        dispatch=cfg.dispatch, delay=delay, threads=1,
    )
    if result is None:
        return None
    s = result.stats
    hit = next((r for r in result.history
                if r["eval_accuracy"] is not None and r["eval_accuracy"] >= args.target), None)
    return {
        "t_target": hit["time_s"] if hit else math.inf,
        "ep_target": hit["epoch"] if hit else math.inf,
        "final_acc": result.history[-1]["eval_accuracy"],
        "best_acc": max(r["eval_accuracy"] for r in result.history),
        "wall_s": s["wall_s"],
        "updates": s["updates_applied"],
        "dropped": s["updates_dropped"],
        "max_stale": s["max_staleness"],
        "max_gap": s["max_clock_gap"],
        "wait_share": s["worker_wait_share"],
        "steps": s["steps_per_worker"],
        "evals": len(result.history),
    }


def make_optimizer(args):
    return ps.SGD(lr=args.lr, momentum=args.momentum)


# -- output -----------------------------------------------------------------------------------
def median(values):
    finite = sorted(values)
    return statistics.median(finite)  # inf sorts last: a majority of misses gives inf


def fmt_time(t):
    return "not reached" if math.isinf(t) else f"{t:.3f}"


def table(rows, runs, repeats):
    """rows: Configs; runs: label -> list of per-seed dicts. Medians over seeds."""
    sync_t = median([r["t_target"] for r in runs["Sync"]])
    sync_acc = median([r["final_acc"] for r in runs["Sync"]])
    head = (f"{'policy':<22} {'t->target s':>11} {'vs Sync':>7} {'reached':>7} {'epochs':>6} "
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
            f"{'-' if math.isinf(ep) else f'{ep:.2f}':>6} {acc:>9.4f} "
            f"{100 * (acc - sync_acc):>+6.1f} {median([r['wall_s'] for r in rs]):>7.2f} "
            f"{median([r['updates'] for r in rs]):>7.0f} {median([r['dropped'] for r in rs]):>7.0f} "
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
    parser.add_argument("--straggler-basis", choices=("compute", "step"), default="compute",
                        help="what the straggler is 3x slower at: the model's compute alone "
                        "(timed on rank 1), or a whole undelayed Async step (pull + compute + "
                        "push under this node's contention)")
    parser.add_argument("--delay", type=float, default=None,
                        help="seconds added to each of worker 0's steps (overrides the basis)")
    parser.add_argument("--no-dynamic-ssp", action="store_true", help="skip SSP(2) + dynamic")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    if size < 3:
        raise SystemExit("run with at least 3 ranks, e.g. mpiexec -n 5 (1 server + 4 workers)")
    n_workers = size - 1
    t_start = time.perf_counter()

    train, test, sizes = load(args.data, seed=0)
    model = ps.models.MLP(sizes)
    per_epoch = steps_per_epoch(len(train), n_workers, args.batch_size)
    eval_every_sync = max(1, round(per_epoch / args.evals_per_epoch))
    rows = configs(n_workers, mixed_steps=per_epoch, with_dynamic_ssp=not args.no_dynamic_ssp)

    compute_s = compute_seconds(comm, model, train, args.batch_size)
    step_s = None
    if args.delay is not None:
        delay_s, basis = args.delay, "given"
    elif args.straggler_basis == "compute":
        delay_s, basis = (SLOWDOWN - 1) * compute_s, "compute"
    else:  # a short undelayed Async run: seconds per worker step with the node as loaded as in the runs
        probe = ps.train(model, train, eval_data=None, policy=ps.Async(),
                         optimizer=make_optimizer(args), batch_size=args.batch_size,
                         epochs=2, seed=0, threads=1)
        if rank == 0:
            step_s = probe.stats["wall_s"] / max(probe.stats["steps_per_worker"])
        step_s = comm.bcast(step_s, root=0)
        delay_s, basis = (SLOWDOWN - 1) * step_s, "step"
    delay = {STRAGGLER: delay_s} if delay_s > 0 else None

    if rank == 0:
        print(f"policies: {args.data} MLP {'-'.join(map(str, sizes))}, {len(train)} train / "
              f"{len(test)} test rows, {n_workers} workers + 1 server = {size} ranks on "
              f"{os.cpu_count()} cores; {MPI.Get_library_version().splitlines()[0].strip()}; "
              f"Python {platform.python_version()}")
        print(f"  SGD lr={args.lr} momentum={args.momentum}, batch {args.batch_size}, "
              f"{args.epochs} epochs ({per_epoch} Sync steps/epoch), target acc {args.target}, "
              f"seeds 0..{args.repeats - 1}")
        print(f"  compute per step (rank 1, others asleep): {compute_s * 1e3:.3f} ms"
              + (f"; undelayed Async step: {step_s * 1e3:.3f} ms" if step_s else ""))
        print(f"  straggler: worker {STRAGGLER} sleeps {delay_s * 1e3:.3f} ms per step "
              f"({basis} basis: {SLOWDOWN - 1:g} x the measured {basis} time)")
        print(f"  evaluation every {eval_every_sync} Sync updates "
              f"({eval_every_sync * n_workers * args.batch_size} samples), "
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

    if rank == 0:
        print()
        print(table(rows, runs, args.repeats))
        dyn = runs.get("Async + dynamic")
        if dyn:
            ratios = []
            for r in dyn:
                fast = [n for i, n in enumerate(r["steps"]) if i != STRAGGLER]
                ratios.append(statistics.mean(fast) / max(1, r["steps"][STRAGGLER]))
            print(f"effective slowdown of worker {STRAGGLER} (its batches vs the others' under "
                  f"Async + dynamic): {statistics.median(ratios):.2f}x")
        print("medians over seeds; 'vs Sync' = time to target / Sync's; 'd pts' = final accuracy "
              "minus Sync's, in points; max stale / max gap = largest over seeds; wait = worker "
              "wait share")
        print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
