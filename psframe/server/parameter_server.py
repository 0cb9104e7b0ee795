"""ParameterServer: the request loop; it carries out each policy decision with its parts."""
from __future__ import annotations

import time

from ..errors import ProtocolError, TrainingInterrupted
from ..metrics import Stopwatch
from ..transport import Channel, Field, Flag, Op, Status, Tag, fill_header, loss_of, new_header
from ..transport import open_server_paths
from .checkpoint_state import restore_server_state, save_server_state
from .inbox import GradientInbox
from ..sparse.server_rows import ServerRows
from .recorder import Recorder
from .stopping import StopControl
from .updates import UpdateEngine

__all__ = ["ParameterServer"]


def _nothing():
    return None


class ParameterServer:
    """Serves workers over ``channel`` until each has sent DONE.

    The loop receives each request header and hands it to ``self.handlers`` (op → method).
    What to do with each pull and push is the policy state's decision; the server carries it
    out through ``self.actions`` (decision flag → method), with its parts:

    - ``paths``: each worker's payload path (psframe.transport.paths);
    - ``inbox``: lands and checks pushed gradients;
    - ``engine``: the weights, the optimizer and the frame-by-frame update while sending;
    - ``stop``: the clean stop after a signal;
    - ``recorder``: stats, history, evaluations, callbacks and the result;
    - checkpoints through ``checkpointer`` (psframe.server.checkpoint_state says what is kept).

    It serves the shard ranges of its ``groups`` to ``worker_ranks``. With several servers,
    it updates only ``own_shards``, and ``followers`` (psframe.server.followers) carry out
    each of its decisions on the other ranges; it gathers their ranges to evaluate, and
    their parts of each checkpoint under its manifest.
    """

    def __init__(self, channel, layout, weights, *, optimizer, groups, worker_ranks,
                 recorder=None, model=None, dispatcher=None, on_bad_gradient="raise",
                 checkpointer=None, resume=None, stop_units=None, transport="mpi",
                 keep_sent_weights=False, owner=0, own_shards=None, followers=None,
                 layer_shards=None, sparse=None, sparse_on_arrival=None, index=0):
        if not isinstance(channel, Channel):  # a communicator: the default channel over it
            channel = Channel(channel, layout)
        self.channel = channel
        self.layout = layout
        self.workers = list(worker_ranks)  # worker index i is rank self.workers[i]
        n = len(self.workers)
        self.own_shards = tuple(own_shards) if own_shards is not None else (0, layout.n_shards)
        self.own = layout.shard_range(*self.own_shards)  # the elements this server updates
        self.index = index  # this server's place among the servers
        self.followers = followers
        # With row-sparse tables a server's range holds dense weights only: its rows of the
        # tables are a block of each (sparse.row_blocks), which it copies in itself.
        dense_own = self.own if sparse is None else tuple(min(e, sparse.dense_end)
                                                          for e in self.own)
        initial = weights
        self.window, weights, self.paths = open_server_paths(
            channel, layout, weights, self.workers, transport, owner=owner, own=dense_own)
        self.groups = list(groups)
        self.group_of = {}
        for g in self.groups:
            for local, w in enumerate(g.workers):
                self.group_of[w] = (g, local)
        if sorted(self.group_of) != list(range(n)):
            raise ValueError("every worker must belong to exactly one group")
        self.recorder = recorder if recorder is not None else Recorder(
            model, layout, n, total_batches=dispatcher.total_batches if dispatcher else None)
        self.engine = UpdateEngine(layout, weights, optimizer, n, keep_sent_weights)
        # Row-sparse tables (psframe.sparse): their touched rows move and update apart from
        # the dense shards. ``sparse_on_arrival``: the weight each push's rows are applied
        # with as it arrives, whatever the dense policy decides (ps.Hybrid); None: they
        # follow the dense policy's decisions.
        self.rows = None
        if sparse is not None:
            self.rows = ServerRows(channel.comm, sparse, self.engine.weights, optimizer,
                                   self.engine.opt_state, self.workers, index=index,
                                   paths=self.paths)
            if weights is not initial:  # moved into the shared window: its rows too
                self.rows.copy_rows(sparse.views(initial))
        self.engine.rows = self.rows  # checkpointed with the engine's state
        self.sparse_on_arrival = sparse_on_arrival
        self.inbox = GradientInbox(layout, self.paths, self.recorder.stats, on_bad_gradient,
                                   layer_shards)
        self.stop = StopControl(n, stop_units)
        self.dispatcher = dispatcher
        self.checkpointer = checkpointer
        self.finished = set()
        self._reply_headers = [new_header() for _ in range(n)]
        # Whose pull awaits its reply: the wire's state, not the policy's, so that a policy
        # releasing a worker that asked for nothing fails loudly instead of desynchronizing it.
        self._awaiting = [False] * n
        # worker -> receives of a push handled as it lands (streamed; see _announce), until
        # the update that reads it has waited for its frames
        self._inflight = {}
        self._reads = []  # the workers whose gradients the decision being carried out reads
        if resume is not None:
            restore_server_state(*resume, self.engine, self.groups, self.recorder,
                                 self.own_shards)
        self.recorder.own_shards = self.own_shards  # what stats["servers"] says of rank 0
        self.n_params = self.own[1] - self.own[0]
        if sparse is not None:
            self.n_params = dense_own[1] - dense_own[0] + sparse.server_params(index)
        self.recorder.own_params = self.n_params
        if followers is not None:
            followers.share(self.window)
            self.recorder.before_read = self._gather
        # Set by the run (psframe.training.watchdog): progress, and the end of the loop.
        self.heartbeat = self.loop_done = _nothing
        self.handlers = {Op.PULL: self._on_pull, Op.PUSH: self._on_push,
                         Op.PUSH_PULL: self._on_push_pull, Op.DONE: self._on_done}
        # Decision flag -> method; "apply" and "complete" return the per-frame update to run
        # (or None), which _carry_out interleaves with sending the new weights.
        self.actions = (
            ("drop", self._drop), ("accumulate", self._accumulate),
            ("apply", self._apply_one), ("complete", self._complete),
        )

    @property
    def weights(self):
        """The weights this server holds (in the shared window when there is one)."""
        return self.engine.weights

    @property
    def version(self):
        """Updates every group has applied: the run's step count for history and eval."""
        return min(g.policy.version for g in self.groups)

    @property
    def stopping(self):
        return self.stop.stopping

    def release(self):
        """Free the shared window (collective with the workers on this node)."""
        self.window.close()

    def request_stop(self):
        """Stop cleanly: every worker's next pull is answered with INTERRUPT (signal-safe)."""
        self.stop.request()

    # -- the loop ---------------------------------------------------------------------------
    def run(self):
        self.requests = self.channel.requests_from(self.workers, Tag.REQUEST)
        self._landing = {}  # worker -> (fields, receives) of a push whose frames are arriving
        self._ready = []  # (worker, fields, receives) to handle, in the order they got ready
        self._landed_frames = 0
        self.recorder.start()
        if self.rows is not None:
            self.rows.start(range(len(self.workers)))
        waiting, busy = Stopwatch(), Stopwatch()
        t0, cpu0 = time.perf_counter(), time.process_time()
        while len(self.finished) < len(self.workers):
            with waiting:
                worker, fields, posted = self._next_request()
            with busy:
                self._event = (worker, fields[Field.OP])  # what an order to the others names
                handler = self.handlers.get(fields[Field.OP])
                if handler is None:
                    raise ProtocolError(f"unknown op {fields[Field.OP]} from rank "
                                        f"{self.workers[worker]}")
                handler(worker, fields, posted)
            self.heartbeat()
        for worker in list(self._inflight):  # none is left unless a policy forgot a push
            self._finish_landing(worker)
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
        result = self.recorder.result(self.weights, self.groups, [p.name for p in self.paths],
                                      wall, cpu, waiting.total, busy.total)
        if self.rows is not None:
            result.params = self.rows.tables.from_storage(result.params)
            result.stats["sparse"] = self.rows.stats(
                [s.get("sparse") for s in self.recorder.servers or ()])
        return result

    def waiting_for(self):
        """What the loop waits for, in words (the watchdog's diagnostic)."""
        landing = {**getattr(self, "_landing", {}), **getattr(self, "_inflight", {})}
        ready = getattr(self, "_ready", [])
        # A worker whose pull awaits its reply has nothing to send: it is not the one late.
        done = (set(self.finished) | set(landing) | {w for w, *_ in ready}
                | {w for w, waiting in enumerate(self._awaiting) if waiting})
        silent = [w for w in range(len(self.workers)) if w not in done]
        held = sorted(g.workers[local] for g in self.groups for local in g.policy.held)
        parts = [f"a request from workers {silent} (ranks "
                 f"{[self.workers[w] for w in silent]})" if silent else "no worker's request"]
        if landing:
            parts.append(f"the pushes of workers {sorted(landing)} to land")
        if held:
            parts.append(f"its policy holds the pulls of workers {held}")
        pending = sorted(w for g in self.groups for w in g.pending)
        if pending:
            parts.append(f"the step gathers the gradients of workers {pending} so far")
        return "; ".join(parts)

    def _next_request(self):
        """The next request to handle: a pull or DONE as soon as its header is here, a push
        once its frames have landed. Every announced push lands at once (its receives are
        posted when its header arrives), so one worker's slow transfer does not hold up the
        others', and on-arrival policies see pushes in the order they arrive whole."""
        def poll():
            for w in self.requests.arrived():
                if w not in self._landing:  # one request per worker in hand at a time
                    self._announce(w, self.requests.take(w))
            for w, (fields, posted) in list(self._landing.items()):
                if posted is None or all(r.Get_status() for r in posted):
                    del self._landing[w]
                    self._ready.append((w, fields, posted))
            return bool(self._ready)

        if not poll():
            self.channel.waiter.until_settled(poll, self._landing_moved, self.channel.idle_s)
        return self._ready.pop(0)

    def _landing_moved(self):
        """Whether a frame of a landing push completed since the last call."""
        done = sum(r.Get_status() for _, posted in self._landing.values() for r in posted or ())
        moved = done > self._landed_frames
        self._landed_frames = done
        return moved

    def _announce(self, worker, fields):
        if self.rows is not None and fields[Field.OP] != Op.DONE:
            self.rows.post(worker, push=fields[Field.OP] != Op.PULL)
        if fields[Field.OP] not in (Op.PUSH, Op.PUSH_PULL):
            self._ready.append((worker, fields, None))
            return
        group, _ = self.group_of[worker]
        lo, hi = self._check_shards(worker, fields, group)
        if worker in group.pending:
            # Its slot (or shared segment) still holds a gradient a later update will read.
            # No shipped policy answers a pull before using the gradient it follows, so this
            # is a policy bug; refusing it keeps the pending gradient from being overwritten.
            raise ProtocolError(f"worker {worker} pushed step {fields[Field.CLOCK]} before "
                                "its previous gradient was applied or dropped")
        if worker in self._inflight:  # its frames go first into the slot the next one takes
            self._finish_landing(worker)
        posted = self.inbox.post(worker, lo, hi, int(fields[Field.COUNT]))
        if self._streams(worker, fields, posted):
            # Decided now and applied frame by frame as it lands: the update and the reply
            # overlap the rest of the push (UpdateEngine.update_and_send's ``landing``).
            self._stream(worker, posted)
            self._ready.append((worker, fields, posted))
        else:
            self._landing[worker] = (fields, posted)

    def _streams(self, worker, fields, posted):
        """Whether a push is handled as its frames land: it comes by message on a path that
        streams (by default, from another node: PayloadPath.streams), one receive per frame
        (``posted``) in the layout's frame order, its worker checked it whole and found it
        finite (so every server takes it alike), and it holds dense weights only (pushes
        with row-sparse tables land whole)."""
        return (posted is not None and self.paths[worker].streams
                and int(fields[Field.FLAGS]) & Flag.FINITE
                and self.rows is None and self.inbox.layer_shards is None)

    def _stream(self, worker, posted):
        """Handle worker's push while its frames (``posted``) land: the update that reads
        it waits for them (see _update_and_send)."""
        self._inflight[worker] = posted
        self.recorder.stats.pushes_streamed += 1

    def _finish_landing(self, worker):
        """Wait for the rest of a streamed push that no update reads (dropped, or left)."""
        self.channel.wait_frames(self._inflight.pop(worker))

    # -- handlers ---------------------------------------------------------------------------
    def _on_pull(self, worker, header, posted=None):
        group, local = self.group_of[worker]
        if self.rows is not None:  # its ids: the rows to answer with
            self._land_rows(worker)
        self._check_shards(worker, header, group)
        self._update_and_send(group, None, self._register_pull(worker, header, group, local,
                                                               int(header[Field.CLOCK])), None)

    def _register_pull(self, worker, header, group, local, clock):
        """Hand worker's pull for ``clock`` to the policy: [(worker, clock)] if it may be
        answered now, else [] and the policy holds it until a later decision releases it."""
        if header[Field.STATUS] == Status.INTERRUPT:  # a worker caught the signal
            self.stop.request()
        self._awaiting[worker] = True
        return [(worker, clock)] if group.policy.pull(local, clock) else []

    def _on_push_pull(self, worker, header, posted=None):
        """A push, then the pull of the worker's next step, in one request: the weights can
        go out frame by frame as the update finishes each, with no second request to wait for."""
        self._on_push(worker, header, posted, then_pull=True)

    def _on_push(self, worker, header, posted=None, then_pull=False):
        """``posted``: the receives its frames have landed through (see _next_request)."""
        group, local = self.group_of[worker]
        lo, hi = self._check_shards(worker, header, group)
        count, clock = int(header[Field.COUNT]), int(header[Field.CLOCK])
        if worker in self._inflight:  # finite by its worker's check; frames checked on landing
            self.inbox.check_size(worker, lo, hi, count, clock)
            accepted = True
        else:
            accepted = self.inbox.receive(worker, lo, hi, count, clock,
                                          int(header[Field.FLAGS]), posted)
        if self.rows is not None:
            if not self._land_rows(worker) and accepted:
                accepted = self.inbox.reject(worker, clock)
            if accepted and self.sparse_on_arrival is not None:
                self.rows.apply_one(worker, self.sparse_on_arrival)
        self.recorder.pushed(worker, count * self.layout.dtype.itemsize, accepted,
                             int(header[Field.SAMPLES]), loss_of(header[Field.LOSS]),
                             int(header[Field.BATCH]))
        decision = group.policy.push(local, clock, int(header[Field.VERSION]), accepted=accepted)
        serve = (self._register_pull(worker, header, group, local, clock + 1)
                 if then_pull else [])
        self._carry_out(decision, group, worker, serve)

    def _land_rows(self, worker):
        """Land worker's row-sparse ids (and pushed rows), counted in its bytes pushed;
        False when the rows are not finite."""
        finite, nbytes = self.rows.land(worker)
        self.recorder.moved(worker, pushed=nbytes)
        return finite

    def _on_done(self, worker, header, posted=None):
        self.recorder.reported(worker, self.channel.recv_object(self.workers[worker],
                                                                Tag.CONTROL))
        self.finished.add(worker)
        self.requests.close(worker)
        if self.rows is not None:
            self.rows.close(worker)
        group, local = self.group_of[worker]
        self._carry_out(group.policy.finish(local), group, worker)

    # -- carrying out decisions -------------------------------------------------------------
    def _carry_out(self, decision, group, worker, serve=()):
        """Do what the policy decided, then answer the pulls it released (and ``serve``)."""
        update = None
        self._reads = []
        for flag, action in self.actions:
            if getattr(decision, flag):
                update = action(decision, group, worker) or update
        # A released pull is for the step its worker's clock is at: it could not push since.
        pulls = [(group.workers[local], group.policy.clocks[local]) for local in decision.release]
        self._update_and_send(group, update, pulls + list(serve), decision, self._reads)
        if update is not None:
            self._updated(decision.staleness, decision.weight)

    def _drop(self, decision, group, worker):
        if worker in self._inflight:
            self._finish_landing(worker)
        self.recorder.dropped()

    def _accumulate(self, decision, group, worker):
        group.pending.append(worker)

    def _complete(self, decision, group, worker):
        order = sorted(group.pending)
        group.pending = []
        if not order:  # a step whose every gradient was rejected changes nothing
            return None
        if self.rows is not None and self.sparse_on_arrival is None:
            self.rows.apply_mean(order, decision.scale, decision.weight)
        self._reads = order
        return self.engine.mean_of([self.inbox.gradient(w) for w in order], decision.scale,
                                   decision.weight)

    def _apply_one(self, decision, group, worker):
        if self.rows is not None and self.sparse_on_arrival is None:
            self.rows.apply_one(worker, decision.weight)
        self._reads = [worker]
        return self.engine.one(self.inbox.gradient(worker), worker, decision.weight,
                               decision.compensation)

    def _update_and_send(self, group, update, pulls, decision, reads=()):
        """Run ``update`` over the group's shards, sending the new weights to every answered
        pull frame by frame (UpdateEngine.update_and_send). Reply headers go first on the
        paths that reply first (messages); the others' once all their frames are there.
        The other servers get the order for this request (``decision`` and the replies)
        before this one starts on its own range. ``reads``: the workers whose gradients
        ``update`` reads; those still landing are waited for frame by frame."""
        for w, _ in pulls:
            if not self._awaiting[w]:
                raise ProtocolError(f"the policy released worker {w}'s pull, but it has none "
                                    "waiting")
            self._awaiting[w] = False
            if w in self._inflight and w not in reads:  # its reply frees it to push again
                self._finish_landing(w)
        landing = [(w, self._inflight.pop(w), self.inbox.gradient(w))
                   for w in reads if w in self._inflight]
        answered = [(w, self.paths[w]) for w, clock in pulls if self._answer(w, group, clock)]
        if self.followers is not None:
            replies = [(w, *(int(self._reply_headers[w][f])
                             for f in (Field.STATUS, Field.VERSION, Field.BATCH)))
                       for w, _ in pulls]
            self.followers.request(*self._event, decision, replies)
        for w, _ in pulls:
            if self.paths[w].reply_first:
                self._send_reply(w)
        requests = self.engine.update_and_send(self.channel, group.shard_range, update, answered,
                                               landing)
        if self.rows is not None:
            for w, _ in answered:  # before the shared paths' replies: their rows are there
                send, nbytes = self.rows.serve(w)
                if send is not None:
                    requests.append(send)
                self.recorder.moved(w, pulled=nbytes)
        last = [w for w, _ in pulls if not self.paths[w].reply_first]
        for path in {self.paths[w].ready_key: self.paths[w] for w in last}.values():
            path.replies_ready()  # once per window, however many workers share it
        for w in last:
            if w in group.pending:  # its reply would let it overwrite that gradient
                raise ProtocolError(f"the policy answered worker {w}'s pull while its "
                                    "shared gradient still waits for an update")
            self._send_reply(w)
        self.channel.wait_frames(requests)

    def _updated(self, staleness, weight=1.0):
        version = self.version
        moved = self.recorder.updated(version, staleness, weight, self.weights)
        if moved and self.checkpointer is not None and self.checkpointer.due(version):
            self._checkpoint()

    # -- pull replies -----------------------------------------------------------------------
    def _answer(self, worker, group, clock):
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
        fill_header(self._reply_headers[worker], 0, 0, 0, lo, hi, count, group.policy.version,
                    0.0, 0, status, batch)
        return status == Status.OK

    def _send_reply(self, worker):
        self.channel.send_header(self._reply_headers[worker], self.workers[worker], Tag.REPLY)

    def _check_shards(self, worker, header, group):
        lo, hi = int(header[Field.SHARD_LO]), int(header[Field.SHARD_HI])
        if (lo, hi) != group.shard_range:
            raise ProtocolError(
                f"worker {worker} asked for shards [{lo}, {hi}); its group owns "
                f"{group.shard_range}"
            )
        return lo, hi

    def _checkpoint(self):
        version = self.version
        parts = self.followers.checkpoint(version) if self.followers is not None else None
        return save_server_state(self.checkpointer, version, self.engine, self.groups,
                                 self.recorder, self.own_shards, parts)

    def _gather(self):
        """The other servers' ranges into ``weights``, as of now (before reading them all)."""
        self.followers.snapshot(self.weights)
