"""Transport: psframe's push + pull round trip against raw mpi4py Send/Recv, by size and shard."""
import argparse
import sys
import time

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

import psframe
from psframe.backend import NumpyBackend
from psframe.data import BatchSchedule
from psframe.nn.optim import SGD, Optimizer
from psframe.params import DEFAULT_SHARD_ELEMS, ParamLayout
from psframe.policies import Sync
from psframe.server import Group, ParameterServer, Recorder
from psframe.training import abort_job
from psframe.transport import Channel, Waiter
from psframe.transport.shm import node_ids
from psframe.transport.topology import node_share
from psframe.worker import Worker

MiB = 1 << 20
N_TENSORS = 4  # the model is 4 equal float32 tensors, so shards and frames have boundaries
PER_TENSOR = 1 << 40  # a shard_elems no tensor reaches: one shard per tensor, one frame per pull
SHARD_LABELS = {1 << 16: "64Ki", 1 << 18: "256Ki", 1 << 20: "1Mi", PER_TENSOR: "per-tensor"}


class FlatModel(psframe.Model):
    """Four tensors of the requested total size; pull/push are driven directly, so no loss."""

    def __init__(self, n_elems):
        self.n = n_elems // N_TENSORS

    def init_params(self, rng):
        return {f"t{i}": np.full(self.n, 0.5, np.float32) for i in range(N_TENSORS)}

    def loss_and_grad(self, params, X, y):
        return 0.0, {k: np.zeros_like(v) for k, v in params.items()}


class NoApply(Optimizer):
    """Stub optimizer: the server loop runs as usual but no weight is touched."""

    name = "none"

    def __init__(self):
        super().__init__(lr=1.0)

    def apply(self, state, w, g, lo, hi, step, lr_scale=1.0):
        pass


