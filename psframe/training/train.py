"""train(): check on every rank, agree on errors, build the roles, abort the job on any failure."""
from __future__ import annotations

from typing import Any, Iterable, Optional

from ..errors import TrainingInterrupted
from ..metrics import TrainResult
from .failures import abort_job, abort_now, agree_or_raise, stop_on_signals
from .options import RunOptions, train_signature
from .planning import plan_run
from .supervisor import supervised_resume

__all__ = ["train"]


def train(model: Any, data: Any, *, verbose: bool = False,
          callbacks: Optional[Iterable[Any]] = None, comm: Any = None,
          **options: Any) -> Optional[TrainResult]:
    """Train ``model`` on ``data`` with a parameter server; call it on every rank.

    Ranks 0..servers-1 of ``comm`` (default COMM_WORLD) serve the weights and rank 0
    returns a TrainResult; the other ranks (workers, other servers) return None. The
    options are psframe.training.RunOptions' fields (see README.md); an unknown one is a
    TypeError, and a bad value a ConfigError raised on every rank before any work.
    """
    # Imported here: `import psframe` must not start MPI (the `psframe train -n N` launcher
    # is a plain process), and the transport and the roles need mpi4py.MPI.
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    from ..transport import Channel, Waiter
    from ..transport.shm import node_ids
    from ..transport.topology import node_share
    from .roles import build_server, build_shard_server, build_worker
    from .watchdog import Watchdog

    # A restarted job continues from the checkpoint its launcher chose (psframe.env.RESUME).
    run_options = supervised_resume(RunOptions.from_keywords(options))
    world = MPI.COMM_WORLD if comm is None else comm
    plan = None
    try:
        plan = plan_run(world, model, data, run_options)
        local_error = None
    except Exception as exc:  # noqa: B902 - an error on one rank must reach all, not hang them
        local_error = exc
    agree_or_raise(world, local_error)
    assert plan is not None  # check_run raised on no rank: agree_or_raise returned

    local_ranks, cores = node_share(world)
    n_threads = run_options.threads or max(1, cores // local_ranks)
    run_comm = world.Dup()
    channel = Channel(run_comm, plan.layout, Waiter(oversubscribed=local_ranks > cores),
                      nodes=node_ids(run_comm))
    try:
        if channel.rank == 0:
            role = build_server(channel, plan, verbose, callbacks, n_threads)
        elif channel.rank < plan.n_servers:
            role = build_shard_server(channel, plan)
        else:
            role = build_worker(channel, plan)
        watchdog = Watchdog(world.Get_rank(), role, lambda: abort_now(world),
                            run_options.stall_timeout or None, run_options.stop_timeout)
        role.heartbeat = watchdog.beat
        if hasattr(role, "loop_done"):
            role.loop_done = watchdog.disarm

        def stop():  # signal-safe: two flags
            watchdog.stop_requested()
            role.request_stop()

        # Every rank leaves together, inside the signal handlers' scope: a worker done early
        # waits there for the server's last evaluation and checkpoint, so Ctrl-C then asks
        # for a stop instead of killing a finished worker (and with it the job).
        with threadpool_limits(limits=n_threads), stop_on_signals(stop):
            try:
                with watchdog:
                    result = role.run()
            except TrainingInterrupted:
                _end_together(channel, role)  # a clean stop reaches every rank
                raise
            _end_together(channel, role)  # any other error aborts the job below instead
        if channel.rank == 0:
            role.recorder.callbacks.on_end(result)
            return result
        if role.interrupted:
            raise TrainingInterrupted("run interrupted by a signal; the servers wrote the "
                                      "checkpoint")
        return None
    except TrainingInterrupted:
        raise  # every rank stopped cleanly and raises it: an exit status, not an abort
    except BaseException:  # noqa: B902 - any failure must take every rank down, never hang
        abort_job(world)
    finally:
        run_comm.Free()


# inspect.signature reads it; typeshed's function type declares no __signature__.
train.__signature__ = train_signature(train)  # type: ignore[attr-defined]


def _end_together(channel, role):
    """Free the shared window, then wait for every rank, without spinning a core."""
    role.release()
    channel.barrier()
