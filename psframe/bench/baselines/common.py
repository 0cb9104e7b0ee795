"""What the hand-written baselines share: the cell spec, data, shards, history and the result."""
import json
import math
import os
import sys
import time

import numpy as np

# The cell spec keys a baseline understands; the bench writes the cell's full options.
DEFAULTS = {"model": "mlp:784,128,10", "data": "mnist", "optimizer": "sgd", "lr": None,
            "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "batch_size": 32,
            "epochs": 1, "steps": None, "eval_every": None, "seed": 0, "dtype": "float32",
            "shuffle": True, "threads": None, "eval": True}


def unsupported(message):
    """The cell asks for something this baseline does not do: exit 2 with the reason."""
    print(f"{os.path.basename(sys.argv[0])}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def load_spec(argv):
    """(options, workers, delays {worker: s}, output path) from ``SCRIPT SPEC.json OUT.json``."""
    if len(argv) != 3:
        unsupported("usage: SCRIPT CELL.json RESULT.json (written by psframe bench)")
    with open(argv[1]) as f:
        cell = json.load(f)
    options = {**DEFAULTS, **{k: v for k, v in cell["options"].items() if k in DEFAULTS}}
    if options["optimizer"] != "sgd":
        unsupported(f"optimizer {options['optimizer']!r}: the baselines implement sgd only")
    if options["lr"] is None:
        from psframe.nn.optim import SGD

        options["lr"] = SGD.DEFAULT_LR  # psframe's default, from its one place
    delays = {int(w): float(s) for w, s in (cell.get("delay") or {}).items()}
    return options, int(cell.get("workers", 1)), delays, argv[2]


def mlp_sizes(options):
    name, _, args = options["model"].partition(":")
    if name != "mlp" or not args:
        unsupported(f"model {options['model']!r}: the baselines implement mlp:SIZES only")
    return [int(s) for s in args.split(",")]


def load_data(options):
    """(X, y, X_test, y_test) from psframe's loaders, X in the run's dtype, y as int64."""
    from psframe import data

    name, _, args = options["data"].partition(":")
    seed = options["seed"]
    if name == "synthetic":
        dims = dict(zip(("n_rows", "n_features", "n_classes"), map(int, args.split(","))))
        train, test = data.synthetic(seed=seed, **dims) if args else data.synthetic(seed=seed)
    elif name in ("digits", "mnist"):
        train, test = getattr(data, name)(seed=seed)
    else:
        unsupported(f"unknown dataset {options['data']!r}")
    dtype = np.dtype(options["dtype"])

    def prep(ds):
        return np.ascontiguousarray(ds.X, dtype=dtype), ds.y.astype(np.int64)

    return (*prep(train), *prep(test))


def steps_per_epoch(n_rows, replicas, batch_size):
    """Steps for every replica to pass once over its block (psframe's definition)."""
    return max(1, math.ceil(math.ceil(n_rows / replicas) / batch_size))


def total_steps(options, n_rows, replicas):
    if options["steps"] is not None:
        return int(options["steps"])
    return int(options["epochs"]) * steps_per_epoch(n_rows, replicas, options["batch_size"])


class Shard:
    """One replica's rows: block ``w`` of array_split(arange(n), replicas), read as an endless
    stream of batches, each pass over it reshuffled with the seed (seed, w, pass)."""

    def __init__(self, n_rows, replicas, w, batch_size, shuffle, seed):
        self.block = np.array_split(np.arange(n_rows), replicas)[w]
        self.b, self.shuffle, self.seed, self.w = batch_size, shuffle, seed, w
        self._pass, self._order = None, self.block

    def _order_of(self, p):
        if self.shuffle and p != self._pass:
            rng = np.random.default_rng([self.seed, self.w, p])
            self._pass, self._order = p, self.block[rng.permutation(len(self.block))]
        return self._order

    def rows(self, step):
        n = len(self.block)
        pos = step * self.b + np.arange(self.b)
        return np.concatenate([self._order_of(int(p))[pos[pos // n == p] % n]
                               for p in np.unique(pos // n)])


class History:
    """History rows as psframe records them: every ``eval_every`` steps, else at each epoch
    boundary, and at the end; time_s is taken before the evaluation, as psframe does."""

    def __init__(self, evaluate, eval_every, epoch_samples, reduce=None):
        """``reduce(loss_sum, n) -> (loss_sum, n)``, when given, is called at every row, on
        every rank that keeps a History: it sums the training loss over ranks (each rank then
        calls step() and record() at the same steps)."""
        self.evaluate, self.every, self.epoch_samples = evaluate, eval_every, epoch_samples
        self.reduce = reduce
        self.rows, self.t0 = [], time.perf_counter()
        self._loss, self._n, self._epoch, self._last = 0.0, 0, 0, -1

    def start(self):
        self.t0 = time.perf_counter()

    def step(self, step, samples, loss, n):
        """After update ``step`` (1-based), with ``samples`` trained so far."""
        self._loss += loss * n
        self._n += n
        epoch = samples // self.epoch_samples
        due = step % self.every == 0 if self.every else epoch > self._epoch
        self._epoch = max(epoch, self._epoch)
        if due:
            self.record(step, samples)

    def record(self, step, samples):
        if step == self._last:
            return
        self._last = step
        if self.reduce is not None:
            self._loss, self._n = self.reduce(self._loss, self._n)
        row = {"step": step, "epoch": samples / self.epoch_samples,
               "time_s": time.perf_counter() - self.t0,
               "train_loss": self._loss / self._n if self._n else None,
               "eval_loss": None, "eval_accuracy": None}
        self._loss, self._n = 0.0, 0
        if self.evaluate is not None:
            row["eval_loss"], row["eval_accuracy"] = self.evaluate()
        self.rows.append(row)


def thread_limit(options, ranks_here):
    """BLAS threads: the option, else the node's cores shared among this job's ranks, as psframe
    does; numpy's default (every core per rank) oversubscribes a small node badly."""
    from threadpoolctl import threadpool_limits

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    threads = options["threads"] or max(1, cores // ranks_here)
    return threads, threadpool_limits(limits=threads)


def rendezvous(comm):
    """(address, port) where torch.distributed's ranks meet: $MASTER_ADDR / $MASTER_PORT when
    set; else, when every rank is on one host, 127.0.0.1, and across hosts the address rank 0's
    hostname resolves to; and a port that rank 0 found free. On the loopback address, gloo and
    TensorPipe are told to use the loopback interface as well, so they do not depend on how
    this host's name resolves."""
    import socket

    hosts = comm.allgather(socket.gethostname())
    address = os.environ.get("MASTER_ADDR")
    if address is None and len(set(hosts)) == 1:
        address = "127.0.0.1"
    elif address is None:  # several hosts: rank 0's address, as the others reach it
        address = comm.bcast(socket.gethostbyname(hosts[0]) if comm.Get_rank() == 0 else None,
                             root=0)
    port = os.environ.get("MASTER_PORT")
    if port is None:
        if comm.Get_rank() == 0:
            with socket.socket() as s:
                s.bind((address, 0))
                port = s.getsockname()[1]
        port = comm.bcast(port, root=0)
    if address.startswith("127."):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        os.environ.setdefault("TP_SOCKET_IFNAME", "lo")
    # Every rank must have the address and port before rank 0 blocks in torch's rendezvous:
    # MPI moves a message only while its sender calls MPI (no progress thread), and across
    # hosts rank 0's bcast could still be unsent when it went into the TCPStore's wait, so
    # the others never learnt where to meet (the DDP hang on the simulated cluster).
    comm.Barrier()
    return address, int(port)


def torch_threads(torch, threads):
    """Intra-op threads of this rank, as for BLAS: cores / ranks, so that ranks x threads fit
    the node. Inter-op threads (unused by these loops) are kept to 1 where torch allows it."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # only settable before torch's first parallel work
        pass
    return torch.get_num_threads()


def write_result(path, stats, history, config):
    """RESULT.json, written to a temporary name and renamed: the bench never reads half a file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"stats": stats, "history": history, "config": config}, f, indent=1)
    os.replace(tmp, path)
