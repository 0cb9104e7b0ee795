"""Row-sparse tables against dense tables, the Allreduce loop and torch DDP, and AUC over time."""
import argparse
import os
import time

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

import psframe as ps

USAGE = """
Run:  timeout -k 10 900 .venv/bin/mpiexec -n 5 .venv/bin/python benchmarks/sparse.py [--smoke]

One job, rank 0 the server and ranks 1..4 the workers: (a) samples/s and bytes per worker step
of a DLRM whose tables total 1.1 M rows x 16 (float32) on the synthetic click log, for psframe
with row-sparse tables, psframe with the same tables dense, the hand-written mpi4py Allreduce
loop (the whole gradient, tables included, in one flat buffer) and torch DDP (gloo, EmbeddingBag
with dense gradients), each as a ratio to the Allreduce loop of the same run; (b) test AUC
against wall time under Sync, Async and the hybrid (dense Sync, rows Async).
"""


def parse():
    p = argparse.ArgumentParser(description=__doc__, epilog=USAGE,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fields", default="400000,400000,200000,100000", help="rows per table")
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--ids-per-field", type=int, default=4)
    p.add_argument("--dense-features", type=int, default=13)
    p.add_argument("--samples", type=int, default=200_000, help="click-log rows (train + test)")
    p.add_argument("--batch-size", type=int, default=128, help="per worker")
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--warmup", type=int, default=20, help="untimed steps of the fast systems")
    p.add_argument("--steps", type=int, default=200, help="timed steps, psframe sparse")
    p.add_argument("--dense-warmup", type=int, default=3)
    p.add_argument("--dense-steps", type=int, default=12,
                   help="timed steps of the systems moving the whole tables")
    p.add_argument("--curve-steps", type=int, default=1500, help="steps per worker in (b)")
    p.add_argument("--curve-evals", type=int, default=10, help="evaluations per curve in (b)")
    p.add_argument("--eval-rows", type=int, default=10_000)
    p.add_argument("--auc-target", type=float, default=0.765, help="(b) reports the time to it")
    p.add_argument("--repeats", type=int, default=3, help="runs of each system in (a)")
    p.add_argument("--scale-batches", default="32,512",
                   help="further batch sizes of psframe sparse, for bytes against rows")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, seconds")
    args = p.parse_args()
    if args.smoke:
        args.fields, args.samples, args.batch_size = "2000,1000", 4000, 16
        args.warmup, args.steps, args.dense_warmup, args.dense_steps = 2, 6, 1, 3
        args.curve_steps, args.curve_evals, args.eval_rows = 20, 2, 500
        args.repeats, args.scale_batches = 1, "4"
    args.fields = [int(f) for f in args.fields.split(",")]
    args.scale_batches = [int(b) for b in args.scale_batches.split(",") if b]
    return args


def make_model(args, sparse=True, cls=None):
    return (cls or ps.models.DLRM)(args.dense_features, args.fields, dim=args.dim,
                                   sparse=sparse)


def idle(comm):
    """Wait for the others at a barrier without spinning: on 2 cores a rank polling MPI would
    take a core from the ranks being measured."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(0.005)


# -- (a) psframe ------------------------------------------------------------------------------
def psframe_run(args, train, sparse, warmup, steps, batch=None):
    """Sync SGD; samples/s between the history rows at ``warmup`` and at the end."""
    batch = batch or args.batch_size
    result = ps.train(make_model(args, sparse), train, policy="sync",
                      optimizer=ps.SGD(lr=args.lr), batch_size=batch,
                      steps=warmup + steps, eval_every=warmup, seed=0)
    if result is None:
        return None
    s, rows = result.stats, {r["step"]: r for r in result.history}
    timed = rows[warmup + steps]["time_s"] - rows[warmup]["time_s"]
    worker_steps = sum(s["steps_per_worker"])
    out = {"samples_per_s": steps * s["n_workers"] * batch / timed,
           "pushed": s["bytes_pushed"] / worker_steps, "pulled": s["bytes_pulled"] / worker_steps,
           "ms": [1e3 * sum(s[f"worker_{k}_s"]) / worker_steps
                  for k in ("compute", "push", "wait")]}
    if "sparse" in s:
        out["rows"] = (s["sparse"]["rows_pushed"] / worker_steps,
                       s["sparse"]["rows_pulled"] / worker_steps)
    return out


# -- (a) the baselines, on the workers' ranks ---------------------------------------------------
class Flat:
    """Parameters as views into one flat float32 vector, in the order given."""

    def __init__(self, params):
        self.shapes = {n: v.shape for n, v in params.items()}
        sizes = [v.size for v in params.values()]
        self.offsets = dict(zip(params, np.cumsum([0] + sizes[:-1])))
        self.size = int(sum(sizes))

    def views(self, flat):
        return {n: flat[o:o + np.prod(s, dtype=int)].reshape(s)
                for (n, s), o in zip(self.shapes.items(), self.offsets.values())}


def batches(train, comm, batch):
    """Endless random batches from this rank's block of the training set (as psframe's
    static dispatch gives each worker one block)."""
    block = np.array_split(np.arange(len(train)), comm.Get_size())[comm.Get_rank()]
    rng = np.random.default_rng([1, comm.Get_rank()])
    X = {k: np.ascontiguousarray(v, np.float32 if k == "dense" else np.int64)
         for k, v in train.X.items()}
    while True:
        rows = rng.choice(block, batch)
        yield {k: v[rows] for k, v in X.items()}, train.y[rows]


def allreduce_loop(comm, args, train, warmup, steps):
    """Data parallel by hand: each rank's gradient on compact tables (psframe's numpy DLRM),
    scattered into the whole flat gradient, one in-place Allreduce of it, the same SGD step."""
    model = make_model(args)
    fields = model.embedding_inputs()  # table -> the input of its ids
    params = ps.sparse.dense_first({n: v.astype(np.float32) for n, v in model.init_params(
        np.random.default_rng(0)).items()}, fields)
    layout = Flat(params)
    w = np.concatenate([v.ravel() for v in params.values()])
    g = np.zeros(layout.size, np.float32)  # the whole gradient, tables included
    W, G = layout.views(w), layout.views(g)
    first_table = min(layout.offsets[t] for t in fields)
    data = batches(train, comm, args.batch_size)
    size = comm.Get_size()
    in_allreduce = 0.0
    with threadpool_limits(1):
        for t in range(warmup + steps):
            if t == warmup:
                comm.Barrier()
                t0 = time.perf_counter()
            X, y = next(data)
            compact, uniq = dict(W), {}
            for table, key in fields.items():
                uniq[table], inverse = np.unique(X[key], return_inverse=True)
                X[key] = inverse.reshape(X[key].shape)
                compact[table] = W[table][uniq[table]]
            _, grads = model.loss_and_grad(compact, X, y)
            g[first_table:] = 0  # the tables, last in the layout; their untouched rows stay 0
            for name, grad in grads.items():
                if name in fields:
                    G[name][uniq[name]] = grad
                else:
                    G[name][...] = grad
            t1 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, g, op=MPI.SUM)
            if t >= warmup:
                in_allreduce += time.perf_counter() - t1
            g *= -args.lr / size  # in place: a temporary would cost one more pass of 70 MB
            w += g
        comm.Barrier()
        wall = time.perf_counter() - t0
    step_ms, comm_ms = 1e3 * wall / steps, 1e3 * in_allreduce / steps
    return {"samples_per_s": steps * size * args.batch_size / wall,
            "pushed": g.nbytes, "pulled": g.nbytes, "ms": [step_ms - comm_ms, comm_ms]}


def torch_dlrm(torch, model, params):
    """psframe's DLRM in torch, from the same initial weights; EmbeddingBag with dense
    gradients (sparse=False), so that DDP allreduces the whole tables as Allreduce does."""
    nn = torch.nn

    def mlp(prefix, n):
        layers = []
        for i in range(0, n, 2):
            W, b = params[f"{prefix}.{i}.W"], params[f"{prefix}.{i}.b"]
            lin = nn.Linear(*W.shape)
            with torch.no_grad():
                lin.weight.copy_(torch.from_numpy(W.T.copy()))
                lin.bias.copy_(torch.from_numpy(b))
            layers += [lin, nn.ReLU()]
        return layers

    n_bottom = sum(1 for n in params if n.startswith("bottom.") and n.endswith(".W"))
    n_top = sum(1 for n in params if n.startswith("top.") and n.endswith(".W"))
    pairs = tuple(torch.from_numpy(a) for a in np.tril_indices(len(model.fields) + 1, -1))

    class DLRM(nn.Module):
        def __init__(self):
            super().__init__()
            self.bottom = nn.Sequential(*mlp("bottom", 2 * n_bottom))  # ReLU last, as psframe
            self.top = nn.Sequential(*mlp("top", 2 * n_top)[:-1])
            self.fields = list(model.fields)
            self.tables = nn.ModuleList()
            for f in self.fields:
                W = params[f"emb.{f}.W"]
                bag = nn.EmbeddingBag(*W.shape, mode=model.combine, sparse=False)
                with torch.no_grad():
                    bag.weight.copy_(torch.from_numpy(W))
                self.tables.append(bag)

        def forward(self, X):
            h = self.bottom(X["dense"])
            T = torch.stack([h] + [bag(X[f]) for f, bag in zip(self.fields, self.tables)], 1)
            Z = T @ T.transpose(1, 2)
            return self.top(torch.cat([h, Z[:, pairs[0], pairs[1]]], 1)).squeeze(1)

    return DLRM()


def ddp_loop(comm, args, train, warmup, steps):
    """torch DDP (gloo) of the same DLRM, batches and SGD; returns None on the other ranks."""
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from psframe.bench.baselines import common

    common.torch_threads(torch, 1)
    address, port = common.rendezvous(comm)
    dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}",
                            rank=comm.Get_rank(), world_size=comm.Get_size())
    model = make_model(args)
    params = {n: v.astype(np.float32) for n, v in
              model.init_params(np.random.default_rng(0)).items()}
    net = torch_dlrm(torch, model, params)
    ddp = DDP(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr)
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    data = batches(train, comm, args.batch_size)
    # The same model: psframe's loss and torch's on one batch at the shared start.
    X, y = next(data)
    with torch.no_grad():
        start = float(loss_fn(net({k: torch.from_numpy(v) for k, v in X.items()}),
                              torch.from_numpy(y.astype(np.float32))))
    reference = float(model.loss_and_grad(params, X, y)[0])
    for t in range(warmup + steps):
        if t == warmup:
            dist.barrier()
            t0 = time.perf_counter()
        X, y = next(data)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ddp({k: torch.from_numpy(v) for k, v in X.items()}),
                       torch.from_numpy(y.astype(np.float32)))
        loss.backward()  # DDP allreduces every gradient, the tables' whole, here
        opt.step()
    dist.barrier()
    wall = time.perf_counter() - t0
    nbytes = 4 * sum(p.numel() for p in net.parameters())
    dist.destroy_process_group()
    return {"samples_per_s": steps * comm.Get_size() * args.batch_size / wall,
            "pushed": nbytes, "pulled": nbytes, "check": (start, reference)}


def on_workers(world, work, *a):
    """``work(comm of ranks 1..N, *a)`` on the workers' ranks while rank 0 idles; its result
    (from rank 1) on rank 0."""
    rank = world.Get_rank()
    sub = world.Split(0 if rank else MPI.UNDEFINED, rank)
    out = None
    if rank:
        out = work(sub, *a)
        sub.Free()
    idle(world)
    if rank == 1:
        world.send(out, dest=0)
    return world.recv(source=1) if rank == 0 else None


# -- (b) AUC against time -----------------------------------------------------------------------
class AucDLRM(ps.models.DLRM):
    """DLRM that keeps each evaluation's AUC, in order (the history rows record the loss and
    accuracy only), and the time the evaluations took."""

    aucs, eval_s = [], 0.0

    def evaluate(self, params, X, y, chunk=4096):
        t0 = time.perf_counter()
        scores = super().evaluate(params, X, y, chunk)
        self.aucs.append(scores["auc"])
        self.eval_s += time.perf_counter() - t0
        return scores


def curve(args, train, test, policy, n_workers):
    model = make_model(args, cls=AucDLRM)
    model.aucs, model.eval_s = [], 0.0
    # Async counts each push as an update; Sync and hybrid one per round of the workers.
    per_step = n_workers if policy == "async" else 1
    every = max(1, args.curve_steps // args.curve_evals) * per_step
    result = ps.train(model, train, eval_data=test, policy=policy, optimizer=ps.SGD(lr=args.lr),
                      batch_size=args.batch_size, steps=args.curve_steps, eval_every=every,
                      seed=0)
    if result is None:
        return None
    s = result.stats
    return {"rows": [(r["time_s"], r["step"] // per_step, r["eval_accuracy"], auc)
                     for r, auc in zip(result.history, model.aucs)],
            "samples_per_s": s["samples_per_s"], "eval_s": model.eval_s,
            "staleness": s.get("staleness_hist"),
            "row_staleness": s.get("sparse", {}).get("staleness")}


# -- report -----------------------------------------------------------------------------------
ALLREDUCE, DDP = "Allreduce loop (mpi4py)", "torch DDP (gloo)"
SPARSE, DENSE = "psframe sparse (Sync)", "psframe dense tables (Sync)"


def mb(n):
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def median_run(runs):
    """The run of median samples/s."""
    return sorted(runs, key=lambda r: r["samples_per_s"])[len(runs) // 2]


def report_a(args, results, scaling, n_workers):
    print(f"\n(a) samples/s and bytes per worker step: {n_workers} workers, batch "
          f"{args.batch_size} each, SGD lr {args.lr}, float32; {args.steps} timed steps after "
          f"{args.warmup} (sparse), {args.dense_steps} after {args.dense_warmup} (the others); "
          f"median of {args.repeats}, interleaved")
    base = results[ALLREDUCE]["samples_per_s"]
    print(f"{'system':<28} {'samples/s':>10} {'vs Allreduce':>12} {'pushed/step':>12} "
          f"{'pulled/step':>12} {'rows pushed/pulled':>19}  worker ms/step")
    for name, r in results.items():
        rows = "-" if "rows" not in r else f"{r['rows'][0]:,.0f} / {r['rows'][1]:,.0f}"
        ms = {3: "compute {:.1f}, push {:.1f}, wait {:.1f}", 2: "compute {:.1f}, Allreduce {:.1f}",
              0: "-"}[len(r.get("ms", ()))].format(*r.get("ms", ()))
        print(f"{name:<28} {r['samples_per_s']:10,.0f} {r['samples_per_s'] / base:12.2f} "
              f"{mb(r['pushed']):>12} {mb(r['pulled']):>12} {rows:>19}  {ms}")
    dense_params = sum(v.size for n, v in make_model(args).init_params(
        np.random.default_rng(0)).items() if not n.startswith("emb."))
    print(f"tables {sum(args.fields):,} rows x {args.dim} = {mb(4 * sum(args.fields) * args.dim)}; "
          f"dense parameters {dense_params:,} ({mb(4 * dense_params)}). Allreduce and DDP: the "
          f"flat gradient sent and the sum received, per rank and step")
    print(f"\nbytes per step against the rows touched (psframe sparse, Sync; a push also "
          f"carries the ids: 8 B per row pushed and per row asked for)")
    print(f"{'batch':>6} {'rows/step':>10} {'pulled/step':>12} {'= rows x dim x 4 + dense':>25} "
          f"{'pushed/step':>12} {'vs Allreduce':>12}")
    for batch, r in sorted(scaling.items()):
        rows = r["rows"][1]
        expect = 4 * (rows * args.dim + dense_params)
        print(f"{batch:6d} {rows:10,.0f} {mb(r['pulled']):>12} {mb(expect):>25} "
              f"{mb(r['pushed']):>12} {results[ALLREDUCE]['pushed'] / r['pushed']:11,.0f}x")


def report_b(curves, args):
    print(f"\n(b) test accuracy and AUC against wall time: sparse DLRM, {args.curve_steps} steps "
          f"per worker, an evaluation of {args.eval_rows:,} test rows every "
          f"{args.curve_steps // args.curve_evals} (time_s is taken before each, and includes "
          f"the earlier ones: they pause the training)")
    for policy, c in curves.items():
        print(f"{policy}: {c['samples_per_s']:,.0f} samples/s over the run, evaluations "
              f"included ({c['eval_s']:.1f} s of them); dense staleness "
              f"{c['staleness']}; row staleness {c['row_staleness']}")
        print(f"  {'time s':>7} {'step':>6} {'accuracy':>8} {'AUC':>6}")
        for t, step, acc, auc in c["rows"]:
            print(f"  {t:7.2f} {step:6d} {acc:8.4f} {auc:6.4f}")
    def reached(rows):
        t = next(((t, step) for t, step, _, auc in rows if auc >= args.auc_target), None)
        return "not reached" if t is None else f"{t[0]:.2f} s (step {t[1]})"

    print(f"time to AUC >= {args.auc_target}: " + "; ".join(
        f"{p} {reached(c['rows'])}" for p, c in curves.items()) + "; last AUC: " + ", ".join(
        f"{p} {c['rows'][-1][3]:.4f}" for p, c in curves.items()))


def main():
    args = parse()
    world = MPI.COMM_WORLD
    rank, n_workers = world.Get_rank(), world.Get_size() - 1
    if n_workers < 1:
        raise SystemExit("run with mpiexec -n 5 (1 server + 4 workers)")
    t_start, load = time.perf_counter(), os.getloadavg()
    train, test = ps.data.click_log(args.samples, fields=args.fields,
                                    ids_per_field=args.ids_per_field,
                                    dense_features=args.dense_features, seed=0)
    test = test.subset(np.arange(min(args.eval_rows, len(test))))
    systems = {
        ALLREDUCE: lambda: on_workers(world, allreduce_loop, args, train, args.dense_warmup,
                                      args.dense_steps),
        DDP: lambda: on_workers(world, ddp_loop, args, train, args.dense_warmup,
                                args.dense_steps),
        SPARSE: lambda: psframe_run(args, train, True, args.warmup, args.steps),
        DENSE: lambda: psframe_run(args, train, False, args.dense_warmup, args.dense_steps)}
    if args.no_torch:
        del systems[DDP]
    runs = {name: [] for name in systems}
    for _ in range(args.repeats):  # interleaved: a change of load hits every system alike
        for name, run in systems.items():
            runs[name].append(run())
    scaling = {b: psframe_run(args, train, True, args.warmup, args.steps, b)
               for b in args.scale_batches}
    curves = {p: curve(args, train, test, p, n_workers) for p in ("sync", "async", "hybrid")}
    if rank:
        return
    print(f"DLRM: {args.dense_features} dense features, tables {args.fields} x {args.dim}, "
          f"{args.ids_per_field} ids per field (Zipf 1.1, mean bags), dot interaction; "
          f"click log of {args.samples:,} rows; {MPI.Get_library_version().splitlines()[0]}")
    results = {name: median_run(r) for name, r in runs.items()}
    report_a(args, results, {args.batch_size: results[SPARSE], **scaling}, n_workers)
    if DDP in results:
        a, b = results[DDP]["check"]
        print(f"torch DLRM's loss at the shared start on one batch: {a:.6f}; psframe's: {b:.6f}")
    report_b(curves, args)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s; load average (1, 5, 15 min) at the "
          f"start {' '.join(f'{x:.2f}' for x in load)}, at the end "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
