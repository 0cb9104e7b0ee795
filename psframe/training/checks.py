"""What can be wrong with a train() call: each check raises one clear error, on every rank alike."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from .. import env
from ..backend import select_backend
from ..data import ArrayDataset, Features, block_range, features
from ..nn.models import Model, Sequential
from ..nn.optim import SGD, Optimizer
from ..params import SUPPORTED_DTYPES, ParamLayout
from ..policies import policy_from_spec
from ..policies.base import positive_number
from ..server.checkpoints import CheckpointError
from .options import BAD_GRADIENT_ACTIONS, DISPATCH, MODES, TRANSPORTS, RunOptions

__all__ = ["CheckedCall", "check_call", "check_tables", "check_init", "check_sparse", "probe",
           "check_overlap", "check_parallel", "check_replicas", "check_checkpoint",
           "check_optimizer_state"]

# Rows of a memory-mapped dataset that every rank checks, so that a feature-count or label
# mismatch reads the same on all of them; past those, only the ranks that read the rows do.
_HEAD_ROWS = 64


@dataclass(frozen=True)
class CheckedCall:
    """What a call's options name, checked before the model has weights: the policy,
    optimizer and backend, the ranks' roles, the stragglers and the datasets."""

    policy: Any
    optimizer: Optimizer
    backend: Any
    n_servers: int
    n_workers: int
    delay: Dict[int, float]
    train: ArrayDataset
    eval: Optional[ArrayDataset]


def check_call(world: Any, model: Any, data: Any, o: RunOptions) -> CheckedCall:
    """The options, ranks, model and data of ``train(model, data, **o)`` on communicator
    ``world``, checked in this order (so every rank meets the same first error)."""
    if o.mode not in MODES:
        raise ValueError(f"unknown mode {o.mode!r}; choose one of {MODES}")
    env.stream()  # a bad $PSFRAME_STREAM: refused here, on every rank, before any work
    policy = policy_from_spec("sync" if o.policy is None else o.policy)
    optimizer = _check_optimizer(o.optimizer)
    _check_counts(o)
    _check_timeouts(o)
    _check_checkpoint_options(o)
    _check_choices(o)
    # Imported here: the transport package loads mpi4py.MPI, and `import psframe` must not
    # start MPI. Whether MPI takes device buffers is the transport's question to answer.
    from ..transport.cuda import mpi_cuda_aware

    backend = select_backend(o.backend, cuda_aware=mpi_cuda_aware)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a ps.Model (or ps.Sequential), got {type(model).__name__}")
    n_servers, n_workers = _check_ranks(world, o.servers)
    policy.validate(n_workers)
    if o.dispatch not in DISPATCH:
        raise ValueError(f"dispatch must be one of {DISPATCH}, got {o.dispatch!r}")
    delay = _check_delay(o.delay, n_workers)
    train_set = _as_dataset(data, "data")
    _check_inputs(model, train_set, o)
    _check_data(world, model, train_set, "training data", n_servers, readers="workers")
    eval_set = None
    if o.eval_data is not None:
        eval_set = _as_dataset(o.eval_data, "eval_data")
        _check_data(world, model, eval_set, "eval data", n_servers, readers="server")
    return CheckedCall(policy, optimizer, backend, n_servers, n_workers, delay, train_set,
                       eval_set)


def _check_optimizer(optimizer: Any) -> Optimizer:
    """The run's optimizer (ps.SGD() when none is given), refused unless it is valid."""
    optimizer = SGD() if optimizer is None else optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a psframe optimizer such as ps.SGD(...), "
                        f"got {optimizer!r}")
    optimizer.validate()
    return optimizer


def _check_counts(o: RunOptions) -> None:
    """The options that count something."""
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


def _check_timeouts(o: RunOptions) -> None:
    off = o.stall_timeout is None or (not isinstance(o.stall_timeout, bool)
                                      and o.stall_timeout == 0)
    if not (off or positive_number(o.stall_timeout)):
        raise ValueError(f"stall_timeout must be a positive number of seconds (0 or None: "
                         f"never), got {o.stall_timeout!r}")
    if not positive_number(o.stop_timeout):
        raise ValueError(f"stop_timeout must be a positive number of seconds, "
                         f"got {o.stop_timeout!r}")


