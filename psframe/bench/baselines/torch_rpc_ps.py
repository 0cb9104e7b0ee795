"""PyTorch RPC parameter server, batch-update design: trainers send gradients, the server
averages one from each trainer, steps SGD and answers all of them with the new weights."""
import sys
import threading
import time
import warnings
from typing import Any, Dict

import numpy as np
import torch
import torch.distributed.rpc as rpc
import torch.nn.functional as F
from mpi4py import MPI
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import common
from mlp import MLP
from torch_ddp import torch_mlp

# This process's data, model and options, ready before RPC starts the clock.
STATE: Dict[str, Any] = {}
# torch's own RPC start-up trips this deprecation warning on every rank; it is not ours to fix
# and would crowd a failed job's stderr tail, which the bench keeps as the failure's note.
warnings.filterwarnings("ignore", message="You are using a Backend .* as a ProcessGroup")


class BatchUpdateServer:
    """Weights as one flat tensor; each update averages ``n_trainers`` gradients."""

    def __init__(self, net, options, n_trainers, history):
        self.net = net  # for evaluation only
        self.w = torch.nn.Parameter(parameters_to_vector(net.parameters()).detach().clone())
        self.w.grad = torch.zeros_like(self.w)
        self.opt = torch.optim.SGD([self.w], lr=options["lr"], momentum=options["momentum"],
                                   weight_decay=options["weight_decay"],
                                   nesterov=options["nesterov"])
        self.n, self.b, self.history = n_trainers, options["batch_size"], history
        self.lock = threading.Lock()
        self.arrived, self.updates, self.loss = 0, 0, 0.0
        self.busy_s = 0.0  # in the handler: summing, stepping, evaluating (psframe's server_busy_s)
        self.future = torch.futures.Future()

    def weights(self):
        return self.w.detach().clone()

    @staticmethod
    @rpc.functions.async_execution
    def push_and_pull(server_rref, grad, loss):
        """A trainer's gradient in, a future of the weights after this batch's update out."""
        self = server_rref.local_value()
        with self.lock:
            t0 = time.perf_counter()
            self.w.grad += grad
            self.loss += loss
            self.arrived += 1
            future = self.future
            if self.arrived == self.n:
                self.w.grad /= self.n
                self.opt.step()
                self.w.grad.zero_()
                self.updates += 1
                samples = self.updates * self.n * self.b
                self.history.step(self.updates, samples, self.loss / self.n, self.n * self.b)
                self.arrived, self.loss = 0, 0.0
                self.future = torch.futures.Future()
                weights = self.weights()
                self.busy_s += time.perf_counter() - t0
                future.set_result(weights)
            else:
                self.busy_s += time.perf_counter() - t0
        return future

    def evaluate(self):
        with torch.no_grad():
            vector_to_parameters(self.w.detach(), self.net.parameters())
            logits = self.net(STATE["X_test"])
            y = STATE["y_test"]
            return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).double().mean())


def run_trainer(server_rref, steps, delay):
    """One trainer: compute a batch gradient, push it, wait for the new weights, repeat.
    Returns (steps, seconds waiting for the server, seconds in all)."""
    net, shard = STATE["net"], STATE["shard"]
    X, y = STATE["X"], STATE["y"]
    start = time.perf_counter()
    vector_to_parameters(server_rref.rpc_sync().weights(), net.parameters())
    waited = time.perf_counter() - start
    for t in range(steps):
        rows = torch.from_numpy(shard.rows(t))
        if delay:
            time.sleep(delay)
        net.zero_grad(set_to_none=False)
        loss = F.cross_entropy(net(X[rows]), y[rows])
        loss.backward()
        grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
        t0 = time.perf_counter()
        w = rpc.rpc_sync(server_rref.owner(), BatchUpdateServer.push_and_pull,
                         args=(server_rref, grad, loss.item()))
        waited += time.perf_counter() - t0
        vector_to_parameters(w, net.parameters())
    return steps, waited, time.perf_counter() - start


def main(argv):
    comm = MPI.COMM_WORLD  # only to learn the ranks and agree on a port
    rank, size = comm.Get_rank(), comm.Get_size()
    n_trainers = size - 1
    options, _, delays, out = common.load_spec(argv)
    if n_trainers < 1:
        common.unsupported("needs at least 2 ranks: the server and a trainer")
    sizes = common.mlp_sizes(options)
    X, y, X_test, y_test = common.load_data(options)
    threads, limit = common.thread_limit(options, ranks_here=size)
    threads = common.torch_threads(torch, threads)
    model = MLP(sizes, options["dtype"])
    flat = model.init(np.random.default_rng(options["seed"]))
    b = options["batch_size"]
    STATE.update(net=torch_mlp(flat, model),
                 X=torch.from_numpy(X), y=torch.from_numpy(y),
                 X_test=torch.from_numpy(X_test), y_test=torch.from_numpy(y_test),
                 shard=common.Shard(len(X), n_trainers, max(rank - 1, 0), b,
                                    options["shuffle"], options["seed"]))
    address, port = common.rendezvous(comm)
    name = "server" if rank == 0 else f"trainer{rank - 1}"
    rpc.init_rpc(name, rank=rank, world_size=size,
                 rpc_backend_options=rpc.TensorPipeRpcBackendOptions(
                     init_method=f"tcp://{address}:{port}",
                     num_worker_threads=max(16, 2 * size)))
    # Trainers do their work in RPC threads while their main thread waits in shutdown(): the
    # thread limits must hold until then.
    with limit:
        if rank == 0:
            steps = common.total_steps(options, len(X), n_trainers)
            epoch_samples = common.steps_per_epoch(len(X), n_trainers, b) * n_trainers * b
            history = common.History(None, options["eval_every"], epoch_samples)
            server = BatchUpdateServer(STATE["net"], options, n_trainers, history)
            if options["eval"]:
                history.evaluate = server.evaluate
            server_rref = rpc.RRef(server)
            history.start()
            futures = [rpc.rpc_async(f"trainer{w}", run_trainer,
                                     args=(server_rref, steps, delays.get(w, 0.0)))
                       for w in range(n_trainers)]
            trainers = torch.futures.wait_all(futures)
            wall = time.perf_counter() - history.t0
            history.record(server.updates, server.updates * n_trainers * b)
        rpc.shutdown()
    if rank:
        return
    samples = server.updates * n_trainers * b
    nbytes = flat.nbytes * server.updates * n_trainers  # per update: each trainer's push and pull
    waits = [w for _, w, _ in trainers]
    stats = {"wall_s": wall, "samples": samples, "samples_per_s": samples / wall,
             "updates_applied": server.updates,
             "steps_per_worker": [n for n, _, _ in trainers], "n_workers": n_trainers,
             "bytes_pushed": nbytes, "bytes_pulled": nbytes, "n_params": int(flat.size),
             "worker_wait_s": waits,
             "worker_wait_share": sum(waits) / max(sum(t for _, _, t in trainers), 1e-12),
             "server_busy_s": server.busy_s}
    common.write_result(out, stats, history.rows,
                        {"threads": threads, "sizes": sizes, "torch": torch.__version__,
                         "backend": "tensorpipe", "rendezvous": f"{address}:{port}"})


if __name__ == "__main__":
    main(sys.argv)
