"""Row-sparse parameters: embedding tables moved and updated by the rows a batch touches.

tables: which parameters are tables and what a batch reads; batch: a batch's touched rows;
worker_rows and server_rows: the two ends of the exchange (they need MPI, so they are
imported where they are used, not here: importing psframe starts no MPI).
"""
from .batch import BatchIds, batch_ids
from .tables import SparseTables, dense_first, sparse_tables

__all__ = ["SparseTables", "sparse_tables", "dense_first", "BatchIds", "batch_ids"]
