"""Run across hosts: Sync equals serial SGD, and each worker takes the path its host allows
(the shared window beside the server, messages elsewhere). Prints PATHS then OK on rank 0."""
import os
import socket
import sys

import numpy as np
from mpi4py import MPI

import psframe as ps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from serial_reference import SerialSGD, mlp_init, mlp_loss_and_grad, serial_sync  # noqa: E402

SIZES = [6, 9, 7, 3]
world = MPI.COMM_WORLD
hosts = world.gather(socket.gethostname())
rng = np.random.default_rng(2)
y = rng.integers(0, 3, 83)
X = rng.normal(size=(3, 6))[y] + 0.7 * rng.normal(size=(83, 6))
init = mlp_init(SIZES, np.random.default_rng(7))
result = ps.train(ps.models.MLP(SIZES), (X, y), policy=ps.Sync(), batch_size=6, steps=8,
                  optimizer=ps.SGD(lr=0.3, momentum=0.9), shuffle=True, seed=3,
                  dtype="float64", init=init)
if world.rank == 0:
    n_workers = world.size - 1
    expected = serial_sync(lambda p, a, b: mlp_loss_and_grad(p, a, b, len(SIZES) - 1), init,
                           X, y, n_workers, 6, 8, SerialSGD(0.3, 0.9), shuffle=True, seed=3)
    for k in expected:
        np.testing.assert_allclose(result.params[k], expected[k], rtol=1e-10, atol=1e-10,
                                   err_msg=k)
    paths = result.stats["worker_transport"]
    want = ["shared-read" if h == hosts[0] else "mpi" for h in hosts[1:]]
    assert paths == want, (paths, want, hosts)
    print("HOSTS", " ".join(hosts))
    print("PATHS", " ".join(paths))
    print("OK", flush=True)
