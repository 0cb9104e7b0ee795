"""plan_run: a train() call checked, then built into its RunPlan, the same on every rank."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from ..data import steps_per_epoch
from ..nn.optim import Optimizer
from ..params import DEFAULT_SHARD_ELEMS, ParamLayout, recount_shards, server_ranges
from ..server.checkpoints import CheckpointError, Checkpointer, load_checkpoint
from ..server.dispatch import BatchDispatcher
from ..sparse.tables import SparseTables, dense_first, sparse_tables
from ..worker.stages import layer_shard_ranges, plan_stages, stage_shard_range
from .checks import (CheckedCall, check_call, check_checkpoint, check_init,
                     check_optimizer_state, check_overlap, check_parallel, check_replicas,
                     check_sparse, check_tables, probe)
from .options import RunOptions
from .plan import ParallelPlan, RunPlan

__all__ = ["plan_run", "plan_parallel"]


def plan_run(world: Any, model: Any, data: Any, o: RunOptions) -> RunPlan:
    """The RunPlan of ``train(model, data, **o)`` on communicator ``world``, or the first
    error. Each part is checked before it is built, in one fixed order, so every rank
    computes the same plan (or meets the same error)."""
    call = check_call(world, model, data, o)
    layout, params = _layout(model, o, call.n_servers)
    tables = sparse_tables(model, layout, call.train.X, o.batch_size, call.n_servers)
    if tables is not None:
        check_sparse(tables, o, call.policy, call.optimizer, call.backend, layout.dtype)
    policy = call.policy
    if tables is None and getattr(policy, "name", None) == "hybrid":
        policy = policy.dense  # no row-sparse table: the Hybrid is its dense policy
    weights = _weights(layout, params, tables)
    del params  # the model's own init (float64): the tables are now in ``weights`` only
    probe(model, layout, weights, call.train)
    server_shards = server_ranges(layout, call.n_servers)
    check_overlap(o, model, policy, call.n_servers)
    layer_shards = layer_shard_ranges(model, layout) if o.overlap else None
    parallel = _parallel(o, model, layout, call.n_workers, tables)
    check_replicas(len(call.train), parallel.replicas)
    meta = _checkpoint_meta(o, layout, call, policy, parallel)
    resumed = None
    if o.resume is not None:
        resumed = _resume(o.resume, meta, call.optimizer, layout)
        _restore(weights, resumed[1], tables)
    schedule = _schedule(o, len(call.train), call.n_workers, parallel.replicas, policy)
    return RunPlan(
        options=o, model=model, train=call.train, eval=call.eval, policy=policy,
        optimizer=call.optimizer, dtype=np.dtype(o.dtype), layout=layout, weights=weights,
        steps=schedule.steps, epoch_samples=schedule.epoch_samples,
        dispatcher=schedule.dispatcher, delay=call.delay,
        expected_updates=schedule.expected_updates, backend=call.backend,
        n_workers=call.n_workers, parallel=parallel, resume=resumed,
        server_shards=server_shards, layer_shards=layer_shards, sparse=tables,
        checkpointer=None if o.checkpoint_dir is None else Checkpointer(
            o.checkpoint_dir, o.checkpoint_every, o.checkpoint_keep, meta),
    )


def _layout(model: Any, o: RunOptions,
            n_servers: int) -> Tuple[ParamLayout, Dict[str, np.ndarray]]:
    """The run's layout, cut between its servers, and the starting weights by name: the
    model's own init, or ``init`` where given."""
    tables: Dict[str, Any] = getattr(model, "embedding_inputs", dict)()
    params = dense_first(model.init_params(np.random.default_rng(o.seed)), tables)
    check_tables(tables, params)
    # The servers' ranges split the dense weights; each server holds a block of every
    # table's rows besides (psframe.sparse.SparseTables).
    layout = ParamLayout.from_params(params, o.dtype, o.shard_elems or DEFAULT_SHARD_ELEMS,
                                     balance={t: 0 for t in tables})
    layout = layout.cut_for(n_servers)  # or: fewer weights than servers
    init = check_init(o.init, layout)
    return layout, params if init is None else init


def _weights(layout: ParamLayout, params: Dict[str, np.ndarray],
             tables: Optional[SparseTables]) -> np.ndarray:
    """The flat weight buffer, each table's rows where the servers hold them."""
    weights = layout.flatten(params, out=layout.empty())
    if tables is not None:
        tables.place(weights)
    return weights


