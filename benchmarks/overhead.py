"""Overhead: one-worker ps.train samples/s against a plain one-process NumPy loop of one MLP."""
import os

# One BLAS thread for both sides, set before NumPy loads; mpiexec passes it on to the ranks.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

SIZES = (784, 128, 10)
LR = 0.05
MARK = "OVERHEAD_RESULT "


def load_data(name, seed=0):
    """(X float32, y int64) training rows: the MNIST subset, or Gaussian blobs of its shape."""
    import psframe as ps

    if name == "mnist":
        train, _ = ps.data.mnist(seed=seed)
    else:
        train, _ = ps.data.synthetic(n_rows=5000, n_features=SIZES[0], n_classes=SIZES[-1],
                                     seed=seed)
    return np.ascontiguousarray(train.X, dtype=np.float32), train.y.astype(np.int64)


# -- the baseline: what a user writes without a framework -------------------------------------
def plain_loop(X, y, batch, steps, seed=0):
    """Forward, backward and in-place SGD of 784-128-10 ReLU + softmax CE; (samples/s, loss)."""
    rng = np.random.default_rng(seed)
    n_in, n_hid, n_out = SIZES
    W1 = rng.normal(0, np.sqrt(2 / n_in), (n_in, n_hid)).astype(np.float32)
    b1 = np.zeros(n_hid, np.float32)
    W2 = rng.normal(0, np.sqrt(2 / n_hid), (n_hid, n_out)).astype(np.float32)
    b2 = np.zeros(n_out, np.float32)
    n = len(X)
    order = rng.permutation(n)
    pos, losses = 0, []
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + batch > n:  # a fresh pass over the data, reshuffled
            order, pos = rng.permutation(n), 0
        rows = order[pos:pos + batch]
        pos += batch
        xb, yb = X[rows], y[rows]
        h = xb @ W1 + b1
        a = np.maximum(h, 0)
        z = a @ W2 + b2
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        p = e / e.sum(axis=1, keepdims=True)
        losses.append(-float(np.log(p[np.arange(batch), yb]).mean()))
        dz = p
        dz[np.arange(batch), yb] -= 1
        dz /= batch
        dW2, db2 = a.T @ dz, dz.sum(axis=0)
        da = dz @ W2.T
        da *= h > 0
        dW1, db1 = xb.T @ da, da.sum(axis=0)
        W1 -= LR * dW1
        b1 -= LR * db1
        W2 -= LR * dW2
        b2 -= LR * db2
    rate = steps * batch / (time.perf_counter() - t0)
    return rate, float(np.mean(losses[-max(1, steps // 10):]))


def model_only(X, y, batch, steps, seed=0):
    """Samples/s of ps.models.MLP.loss_and_grad alone, in this process: no MPI, no update."""
    import psframe as ps

    model = ps.models.MLP(list(SIZES))
    init = model.init_params(np.random.default_rng(seed))
    params = {k: v.astype(np.float32) for k, v in init.items()}
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(X))
    t0 = time.perf_counter()
    for step in range(steps):
        rows = order[(step * batch + np.arange(batch)) % len(X)]
        model.loss_and_grad(params, X[rows], y[rows])
    return steps * batch / (time.perf_counter() - t0)


# -- psframe side, run under mpiexec -n 2 ------------------------------------------------------
def psframe_role(args):
    import psframe as ps
    from psframe.transport import Waiter

    if args.spin:
        Waiter.spin_tests = 1 << 62  # the diagnostic knob: every wait of this rank spins
    X, y = load_data(args.data)
    out = []
    for batch in args.batches:
        result = ps.train(ps.models.MLP(list(SIZES)), (X, y), policy="sync",
                          optimizer=ps.SGD(lr=LR), batch_size=batch, steps=args.steps,
                          threads=1, seed=0, transport=args.transport,
                          backend="numpy")  # the plain loop is NumPy: never a GPU worker here
        if result is not None:
            s = result.stats
            out.append({"batch": batch, "samples_per_s": s["samples_per_s"],
                        "wall_s": s["wall_s"], "server_cpu_share": s["server_cpu_share"],
                        "worker_wait_share": s["worker_wait_share"],
                        "loss": result.history[-1]["train_loss"],
                        "threads": result.config.get("threads")})
    if out:
        print(MARK + json.dumps(out), flush=True)
    return 0


def run_psframe(args):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    # Bound to a core each (MPICH's hydra: -bind-to core), the two ranks keep their caches:
    # unbound, the scheduler moves them between cores and a step at batch 32 measured
    # 305-327 us against 240-260 us bound, on this 2-core machine.
    bind = ["-bind-to", "core"] if args.bind else []
    cmd = [mpiexec, *bind, "-n", "2", sys.executable, os.path.abspath(__file__), "--role", "psframe",
           "--data", args.data, "--steps", str(args.steps),
           "--batches", *map(str, args.batches), "--transport", args.transport] \
        + (["--spin"] if args.spin else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=600)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"psframe run failed (exit {proc.returncode}): {' '.join(cmd)}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARK))
    return {r["batch"]: r for r in json.loads(line[len(MARK):])}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", choices=("mnist", "synthetic"), default="mnist",
                        help="MNIST 5k subset (ps.data.mnist) or synthetic rows of that shape")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=2000, help="SGD steps per run (both sides)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved runs of each side; the table shows medians")
    parser.add_argument("--transport", choices=("auto", "mpi"), default="auto",
                        help="ps.train's transport: auto (the worker shares the server's node, "
                             "so shared memory) or mpi (every payload as a message)")
    parser.add_argument("--no-bind", dest="bind", action="store_false",
                        help="do not bind the two ranks to a core each (mpiexec -bind-to core)")
    parser.add_argument("--spin", action="store_true",
                        help="diagnostic: make every psframe wait spin instead of sleeping")
    parser.add_argument("--role", choices=("main", "psframe"), default="main",
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "psframe":
        return psframe_role(args)

    from threadpoolctl import threadpool_info, threadpool_limits

    X, y = load_data(args.data)  # also fills the MNIST cache before the ranks read it
    t_start = time.perf_counter()
    plain = {b: [] for b in args.batches}
    grad_only = {b: [] for b in args.batches}
    ps_runs = {b: [] for b in args.batches}
    with threadpool_limits(limits=1):
        blas = [(i["internal_api"], i["num_threads"]) for i in threadpool_info()]
        for _ in range(args.repeats):
            for b in args.batches:
                plain[b].append(plain_loop(X, y, b, args.steps))
                grad_only[b].append(model_only(X, y, b, args.steps))
            for b, r in run_psframe(args).items():
                ps_runs[b].append(r)

    med = lambda v: float(np.median(v))  # noqa: E731
    print(f"overhead: MLP {'-'.join(map(str, SIZES))} on {args.data} ({len(X)} rows), SGD lr={LR}, "
          f"{args.steps} steps, {args.repeats} interleaved repeats, medians; BLAS {blas}; "
          f"psframe: mpiexec -n 2 (1 server + 1 worker), Sync, threads=1, "
          f"transport={args.transport}, {'bound to a core each' if args.bind else 'unbound'}"
          + ("; comm.wait SPINS (diagnostic)" if args.spin else ""))
    head = (f"{'batch':>5} | {'plain samples/s':>15} | {'psframe samples/s':>17} | {'ratio':>5} | "
            f"{'worker wait':>11} | {'server CPU':>10} | {'ps.MLP grad only':>16} | "
            f"{'loss plain / psframe':>20}")
    print(head)
    print("-" * len(head))
    for b in args.batches:
        p = med([s for s, _ in plain[b]])
        q = med([r["samples_per_s"] for r in ps_runs[b]])
        wait = med([r["worker_wait_share"] for r in ps_runs[b]])
        cpu = med([r["server_cpu_share"] for r in ps_runs[b]])
        g = med(grad_only[b])
        lp, lq = plain[b][-1][1], ps_runs[b][-1]["loss"]
        print(f"{b:>5} | {p:>15,.0f} | {q:>17,.0f} | {q / p:5.2f} | {wait:>11.1%} | {cpu:>10.1%} | "
              f"{g:>16,.0f} | {lp:9.3f} / {lq:<9.3f}")
    print("ratio = psframe / plain (target >= 0.8). psframe samples/s = "
          "result.stats['samples_per_s'] (server loop wall). worker wait = share of the worker's "
          "wall time in pull; server CPU = CPU s / wall s of rank 0. ps.MLP grad only: psframe's "
          "own loss_and_grad, one process, no MPI and no update (an upper bound for psframe). "
          "loss, a sanity check: mean of the last 10% of steps (plain) / last logged train_loss "
          "(psframe).")
    print("per-run samples/s  plain: "
          + "; ".join(f"b{b}: " + ", ".join(f"{s:,.0f}" for s, _ in plain[b]) for b in args.batches)
          + "  psframe: "
          + "; ".join(f"b{b}: " + ", ".join(f"{r['samples_per_s']:,.0f}" for r in ps_runs[b])
                      for b in args.batches))
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
