"""A simulated cluster on one machine: hosts as network namespaces, for multi-node jobs."""
from .cluster import MPI_ENV, Cluster, clusters, down_all, find, remove, sweep, up
from .netns import ClusterError

__all__ = ["Cluster", "ClusterError", "up", "find", "clusters", "remove", "down_all", "sweep",
           "MPI_ENV"]
