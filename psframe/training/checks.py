"""Everything that can be wrong with a train() call, checked identically on every rank."""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import numpy as np

from .. import env
from ..backend import select_backend
from ..data import ArrayDataset, Features, block_range, features, steps_per_epoch
from ..nn.models import Model, Sequential
from ..nn.optim import SGD, Optimizer
from ..sparse.tables import dense_first, sparse_tables
from ..params import (DEFAULT_SHARD_ELEMS, SUPPORTED_DTYPES, ParamLayout, recount_shards,
                      server_ranges)
from ..policies import policy_from_spec
from ..policies.base import positive_number
from ..server.checkpoints import CheckpointError, Checkpointer, load_checkpoint
from ..server.dispatch import BatchDispatcher
from .options import BAD_GRADIENT_ACTIONS, DISPATCH, MODES, TRANSPORTS, RunOptions
from ..worker.stages import layer_shard_ranges
from .plan import RunPlan, plan_parallel

__all__ = ["check_run"]

# Rows of a memory-mapped dataset that every rank checks, so that a feature-count or label
# mismatch reads the same on all of them; past those, only the ranks that read the rows do.
_HEAD_ROWS = 64


def check_run(world: Any, model: Any, data: Any, o: RunOptions) -> RunPlan:
    """The RunPlan of ``train(model, data, **o)`` on communicator ``world``, or the first
    error. Every rank computes the same plan (or the same error)."""
    if o.mode not in MODES:
        raise ValueError(f"unknown mode {o.mode!r}; choose one of {MODES}")
    env.stream()  # a bad $PSFRAME_STREAM: refused here, on every rank, before any work
    policy = policy_from_spec("sync" if o.policy is None else o.policy)
    optimizer = SGD() if o.optimizer is None else o.optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a psframe optimizer such as ps.SGD(...), "
                        f"got {optimizer!r}")
    optimizer.validate()
    _check_int("batch_size", o.batch_size)
    _check_int("epochs", o.epochs)
    _check_int("steps", o.steps, allow_none=True)
    _check_int("eval_every", o.eval_every, allow_none=True)
    _check_int("threads", o.threads, allow_none=True)
    _check_int("seed", o.seed, minimum=0)
    _check_int("shard_elems", o.shard_elems, allow_none=True)
    _check_int("micro_batches", o.micro_batches)
    _check_int("checkpoint_every", o.checkpoint_every, allow_none=True)
    _check_int("checkpoint_keep", o.checkpoint_keep)
    off = o.stall_timeout is None or (not isinstance(o.stall_timeout, bool)
                                      and o.stall_timeout == 0)
    if not (off or positive_number(o.stall_timeout)):
        raise ValueError(f"stall_timeout must be a positive number of seconds (0 or None: "
                         f"never), got {o.stall_timeout!r}")
    if not positive_number(o.stop_timeout):
        raise ValueError(f"stop_timeout must be a positive number of seconds, "
                         f"got {o.stop_timeout!r}")
    if o.checkpoint_every is not None and o.checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir, the directory to write into")
    if o.dispatch == "dynamic" and (o.checkpoint_dir is not None or o.resume is not None):
        raise ValueError("checkpoints need dispatch='static': dynamic batches in flight "
                         "cannot be replayed exactly")
    if str(o.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {o.dtype!r}")
    if o.on_bad_gradient not in BAD_GRADIENT_ACTIONS:
        raise ValueError(f"on_bad_gradient must be one of {BAD_GRADIENT_ACTIONS}, "
                         f"got {o.on_bad_gradient!r}")
    if o.transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {o.transport!r}")
    # Imported here: the transport package loads mpi4py.MPI, and `import psframe` must not
    # start MPI. Whether MPI takes device buffers is the transport's question to answer.
    from ..transport.cuda import mpi_cuda_aware

    backend = select_backend(o.backend, cuda_aware=mpi_cuda_aware)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a ps.Model (or ps.Sequential), got {type(model).__name__}")

    size = world.Get_size()
    if size < 2:
        raise ValueError(
            f"psframe needs at least 2 MPI ranks (1 server + 1 worker), got {size}; "
            "launch with e.g. `mpiexec -n 4 python train.py`"
        )
    _check_int("servers", o.servers)
    n_servers = int(o.servers)
    if n_servers >= size:
        raise ValueError(
            f"servers={n_servers} leaves no worker among {size} MPI ranks: ranks "
            f"0..{n_servers - 1} serve and the rest are workers; launch more ranks or use fewer "
            "servers"
        )
    n_workers = size - n_servers
    policy.validate(n_workers)
    if o.dispatch not in DISPATCH:
        raise ValueError(f"dispatch must be one of {DISPATCH}, got {o.dispatch!r}")
    delay = _check_delay(o.delay, n_workers)

    train_set = _as_dataset(data, "data")
    _check_inputs(model, train_set, o)
    _check_data(world, model, train_set, "training data", n_servers, readers="workers")
    eval_data = o.eval_data
    if eval_data is not None:
        eval_data = _as_dataset(eval_data, "eval_data")
        _check_data(world, model, eval_data, "eval data", n_servers, readers="server")

    params = model.init_params(np.random.default_rng(o.seed))
    params = dense_first(params, getattr(model, "embedding_inputs", dict)())
    layout = ParamLayout.from_params(params, o.dtype, o.shard_elems or DEFAULT_SHARD_ELEMS)
    tables = getattr(model, "embedding_inputs", dict)()
    unknown = [t for t in tables if t not in layout.shapes]
    if unknown:
        raise ValueError(f"embedding_inputs() names {unknown}, which are not parameters of "
                         "the model")
    # The servers' ranges split the dense weights; each server holds a block of every
    # table's rows besides (psframe.sparse.SparseTables).
    layout.weights = {t: 0 for t in tables}
    layout = layout.cut_for(n_servers)  # or: fewer weights than servers
    if o.init is not None:
        if not isinstance(o.init, dict):
            raise TypeError(f"init must be a dict name -> array, got {type(o.init).__name__}")
        params = {k: np.asarray(v) for k, v in o.init.items()}
        layout.flatten(params, out=layout.empty())  # checks names and shapes
        if not all(np.isfinite(v).all() for v in params.values()):
            raise ValueError("init has non-finite values")
    sparse = _check_sparse(o, model, layout, train_set, policy, optimizer, backend, n_servers)
    if sparse is None and getattr(policy, "name", None) == "hybrid":
        policy = policy.dense  # no row-sparse table: the Hybrid is its dense policy
    weights = layout.flatten(params, out=layout.empty())
    del params  # the model's own init (float64): the tables are now in ``weights`` only
    if sparse is not None:  # the servers hold each table's rows where placement puts them
        sparse.place(weights)
    _probe(model, layout, weights, train_set)
    server_shards = server_ranges(layout, n_servers)
    layer_shards = _check_overlap(o, model, layout, policy, n_servers)
    parallel = plan_parallel(o.mode, model, layout, n_workers, o.stages, o.micro_batches,
                             o.batch_size, o.dispatch)
    if sparse is not None:  # the dense shards move as before; the tables' rows apart
        parallel = dataclasses.replace(parallel, stage_shards=[sparse.dense_shards])
    n_replicas = parallel.replicas  # workers (data) or pipelines (model, hybrid)
    if len(train_set) < n_replicas:
        raise ValueError(f"{len(train_set)} training rows cannot be split {n_replicas} ways")

    # The layout without the servers' cuts: a checkpoint resumes with any number of servers.
    meta = {"layout": _jsonable(layout.signature(with_cuts=False)), "n_workers": n_workers,
            "mode": o.mode,
            "n_stages": parallel.n_stages, "optimizer": repr(optimizer),
            "policy": repr(policy), "batch_size": int(o.batch_size), "servers": n_servers}
    resumed = None
    if o.resume is not None:
        resumed = _load_resume(o.resume, meta, optimizer, layout)
        saved = resumed[1]
        weights[:len(saved["weights"])] = saved["weights"]
        if sparse is not None:  # the tables are checkpointed by rows, each server's block
            for name, table in sparse.views(weights).items():
                table[...] = saved[f"table.{name}"]

    per_epoch = steps_per_epoch(len(train_set), n_replicas, o.batch_size)
    steps_given = o.steps is not None
    steps = int(o.steps) if steps_given else int(o.epochs) * per_epoch
    if o.dispatch == "dynamic":
        # Total work is the same as static dispatch; who does which batch is decided live.
        total_batches = steps * n_workers if steps_given else int(o.epochs) * math.ceil(
            len(train_set) / o.batch_size)
        dispatcher = BatchDispatcher(len(train_set), o.batch_size, total_batches, o.shuffle,
                                     o.seed)
        epoch_samples = len(train_set)
        rounds = total_batches / n_workers
    else:
        dispatcher = None
        epoch_samples = per_epoch * n_replicas * o.batch_size
        rounds = steps
    per_round = policy.updates_per_round(n_replicas)
    return RunPlan(
        options=o, model=model, train=train_set, eval=eval_data, policy=policy,
        optimizer=optimizer, dtype=np.dtype(o.dtype), layout=layout, weights=weights,
        steps=steps, epoch_samples=epoch_samples, dispatcher=dispatcher, delay=delay,
        expected_updates=None if per_round is None else int(round(rounds * per_round)),
        backend=backend, n_workers=n_workers, parallel=parallel, resume=resumed,
        server_shards=server_shards, layer_shards=layer_shards, sparse=sparse,
        checkpointer=None if o.checkpoint_dir is None else Checkpointer(
            o.checkpoint_dir, o.checkpoint_every, o.checkpoint_keep, meta),
    )


def _check_sparse(o, model, layout, train_set, policy, optimizer, backend, n_servers):
    """The run's row-sparse tables (psframe.sparse), or None; refuses what they cannot do."""
    tables = sparse_tables(model, layout, train_set.X, o.batch_size, n_servers)
    if tables is None:
        return None
    problems = []
    if o.mode != "data":
        problems.append(f"mode={o.mode!r} (they need mode='data')")
    if o.dispatch != "static":
        problems.append("dispatch='dynamic' (a pull must know its batch's rows)")
    if o.overlap:
        problems.append("overlap=True")
    if policy.keeps_sent_weights():
        problems.append(f"{policy!r} (delay compensation of rows is not built)")
    if backend.name != "numpy":
        problems.append(f"backend {backend.name!r} (the rows are exchanged on the host)")
    if not _steps_rows(optimizer, layout.dtype):
        problems.append(f"{optimizer!r}, which has no row-wise step (apply_rows)")
    if problems:
        raise ValueError(f"row-sparse tables {tables.names} cannot run with "
                         f"{'; '.join(problems)}; make them dense (sparse=False) or change "
                         "the run")
    return tables


def _steps_rows(optimizer, dtype):
    """Whether ``optimizer`` can step a table's rows: tried on a one-row table."""
    try:
        table = np.zeros((1, 1), dtype)
        optimizer.apply_rows(optimizer.init_rows_state(1, 1, dtype), table,
                             np.zeros(1, np.int64), np.zeros((1, 1), dtype))
    except (NotImplementedError, AttributeError):
        return False
    return True


def _check_overlap(o, model, layout, policy, n_servers):
    """Each trained layer's shards under overlap=True (None without), or why it cannot run."""
    if not isinstance(o.overlap, bool):
        raise ValueError(f"overlap must be True or False, got {o.overlap!r}")
    if not o.overlap:
        return None
    if o.mode != "data":
        raise ValueError("overlap=True needs mode='data'; a pipeline's stages already "
                         "overlap each other")
    if not isinstance(model, Sequential):
        raise ValueError("overlap=True needs a ps.Sequential model: it pushes and pulls "
                         "layer by layer")
    if not policy.lockstep:
        # The server lands a push frame by frame as the worker's backward makes them: under
        # an on-arrival policy it would wait for one worker's backward instead of applying
        # the others' pushes.
        raise ValueError(f"overlap=True needs Sync without backup workers, not {policy!r}")
    if n_servers > 1 and o.on_bad_gradient == "skip":
        raise ValueError("overlap=True with several servers cannot skip non-finite "
                         "gradients (the header leaves before the gradient is whole, so the "
                         "servers could not agree which to skip); use on_bad_gradient='raise'")
    return layer_shard_ranges(model, layout)


def _as_dataset(data, what):
    if isinstance(data, ArrayDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArrayDataset(*data)
    raise TypeError(f"{what} must be a ps.data.ArrayDataset or an (X, y) pair, got {type(data)}")


def _check_inputs(model, dataset, o):
    """Ids and several inputs travel only where the data-parallel worker gathers them."""
    several = isinstance(dataset.X, Features)
    if not (several or model.id_inputs()):
        return
    what = "several inputs (a dict X)" if several else "integer ids (an Embedding first)"
    if o.mode != "data":
        raise ValueError(f"data with {what} needs mode='data', not {o.mode!r}: pipeline "
                         "stages pass one float activation array")


def _check_data(world, model, dataset, what, n_servers, readers):
    """Finite, numeric, fitting the model. A dataset in memory is checked whole on every rank
    (each holds it anyway); a lazy one (ps.data.NpyDataset) in chunks, by its readers only:
    training data by the workers, worker w its block w, eval data by the server."""
    if not dataset.lazy:
        dataset.check(model, what)
        return
    n, head = len(dataset), min(len(dataset), _HEAD_ROWS)
    dataset.check(model, what, (0, head))
    rank, n_workers = world.Get_rank(), world.Get_size() - n_servers
    if readers == "server" and rank == 0:
        dataset.check(model, what, (head, n))
    elif readers == "workers" and rank >= n_servers:
        lo, hi = block_range(n, n_workers, rank - n_servers)
        dataset.check(model, what, (max(lo, head), hi))


def _check_int(name, value, minimum=1, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _jsonable(value):
    return json.loads(json.dumps(value))


def _load_resume(path, meta, optimizer, layout):
    """The checkpoint to continue from, refused unless it fits this run exactly."""
    manifest, arrays = load_checkpoint(path)
    for key in ("layout", "n_workers", "mode", "n_stages"):
        if manifest.get(key) != meta[key]:
            what = {"layout": "model layout or dtype"}.get(key, key.replace("_", " "))
            raise CheckpointError(
                f"checkpoint {path} was written for a different {what} "
                f"({manifest.get(key)!r}, this run has {meta[key]!r}); resume needs the same "
                "model, dtype, mode and worker count"
            )
    written_by = int(manifest.get("servers", 1))
    if written_by != meta["servers"]:
        # Another number of servers: the weights and optimizer state are per element and
        # carry over as they are; only the per-shard update counts follow the new cuts.
        base = layout.uncut()
        arrays = dict(arrays)
        try:
            arrays["shard_updates"] = recount_shards(arrays["shard_updates"],
                                                     base.cut_for(written_by), layout)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {path} cannot be resharded from "
                                  f"{written_by} to {meta['servers']} servers: {exc}") from None
    wanted = {f"opt.{k}" for k in optimizer.init_state(1, layout.dtype) if not k.startswith("_")}
    saved = {k for k in arrays if k.startswith("opt.")}
    if wanted != saved:
        raise CheckpointError(
            f"checkpoint {path} holds state for {manifest.get('optimizer')}, not for "
            f"{optimizer!r}; resume with the optimizer it was written with"
        )
    return manifest, arrays


def _check_delay(delay, n_workers):
    """``{worker_index: seconds_per_step}``: simulated stragglers."""
    if delay is None:
        return {}
    if not isinstance(delay, dict):
        raise TypeError(f"delay must be a dict worker_index -> seconds, got {type(delay).__name__}")
    out = {}
    for w, seconds in delay.items():
        if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or not 0 <= w < n_workers:
            raise ValueError(f"delay names worker {w!r}, but workers are 0..{n_workers - 1}")
        seconds = float(seconds)
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"delay for worker {w} must be seconds >= 0, got {seconds!r}")
        out[int(w)] = seconds
    return out


def _probe(model, layout, weights, train_set):
    """One loss_and_grad on two rows, so a model/data mismatch fails here, not mid-run."""
    X = features(train_set.X[:2], layout.dtype, model.id_inputs())
    y = train_set.y[:2]
    try:
        loss, grads = model.loss_and_grad(layout.views(weights.copy()), X, y)
    except Exception as exc:
        raise ValueError(
            f"the model failed on the first rows of the data ({type(exc).__name__}: {exc}); "
            "check that the data's features and labels fit the model"
        ) from exc
    if not isinstance(grads, dict) or set(grads) != set(layout.names):
        got = sorted(grads) if isinstance(grads, dict) else type(grads).__name__
        raise ValueError(f"loss_and_grad must return gradients for {layout.names}, got {got}")
    for name in layout.names:
        if tuple(np.shape(grads[name])) != layout.shapes[name]:
            raise ValueError(
                f"gradient {name!r} has shape {tuple(np.shape(grads[name]))}, "
                f"parameter has {layout.shapes[name]}"
            )
    if not np.isfinite(float(loss)):
        raise ValueError(f"the model's loss on the first rows is not finite ({loss})")
