"""Where ranks sit: how many share this node and its cores, and a worker's place on its node."""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple, Union

from mpi4py import MPI

__all__ = ["node_share", "node_local_index"]


def node_share(comm: MPI.Comm) -> Tuple[int, int]:
    """(ranks of ``comm`` on this machine's cores, cores this process may use): threads and
    waits follow from it. Collective over ``comm``.

    Ranks are counted by the kernel they run on (its boot id), not by MPI's node: hosts that
    share one machine (network namespaces, containers) share its cores too. Measured on the
    simulated cluster, 2 cores: counted per MPI node, each remote worker took 2 BLAS threads
    and spun its waits, and a step of the MNIST MLP took 61 ms instead of 1.3 ms.
    """
    kernel = _kernel_id()
    if kernel is not None:
        ids = comm.allgather(kernel)
        local_ranks = ids.count(kernel)
    else:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        local_ranks = node.Get_size()
        node.Free()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return local_ranks, cores


def _kernel_id() -> Optional[str]:
    """This kernel's boot id (Linux), the same in every namespace and container it runs."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def node_local_index(comm: MPI.Intracomm, server_ranks: Union[int, Sequence[int]]) -> int:
    """This worker's place among the workers on its node, for picking its GPU.

    Collective over the workers only (MPI_Comm_create_group), because the servers (a rank,
    or a list of them) never take part in building workers; leaving them out also keeps
    them from using up a device slot.
    Every worker calls it, whatever its backend, so a node without a GPU cannot leave the
    others waiting.
    """
    servers = [server_ranks] if isinstance(server_ranks, int) else list(server_ranks)
    everyone = comm.Get_group()
    workers = everyone.Excl(servers)
    everyone.Free()
    if comm.Get_rank() in servers or workers.Get_size() == 0:
        workers.Free()
        return 0
    sub = comm.Create_group(workers)
    workers.Free()
    node = sub.Split_type(MPI.COMM_TYPE_SHARED)
    index = node.Get_rank()
    node.Free()
    sub.Free()
    return index