def make_layout(mb, shard_elems):
    n = mb * MiB // 4
    return ParamLayout({f"t{i}": (n // N_TENSORS,) for i in range(N_TENSORS)}, "float32",
                       shard_elems)


def raw_round_trips(comm, bufs, warmup, reps):
    """rank 1 → rank 0 → rank 1 with blocking Send/Recv; rank 1's per-trip seconds.

    Each rank sends from one buffer and receives into another, as psframe does (worker:
    gradient out, weights in; server: slot in, weights out), so both touch the same memory.
    """
    rank = comm.Get_rank()
    out, into = bufs
    times = []
    comm.Barrier()
    for i in range(warmup + reps):
        t = time.perf_counter()
        if rank == 1:
            comm.Send([out, MPI.FLOAT], dest=0, tag=1)
            comm.Recv([into, MPI.FLOAT], source=0, tag=2)
        else:
            comm.Recv([into, MPI.FLOAT], source=1, tag=1)
            comm.Send([out, MPI.FLOAT], dest=1, tag=2)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


# How the payload travels: messages (what workers on other nodes use), or the shared window
# of workers on the server's node, reading the server's weights (plain Sync, ps.train's
# choice) or getting a copy written by the server (every other policy).
PATHS = {"messages": ("mpi", False), "shared": ("auto", True), "shared-copy": ("auto", False)}


def psframe_round_trips(comm, waiter, layout, optimizer, warmup, reps, path="messages"):
    """Rank 0 runs a real ParameterServer (Sync, 1 worker); rank 1 times Worker.push_pull:
    a step's push and the next step's pull, as Worker.run does between two computes."""
    transport, reads_in_place = PATHS[path]
    timed = warmup + reps
    steps = timed + 1  # the last step's push is a push alone
    model = FlatModel(layout.size)
    # One waiter per rank and the ranks' nodes, as ps.train makes: pushes between nodes are
    # applied as they land ($PSFRAME_STREAM).
    channel = Channel(comm, layout, waiter, nodes=node_ids(comm))
    comm.Barrier()
    if comm.Get_rank() == 0:
        weights = layout.flatten(model.init_params(None))
        # As psframe.training.roles.build_server does for data mode: one group, every shard.
        group = Group(Sync().state(1), [0], (0, layout.n_shards))
        recorder = Recorder(model, layout, 1, total_steps=steps,
                            epoch_samples=1 << 62)  # no history row per step
        server = ParameterServer(channel, layout, weights, optimizer=optimizer,
                                 groups=[group], worker_ranks=[1], recorder=recorder,
                                 transport=transport)
        server.run()
        server.release()
        return []
    X, y = np.zeros((2, 1), np.float32), np.zeros(2, np.int64)
    schedule = BatchSchedule(np.arange(2), 1, False, 0, 0)
    worker = Worker(channel, 0, 0, layout, model, NumpyBackend(), X, y, schedule, steps,
                    transport=transport, reads_in_place=reads_in_place)
    if (worker.link.name == "mpi") != (path == "messages"):
        raise RuntimeError(f"path {path!r} asked for, but the worker's is {worker.link.name}")
    worker.grad[:] = 1e-3  # a finite gradient, or the server rejects the push
    times = []
    worker.pull(0)
    for step in range(timed):
        t = time.perf_counter()
        worker.push_pull(step, 0.0, 1)
        if step >= warmup:
            times.append(time.perf_counter() - t)
    worker.push(timed, 0.0, 1)
    worker.finish(time.perf_counter(), time.process_time(), steps)  # DONE, as Worker.run ends
    worker.release()
    return times


def server_compute_ms(layout, reps):
    """Rank 0's per-push work besides the transfer, each part alone: ms (check, mean, SGD)."""
    size = layout.size
    grad = np.full(size, 1e-3, np.float32)
    acc = np.empty(size, np.float32)
    w = np.full(size, 0.5, np.float32)
    opt = SGD(lr=1e-6)
    state = opt.init_state(size, layout.dtype)
    bounds = layout.shard_bounds

    def check():
        float(np.dot(grad, grad))

    def mean():
        for k in range(layout.n_shards):
            a, b = int(bounds[k]), int(bounds[k + 1])
            np.multiply(grad[a:b], 1.0, out=acc[a:b])

    def sgd():
        for k in range(layout.n_shards):
            a, b = int(bounds[k]), int(bounds[k + 1])
            opt.apply(state, w, acc[a:b], a, b, 1)

    out = []
    for fn in (check, mean, sgd):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        out.append(1e3 * float(np.median(ts)))
    return out


def measure(comm, waiter, mb, shard_elems_list, args):
    """Interleave raw and psframe runs over args.rounds rounds; median of pooled samples.
    Keys: "raw", (optimizer, shard_elems) over messages, and (path, shard_elems) with SGD
    for the shared paths (default shard size only)."""
    layouts = {s: make_layout(mb, s) for s in shard_elems_list}
    bufs = [np.full(mb * MiB // 4, 0.5, np.float32) for _ in range(2)]
    samples = {}
    for _ in range(args.rounds):
        for s, layout in layouts.items():
            variants = [("sgd", SGD(lr=1e-6), "messages"), ("noapply", NoApply(), "messages")]
            if s == DEFAULT_SHARD_ELEMS and not args.messages_only:
                variants += [(p, SGD(lr=1e-6), p) for p in ("shared", "shared-copy")]
            for name, optimizer, path in variants:
                # A raw run before every psframe run: the machine's load drifts over seconds.
                samples.setdefault("raw", []).extend(
                    raw_round_trips(comm, bufs, args.warmup, args.reps))
                samples.setdefault((name, s), []).extend(
                    psframe_round_trips(comm, waiter, layout, optimizer, args.warmup,
                                        args.reps, path))
    samples = comm.bcast(samples, root=1)  # rank 1 holds the timings; a small pickle
    return {k: float(np.median(v)) for k, v in samples.items()}


def framed_round_trips(comm, bufs, n_frames, waiter, warmup, reps):
    """The raw round trip cut into n_frames Isend/Irecv frames, finished by ``waiter``."""
    rank, (out, into) = comm.Get_rank(), bufs
    cuts = np.linspace(0, out.size, n_frames + 1).astype(int)
    frames = list(zip(cuts[:-1], cuts[1:]))
    times = []
    comm.Barrier()
    for i in range(warmup + reps):
        t = time.perf_counter()
        if rank == 1:
            waiter([comm.Isend([out[a:b], MPI.FLOAT], dest=0, tag=1) for a, b in frames])
            waiter([comm.Irecv([into[a:b], MPI.FLOAT], source=0, tag=2) for a, b in frames])
        else:
            waiter([comm.Irecv([into[a:b], MPI.FLOAT], source=1, tag=1) for a, b in frames])
            waiter([comm.Isend([out[a:b], MPI.FLOAT], dest=1, tag=2) for a, b in frames])
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def diagnose(comm, waiter, mb, args, out):
    """No psframe server: the same frames waited by MPI Waitall and by Waiter.wait_all."""
    bufs = [np.full(mb * MiB // 4, 0.5, np.float32) for _ in range(2)]
    waiters = (("MPI.Request.Waitall", MPI.Request.Waitall),
               ("Waiter.wait_all", waiter.wait_all))
    out("")
    out(f"diagnostic: raw {mb} MB round trip as 1 or {mb} Isend/Irecv frames each way "
        "(no psframe server)")
    head = f"{'frames':>6} | {'waited by':<22} | {'ms':>7} | {'ratio vs Send/Recv':>18}"
    out(head)
    out("-" * len(head))
    for n_frames in (1, mb):
        samples = {}
        for _ in range(args.rounds):
            samples.setdefault("raw", []).extend(
                raw_round_trips(comm, bufs, args.warmup, args.reps))
            for name, waiter in waiters:
                samples.setdefault(name, []).extend(
                    framed_round_trips(comm, bufs, n_frames, waiter, args.warmup, args.reps))
        samples = comm.bcast(samples, root=1)
        raw = float(np.median(samples["raw"]))
        for name, _ in waiters:
            t = float(np.median(samples[name]))
            out(f"{n_frames:>6} | {name:<22} | {t * 1e3:7.2f} | {raw / t:18.2f}")


def gbps(mb, seconds):
    return 2 * mb * MiB / seconds / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16, 64],
                        help="model sizes in MiB of float32 (default: 1 4 16 64)")
    parser.add_argument("--sweep-sizes", type=int, nargs="*", default=[16, 64],
                        help="model sizes for the shard-size sweep (default: 16 64)")
    parser.add_argument("--shards", type=int, nargs="+",
                        default=[1 << 16, 1 << 18, 1 << 20, PER_TENSOR],
                        help="shard_elems values to sweep (default: 64Ki 256Ki 1Mi per-tensor)")
    parser.add_argument("--reps", type=int, default=10, help="timed round trips per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed round trips per run")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs per variant, interleaved; medians pool all rounds")
    parser.add_argument("--spin", action="store_true",
                        help="diagnostic: make every psframe wait spin instead of sleeping")
    parser.add_argument("--messages-only", action="store_true",
                        help="only the message path (ranks on different hosts: no shared window)")
    parser.add_argument("--diagnose", action="store_true",
                        help="also time raw 1 MiB frames waited by MPI vs by psframe's Waiter")
    args = parser.parse_args()

    comm = MPI.COMM_WORLD.Dup()
    if comm.Get_size() != 2:
        if comm.Get_rank() == 0:
            print("run with: mpiexec -n 2 python benchmarks/transport.py", file=sys.stderr)
        return 2
    local_ranks, cores = node_share(comm)
    if args.spin:
        Waiter.spin_tests = 1 << 62  # the diagnostic knob, set before any waiter is made
    waiter = Waiter(oversubscribed=local_ranks > cores)  # as ps.train makes
    root = comm.Get_rank() == 0
    out = (lambda *a: print(*a, flush=True)) if root else (lambda *a: None)
    t_start = time.perf_counter()

    out(f"psframe transport: {MPI.Get_library_version().splitlines()[0].strip()}, "
        f"{args.rounds} rounds x {args.reps} reps (+{args.warmup} warmup), medians; "
        f"model = {N_TENSORS} float32 tensors; Sync policy, 1 worker"
        + ("; waits SPIN (diagnostic)" if args.spin else ""))
    out("round trip = rank 1 sends the model's bytes to rank 0 and gets them back "
        "(psframe: Worker.push_pull, one request); GB/s = 2 x bytes / time")

    with threadpool_limits(limits=1):  # what ps.train picks for 2 ranks on 2 cores
        # -- by model size, default shard size ----------------------------------------------
        # Every size once, interleaving raw and psframe; sweep sizes with every shard size.
        results, parts = {}, {}
        for mb in sorted(set(args.sizes) | set(args.sweep_sizes)):
            shards = [DEFAULT_SHARD_ELEMS]
            if mb in args.sweep_sizes:
                shards += [s for s in args.shards if s != DEFAULT_SHARD_ELEMS]
            results[mb] = measure(comm, waiter, mb, shards, args)
            if root:
                for shard in shards:
                    parts[mb, shard] = server_compute_ms(make_layout(mb, shard), args.reps)

        out("")
        out(f"(a)-(c) by model size, shard_elems = {DEFAULT_SHARD_ELEMS} (psframe default)")
        head = (f"{'size':>6} | {'raw ms':>7} {'GB/s':>6} | {'psframe ms':>10} {'GB/s':>6} "
                f"{'ratio':>6} | {'no-apply ms':>11} {'GB/s':>6} {'ratio':>6} | "
                f"{'check ms':>8} {'mean ms':>7} {'SGD ms':>7}")
        out(head)
        out("-" * len(head))
        for mb in args.sizes:
            r = results[mb]
            chk, mean, sgd = parts.get((mb, DEFAULT_SHARD_ELEMS), (0, 0, 0))
            raw, full, noapp = r["raw"], r[("sgd", DEFAULT_SHARD_ELEMS)], \
                r[("noapply", DEFAULT_SHARD_ELEMS)]
            out(f"{mb:>4}MB | {raw * 1e3:7.2f} {gbps(mb, raw):6.2f} | {full * 1e3:10.2f} "
                f"{gbps(mb, full):6.2f} {raw / full:6.2f} | {noapp * 1e3:11.2f} "
                f"{gbps(mb, noapp):6.2f} {raw / noapp:6.2f} | {chk:8.2f} {mean:7.2f} {sgd:7.2f}")
        out("ratio = psframe GB/s / raw GB/s (target >= 0.8 from 4 MB). psframe: payload as "
            "messages (workers on other nodes). no-apply: same, with a stub optimizer. "
            "check/mean/SGD: rank 0's per-push compute, timed alone (finite check g.g, 1/n mean "
            "copy, SGD apply).")

        out("")
        head = (f"{'size':>6} | {'raw ms':>7} | {'messages':>8} {'ratio':>6} | "
                f"{'shared ms':>9} {'ratio':>6} | {'copy ms':>7} {'ratio':>6}")
        if not args.messages_only:
            out("(d) workers on the server's node: payload through the shared window, only "
                "headers as messages (with SGD)")
            out(head)
            out("-" * len(head))
        for mb in args.sizes if not args.messages_only else ():
            r = results[mb]
            raw, msg = r["raw"], r[("sgd", DEFAULT_SHARD_ELEMS)]
            shared, copy = r[("shared", DEFAULT_SHARD_ELEMS)], r[("shared-copy", DEFAULT_SHARD_ELEMS)]
            out(f"{mb:>4}MB | {raw * 1e3:7.2f} | {msg * 1e3:8.2f} {raw / msg:6.2f} | "
                f"{shared * 1e3:9.2f} {raw / shared:6.2f} | {copy * 1e3:7.2f} {raw / copy:6.2f}")
        if not args.messages_only:
            out("shared: the worker reads the server's weights in place (plain Sync, what "
                "ps.train does); copy: the server writes each frame into the worker's own "
                "segment (every other policy). Both skip MPI's copies, so a ratio can pass 1.")

        # -- shard-size sweep ---------------------------------------------------------------
        if args.sweep_sizes:
            out("")
            out("shard_elems sweep (psframe round trip with SGD / with the stub optimizer)")
            head = (f"{'size':>6} {'shard_elems':>11} {'frames':>6} | {'psframe ms':>10} "
                    f"{'ratio':>6} | {'no-apply ms':>11} {'ratio':>6} | {'raw ms':>6} | "
                    f"{'mean ms':>7} {'SGD ms':>7}")
            out(head)
            out("-" * len(head))
            for mb in args.sweep_sizes:
                r = results[mb]
                for s in args.shards:
                    frames = len(make_layout(mb, s).frames())
                    full, noapp = r[("sgd", s)], r[("noapply", s)]
                    label = SHARD_LABELS.get(s, str(s))
                    _, mean, sgd = parts.get((mb, s), (0, 0, 0))
                    out(f"{mb:>4}MB {label:>11} {frames:>6} | {full * 1e3:10.2f} "
                        f"{r['raw'] / full:6.2f} | {noapp * 1e3:11.2f} {r['raw'] / noapp:6.2f} | "
                        f"{r['raw'] * 1e3:6.2f} | {mean:7.2f} {sgd:7.2f}")
        if args.diagnose:
            diagnose(comm, waiter, max(args.sizes), args, out)
    out(f"\ntotal {time.perf_counter() - t_start:.1f} s")
    comm.Free()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # one failing rank must not leave the others waiting in MPI
        abort_job(MPI.COMM_WORLD)
