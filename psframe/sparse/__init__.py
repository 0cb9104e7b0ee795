"""Row-sparse parameters: embedding tables moved and updated by the rows a batch touches."""
from .tables import SparseTables, sparse_tables
from .batch import BatchIds, batch_ids
from .server_rows import ServerRows
from .worker_rows import WorkerRows

__all__ = ["SparseTables", "sparse_tables", "BatchIds", "batch_ids", "ServerRows",
           "WorkerRows"]
