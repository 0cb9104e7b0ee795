"""Where ranks sit: how many share this node and its cores, and a worker's place on its node."""
from __future__ import annotations

import os
from typing import Tuple

from mpi4py import MPI

__all__ = ["node_share", "node_local_index"]


def node_share(comm: MPI.Comm) -> Tuple[int, int]:
    """(ranks of ``comm`` on this node, cores this process may use): threads and waits follow
    from it. Collective over ``comm``."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_ranks = node.Get_size()
    node.Free()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return local_ranks, cores


def node_local_index(comm: MPI.Comm, server_rank: int) -> int:
    """This worker's place among the workers on its node, for picking its GPU.

    Collective over the workers only (MPI_Comm_create_group), because the server never
    takes part in building workers; leaving it out also keeps it from using up a device slot.
    Every worker calls it, whatever its backend, so a node without a GPU cannot leave the
    others waiting.
    """
    everyone = comm.Get_group()
    workers = everyone.Excl([server_rank])
    everyone.Free()
    if comm.Get_rank() == server_rank or workers.Get_size() == 0:
        workers.Free()
        return 0
    sub = comm.Create_group(workers)
    workers.Free()
    node = sub.Split_type(MPI.COMM_TYPE_SHARED)
    index = node.Get_rank()
    node.Free()
    sub.Free()
    return index
