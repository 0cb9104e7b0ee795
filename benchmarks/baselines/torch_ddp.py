"""PyTorch DistributedDataParallel on CPU (gloo) over the same MLP, data, shards and SGD."""
import socket
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


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_mlp(flat, model):
    """torch layers holding the NumPy baseline's initial weights: the same start as the others."""
    layers = []
    views = model.views(flat)
    for k in range(0, len(views), 2):
        lin = torch.nn.Linear(*views[k].shape)
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
    port = comm.bcast(free_port() if rank == 0 else None, root=0)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    X, y, X_test, y_test = common.load_data(options)
    threads, limit = common.thread_limit(options, ranks_here=size)
    torch.set_num_threads(threads)
    model = MLP(sizes, options["dtype"])
    flat = model.init(np.random.default_rng(options["seed"]))
    net = torch_mlp(flat, model).to(getattr(torch, options["dtype"]))
    ddp = DDP(net)
    opt = torch.optim.SGD(ddp.parameters(), lr=options["lr"], momentum=options["momentum"],
                          weight_decay=options["weight_decay"], nesterov=options["nesterov"])
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    Xe, ye = torch.from_numpy(X_test), torch.from_numpy(y_test)

    def evaluate():
        with torch.no_grad():
            logits = net(Xe)
            accuracy = (logits.argmax(1) == ye).float().mean()
            return float(F.cross_entropy(logits, ye)), float(accuracy)

    b = options["batch_size"]
    shard = common.Shard(len(X), size, rank, b, options["shuffle"], options["seed"])
    steps = common.total_steps(options, len(X), size)
    history = common.History(evaluate if options["eval"] and rank == 0 else None,
                             options["eval_every"],
                             common.steps_per_epoch(len(X), size, b) * size * b)
    sleep = delays.get(rank, 0.0)
    with limit:
        dist.barrier()
        history.start()
        for t in range(steps):
            rows = torch.from_numpy(shard.rows(t))
            if sleep:
                time.sleep(sleep)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(ddp(Xt[rows]), yt[rows])
            loss.backward()  # DDP averages the gradients across ranks here
            opt.step()
            if rank == 0:
                # Rank 0's own batch loss: a cross-rank mean would cost a collective per step.
                history.step(t + 1, (t + 1) * size * b, float(loss), b)
        wall = time.perf_counter() - history.t0
        if rank == 0:
            history.record(steps, steps * size * b)
    dist.destroy_process_group()
    if rank:
        return
    samples = steps * size * b
    nbytes = flat.nbytes * steps
    stats = {"wall_s": wall, "samples": samples, "samples_per_s": samples / wall,
             "updates_applied": steps, "steps_per_worker": [steps] * size, "n_workers": size,
             "bytes_pushed": nbytes * size, "bytes_pulled": nbytes * size,
             "n_params": int(flat.size)}
    common.write_result(out, stats, history.rows,
                        {"threads": threads, "sizes": sizes, "torch": torch.__version__})


if __name__ == "__main__":
    main(sys.argv)
