"""The roles of a planned run: ranks 0..S-1 the servers (rank 0 runs the policy), the rest
workers."""
from __future__ import annotations

import numpy as np

from ..callbacks import CallbackList, PrintProgress
from ..data import BatchSchedule, block_range, features
from ..params import overlap
from ..server import Followers, Group, ParameterServer, Recorder, ShardServer
from ..worker import LayerwiseWorker, StageWorker, Worker
from .plan import RunPlan

__all__ = ["build_server", "build_shard_server", "build_worker", "groups_of", "labels_for"]


def build_server(channel, plan: RunPlan, verbose, callbacks, n_threads):
    """The ParameterServer of ``plan`` on ``channel`` (whose rank 0 it is): the policy, the
    first range of the weights, and the coordination of the other servers."""
    hooks = CallbackList(([PrintProgress()] if verbose else []) + list(callbacks or []))
    eval_data = None
    if plan.eval is not None:
        X = features(plan.eval.X, plan.dtype, plan.model.id_inputs())
        if plan.sparse is not None:  # the server's tables are in storage order
            X = plan.sparse.placed(X)
        eval_data = (X, labels_for(plan.model, plan.eval.y, plan.dtype))
    n_workers = plan.n_workers
    recorder = Recorder(
        plan.model, plan.layout, n_workers, eval_data=eval_data,
        eval_every=plan.options.eval_every, total_steps=plan.expected_updates,
        epoch_samples=plan.epoch_samples, callbacks=hooks,
        run_info={"config": plan.describe(n_threads)},
        weighting=(f"{plan.policy.describe(plan.parallel.replicas)}; "
                   f"{plan.optimizer.name} steps by {plan.optimizer.weight_rule}"),
        total_batches=plan.dispatcher.total_batches if plan.dispatcher else None,
    )
    followers = None
    if plan.n_servers > 1:
        followers = Followers(channel, range(1, plan.n_servers), plan.server_shards[1:],
                              n_workers, sparse=plan.sparse)
    return ParameterServer(
        channel, plan.layout, plan.weights, optimizer=plan.optimizer, groups=groups_of(plan, 0),
        worker_ranks=_worker_ranks(plan), recorder=recorder, dispatcher=plan.dispatcher,
        on_bad_gradient=plan.options.on_bad_gradient, checkpointer=plan.checkpointer,
        resume=plan.resume, stop_units=plan.stop_units(), transport=plan.options.transport,
        keep_sent_weights=plan.policy.keeps_sent_weights(), own_shards=plan.server_shards[0],
        followers=followers, layer_shards=plan.layer_shards, sparse=plan.sparse,
        sparse_on_arrival=_rows_on_arrival(plan),
    )


def _rows_on_arrival(plan: RunPlan):
    """The weight a push's rows are applied with as they arrive (ps.Hybrid), or None when
    they follow the dense policy's decisions."""
    policy = plan.policy
    if plan.sparse is None or not getattr(policy, "on_arrival", False):
        return None
    return policy.sparse_weight(plan.parallel.replicas)


def build_shard_server(channel, plan: RunPlan):
    """Server ``channel.rank`` (> 0) of ``plan``: its range, as rank 0 orders."""
    index = channel.rank
    return ShardServer(
        channel, plan.layout, plan.weights, optimizer=plan.optimizer,
        groups=groups_of(plan, index), worker_ranks=_worker_ranks(plan),
        recorder=Recorder(plan.model, plan.layout, plan.n_workers),
        on_bad_gradient=plan.options.on_bad_gradient, checkpointer=plan.checkpointer,
        resume=plan.resume, transport=plan.options.transport,
        keep_sent_weights=plan.policy.keeps_sent_weights(),
        own_shards=plan.server_shards[index], leader=0, index=index,
        layer_shards=plan.layer_shards, sparse=plan.sparse,
        sparse_on_arrival=_rows_on_arrival(plan),
    )


def _worker_ranks(plan: RunPlan):
    return range(plan.n_servers, plan.n_servers + plan.n_workers)


def groups_of(plan: RunPlan, server: int = 0):
    """One group per stage: worker p*P + k is stage k of pipeline p (data mode: P = 1), with
    the part of that stage's shards that server ``server`` holds (maybe none)."""
    par = plan.parallel
    own = plan.server_shards[server]
    return [
        Group(plan.policy.state(par.replicas), [p * par.n_stages + k for p in range(par.replicas)],
              overlap(own, par.stage_shards[k]))
        for k in range(par.n_stages)
    ]


def build_worker(channel, plan: RunPlan):
    """The worker (or pipeline stage) of ``plan`` that ``channel``'s rank runs."""
    rank = channel.rank
    index = rank - plan.n_servers
    par = plan.parallel
    o = plan.options
    replica, stage = divmod(index, par.n_stages)  # data mode: replica = index, stage 0
    if plan.dispatcher is not None:  # any worker may get any batch: it keeps every row
        rows, schedule, steps = slice(None), plan.dispatcher, None
    else:
        # A slice, not an index array: on a memory-mapped dataset it reads just the block.
        lo, hi = block_range(len(plan.train), par.replicas, replica)
        rows = slice(lo, hi)
        schedule = BatchSchedule(np.arange(hi - lo), o.batch_size, o.shuffle, o.seed, replica)
        steps = plan.steps
    start_step = 0
    if plan.resume is not None:  # the data position is the worker's clock
        start_step = plan.resume[0]["groups"][stage]["clocks"][replica]
    # Every rank builds the same model: without its own random stream each worker would draw the
    # same dropout masks.
    plan.model.reseed(o.seed, index)
    X = features(plan.train.X[rows], plan.dtype, plan.model.id_inputs())
    y = np.ascontiguousarray(labels_for(plan.model, plan.train.y[rows], plan.dtype))
    servers = list(enumerate(plan.server_shards))  # server s is rank s
    common = (channel, servers, index, plan.layout, plan.model, plan.backend, X, y, schedule, steps)
    options = dict(delay=plan.delay.get(index, 0.0), start_step=start_step,
                   transport=o.transport, reads_in_place=plan.read_in_place)
    if par.stage_layers is None:
        if plan.layer_shards is not None:
            return LayerwiseWorker(*common, layer_shards=plan.layer_shards, **options)
        return Worker(*common, sparse=plan.sparse, **options)
    return StageWorker(*common, layer_ids=par.stage_layers[stage], stage=stage,
                       n_stages=par.n_stages, prev_rank=rank - 1 if stage else None,
                       next_rank=rank + 1 if stage < par.n_stages - 1 else None,
                       micro_batches=par.micro_batches, **options)


def labels_for(model, y, dtype):
    """Class labels become int64; real-valued regression targets follow the run's dtype."""
    if y.dtype.kind in "biu" or model.classification:
        return y.astype(np.int64)
    return y.astype(dtype)