def plan_parallel(mode: str, model: Any, layout: ParamLayout, n_workers: int, n_stages: int,
                  stages: Any, micro_batches: int, batch_size: int) -> ParallelPlan:
    """The ParallelPlan of a mode checked by check_parallel (``n_stages`` is its answer)."""
    if mode == "data":
        return ParallelPlan(n_workers, 1, None, [(0, layout.n_shards)], 1)
    layers = plan_stages(model, n_stages, batch_size, None if isinstance(stages, int) else stages)
    return ParallelPlan(n_workers // n_stages, n_stages, layers,
                        [stage_shard_range(model, layout, ids) for ids in layers], micro_batches)


def _parallel(o: RunOptions, model: Any, layout: ParamLayout, n_workers: int,
              tables: Optional[SparseTables]) -> ParallelPlan:
    n_stages = check_parallel(o.mode, n_workers, o.stages, o.micro_batches, o.batch_size,
                              o.dispatch)
    parallel = plan_parallel(o.mode, model, layout, n_workers, n_stages, o.stages,
                             o.micro_batches, o.batch_size)
    if tables is not None:  # the dense shards move as before; the tables' rows apart
        parallel = dataclasses.replace(parallel, stage_shards=[tables.dense_shards])
    return parallel


def _checkpoint_meta(o: RunOptions, layout: ParamLayout, call: CheckedCall, policy: Any,
                     parallel: ParallelPlan) -> Dict[str, Any]:
    """The run's facts a checkpoint records and a resume must match."""
    # The layout without the servers' cuts: a checkpoint resumes with any number of servers.
    return {"layout": _jsonable(layout.signature(with_cuts=False)),
            "n_workers": call.n_workers, "mode": o.mode, "n_stages": parallel.n_stages,
            "optimizer": repr(call.optimizer), "policy": repr(policy),
            "batch_size": int(o.batch_size), "servers": call.n_servers}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _resume(path: str, meta: Dict[str, Any], optimizer: Optimizer,
            layout: ParamLayout) -> Tuple[dict, dict]:
    """The checkpoint to continue from, refused unless it fits this run exactly."""
    manifest, arrays = load_checkpoint(path)
    check_checkpoint(path, manifest, meta)
    written_by = int(manifest.get("servers", 1))
    if written_by != meta["servers"]:
        # Another number of servers: the weights and optimizer state are per element and
        # carry over as they are; only the per-shard update counts follow the new cuts.
        arrays = dict(arrays)
        try:
            arrays["shard_updates"] = recount_shards(
                arrays["shard_updates"], layout.uncut().cut_for(written_by), layout)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path} cannot be resharded from "
                                  f"{written_by} to {meta['servers']} servers: {exc}") from None
    check_optimizer_state(path, manifest, arrays, optimizer, layout.dtype)
    return manifest, arrays


def _restore(weights: np.ndarray, saved: Dict[str, np.ndarray],
             tables: Optional[SparseTables]) -> None:
    """A checkpoint's weights into ``weights``."""
    weights[:len(saved["weights"])] = saved["weights"]
    if tables is not None:  # the tables are checkpointed by rows, each server's block
        for name, table in tables.views(weights).items():
            table[...] = saved[f"table.{name}"]


class _Schedule(NamedTuple):
    steps: int  # per worker
    epoch_samples: int
    dispatcher: Optional[BatchDispatcher]
    expected_updates: Optional[int]


def _schedule(o: RunOptions, n_rows: int, n_workers: int, n_replicas: int,
              policy: Any) -> _Schedule:
    """How many steps each worker takes, who reads which batch, and how many updates the
    server should apply (None where the policy cannot tell)."""
    per_epoch = steps_per_epoch(n_rows, n_replicas, o.batch_size)
    steps_given = o.steps is not None
    steps = int(o.steps) if o.steps is not None else int(o.epochs or 0) * per_epoch
    dispatcher: Optional[BatchDispatcher]
    if o.dispatch == "dynamic":
        # Total work is the same as static dispatch; who does which batch is decided live.
        total_batches = steps * n_workers if steps_given else int(o.epochs) * math.ceil(
            n_rows / o.batch_size)
        dispatcher = BatchDispatcher(n_rows, o.batch_size, total_batches, o.shuffle, o.seed)
        epoch_samples = n_rows
        rounds: float = total_batches / n_workers
    else:
        dispatcher = None
        epoch_samples = per_epoch * n_replicas * o.batch_size
        rounds = steps
    per_round = policy.updates_per_round(n_replicas)
    return _Schedule(steps, epoch_samples, dispatcher,
                     None if per_round is None else int(round(rounds * per_round)))
