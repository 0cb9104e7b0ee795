"""ParameterServer: rank 0's loop; it decides each request with the policy, and carries it out."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ProtocolError, TrainingInterrupted
from ..metrics import Stopwatch, TrainResult
from ..policies import PushDecision
from ..transport import Channel, Field, Op, Status, Tag, fill_header, float_of
from .checkpoint_state import save_server_state
from .executor import Executor, Pull
from .group import Group
from .pushes import Push
from .recorder import Recorder
from .stopping import StopControl

__all__ = ["ParameterServer"]


def _nothing() -> None:
    return None


class ParameterServer:
    """Serves workers over ``channel`` until each has sent DONE: the leader of the servers.

    The loop receives each request header and hands it to ``self.handlers`` (op → method).
    What to do with each pull and push is the policy state's decision; the server carries it
    out through its ``executor`` (psframe.server.executor), which holds the links, the
    payload parts, the inbox, the update engine and the book of pushes. Besides, it has:

    - ``stop``: the clean stop after a signal;
    - ``recorder``: stats, history, evaluations, callbacks and the result;
    - checkpoints through ``checkpointer`` (psframe.server.checkpoint_state says what is kept).

    It serves the shard ranges of its ``groups`` to ``worker_ranks``. With several servers,
    it updates only ``own_shards``, and ``followers`` (psframe.server.followers) carry out
    each of its decisions on the other ranges; it gathers their ranges to evaluate, and
    their parts of each checkpoint under its manifest.
    """

    def __init__(self, channel: Any, layout: Any, weights: Any, *,
                 recorder: Optional[Recorder] = None, model: Any = None, dispatcher: Any = None,
                 checkpointer: Any = None, stop_units: Any = None, followers: Any = None,
                 **options: Any) -> None:
        """``options``: the Executor's (optimizer, groups, worker_ranks, on_bad_gradient,
        transport, keep_sent_weights, owner, own_shards, layer_shards, sparse,
        sparse_on_arrival, index, resume)."""
        if not isinstance(channel, Channel):  # a communicator: the default channel over it
            channel = Channel(channel, layout)
        self.channel, self.layout = channel, layout
        n = len(list(options["worker_ranks"]))
        self.recorder = recorder if recorder is not None else Recorder(
            model, layout, n, total_batches=dispatcher.total_batches if dispatcher else None)
        self.executor = ex = Executor(channel, layout, weights, recorder=self.recorder, **options)
        self.workers, self.groups, self.group_of, self.book = (ex.workers, ex.groups,
                                                               ex.group_of, ex.book)
        self.window, self.links, self.engine = ex.window, ex.links, ex.engine
        self.own_shards, self.n_params = ex.own_shards, ex.n_params
        self.followers = followers
        self.stop = StopControl(n, stop_units)
        self.dispatcher = dispatcher
        self.checkpointer = checkpointer
        self.finished: set = set()
        if followers is not None:
            followers.share(self.window)
            self.recorder.before_read = self._gather
        # Set by the run (psframe.training.watchdog): progress, and the end of the loop.
        self.heartbeat: Callable[[], None] = _nothing
        self.loop_done: Callable[[], None] = _nothing
        self.handlers: Dict[int, Callable[[int, List[int], Optional[Push]], None]] = {
            Op.PULL: self._on_pull, Op.PUSH: self._on_push,
                         Op.PUSH_PULL: self._on_push_pull, Op.DONE: self._on_done}
        self._event: Tuple[int, int] = (0, 0)  # the request an order to the others names

    @property
    def weights(self) -> Any:
        """The weights this server holds (in the shared window when there is one)."""
        return self.engine.weights

    @property
    def version(self) -> int:
        """Updates every group has applied: the run's step count for history and eval."""
        return min(g.policy.version for g in self.groups)

    @property
    def stopping(self) -> bool:
        return self.stop.stopping

    def release(self) -> None:
        """Free the shared window (collective with the workers on this node)."""
        self.window.close()

    def request_stop(self) -> None:
        """Stop cleanly: every worker's next pull is answered with INTERRUPT (signal-safe)."""
        self.stop.request()

    # -- the loop ---------------------------------------------------------------------------
    def run(self) -> TrainResult:
        self.requests = self.channel.requests_from(self.workers, Tag.REQUEST)
        self.recorder.start()
        self.executor.start(range(len(self.workers)))
        waiting, busy = Stopwatch(), Stopwatch()
        t0, cpu0 = time.perf_counter(), time.process_time()
        while len(self.finished) < len(self.workers):
            with waiting:
                worker, fields, push = self._next_request()
            with busy:
                self._event = (worker, fields[Field.OP])
                handler = self.handlers.get(fields[Field.OP])
                if handler is None:
                    raise ProtocolError(f"unknown op {fields[Field.OP]} from rank "
                                        f"{self.workers[worker]}")
                handler(worker, fields, push)
            self.heartbeat()
        self.book.finish_all()
        self.loop_done()  # what follows is local work: the last evaluation and checkpoint
        wall = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
        if self.version != self.recorder.last_logged:
            self.recorder.record(self.version, self.weights)
        if self.checkpointer is not None:
            self._checkpoint()  # the final state, also when a signal stopped the run
        if self.followers is not None:
            self._gather()
            self.recorder.merge_servers(self.followers.end(self.stopping))
        if self.stopping:
            where = f"; last checkpoint: {self.checkpointer.last_path}" if self.checkpointer else ""
            raise TrainingInterrupted(f"run interrupted at step {self.version}{where}")
        result = self.recorder.result(self.weights, self.groups, [link.name for link in self.links],
                                      wall, cpu, waiting.total, busy.total)
        for part in self.executor.parts:
            result.params = part.result_params(result.params)
            if part.stats_key is not None:
                result.stats[part.stats_key] = part.stats(
                    [s.get(part.stats_key) for s in self.recorder.servers or ()])
        return result

    def waiting_for(self) -> str:
        """What the loop waits for, in words (the watchdog's diagnostic)."""
        book = self.book
        landing = book.landing()
        # A worker whose pull awaits its reply has nothing to send: it is not the one late.
        done = (set(self.finished) | set(landing) | {w for w, *_ in book.ready}
                | set(book.awaiting))
        silent = [w for w in range(len(self.workers)) if w not in done]
        held = sorted(g.workers[local] for g in self.groups for local in g.policy.held)
        parts = [f"a request from workers {silent} (ranks "
                 f"{[self.workers[w] for w in silent]})" if silent else "no worker's request"]
        if landing:
            parts.append(f"the pushes of workers {landing} to land")
        if held:
            parts.append(f"its policy holds the pulls of workers {held}")
        pending = book.gathering()
        if pending:
            parts.append(f"the step gathers the gradients of workers {pending} so far")
        return "; ".join(parts)

    def _next_request(self) -> Tuple[int, List[int], Optional[Push]]:
        """The next request to handle: a pull or DONE as soon as its header is here, a push
        once its frames have landed (a streamed one at once). Every announced push lands at
        once (its receives are posted when its header arrives), so one worker's slow
        transfer does not hold up the others', and on-arrival policies see pushes in the
        order they arrive whole."""
        book = self.book

        def poll() -> bool:
            for w in self.requests.arrived():
                if w not in book.arriving:  # one request per worker in hand at a time
                    fields = self.requests.take(w)
                    book.queue(w, fields, self.executor.announce(w, fields))
            return book.poll() if book.arriving else bool(book.ready)

        if not poll():
            self.channel.until_settled(poll, book.moved)
        return book.ready.pop(0)

    # -- handlers ---------------------------------------------------------------------------
    def _on_pull(self, worker: int, header: List[int], push: Optional[Push] = None) -> None:
        group, local = self.group_of[worker]
        self.executor.land_parts(worker, push=False)  # e.g. its ids: the rows to answer with
        self.executor.check_shards(worker, header, group)
        self._reply(group, None, None, [], self._register_pull(worker, header, group, local,
                                                               int(header[Field.CLOCK])))

    def _register_pull(self, worker: int, header: List[int], group: Group, local: int,
                       clock: int) -> List[Pull]:
        """Hand worker's pull for ``clock`` to the policy: [(worker, clock)] if it may be
        answered now, else [] and the policy holds it until a later decision releases it."""
        if header[Field.STATUS] == Status.INTERRUPT:  # a worker caught the signal
            self.stop.request()
        self.book.awaiting.add(worker)
        return [(worker, clock)] if group.policy.pull(local, clock) else []

    def _on_push_pull(self, worker: int, header: List[int], push: Optional[Push] = None) -> None:
        """A push, then the pull of the worker's next step, in one request: the weights can
        go out frame by frame as the update finishes each, with no second request to wait for."""
        self._on_push(worker, header, push, then_pull=True)

    def _on_push(self, worker: int, header: List[int], push: Optional[Push] = None,
                 then_pull: bool = False) -> None:
        group, local = self.group_of[worker]
        clock = int(header[Field.CLOCK])
        ex = self.executor
        assert push is not None
        accepted = ex.land(worker, header, push)
        if ex.parts:  # the push's other parts (row-sparse rows): one refusal refuses it all
            if not ex.land_parts(worker, push=True) and accepted:
                accepted = ex.inbox.reject(worker, clock)
            if accepted:
                ex.accepted(worker)
        self.recorder.pushed(worker, int(header[Field.COUNT]) * self.layout.dtype.itemsize,
                             accepted, int(header[Field.SAMPLES]), float_of(header[Field.LOSS]),
                             int(header[Field.BATCH]))
        decision = group.policy.push(local, clock, int(header[Field.VERSION]), accepted=accepted)
        serve = (self._register_pull(worker, header, group, local, clock + 1)
                 if then_pull else [])
        self._carry_out(decision, group, worker, serve)

    def _on_done(self, worker: int, header: List[int], push: Optional[Push] = None) -> None:
        self.recorder.reported(worker, self.channel.recv_object(self.workers[worker],
                                                                Tag.CONTROL))
        self.finished.add(worker)
        self.requests.close(worker)
        self.executor.close(worker)
        group, local = self.group_of[worker]
        self._carry_out(group.policy.finish(local), group, worker)

    # -- carrying out decisions -------------------------------------------------------------
    def _carry_out(self, decision: PushDecision, group: Group, worker: int,
                   serve: Sequence[Pull] = ()) -> None:
        """Do what the policy decided, then answer the pulls it released (and ``serve``)."""
        update, reads = self.executor.carry_out(decision, group, worker)
        # A released pull is for the step its worker's clock is at: it could not push since.
        pulls = [(group.workers[local], group.policy.clocks[local]) for local in decision.release]
        self._reply(group, update, decision, reads, pulls + list(serve))
        if update is not None:
            self._updated(decision.staleness, decision.weight)

    def _reply(self, group: Group, update: Any, decision: Optional[PushDecision],
               reads: Sequence[int], pulls: Sequence[Pull]) -> None:
        """Run the update and answer ``pulls``; the other servers get the order for this
        request (``decision`` and the replies) before this one starts on its own range."""
        followers = self.followers

        def order() -> None:
            assert followers is not None
            replies = [(w, *(int(self.executor.reply_header(w)[f])
                             for f in (Field.STATUS, Field.VERSION, Field.BATCH)))
                       for w, _ in pulls]
            followers.request(*self._event, decision, replies)

        self.executor.update_and_send(group, update, reads, pulls, self._answer,
                                      order if followers is not None else None)

    def _updated(self, staleness: int, weight: float = 1.0) -> None:
        version = self.version
        moved = self.recorder.updated(version, staleness, weight, self.weights)
        if moved and self.checkpointer is not None and self.checkpointer.due(version):
            self._checkpoint()

    # -- pull replies -----------------------------------------------------------------------
    def _answer(self, worker: int, group: Group, clock: int) -> bool:
        """Fill worker's reply header for its pull; True when weights are to follow."""
        status, batch = Status.OK, 0
        if self.stop.stops(worker, clock):
            status = Status.INTERRUPT
        elif self.dispatcher is not None:
            batch = self.dispatcher.next()
            if batch is None:  # every batch is handed out: this worker is done
                status, batch = Status.STOP, 0
        lo, hi, count = 0, 0, 0
        if status == Status.OK:
            lo, hi = group.shard_range
            start, stop = self.layout.shard_range(lo, hi)
            count = stop - start
            self.stop.answered(worker, clock)
            self.recorder.pulled(worker, count * self.layout.dtype.itemsize)
        # The header is sent before the worker can ask again, so each worker's is reused.
        fill_header(self.executor.reply_header(worker), 0, 0, 0, lo, hi, count,
                    group.policy.version, 0.0, 0, status, batch)
        return status == Status.OK

    def _checkpoint(self) -> Any:
        version = self.version
        parts = self.followers.checkpoint(version) if self.followers is not None else None
        return save_server_state(self.checkpointer, version, self.engine, self.groups,
                                 self.recorder, self.own_shards, parts)

    def _gather(self) -> None:
        """The other servers' ranges into ``weights``, as of now (before reading them all)."""
        self.followers.snapshot(self.weights)
