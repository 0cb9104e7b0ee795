"""Overhead: one-worker ps.train of a ps.TorchModel against a plain torch loop, same module."""
import os

# One thread for BLAS, OpenMP and so torch's intra-op pool on both sides, set before anything
# loads them; mpiexec passes it on to the ranks.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

LR = 0.05
MARK = "TORCH_OVERHEAD_RESULT "


def load_data(name):
    """(X float32, y int64): MNIST's 5,000-image subset for the MLP, digits for the CNN."""
    import psframe as ps

    train, _ = ps.data.mnist(seed=0) if name == "mlp" else ps.data.digits(seed=0)
    return np.ascontiguousarray(train.X, dtype=np.float32), train.y.astype(np.int64)


def build_module(name):
    """The same weights on every call: torch seeded, then built."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "mlp":  # the 784-128-10 MLP of benchmarks/overhead.py
        return nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(  # 8x8 digits: Conv2d, MaxPool2d, LayerNorm, Linear
        nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.LayerNorm([16, 4, 4]), nn.Flatten(), nn.Linear(256, 10))


def batch_rows(n_rows, batch, step):
    """psframe's rows for one worker, shuffle=False: block[(t*b + arange(b)) % len(block)]."""
    return (step * batch + np.arange(batch)) % n_rows


# -- the baseline: what a torch user writes without a framework -------------------------------
def plain_loop(model_name, X, y, batch, steps):
    """zero_grad, forward, backward, torch.optim.SGD on psframe's batches; (samples/s, weights)."""
    import torch
    from torch import nn

    net = build_module(model_name)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    rows = [torch.from_numpy(batch_rows(len(X), batch, t)) for t in range(steps)]
    t0 = time.perf_counter()
    for t in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(Xt[rows[t]]), yt[rows[t]])
        loss.backward()
        opt.step()
    rate = steps * batch / (time.perf_counter() - t0)
    return rate, {n: p.detach().numpy().copy() for n, p in net.named_parameters()}


def grad_only(model_name, X, y, batch, steps):
    """Samples/s of TorchModel.loss_and_grad alone, in this process: no MPI, no update."""
    import psframe as ps
    from torch import nn

    model = ps.TorchModel(build_module(model_name), nn.CrossEntropyLoss())
    params = model.init_params(None)
    xb = np.empty((batch,) + X.shape[1:], X.dtype)
    yb = np.empty(batch, y.dtype)
    t0 = time.perf_counter()
    for t in range(steps):
        rows = batch_rows(len(X), batch, t)
        np.take(X, rows, axis=0, out=xb)  # as the worker gathers a batch
        np.take(y, rows, axis=0, out=yb)
        model.loss_and_grad(params, xb, yb)
    return steps * batch / (time.perf_counter() - t0)


# -- psframe side, run under mpiexec -n 2 ------------------------------------------------------
def psframe_role(args):
    import psframe as ps
    import torch
    from torch import nn

    torch.set_num_threads(1)  # as in the baseline (psframe's threads=1 caps it as well)
    out = []
    for model_name in args.models:
        X, y = load_data(model_name)
        for batch in args.batches:
            model = ps.TorchModel(build_module(model_name), nn.CrossEntropyLoss())
            result = ps.train(model, (X, y), policy="sync", optimizer=ps.SGD(lr=LR),
                              batch_size=batch, steps=args.steps, shuffle=False, threads=1,
                              seed=0, transport=args.transport, backend="numpy")
            if result is not None:
                s = result.stats
                out.append({"model": model_name, "batch": batch,
                            "samples_per_s": s["samples_per_s"],
                            "worker_wait_share": s["worker_wait_share"],
                            "server_cpu_share": s["server_cpu_share"]})
                np.savez(os.path.join(args.save, f"{model_name}-{batch}.npz"), **result.params)
    if out:
        print(MARK + json.dumps(out), flush=True)
    return 0


