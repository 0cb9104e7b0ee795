"""train(): validate on every rank, agree on errors, split roles, abort the job on any failure."""
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import traceback

import numpy as np

from .backend import select_backend
from .callbacks import CallbackList, PrintProgress
from .checkpoint import CheckpointError, Checkpointer, load_checkpoint
from .data import ArrayDataset, BatchStream, block_range, steps_per_epoch
from .dispatch import BatchDispatcher
from .errors import ConfigError, TrainingInterrupted
from .models import Model
from .optim import SGD, Optimizer
from .params import DEFAULT_SHARD_ELEMS, SUPPORTED_DTYPES, ParamLayout
from .policies import Sync, policy_from_spec

__all__ = ["train", "ConfigError"]

MODES = ("data", "model", "hybrid")
# "auto": workers on the server's node exchange gradients and weights through a shared-memory
# window (psframe.shm), with only the int64 headers sent as messages; "mpi": all by message.
TRANSPORTS = ("auto", "mpi")
DISPATCH = ("static", "dynamic")
BAD_GRADIENT_ACTIONS = ("raise", "skip")


def train(model, data, *, eval_data=None, mode="data", policy=None, optimizer=None,
          batch_size=32, epochs=1, steps=None, shuffle=True, seed=0, dtype="float32",
          init=None, eval_every=None, threads=None, backend="auto", shard_elems=None,
          dispatch="static", delay=None, micro_batches=1, stages=None,
          checkpoint_dir=None, checkpoint_every=None, checkpoint_keep=3, resume=None,
          on_bad_gradient="raise", transport="auto", verbose=False, callbacks=None, comm=None):
    """Train ``model`` on ``data`` with a parameter server; call it on every rank.

    Rank 0 of ``comm`` (default COMM_WORLD) serves the weights and returns a TrainResult;
    the other ranks are workers and return None. See README.md for every option.
    """
    from mpi4py import MPI

    # Every keyword but the plumbing ones is a run option, validated in one place.
    options = {k: v for k, v in locals().items()
               if k not in ("model", "data", "verbose", "callbacks", "comm", "MPI")}
    world = MPI.COMM_WORLD if comm is None else comm
    run = None
    try:
        run = _validate(world, model, data, **options)
        local_error = None
    except Exception as exc:  # noqa: B902 - an error on one rank must reach all, not hang them
        local_error = exc
    _agree_or_raise(world, local_error)

    from threadpoolctl import threadpool_limits

    local_ranks, cores = _node_share(world)
    n_threads = run["threads"] or max(1, cores // local_ranks)
    from .comm import configure_waits

    configure_waits(oversubscribed=local_ranks > cores)
    comm = world.Dup()
    try:
        if comm.Get_rank() == 0:
            role = _build_server(comm, run, verbose, callbacks, n_threads)
        else:
            role = _build_worker(comm, run)
        # Every rank leaves together, inside the signal handlers' scope: a worker done early
        # waits there for the server's last evaluation and checkpoint, so Ctrl-C then asks
        # for a stop instead of killing a finished worker (and with it the job).
        with threadpool_limits(limits=n_threads), _stop_on_signals(role.request_stop):
            try:
                result = role.run()
            except TrainingInterrupted:
                _end_together(comm, role)  # a clean stop reaches every rank
                raise
            _end_together(comm, role)  # any other error aborts the job below instead
        if comm.Get_rank() == 0:
            role.callbacks.on_end(result)
            return result
        if role.interrupted:
            raise TrainingInterrupted("run interrupted by a signal; the server wrote the checkpoint")
        return None
    except TrainingInterrupted:
        raise  # every rank stopped cleanly and raises it: an exit status, not an abort
    except BaseException:  # noqa: B902 - any failure must take every rank down, never hang
        _abort(world)
    finally:
        comm.Free()


def _end_together(comm, role):
    """Free the shared window, then wait for every rank, without spinning a core."""
    from .comm import wait

    role.release()
    wait(comm.Ibarrier())


@contextlib.contextmanager
def _stop_on_signals(request_stop):
    """SIGINT/SIGTERM ask for a clean stop (mpiexec forwards them to every rank)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: request_stop())
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# -- validation ------------------------------------------------------------------------------
def _as_dataset(data, what):
    if isinstance(data, ArrayDataset):
        return data
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return ArrayDataset(*data)
    raise TypeError(f"{what} must be a ps.data.ArrayDataset or an (X, y) pair, got {type(data)}")


# Rows of a memory-mapped dataset that every rank checks, so that a feature-count or label
# mismatch reads the same on all of them; past those, only the ranks that read the rows do.
_HEAD_ROWS = 64


def _check_data(world, model, dataset, what, readers):
    """Finite, numeric, fitting the model. A dataset in memory is checked whole on every rank
    (each holds it anyway); a lazy one (ps.data.NpyDataset) in chunks, by its readers only:
    training data by the workers, worker w its block w, eval data by the server."""
    if not dataset.lazy:
        dataset.check(model, what)
        return
    n, head = len(dataset), min(len(dataset), _HEAD_ROWS)
    dataset.check(model, what, (0, head))
    rank, n_workers = world.Get_rank(), world.Get_size() - 1
    if readers == "server" and rank == 0:
        dataset.check(model, what, (head, n))
    elif readers == "workers" and rank > 0:
        lo, hi = block_range(n, n_workers, rank - 1)
        dataset.check(model, what, (max(lo, head), hi))


def _check_int(name, value, minimum=1, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _validate(world, model, data, *, eval_data, mode, policy, optimizer, batch_size, epochs,
              steps, shuffle, seed, dtype, init, eval_every, threads, backend, shard_elems,
              dispatch, delay, micro_batches, stages, checkpoint_dir, checkpoint_every,
              checkpoint_keep, resume, on_bad_gradient, transport):
    """Everything that can be wrong with the call, checked identically on each rank."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")
    policy = policy_from_spec("sync" if policy is None else policy)
    optimizer = SGD(lr=0.1) if optimizer is None else optimizer
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a psframe optimizer such as ps.SGD(...), got {optimizer!r}")
    optimizer.validate()
    _check_int("batch_size", batch_size)
    _check_int("epochs", epochs)
    _check_int("steps", steps, allow_none=True)
    _check_int("eval_every", eval_every, allow_none=True)
    _check_int("threads", threads, allow_none=True)
    _check_int("seed", seed, minimum=0)
    _check_int("shard_elems", shard_elems, allow_none=True)
    _check_int("micro_batches", micro_batches)
    _check_int("checkpoint_every", checkpoint_every, allow_none=True)
    _check_int("checkpoint_keep", checkpoint_keep)
    if checkpoint_every is not None and checkpoint_dir is None:
        raise ValueError("checkpoint_every needs checkpoint_dir, the directory to write into")
    if dispatch == "dynamic" and (checkpoint_dir is not None or resume is not None):
        raise ValueError("checkpoints need dispatch='static': dynamic batches in flight "
                         "cannot be replayed exactly")
    if str(dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
    if on_bad_gradient not in BAD_GRADIENT_ACTIONS:
        raise ValueError(f"on_bad_gradient must be one of {BAD_GRADIENT_ACTIONS}, got {on_bad_gradient!r}")
    if transport not in TRANSPORTS:
        raise ValueError(f"transport must be one of {TRANSPORTS}, got {transport!r}")
    backend = select_backend(backend)
    if not isinstance(model, Model):
        raise TypeError(f"model must be a ps.Model (or ps.Sequential), got {type(model).__name__}")

    size = world.Get_size()
    if size < 2:
        raise ValueError(
            f"psframe needs at least 2 MPI ranks (1 server + 1 worker), got {size}; "
            "launch with e.g. `mpiexec -n 4 python train.py`"
        )
    n_workers = size - 1
    policy.validate(n_workers)
    if dispatch not in DISPATCH:
        raise ValueError(f"dispatch must be one of {DISPATCH}, got {dispatch!r}")
    delay = _check_delay(delay, n_workers)

    train_set = _as_dataset(data, "data")
    _check_data(world, model, train_set, "training data", readers="workers")
    if eval_data is not None:
        eval_data = _as_dataset(eval_data, "eval_data")
        _check_data(world, model, eval_data, "eval data", readers="server")

    params = model.init_params(np.random.default_rng(seed))
    layout = ParamLayout.from_params(params, dtype, shard_elems or DEFAULT_SHARD_ELEMS)
    if init is not None:
        if not isinstance(init, dict):
            raise TypeError(f"init must be a dict name -> array, got {type(init).__name__}")
        params = {k: np.asarray(v) for k, v in init.items()}
        layout.flatten(params, out=layout.empty())  # checks names and shapes
        if not all(np.isfinite(v).all() for v in params.values()):
            raise ValueError("init has non-finite values")
    weights = layout.flatten(params, out=layout.empty())
    _probe(model, layout, weights, train_set)
    parallel = _plan_parallel(mode, model, layout, n_workers, stages, micro_batches,
                              batch_size, dispatch)
    n_replicas = parallel["replicas"]  # workers (data) or pipelines (model, hybrid)
    if len(train_set) < n_replicas:
        raise ValueError(f"{len(train_set)} training rows cannot be split {n_replicas} ways")

    meta = {"layout": _jsonable(layout.signature()), "n_workers": n_workers, "mode": mode,
            "n_stages": parallel["n_stages"], "optimizer": repr(optimizer),
            "policy": repr(policy), "batch_size": int(batch_size)}
    resumed = None
    if resume is not None:
        resumed = _load_resume(resume, meta, optimizer, layout)
        weights[:] = resumed[1]["weights"]

    per_epoch = steps_per_epoch(len(train_set), n_replicas, batch_size)
    steps_given = steps is not None
    steps = int(steps) if steps_given else int(epochs) * per_epoch
    if dispatch == "dynamic":
        # Total work is the same as static dispatch; who does which batch is decided live.
        total_batches = steps * n_workers if steps_given else int(epochs) * math.ceil(
            len(train_set) / batch_size)
        dispatcher = BatchDispatcher(len(train_set), batch_size, total_batches, shuffle, seed)
        epoch_samples = len(train_set)
        rounds = total_batches / n_workers
    else:
        dispatcher = None
        epoch_samples = per_epoch * n_replicas * batch_size
        rounds = steps
    per_round = getattr(policy, "updates_per_round", lambda n: None)(n_replicas)
    return {
        "model": model, "train": train_set, "eval": eval_data, "mode": mode, "policy": policy,
        "optimizer": optimizer, "batch_size": int(batch_size), "shuffle": bool(shuffle),
        "seed": int(seed), "dtype": np.dtype(dtype), "layout": layout, "weights": weights,
        "steps": steps, "eval_every": eval_every, "epoch_samples": epoch_samples,
        "dispatcher": dispatcher, "delay": delay,
        "expected_updates": None if per_round is None else int(round(rounds * per_round)),
        "threads": threads, "backend": backend, "on_bad_gradient": on_bad_gradient,
        "transport": transport,
        # Workers may read the server's weights in place only if no update can run while one
        # computes: lockstep Sync, where every worker has pushed before the step is applied.
        "read_master": type(policy) is Sync and not policy.backup,
        "n_workers": n_workers, "parallel": parallel, "resume": resumed,
        "checkpointer": None if checkpoint_dir is None else Checkpointer(
            checkpoint_dir, checkpoint_every, checkpoint_keep, meta),
    }


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
    wanted = {f"opt.{k}" for k in optimizer.init_state(1, layout.dtype) if not k.startswith("_")}
    saved = {k for k in arrays if k.startswith("opt.")}
    if wanted != saved:
        raise CheckpointError(
            f"checkpoint {path} holds state for {manifest.get('optimizer')}, not for "
            f"{optimizer!r}; resume with the optimizer it was written with"
        )
    return manifest, arrays


def _plan_parallel(mode, model, layout, n_workers, stages, micro_batches, batch_size, dispatch):
    """Who does what: replicas (data-parallel units) and, for pipelines, each stage's layers."""
    if mode == "data":
        if stages is not None or micro_batches != 1:
            raise ValueError("stages and micro_batches apply to mode='model' or 'hybrid' only")
        return {"replicas": n_workers, "n_stages": 1, "stage_layers": None,
                "stage_shards": [(0, layout.n_shards)], "micro_batches": 1}
    from .pipeline import plan_stages, stage_shard_range

    if dispatch != "static":
        raise ValueError(f"dispatch={dispatch!r} needs mode='data'; pipelines read fixed blocks")
    if micro_batches > batch_size:
        raise ValueError(f"micro_batches ({micro_batches}) cannot exceed batch_size ({batch_size})")
    if mode == "model":
        n_stages = n_workers
        if stages is not None and not isinstance(stages, int):
            n_stages = len(stages)
    else:
        if stages is None:
            raise ValueError("mode='hybrid' needs stages=P (stages per pipeline) or a stage list")
        n_stages = stages if isinstance(stages, int) and not isinstance(stages, bool) else len(stages)
        if n_stages < 1 or n_workers % n_stages:
            raise ValueError(
                f"mode='hybrid' with {n_stages} stages needs a worker count divisible by "
                f"{n_stages}, got {n_workers} workers"
            )
    if mode == "model" and n_stages != n_workers:
        raise ValueError(f"mode='model' runs one stage per worker: {n_workers} workers, "
                         f"but stages lists {n_stages}")
    layers = plan_stages(model, n_stages, batch_size, None if isinstance(stages, int) else stages)
    return {"replicas": n_workers // n_stages, "n_stages": n_stages, "stage_layers": layers,
            "stage_shards": [stage_shard_range(model, layout, ids) for ids in layers],
            "micro_batches": micro_batches}


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
    X = train_set.X[:2].astype(layout.dtype)
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


def _agree_or_raise(world, local_error):
    """Every rank learns of any rank's error and raises the same ConfigError."""
    if local_error is None:
        mine = None
    elif isinstance(local_error, ValueError):
        mine = str(local_error)
    else:  # a TypeError or a user model's own exception: its type is part of the story
        mine = f"{type(local_error).__name__}: {local_error}"
    errors = world.allgather(mine)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if not failed:
        return
    rank, message = failed[0]
    if len(failed) < len(errors):
        message = f"{message} (on rank {rank})"
    raise ConfigError(message) from local_error


def _node_share(world):
    """(ranks on this node, cores this process may use): threads and waits follow from it."""
    from mpi4py import MPI

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    local_ranks = node.Get_size()
    node.Free()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return local_ranks, cores


def _abort(world):
    rank = world.Get_rank()
    sys.stdout.flush()
    report = f"psframe: rank {rank} failed; aborting all ranks\n{traceback.format_exc()}"
    # One write, then a moment for mpiexec's proxy to forward it: on abort, hydra drops
    # output it has not forwarded yet, and the traceback is the one thing the user needs.
    os.write(2, report.encode(errors="replace"))
    time.sleep(0.3)
    world.Abort(1)
    # MPICH's Abort can return before the process manager kills us; never let a failed
    # rank run on as if training had finished.
    os._exit(1)


# -- roles ------------------------------------------------------------------------------------
def _build_server(comm, run, verbose, callbacks, n_threads):
    from .server import ParameterServer

    hooks = CallbackList(([PrintProgress()] if verbose else []) + list(callbacks or []))
    eval_data = None
    if run["eval"] is not None:
        eval_data = (
            np.ascontiguousarray(run["eval"].X, dtype=run["dtype"]),
            _labels(run["model"], run["eval"].y, run["dtype"]),
        )
    par = run["parallel"]
    # Under Sync every worker stops at the same step, so a stopped run resumes exactly;
    # otherwise each pipeline (or data-parallel worker) stops on its own.
    lockstep = isinstance(run["policy"], Sync) and not run["policy"].backup
    stop_units = [0 if lockstep else w // par["n_stages"] for w in range(run["n_workers"])]
    server = ParameterServer(
        comm, run["layout"], run["weights"], model=run["model"], optimizer=run["optimizer"],
        groups=_groups(run), worker_ranks=range(1, comm.Get_size()),
        eval_data=eval_data, eval_every=run["eval_every"], total_steps=run["expected_updates"],
        epoch_samples=run["epoch_samples"], dispatcher=run["dispatcher"],
        on_bad_gradient=run["on_bad_gradient"], callbacks=hooks,
        checkpointer=run["checkpointer"], resume=run["resume"], stop_units=stop_units,
        transport=run["transport"],
        weighting=(f"{run['policy'].describe(par['replicas'])}; "
                   f"{run['optimizer'].name} steps by {run['optimizer'].weight_rule}"),
        keep_sent_weights=run["policy"].keeps_sent_weights(),
        run_info={"config": dict(_describe(run), threads=n_threads)},
    )
    return server


def _describe(run):
    """The run's settings as plain values, for the result and the logs."""
    par = run["parallel"]
    return dict(
        mode=run["mode"], policy=repr(run["policy"]), optimizer=repr(run["optimizer"]),
        batch_size=run["batch_size"], steps=run["steps"], dtype=str(run["dtype"]),
        seed=run["seed"], shuffle=run["shuffle"], backend=run["backend"].name,
        dispatch="dynamic" if run["dispatcher"] is not None else "static",
        n_stages=par["n_stages"], micro_batches=par["micro_batches"],
        stage_layers=par["stage_layers"],
    )


def _groups(run):
    """One group per stage: worker p*P + k is stage k of pipeline p (data mode: P = 1)."""
    from .server import Group

    par = run["parallel"]
    n_stages, replicas = par["n_stages"], par["replicas"]
    return [
        Group(run["policy"].state(replicas), [p * n_stages + k for p in range(replicas)],
              par["stage_shards"][k])
        for k in range(n_stages)
    ]


def _build_worker(comm, run):
    from .pipeline import StageWorker
    from .worker import Worker

    index = comm.Get_rank() - 1
    par = run["parallel"]
    replica, stage = divmod(index, par["n_stages"])  # data mode: replica = index, stage 0
    if run["dispatcher"] is not None:  # any worker may get any batch: it keeps every row
        rows, stream, steps = slice(None), run["dispatcher"], None
    else:
        # A slice, not an index array: on a memory-mapped dataset it reads just the block.
        lo, hi = block_range(len(run["train"]), par["replicas"], replica)
        rows = slice(lo, hi)
        stream = BatchStream(np.arange(hi - lo), run["batch_size"], run["shuffle"],
                             run["seed"], replica)
        steps = run["steps"]
    start_step = 0
    if run["resume"] is not None:  # the data position is the worker's clock
        start_step = run["resume"][0]["groups"][stage]["clocks"][replica]
    _distinct_masks(run["model"], run["seed"], index)
    X = np.ascontiguousarray(run["train"].X[rows], dtype=run["dtype"])
    y = np.ascontiguousarray(_labels(run["model"], run["train"].y[rows], run["dtype"]))
    common = (comm, 0, index, run["layout"], run["model"], run["backend"], X, y, stream, steps)
    options = dict(delay=run["delay"].get(index, 0.0), start_step=start_step,
                   transport=run["transport"], read_master=run["read_master"])
    if par["stage_layers"] is None:
        return Worker(*common, **options)
    rank = comm.Get_rank()
    return StageWorker(*common, layer_ids=par["stage_layers"][stage], stage=stage,
                       n_stages=par["n_stages"], prev_rank=rank - 1 if stage else None,
                       next_rank=rank + 1 if stage < par["n_stages"] - 1 else None,
                       micro_batches=par["micro_batches"], **options)


def _distinct_masks(model, seed, worker):
    """Each worker's dropout masks from a stream of its own, seeded by (run seed, worker):
    every rank builds the same model, so without this all workers would draw the same masks."""
    for layer in getattr(model, "layers", ()):
        reseed = getattr(layer, "reseed", None)
        if reseed is not None:
            reseed(seed, worker)


def _labels(model, y, dtype):
    """Class labels become int64; real-valued regression targets follow the run's dtype."""
    classification = getattr(getattr(model, "loss", None), "classification", False)
    if y.dtype.kind in "biu" or classification:
        return y.astype(np.int64)
    return y.astype(dtype)