def _check_checkpoint_options(o: RunOptions) -> None:
    if o.checkpoint_every is not None and o.checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir, the directory to write into")
    if o.dispatch == "dynamic" and (o.checkpoint_dir is not None or o.resume is not None):
        raise ValueError("checkpoints need dispatch='static': dynamic batches in flight "
                         "cannot be replayed exactly")


def _check_choices(o: RunOptions) -> None:
    """The options that name one of a few choices (but mode and dispatch, checked apart)."""
    if str(o.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {o.dtype!r}")
    if o.on_bad_gradient not in BAD_GRADIENT_ACTIONS:
        raise ValueError(f"on_bad_gradient must be one of {BAD_GRADIENT_ACTIONS}, "
                         f"got {o.on_bad_gradient!r}")
    if o.transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {o.transport!r}")


def _check_ranks(world: Any, servers: Any) -> Tuple[int, int]:
    """(servers, workers) among ``world``'s ranks."""
    size = world.Get_size()
    if size < 2:
        raise ValueError(
            f"psframe needs at least 2 MPI ranks (1 server + 1 worker), got {size}; "
            "launch with e.g. `mpiexec -n 4 python train.py`"
        )
    _check_int("servers", servers)
    n_servers = int(servers)
    if n_servers >= size:
        raise ValueError(
            f"servers={n_servers} leaves no worker among {size} MPI ranks: ranks "
            f"0..{n_servers - 1} serve and the rest are workers; launch more ranks or use fewer "
            "servers"
        )
    return n_servers, size - n_servers


def check_tables(tables: Mapping[str, Any], params: Mapping[str, Any]) -> None:
    """The row-sparse tables a model names (``embedding_inputs()``) are its parameters."""
    unknown = [t for t in tables if t not in params]
    if unknown:
        raise ValueError(f"embedding_inputs() names {unknown}, which are not parameters of "
                         "the model")


def check_init(init: Any, layout: ParamLayout) -> Optional[Dict[str, np.ndarray]]:
    """The starting weights given as ``init`` (None when none are), refused unless they fit
    ``layout`` and are finite."""
    if init is None:
        return None
    if not isinstance(init, dict):
        raise TypeError(f"init must be a dict name -> array, got {type(init).__name__}")
    params = {k: np.asarray(v) for k, v in init.items()}
    layout.flatten(params, out=layout.empty())  # checks names and shapes
    if not all(np.isfinite(v).all() for v in params.values()):
        raise ValueError("init has non-finite values")
    return params


def check_sparse(tables: Any, o: RunOptions, policy: Any, optimizer: Optimizer,
                 backend: Any, dtype: np.dtype) -> None:
    """Refuses what a run's row-sparse tables (psframe.sparse.SparseTables) cannot do."""
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
    if not _steps_rows(optimizer, dtype):
        problems.append(f"{optimizer!r}, which has no row-wise step (apply_rows)")
    if problems:
        raise ValueError(f"row-sparse tables {tables.names} cannot run with "
                         f"{'; '.join(problems)}; make them dense (sparse=False) or change "
                         "the run")


def _steps_rows(optimizer: Optimizer, dtype: np.dtype) -> bool:
    """Whether ``optimizer`` can step a table's rows: tried on a one-row table."""
    try:
        table = np.zeros((1, 1), dtype)
        optimizer.apply_rows(optimizer.init_rows_state(1, 1, dtype), table,
                             np.zeros(1, np.int64), np.zeros((1, 1), dtype))
    except (NotImplementedError, AttributeError):
        return False
    return True


def check_overlap(o: RunOptions, model: Any, policy: Any, n_servers: int) -> None:
    """Whether overlap=True (pushes and pulls layer by layer) can run."""
    if not isinstance(o.overlap, bool):
        raise ValueError(f"overlap must be True or False, got {o.overlap!r}")
    if not o.overlap:
        return
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


def check_parallel(mode: str, n_workers: int, stages: Any, micro_batches: int,
                   batch_size: int, dispatch: str) -> int:
    """The stages of each pipeline (1 in data mode), refusing what the mode cannot do."""
    if mode == "data":
        if stages is not None or micro_batches != 1:
            raise ValueError("stages and micro_batches apply to mode='model' or 'hybrid' only")
        return 1
    if dispatch != "static":
        raise ValueError(f"dispatch={dispatch!r} needs mode='data'; pipelines read fixed blocks")
    if micro_batches > batch_size:
        raise ValueError(f"micro_batches ({micro_batches}) cannot exceed batch_size ({batch_size})")
    if mode == "model":
        n_stages = n_workers
        if stages is not None and not isinstance(stages, int):
            n_stages = len(stages)
        if n_stages != n_workers:
            raise ValueError(f"mode='model' runs one stage per worker: {n_workers} workers, "
                             f"but stages lists {n_stages}")
        return n_stages
    if stages is None:
        raise ValueError("mode='hybrid' needs stages=P (stages per pipeline) or a stage list")
    given_count = isinstance(stages, int) and not isinstance(stages, bool)
    n_stages = stages if given_count else len(stages)
    if n_stages < 1 or n_workers % n_stages:
        raise ValueError(
            f"mode='hybrid' with {n_stages} stages needs a worker count divisible by "
            f"{n_stages}, got {n_workers} workers"
        )
    return n_stages


def check_replicas(n_rows: int, n_replicas: int) -> None:
    """The training rows split among the data-parallel replicas (workers or pipelines)."""
    if n_rows < n_replicas:
        raise ValueError(f"{n_rows} training rows cannot be split {n_replicas} ways")


def check_checkpoint(path: str, manifest: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """A checkpoint written for this model, dtype, mode and worker count."""
    for key in ("layout", "n_workers", "mode", "n_stages"):
        if manifest.get(key) != meta[key]:
            what = {"layout": "model layout or dtype"}.get(key, key.replace("_", " "))
            raise CheckpointError(
                f"checkpoint {path} was written for a different {what} "
                f"({manifest.get(key)!r}, this run has {meta[key]!r}); resume needs the same "
                "model, dtype, mode and worker count"
            )


def check_optimizer_state(path: str, manifest: Mapping[str, Any], arrays: Mapping[str, Any],
                          optimizer: Optimizer, dtype: np.dtype) -> None:
    """A checkpoint holding the state of this run's optimizer."""
    wanted = {f"opt.{k}" for k in optimizer.init_state(1, dtype) if not k.startswith("_")}
    saved = {k for k in arrays if k.startswith("opt.")}
    if wanted != saved:
        raise CheckpointError(
            f"checkpoint {path} holds state for {manifest.get('optimizer')}, not for "
            f"{optimizer!r}; resume with the optimizer it was written with"
        )


def _as_dataset(data: Any, what: str) -> ArrayDataset:
    if isinstance(data, ArrayDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArrayDataset(*data)
    raise TypeError(f"{what} must be a ps.data.ArrayDataset or an (X, y) pair, got {type(data)}")


def _check_inputs(model: Model, dataset: ArrayDataset, o: RunOptions) -> None:
    """Ids and several inputs travel only where the data-parallel worker gathers them."""
    several = isinstance(dataset.X, Features)
    if not (several or model.id_inputs()):
        return
    what = "several inputs (a dict X)" if several else "integer ids (an Embedding first)"
    if o.mode != "data":
        raise ValueError(f"data with {what} needs mode='data', not {o.mode!r}: pipeline "
                         "stages pass one float activation array")


def _check_data(world: Any, model: Model, dataset: ArrayDataset, what: str, n_servers: int,
                readers: str) -> None:
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


def _check_int(name: str, value: Any, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_delay(delay: Any, n_workers: int) -> Dict[int, float]:
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


def probe(model: Model, layout: ParamLayout, weights: np.ndarray,
          train_set: ArrayDataset) -> None:
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
