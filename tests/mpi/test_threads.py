"""Each rank's BLAS threads are limited so that ranks x threads fits the node's cores."""
import os

import numpy as np
import pytest
from mpi4py import MPI
from threadpoolctl import threadpool_info

import psframe as ps

pytestmark = pytest.mark.mpi

WORLD = MPI.COMM_WORLD


class RecordsThreads(ps.models.MLP):
    seen = None

    def loss_and_grad(self, params, X, y):
        RecordsThreads.seen = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
        return super().loss_and_grad(params, X, y)


def run(threads):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 4)), rng.integers(0, 2, 40)
    RecordsThreads.seen = None
    ps.train(RecordsThreads([4, 8, 2]), (X, y), batch_size=4, steps=2, threads=threads)
    return RecordsThreads.seen


def test_default_threads_share_the_cores():
    seen = run(None)
    if WORLD.Get_rank() == 0:
        return  # the server computes no gradients
    assert seen, "numpy's BLAS was not found by threadpoolctl, so no limit could be set"
    cores = len(os.sched_getaffinity(0))
    expected = max(1, cores // WORLD.Get_size())  # every rank of this job is on this node
    assert set(seen) == {expected}


def test_threads_option_overrides():
    seen = run(2)
    if WORLD.Get_rank():
        assert set(seen) == {2}
