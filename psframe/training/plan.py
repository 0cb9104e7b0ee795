"""RunPlan: what a checked train() call will do, the same on every rank; and its ParallelPlan."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..params import ParamLayout
from .options import RunOptions

__all__ = ["ParallelPlan", "RunPlan"]


@dataclass(frozen=True)
class ParallelPlan:
    """Who does what: ``replicas`` data-parallel units (workers, or pipelines of
    ``n_stages`` stages), each stage's layers (None in data mode) and shard range."""

    replicas: int
    n_stages: int
    stage_layers: Optional[List[List[int]]]
    stage_shards: List[Tuple[int, int]]
    micro_batches: int


@dataclass
class RunPlan:
    """A checked run: the options as given, and everything derived from them."""

    options: RunOptions
    model: Any
    train: Any  # ps.data.ArrayDataset (or a memory-mapped NpyDataset)
    eval: Any
    policy: Any
    optimizer: Any
    dtype: np.dtype
    layout: ParamLayout
    weights: np.ndarray
    steps: int  # per worker
    epoch_samples: int
    dispatcher: Any  # BatchDispatcher under dynamic dispatch, else None
    delay: Dict[int, float]
    expected_updates: Optional[int]
    backend: Any
    n_workers: int
    parallel: ParallelPlan
    resume: Optional[Tuple[dict, dict]]
    checkpointer: Any
    server_shards: List[Tuple[int, int]]  # each server's shard range; rank s is server s
    layer_shards: Optional[List[Tuple[int, int]]]  # per trained layer, under overlap=True
    sparse: Any = None  # psframe.sparse.SparseTables: the row-sparse tables, if any

    @property
    def n_servers(self) -> int:
        return len(self.server_shards)

    @property
    def read_in_place(self) -> bool:
        """Workers may read the server's weights in place only if no update can run while one
        computes: a lockstep policy, where every worker has pushed before a step is applied."""
        return bool(self.policy.lockstep)

    def stop_units(self) -> List[int]:
        """Workers that must stop at the same step: all of them under a lockstep policy (a
        stopped run then resumes exactly), else each pipeline (or data-parallel worker)."""
        lockstep = self.policy.lockstep
        return [0 if lockstep else w // self.parallel.n_stages for w in range(self.n_workers)]

    def describe(self, threads: int) -> Dict[str, Any]:
        """The run's settings as plain values, for TrainResult.config and the logs."""
        par = self.parallel
        return dict(
            self.options.shown(), policy=repr(self.policy), optimizer=repr(self.optimizer),
            batch_size=int(self.options.batch_size), seed=int(self.options.seed),
            shuffle=bool(self.options.shuffle), steps=self.steps, dtype=str(self.dtype),
            backend=self.backend.name,
            dispatch="dynamic" if self.dispatcher is not None else "static",
            n_stages=par.n_stages, micro_batches=par.micro_batches,
            stage_layers=par.stage_layers, threads=threads,
            server_shards=[list(r) for r in self.server_shards],
        )

