"""ParameterServer: the one writer of the weights; serves pulls, gathers pushes, steps the optimizer."""
import math
import sys
import time
from collections import Counter

import numpy as np
from mpi4py import MPI

from .callbacks import CallbackList
from .comm import Channel, Field, Op, Status, Tag, fill_header, loss_of, new_header
from .errors import GradientError, ProtocolError, TrainingInterrupted
from .metrics import ServerStats, Stopwatch, TrainResult
from .policies import delay_compensate
from .shm import open_window

__all__ = ["ParameterServer", "Group", "GradientError"]


class Group:
    """Workers that update one shard range under one policy state.

    Data parallel: one group, every worker, every shard. A pipeline: one group per stage,
    holding that stage's worker from each pipeline and the shards of that stage's layers.
    """

    def __init__(self, policy_state, workers, shard_range):
        self.policy = policy_state
        self.workers = list(workers)  # global worker indices; the policy sees 0..len-1
        self.shard_range = tuple(shard_range)
        self.pending = []  # global workers whose slot holds a gradient of the step gathered


class ParameterServer:
    """Serves workers over ``comm`` until each has sent DONE.

    Requests are dispatched through ``self.handlers`` (op → method); what to do with each
    pull and push is the policy state's decision, the server only carries it out through
    ``self.actions`` (decision flag → method).
    """

    def __init__(self, comm, layout, weights, *, model, optimizer, groups, worker_ranks,
                 eval_data=None, eval_every=None, total_steps=None, epoch_samples=1,
                 dispatcher=None, on_bad_gradient="raise", callbacks=None, run_info=None,
                 checkpointer=None, resume=None, stop_units=None, transport="mpi",
                 weighting=None, keep_sent_weights=False):
        self.comm = comm
        self.layout = layout
        self.channel = Channel(comm, layout)
        self.workers = list(worker_ranks)  # worker index i is rank self.workers[i]
        self._open_window(weights, transport)
        self.model = model
        self.optimizer = optimizer
        self.opt_state = optimizer.init_state(layout.size, layout.dtype)
        self.groups = list(groups)
        self.index_of = {rank: i for i, rank in enumerate(self.workers)}
        self.group_of = {}
        for g in self.groups:
            for local, w in enumerate(g.workers):
                self.group_of[w] = (g, local)
        if sorted(self.group_of) != list(range(len(self.workers))):
            raise ValueError("every worker must belong to exactly one group")
        self.eval_data = eval_data
        self.eval_every = eval_every
        self.total_steps = total_steps
        self.epoch_samples = epoch_samples  # samples in one epoch: history's epoch unit
        self.dispatcher = dispatcher
        self.batch_counts = (
            np.zeros(dispatcher.total_batches, dtype=np.int64) if dispatcher else None
        )
        self.on_bad_gradient = on_bad_gradient
        self.callbacks = callbacks if callbacks is not None else CallbackList()
        self.run_info = dict(run_info or {})

        n = len(self.workers)
        # One landing slot per worker: pushes never wait on each other's buffers, and a step's
        # mean is summed in worker order, so Sync results are bitwise reproducible. A worker on
        # this node pushes into its own shared segment instead, read where it lies.
        self.slots = [None if self.shared_grad[w] is not None else layout.empty()
                      for w in range(n)]
        self.acc = layout.empty()
        # Delay compensation needs the weights each worker computed on: the server keeps a
        # copy of what it last sent each one (model-sized, per worker; see DelayCompensation).
        self.sent = [layout.empty() for _ in range(n)] if keep_sent_weights else None
        self.mean_square = layout.empty() if keep_sent_weights else None  # adaptive DC's MS
        if keep_sent_weights:
            self.mean_square[:] = 0
            widest = max(b - a for a, b in layout.frames(0, layout.n_shards))
            self._dc_scratch = np.empty(widest, layout.dtype)
        self.weighting = weighting  # how the policy weights updates, in words, for stats
        self.shard_updates = np.zeros(layout.n_shards, dtype=np.int64)
        self._plans = {}  # shard range -> frame plan (see _frame_plan)
        self._reply_headers = [new_header() for _ in range(n)]
        self.held = {}  # worker index -> (lo, hi) of a pull the policy holds
        self.finished = set()
        self.worker_reports = {}
        self.stats = ServerStats()
        self.bytes_pulled_by = [0] * n
        self.bytes_pushed_by = [0] * n
        self.history = []
        self._loss_sum = 0.0
        self._loss_n = 0
        self._last_logged = -1
        self._last_epoch = 0
        self._seen_version = 0
        self.checkpointer = checkpointer
        self.stopping = False
        # Workers that must stop at the same step: all of them under Sync, one pipeline's
        # stages otherwise (a stage left waiting for activations would hang).
        self.stop_units = list(stop_units) if stop_units is not None else list(range(n))
        self.answered_clock = [-1] * n
        self.stop_at = {}
        if resume is not None:
            self._restore(*resume)
        self.handlers = {Op.PULL: self._on_pull, Op.PUSH: self._on_push,
                         Op.PUSH_PULL: self._on_push_pull, Op.DONE: self._on_done}
        # Decision flag -> method; "apply" and "complete" return the per-shard update to run
        # (or None), which _carry_out interleaves with sending the new weights.
        self.actions = (
            ("drop", self._drop), ("accumulate", self._accumulate),
            ("apply", self._apply_one), ("complete", self._complete),
        )

    @property
    def version(self):
        """Updates every group has applied: the run's step count for history and eval."""
        return min(g.policy.version for g in self.groups)

    def _open_window(self, weights, transport):
        """The weights, and for each worker on this node its shared gradient (and weights).

        A worker's segment says how it takes part (see Worker._open_window): ``size``
        elements, its gradient only, and it reads the weights straight from the server's
        segment (lockstep Sync: no update runs while any worker computes); ``2 * size``, its
        gradient then its own copy of the weights, which the server writes frame by frame.
        """
        size = self.layout.size
        shared = self.window = open_window(self.comm, self.comm.Get_rank(), size,
                                           self.layout.dtype, transport)
        mine = shared.mine
        if mine is not None:
            mine[:] = weights  # the weights live in the window, where workers can read them
            weights = mine
        self.w = weights
        self.shared_grad, self.shared_weights = [], []  # None: not on the shared path
        for rank in self.workers:
            seg = shared.segment(rank)
            if seg is not None and len(seg) not in (size, 2 * size):
                raise ProtocolError(f"rank {rank} shares {len(seg)} elements; expected "
                                    f"{size} or {2 * size}")
            self.shared_grad.append(None if seg is None else seg[:size])
            self.shared_weights.append(None if seg is None or len(seg) == size else seg[size:])

    def release(self):
        """Free the shared window (collective with the workers on this node)."""
        self.window.close()

    # -- main loop --------------------------------------------------------------------------
    def run(self):
        header = new_header()
        self.callbacks.on_start({**self.run_info, "total_steps": self.total_steps,
                                 "n_workers": len(self.workers),
                                 "epoch_samples": self.epoch_samples})
        waiting, busy = Stopwatch(), Stopwatch()
        self.t0 = time.perf_counter()
        cpu0 = time.process_time()
        while len(self.finished) < len(self.workers):
            with waiting:
                status = self.channel.recv_header(header, MPI.ANY_SOURCE, Tag.REQUEST)
            with busy:
                src = status.Get_source()
                if src not in self.index_of:
                    raise ProtocolError(f"request from rank {src}, which is not a worker")
                fields = header.tolist()  # plain ints: cheaper to read than the array
                handler = self.handlers.get(fields[Field.OP])
                if handler is None:
                    raise ProtocolError(f"unknown op {fields[Field.OP]} from rank {src}")
                handler(self.index_of[src], fields)
        wall = time.perf_counter() - self.t0
        cpu = time.process_time() - cpu0
        if self.version != self._last_logged:
            self._record()
        if self.checkpointer is not None:
            self._checkpoint()  # the final state, also when a signal stopped the run
        if self.stopping:
            where = f"; last checkpoint: {self.checkpointer.last_path}" if self.checkpointer else ""
            raise TrainingInterrupted(f"run interrupted at step {self.version}{where}")
        return self._result(wall, cpu, waiting.total, busy.total)

    def request_stop(self):
        """Stop cleanly: every worker's next pull is answered with INTERRUPT (signal-safe)."""
        self.stopping = True

    # -- handlers ---------------------------------------------------------------------------
    def _on_pull(self, w, header):
        group, local = self.group_of[w]
        lo, hi = self._shard_range(w, header, group)
        pulls = self._register_pull(w, header, group, local, lo, hi, int(header[Field.CLOCK]))
        self._update_and_send(group, None, pulls)

    def _register_pull(self, w, header, group, local, lo, hi, clock):
        """Hand worker w's pull for ``clock`` to the policy: [the pull] if it may be answered
        now, else [] and the pull is held until a later decision releases it."""
        if header[Field.STATUS] == Status.INTERRUPT:  # a worker caught the signal
            self.stopping = True
        if group.policy.pull(local, clock):
            return [(w, lo, hi, clock)]
        self.held[w] = (lo, hi, clock)
        return []

    def _on_push_pull(self, w, header):
        """A push, then the pull of the worker's next step, in one request: the weights can
        go out frame by frame as the update finishes each, with no second request to wait for."""
        self._on_push(w, header, then_pull=True)

    def _on_push(self, w, header, then_pull=False):
        group, local = self.group_of[w]
        lo, hi = self._shard_range(w, header, group)
        start, stop = self.layout.shard_range(lo, hi)
        count = int(header[Field.COUNT])
        clock = int(header[Field.CLOCK])
        if w in group.pending:
            # Its slot (or shared segment) still holds a gradient a later update will read.
            # No shipped policy answers a pull before using the gradient it follows, so this
            # is a policy bug; refusing it keeps the pending gradient from being overwritten.
            raise ProtocolError(f"worker {w} pushed step {clock} before its previous gradient "
                                "was applied or dropped")
        if count != stop - start:
            raise GradientError(
                f"worker {w} pushed {count} elements for step {clock}, but shards [{lo}, {hi}) "
                f"hold {stop - start}; the model's gradients do not match its parameters"
            )
        finite = True
        if self.shared_grad[w] is not None:  # already in its segment: check it where it lies
            self.window.fence()
            slot = self.shared_grad[w]
            for a, b in self.layout.frames(lo, hi):
                finite = self._frame_finite(slot[a:b]) and finite
        else:
            slot = self.slots[w]
            requests = self.channel.irecv_frames(slot, lo, hi, self.workers[w], Tag.PUSH)
            # Check each frame as it lands, while the next ones are still arriving.
            for a, b in self.channel.each_frame(requests, self.layout.frames(lo, hi)):
                finite = self._frame_finite(slot[a:b]) and finite
        nbytes = count * self.layout.dtype.itemsize
        self.stats.pushes_received += 1
        self.stats.bytes_pushed += nbytes
        self.bytes_pushed_by[w] += nbytes
        accepted = finite or self._reject(w, clock)
        if accepted:
            # Only the rank that saw the loss reports samples (a pipeline's last stage).
            samples = int(header[Field.SAMPLES])
            self.stats.samples += samples
            if samples:
                loss = loss_of(header[Field.LOSS])
                self._loss_sum += loss * samples
                self._loss_n += samples
                self.stats.record_loss(loss)
            if self.batch_counts is not None:
                self.batch_counts[int(header[Field.BATCH])] += 1
        decision = group.policy.push(local, clock, int(header[Field.VERSION]), accepted=accepted)
        serve = (self._register_pull(w, header, group, local, lo, hi, clock + 1)
                 if then_pull else [])
        self._carry_out(decision, group, w, serve)

    def _on_done(self, w, header):
        self.worker_reports[w] = self.comm.recv(source=self.workers[w], tag=Tag.CONTROL)
        self.finished.add(w)
        group, local = self.group_of[w]
        self._carry_out(group.policy.finish(local), group, w)

    # -- actions ----------------------------------------------------------------------------
    def _carry_out(self, decision, group, w, serve=()):
        """Do what the policy decided, then answer the pulls it released (and ``serve``)."""
        update = None
        for flag, action in self.actions:
            if getattr(decision, flag):
                update = action(decision, group, w) or update
        pulls = [(group.workers[local], *self.held.pop(group.workers[local]))
                 for local in decision.release]
        self._update_and_send(group, update, pulls + list(serve))
        if update is not None:
            self._updated(decision.staleness, decision.weight)

    def _update_and_send(self, group, update, pulls):
        """Run ``update`` over the group's shards frame by frame, sending each frame of new
        weights to every answered pull as soon as it is updated: the copy of one frame to the
        workers overlaps the update of the next. Reply headers go first over messages; a
        worker on this node gets its frames copied into its segment while they are still in
        cache (or reads the server's own), and its header once they are all there."""
        answered = [p for p in pulls if self._answer(*p)]
        by_message = [self.workers[p[0]] for p in answered if self.shared_grad[p[0]] is None]
        copies = [self.shared_weights[p[0]] for p in answered
                  if self.shared_weights[p[0]] is not None]
        if self.sent is not None:  # after the frame's update: what the worker will compute on
            copies += [self.sent[p[0]] for p in answered]
        for p in pulls:
            if self.shared_grad[p[0]] is None:
                self._send_reply(p[0])
        requests = []
        plan = self._frame_plan(group) if update is not None or answered else ()
        for a, b, k_lo, k_hi in plan:
            if update is not None:
                # A group's shards always step together, so a frame's shards share one count:
                # one optimizer call per frame, not one per (often tiny) shard.
                self.shard_updates[k_lo:k_hi] += 1
                update(int(self.shard_updates[k_lo]), a, b)
            for dest in copies:
                np.copyto(dest[a:b], self.w[a:b])
            for rank in by_message:
                requests.append(self.channel.isend(self.w, a, b, rank, Tag.WEIGHTS))
            if requests:
                MPI.Request.Testall(requests)  # moves the frames already posted along
        shared = [p for p in pulls if self.shared_grad[p[0]] is not None]
        if shared:
            self.window.fence()
            for w, *_ in shared:
                if w in group.pending:  # its reply would let it overwrite that gradient
                    raise ProtocolError(f"the policy answered worker {w}'s pull while its "
                                        "shared gradient still waits for an update")
                self._send_reply(w)
        self.channel.wait_frames(requests)

    def _gradient(self, w):
        """Where worker w's latest gradient is: its landing slot or its shared segment."""
        return self.slots[w] if self.shared_grad[w] is None else self.shared_grad[w]

    def _drop(self, decision, group, w):
        self.stats.updates_dropped += 1

    def _accumulate(self, decision, group, w):
        group.pending.append(w)

    def _frame_plan(self, group):
        """(start, stop, first shard, end shard) of each frame of the group's shards; cached."""
        plan = self._plans.get(group.shard_range)
        if plan is None:
            plan = [(a, b, *self.layout.shards_of_range(a, b))
                     for a, b in self.layout.frames(*group.shard_range)]
            self._plans[group.shard_range] = plan
        return plan

    def _complete(self, decision, group, w):
        order = sorted(group.pending)
        group.pending = []
        if not order:  # a step whose every gradient was rejected changes nothing
            return None
        return lambda step, a, b: self._apply_mean(order, decision.scale, decision.weight,
                                                   step, a, b)

    def _apply_one(self, decision, group, w):
        """Apply one worker's gradient on arrival (Async, SSP), frame by frame."""
        slot, weight, comp = self._gradient(w), decision.weight, decision.compensation

        def update(step, a, b):
            g = slot[a:b] if comp is None else self._compensated(slot[a:b], w, comp, a, b)
            self.optimizer.apply(self.opt_state, self.w, g, a, b, step, weight)
        return update

    def _compensated(self, g, w, comp, a, b):
        """Worker w's gradient for elements [a, b), corrected for the weights it computed on,
        in the step scratch (free here: on-arrival updates never gather a mean)."""
        return delay_compensate(g, self.w[a:b], self.sent[w][a:b], comp, out=self.acc[a:b],
                                mean_square=self.mean_square[a:b],
                                scratch=self._dc_scratch[: b - a])

    def _apply_mean(self, order, scale, weight, step, a, b):
        """Elements [a, b): sum the pending slots in worker order, scale, step the optimizer."""
        acc = self.acc[a:b]
        grads = [self._gradient(w) for w in order]
        if len(order) == 1 and scale == 1.0:
            acc = grads[0][a:b]  # one gradient, unscaled: no copy needed
        elif len(order) == 1:
            np.multiply(grads[0][a:b], scale, out=acc)
        else:
            np.add(grads[0][a:b], grads[1][a:b], out=acc)
            for g in grads[2:]:
                acc += g[a:b]
            acc *= scale
        self.optimizer.apply(self.opt_state, self.w, acc, a, b, step, weight)

    def _updated(self, staleness, weight=1.0):
        self.stats.record_update(staleness, weight)
        version = self.version
        if version == self._seen_version:
            return  # a pipeline stage moved, but not every stage has finished the step yet
        self._seen_version = version
        self.callbacks.on_update(version, self.stats)
        epoch = int(self.stats.samples // self.epoch_samples)
        if self.eval_every:
            due = version % self.eval_every == 0 and version != self._last_logged
        else:
            due = epoch > self._last_epoch
        self._last_epoch = max(epoch, self._last_epoch)
        if due:
            self._record()
        if self.checkpointer is not None and self.checkpointer.due(version):
            self._checkpoint()

    def _stop_now(self, w, clock):
        """In a stopping run: whether this pull is past its unit's last step."""
        unit = self.stop_units[w]
        if unit not in self.stop_at:
            members = [v for v, u in enumerate(self.stop_units) if u == unit]
            self.stop_at[unit] = max(self.answered_clock[v] for v in members) + 1
        return clock >= self.stop_at[unit]

    def _answer(self, w, lo, hi, clock):
        """Fill worker w's reply header for its pull; True when weights are to follow."""
        status, batch = Status.OK, 0
        if self.stopping and self._stop_now(w, clock):
            status = Status.INTERRUPT
        elif self.dispatcher is not None:
            batch = self.dispatcher.next()
            if batch is None:  # every batch is handed out: this worker is done
                status, batch = Status.STOP, 0
        count = 0
        if status == Status.OK:
            start, stop = self.layout.shard_range(lo, hi)
            count = stop - start
            self.answered_clock[w] = clock
            nbytes = count * self.layout.dtype.itemsize
            self.stats.pulls_answered += 1
            self.stats.bytes_pulled += nbytes
            self.bytes_pulled_by[w] += nbytes
        else:
            lo = hi = 0
        # The header is sent before w can ask again, so each worker's is reused.
        fill_header(self._reply_headers[w], 0, 0, 0, lo, hi, count,
                    self.group_of[w][0].policy.version, 0.0, 0, status, batch)
        return status == Status.OK

    def _send_reply(self, w):
        self.channel.send_header(self._reply_headers[w], self.workers[w], Tag.REPLY)

    @staticmethod
    def _frame_finite(grad):
        # One BLAS pass, no temporaries: g·g is finite whenever every element is (unless the
        # sum of squares overflows, for absurdly large but finite gradients: the exact,
        # slower check settles that rare case, so no finite gradient is refused).
        with np.errstate(over="ignore", invalid="ignore"):
            squares = float(np.dot(grad, grad))
        return math.isfinite(squares) or bool(np.isfinite(grad).all())

    def _reject(self, w, clock):
        """Count a non-finite push; raise or warn as on_bad_gradient says. Returns False."""
        self.stats.updates_rejected += 1
        message = (
            f"worker {w} pushed a non-finite gradient (NaN or inf) for step {clock}; "
            "it was rejected and the weights are untouched"
        )
        if self.on_bad_gradient == "raise":
            raise GradientError(message + ". Lower the learning rate, check the data, or pass "
                                "on_bad_gradient='skip' to drop such gradients and go on.")
        print(f"psframe: warning: {message}", file=sys.stderr, flush=True)
        return False

    def _shard_range(self, w, header, group):
        lo, hi = int(header[Field.SHARD_LO]), int(header[Field.SHARD_HI])
        if (lo, hi) != group.shard_range:
            raise ProtocolError(
                f"worker {w} asked for shards [{lo}, {hi}); its group owns {group.shard_range}"
            )
        return lo, hi

    # -- checkpoints ------------------------------------------------------------------------
    def _checkpoint(self):
        arrays = {"weights": self.w, "shard_updates": self.shard_updates}
        for key, value in self.opt_state.items():
            if not key.startswith("_"):  # scratch buffers carry no state
                arrays[f"opt.{key}"] = value
        state = {
            "groups": [{"version": g.policy.version, "clocks": list(g.policy.clocks)}
                       for g in self.groups],
            "samples": self.stats.samples,
            "history": self.history,
        }
        return self.checkpointer.save(self.version, arrays, state)

    def _restore(self, manifest, arrays):
        """Continue from a checkpoint: weights, optimizer state, clocks, data position."""
        self.w[:] = arrays["weights"]
        self.shard_updates[:] = arrays["shard_updates"]
        for key in self.opt_state:
            if not key.startswith("_"):
                self.opt_state[key][:] = arrays[f"opt.{key}"]
        for g, saved in zip(self.groups, manifest["groups"]):
            g.policy.restore(saved["version"], saved["clocks"])
        self.stats.samples = manifest["samples"]
        self.history = list(manifest["history"])
        self._seen_version = self._last_logged = self.version
        self._last_epoch = int(self.stats.samples // self.epoch_samples)

    def _transport_of(self, w):
        if self.shared_grad[w] is None:
            return "mpi"
        return "shared-copy" if self.shared_weights[w] is not None else "shared-read"

    # -- history and result -----------------------------------------------------------------
    def _record(self):
        version = self.version
        self._last_logged = version
        row = {
            "step": version,
            "epoch": self.stats.samples / self.epoch_samples,
            "time_s": time.perf_counter() - self.t0,
            "train_loss": self._loss_sum / self._loss_n if self._loss_n else None,
            "eval_loss": None,
            "eval_accuracy": None,
        }
        self._loss_sum, self._loss_n = 0.0, 0
        if self.eval_data is not None:
            X, y = self.eval_data
            scores = self.model.evaluate(self.layout.views(self.w), X, y)
            row["eval_loss"] = float(scores["loss"])
            acc = scores.get("accuracy")
            row["eval_accuracy"] = None if acc is None else float(acc)
        self.history.append(row)
        self.callbacks.on_record(row)

    def _result(self, wall, cpu, wait_s, busy_s):
        stats = self.stats.as_dict()
        reports = [self.worker_reports.get(i, {}) for i in range(len(self.workers))]
        worker_wait = [r.get("wait_s", 0.0) for r in reports]
        worker_wall = [r.get("wall_s", 0.0) for r in reports]
        gaps = Counter()
        for g in self.groups:
            gaps.update(g.policy.gaps)
        stats.update(
            n_workers=len(self.workers),
            wall_s=wall,
            samples_per_s=stats["samples"] / wall if wall > 0 else 0.0,
            steps_per_worker=[r.get("steps", 0) for r in reports],
            worker_wait_s=worker_wait,
            worker_push_s=[r.get("push_s", 0.0) for r in reports],
            worker_compute_s=[r.get("compute_s", 0.0) for r in reports],
            worker_wait_share=sum(worker_wait) / max(sum(worker_wall), 1e-12),
            bytes_pulled_per_worker=list(self.bytes_pulled_by),
            bytes_pushed_per_worker=list(self.bytes_pushed_by),
            server_wait_s=wait_s,
            server_busy_s=busy_s,
            server_cpu_s=cpu,
            server_cpu_share=cpu / wall if wall > 0 else 0.0,
            max_clock_gap=max(gaps, default=0),
            clock_gap_hist=dict(sorted(gaps.items())),
            n_shards=self.layout.n_shards,
            n_params=self.layout.size,
            policy_switches=list(getattr(self.groups[0].policy, "switches", [])),
            worker_transport=[self._transport_of(w) for w in range(len(self.workers))],
            update_weighting=self.weighting,
        )
        if self.batch_counts is not None:
            stats["batch_counts"] = self.batch_counts.tolist()
        if any("backend" in r for r in reports):  # each worker's backend and data path
            keys = ("backend", "device", "transfer", "data_on_device", "note")
            stats["worker_backends"] = [{k: r[k] for k in keys if k in r} for r in reports]
        if any("idle_s" in r for r in reports):  # pipeline stages report their bubble
            stats["stage_idle_share"] = [
                r.get("idle_s", 0.0) / max(r.get("wall_s", 0.0), 1e-12) for r in reports
            ]
        return TrainResult(params=self.layout.unflatten(self.w), history=self.history,
                           stats=stats, config=dict(self.run_info.get("config", {})))