def run_psframe(args):
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    bind = ["-bind-to", "core"] if args.bind else []  # as benchmarks/overhead.py: keeps caches
    cmd = [mpiexec, *bind, "-n", "2", sys.executable, os.path.abspath(__file__),
           "--role", "psframe", "--models", *args.models, "--steps", str(args.steps),
           "--batches", *map(str, args.batches), "--transport", args.transport,
           "--save", args.save]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, timeout=900)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"psframe run failed (exit {proc.returncode}): {' '.join(cmd)}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(MARK))
    return {(r["model"], r["batch"]): r for r in json.loads(line[len(MARK):])}


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", choices=("mlp", "cnn"), default=["mlp", "cnn"],
                        help="mlp: 784-128-10 on the MNIST subset; cnn: conv net on 8x8 digits")
    parser.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--steps", type=int, default=1000, help="SGD steps per run (both sides)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved runs of each side; the table shows medians")
    parser.add_argument("--transport", choices=("auto", "mpi"), default="auto")
    parser.add_argument("--no-bind", dest="bind", action="store_false",
                        help="do not bind the two ranks to a core each (mpiexec -bind-to core)")
    parser.add_argument("--role", choices=("main", "psframe"), default="main",
                        help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)  # where the ranks leave the weights
    args = parser.parse_args()
    if args.role == "psframe":
        return psframe_role(args)

    import torch

    torch.set_num_threads(1)
    data = {m: load_data(m) for m in args.models}  # also fills the MNIST cache for the ranks
    keys = [(m, b) for m in args.models for b in args.batches]
    plain, grads, ps_runs = ({k: [] for k in keys} for _ in range(3))
    drift = {}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as args.save:
        for _ in range(args.repeats):
            for m, b in keys:
                plain[(m, b)].append(plain_loop(m, *data[m], b, args.steps))
                grads[(m, b)].append(grad_only(m, *data[m], b, args.steps))
            for k, r in run_psframe(args).items():
                ps_runs[k].append(r)
        for m, b in keys:  # the same start and batches: the two should end at the same weights
            ours = np.load(os.path.join(args.save, f"{m}-{b}.npz"))
            theirs = plain[(m, b)][-1][1]
            drift[(m, b)] = max(float(np.abs(ours[n] - theirs[n]).max()) for n in theirs)

    med = lambda v: float(np.median(v))  # noqa: E731
    print(f"torch overhead: ps.TorchModel vs a plain torch loop, SGD lr={LR}, {args.steps} steps, "
          f"{args.repeats} interleaved repeats, medians; torch {torch.__version__}, "
          f"{torch.get_num_threads()} intra-op thread; psframe: mpiexec -n 2 (1 server + 1 "
          f"worker), Sync, threads=1, transport={args.transport}, "
          f"{'bound to a core each' if args.bind else 'unbound'}")
    head = (f"{'model':>5} | {'batch':>5} | {'torch samples/s':>15} | {'psframe samples/s':>17} | "
            f"{'ratio':>5} | {'worker wait':>11} | {'server CPU':>10} | "
            f"{'loss_and_grad only':>18} | {'max |w_ps - w_torch|':>20}")
    print(head)
    print("-" * len(head))
    for m, b in keys:
        p = med([s for s, _ in plain[(m, b)]])
        q = med([r["samples_per_s"] for r in ps_runs[(m, b)]])
        wait = med([r["worker_wait_share"] for r in ps_runs[(m, b)]])
        cpu = med([r["server_cpu_share"] for r in ps_runs[(m, b)]])
        g = med(grads[(m, b)])
        print(f"{m:>5} | {b:>5} | {p:>15,.0f} | {q:>17,.0f} | {q / p:5.2f} | {wait:>11.1%} | "
              f"{cpu:>10.1%} | {g:>18,.0f} | {drift[(m, b)]:>20.2e}")
    print("ratio = psframe / torch (target >= 0.8). psframe samples/s = "
          "result.stats['samples_per_s']. loss_and_grad only: ps.TorchModel's gradient alone, "
          "one process, no MPI and no update (psframe's ceiling). max |w_ps - w_torch|: final "
          "weights of the last repeat, a check that both trained the same (float32 rounding grows "
          "over the steps; in float64 the two agree to ~1e-15 after 1000 steps).")
    print("per-run samples/s  torch: "
          + "; ".join(f"{m} b{b}: " + ", ".join(f"{s:,.0f}" for s, _ in plain[(m, b)])
                      for m, b in keys)
          + "  psframe: "
          + "; ".join(f"{m} b{b}: " + ", ".join(f"{r['samples_per_s']:,.0f}" for r in ps_runs[(m, b)])
                      for m, b in keys))
    print(f"total {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
