"""PyTorch DistributedDataParallel on CPU (gloo) over the same MLP, data, shards and SGD."""
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from mpi4py import MPI
from torch.nn.parallel import DistributedDataParallel as DDP

import common
from mlp import MLP


def torch_mlp(flat, model):
    """torch layers holding the NumPy baseline's initial weights: the same start as the others.

    torch's Linear keeps W as (out, in), the transpose of psframe's (in, out); the flat vector
    of ``parameters()`` is therefore [W0ᵀ, b0, W1ᵀ, b1, ...]."""
    layers = []
    views = model.views(flat)
    for k in range(0, len(views), 2):
        lin = torch.nn.Linear(*views[k].shape, dtype=torch.from_numpy(flat).dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(views[k].T.copy()))
            lin.bias.copy_(torch.from_numpy(views[k + 1].copy()))
        layers += [lin, torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def main(argv):
    comm = MPI.COMM_WORLD  # only to learn the ranks and agree on a port; gloo moves the data
    rank, size = comm.Get_rank(), comm.Get_size()
    options, _, delays, out = common.load_spec(argv)
    sizes = common.mlp_sizes(options)
    X, y, X_test, y_test = common.load_data(options)
    threads, limit = common.thread_limit(options, ranks_here=size)
    threads = common.torch_threads(torch, threads)
    address, port = common.rendezvous(comm)
    dist.init_process_group("gloo", init_method=f"tcp://{address}:{port}", rank=rank,
                            world_size=size)
    model = MLP(sizes, options["dtype"])
    flat = model.init(np.random.default_rng(options["seed"]))
    net = torch_mlp(flat, model)
    ddp = DDP(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=options["lr"], momentum=options["momentum"],
                          weight_decay=options["weight_decay"], nesterov=options["nesterov"])
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    Xe, ye = torch.from_numpy(X_test), torch.from_numpy(y_test)

    def evaluate():
        with torch.no_grad():
            logits = net(Xe)
            accuracy = (logits.argmax(1) == ye).double().mean()
            return float(F.cross_entropy(logits, ye)), float(accuracy)

    def loss_over_ranks(loss_sum, n):
        # At each history row only: the training loss of every rank's batches, as psframe's
        # server and the Allreduce loop report it, for one small collective per row.
        both = torch.tensor([loss_sum, n], dtype=torch.float64)
        dist.all_reduce(both)
        return float(both[0]), int(both[1])

    b = options["batch_size"]
    shard = common.Shard(len(X), size, rank, b, options["shuffle"], options["seed"])
    steps = common.total_steps(options, len(X), size)
    history = common.History(evaluate if options["eval"] and rank == 0 else None,
                             options["eval_every"],
                             common.steps_per_epoch(len(X), size, b) * size * b,
                             reduce=loss_over_ranks)
    sleep = delays.get(rank, 0.0)
    with limit:
        dist.barrier()
        history.start()
        for t in range(steps):
            rows = torch.from_numpy(shard.rows(t))
            if sleep:
                time.sleep(sleep)  # a simulated straggler, as psframe's delay= sleeps
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(Xt[rows]), yt[rows])
            loss.backward()  # DDP averages the gradients across ranks here
            opt.step()
            history.step(t + 1, (t + 1) * size * b, loss.item(), b)
        wall = time.perf_counter() - history.t0
        history.record(steps, steps * size * b)
    # Leave together: a rank that tears gloo down while a peer still uses its connection (or
    # the store rank 0 hosts) kills that peer with std::terminate at exit, after a good run.
    dist.barrier()
    dist.destroy_process_group()
    comm.Barrier()
    if rank:
        return
    samples = steps * size * b
    nbytes = flat.nbytes * steps  # per rank: its gradient sent and the mean received, per step
    stats = {"wall_s": wall, "samples": samples, "samples_per_s": samples / wall,
             "updates_applied": steps, "steps_per_worker": [steps] * size, "n_workers": size,
             "bytes_pushed": nbytes * size, "bytes_pulled": nbytes * size,
             "n_params": int(flat.size)}
    common.write_result(out, stats, history.rows,
                        {"threads": threads, "sizes": sizes, "torch": torch.__version__,
                         "backend": "gloo", "rendezvous": f"{address}:{port}"})


if __name__ == "__main__":
    main(sys.argv)
