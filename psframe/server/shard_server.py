"""ShardServer: a server other than rank 0; it carries out rank 0's orders on its own range."""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import ProtocolError
from ..transport import Channel, Field, Flag, Op, Status, Tag, fill_header
from .checkpoint_state import range_arrays
from .executor import Executor
from .followers import snapshot_shards
from .group import Group
from .orders import Kind, Order, OrderReader
from .pushes import Push
from .recorder import Recorder

__all__ = ["ShardServer"]


def _nothing() -> None:
    return None


class ShardServer:
    """Updates shards ``own_shards`` with its own optimizer state, as rank 0 orders.

    It runs no policy: rank 0 does, and sends one order per request it handles, before
    doing its own part (psframe.server.orders). For each, this server takes that worker's
    request (the workers send one to every server whose range their shards meet), lands
    its range of the gradient, has its ``executor`` carry out the decision (gather, step
    with the mean, apply alone, drop) and answers the pulls the order answers, with rank
    0's status. Orders come in the order rank 0 decided them, so every server applies the
    same updates in the same order: Sync's steps, a backup's drops, SSP's bound and a stop
    agree on every range.
    """

    def __init__(self, channel: Any, layout: Any, weights: Any, *,
                 recorder: Optional[Recorder] = None, model: Any = None,
                 checkpointer: Any = None, leader: int = 0, index: int = 1, **options: Any) -> None:
        """``options``: the Executor's (optimizer, groups, worker_ranks, on_bad_gradient,
        transport, keep_sent_weights, own_shards, layer_shards, sparse, sparse_on_arrival,
        resume); rank ``leader`` owns the weights' shared segment."""
        if not isinstance(channel, Channel):
            channel = Channel(channel, layout)
        self.channel, self.layout = channel, layout
        n = len(list(options["worker_ranks"]))
        self.recorder = recorder if recorder is not None else Recorder(model, layout, n)
        self.executor = ex = Executor(channel, layout, weights, recorder=self.recorder,
                                      owner=leader, index=index, **options)
        self.workers, self.groups, self.group_of = ex.workers, ex.groups, ex.group_of
        self.window, self.links, self.engine = ex.window, ex.links, ex.engine
        self.own_shards, self.index, self.n_params = ex.own_shards, ex.index, ex.n_params
        self.checkpointer = checkpointer
        # The row-sparse tables' layout (a snapshot's dense shards).
        self.sparse = options.get("sparse")
        self.leader = leader
        self.interrupted = False
        self._replies: Dict[int, Tuple[int, int, int]] = {}
        # The workers whose shards meet this range: they send it requests; the others never.
        # A part that goes to every server (the row-sparse rows) brings every worker.
        every = any(p.every_server for p in ex.parts)
        self.serves = [w for w in range(n) if every or self._meets(self.group_of[w][0])]
        self._queue_index = {w: i for i, w in enumerate(self.serves)}
        # Requests taken off the wire, each worker's next, before rank 0's order for it.
        self._taken: Dict[int, Tuple[List[int], Optional[Push]]] = {}
        # Weights in rank 0's own buffer (the node's shared window): a snapshot is a word.
        self.shares_weights = self.window.segment(leader) is not None
        self._waiting: Optional[int] = None
        self.heartbeat: Callable[[], None] = _nothing
        self.loop_done: Callable[[], None] = _nothing

    @property
    def weights(self) -> Any:
        return self.engine.weights

    @staticmethod
    def _meets(group: Group) -> bool:
        lo, hi = group.shard_range
        return hi > lo

    def release(self) -> None:
        """Free the shared window (collective with the workers on this node)."""
        self.window.close()

    def request_stop(self) -> None:
        """A signal here changes nothing: rank 0 decides the stop, and orders it."""

    def run(self) -> None:
        self.requests = self.channel.requests_from([self.workers[w] for w in self.serves],
                                                   Tag.REQUEST)
        orders = OrderReader(self.channel, self.leader, len(self.workers))
        self.executor.start(self.serves)
        book = self.executor.book
        t0, cpu0 = time.perf_counter(), time.process_time()
        while True:
            self._waiting = None  # rank 0's next order
            order = orders.next(while_waiting=self._prefetch, moved=self._landing_moved)
            self.heartbeat()
            if order.kind == Kind.REQUEST:
                self._follow(order)
            elif order.kind == Kind.SNAPSHOT:
                self._send_range()
            elif order.kind == Kind.CHECKPOINT:
                part = self.checkpointer.save_part(order.version, self.index,
                                                   range_arrays(self.engine, self.own_shards))
                self.channel.send_object(part, self.leader, Tag.CONTROL)
            else:  # END
                book.finish_all()
                self.interrupted = order.interrupted
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                load = self.recorder.load(self.channel.rank, self.own_shards,
                                          self.n_params, wall, cpu)
                for p in self.executor.parts:
                    if p.stats_key is not None:
                        load[p.stats_key] = p.stats()
                self.channel.send_object(load, self.leader, Tag.CONTROL)
                return None

    def _follow(self, order: Order) -> None:
        worker, op = order.worker, order.op
        group, _ = self.group_of[worker]
        if worker not in self._queue_index:
            return  # none of this worker's shards are here
        ex = self.executor
        self._waiting = worker  # its request, which rank 0 has already handled
        if worker not in self._taken:
            self._take(worker)
        fields, push = self._taken.pop(worker)
        if fields[Field.OP] != op:
            raise ProtocolError(f"worker {worker} sent server {self.index} op "
                                f"{fields[Field.OP]} where rank 0 had op {op}")
        if op in (Op.PUSH, Op.PUSH_PULL):
            assert push is not None
            self._land(worker, fields, push)
        elif op == Op.PULL:
            ex.land_parts(worker, push=False)
        if op in (Op.PULL, Op.PUSH_PULL):
            ex.check_shards(worker, fields, group)
            ex.book.awaiting.add(worker)
        if op == Op.DONE:
            self.requests.close(self._queue_index[worker])
            ex.close(worker)
        self._replies = {w: (status, version, batch)
                         for w, status, version, batch in order.replies}
        decision = order.decision
        update, reads = ex.carry_out(decision, group, worker)
        ex.update_and_send(group, update, reads, [(w, None) for w in self._replies],
                           self._answer)
        if update is not None:
            self.recorder.stats.record_update(decision.staleness, decision.weight)

    def waiting_for(self) -> str:
        if self._waiting is None:
            return "rank 0's next order"
        return (f"the request of worker {self._waiting} (rank {self.workers[self._waiting]}) "
                "that rank 0 has already handled")

    def _prefetch(self) -> None:
        """Start landing every push whose header is here, whoever's turn is next: each
        worker's range then moves at once, not one worker after another in rank 0's order
        (rank 0 decides on arrival of its own range; this one's may come later)."""
        for i in self.requests.arrived():
            worker = self.serves[i]
            if worker not in self._taken:  # its earlier request is not carried out yet
                self._take(worker)

    def _landing_moved(self) -> bool:
        """Whether a frame of a push taken ahead of its order completed since last asked."""
        return self.executor.book.moved(push for _, push in self._taken.values())

    def _take(self, worker: int) -> None:
        fields = self.requests.take(self._queue_index[worker])
        self._taken[worker] = (fields, self.executor.announce(worker, fields))

    def _land(self, worker: int, fields: List[int], push: Push) -> bool:
        ex = self.executor
        accepted = ex.land(worker, fields, push)
        self.recorder.moved(worker, pushed=int(fields[Field.COUNT]) * self.layout.dtype.itemsize)
        # Every server refuses a push alike: the worker flags non-finite parts too, and
        # unflagged ones here would be applied here and refused by rank 0.
        if not ex.land_parts(worker, push=True) and not int(fields[Field.FLAGS]) & Flag.NON_FINITE:
            raise ProtocolError(f"worker {worker} pushed non-finite rows to server "
                                f"{self.index} without flagging them")
        if accepted:
            ex.accepted(worker)
        return accepted

    def _answer(self, worker: int, group: Group, clock: Any) -> bool:
        """Rank 0's reply to this pull, for this server's range of it."""
        status, version, batch = self._replies[worker]
        lo, hi, count = 0, 0, 0
        if status == Status.OK:
            lo, hi = group.shard_range
            start, stop = self.layout.shard_range(lo, hi)
            count = stop - start
            self.recorder.pulled(worker, count * self.layout.dtype.itemsize)
        fill_header(self.executor.reply_header(worker), 0, 0, 0, lo, hi, count, version, 0.0, 0,
                    status, batch)
        return status == Status.OK

    def _send_range(self) -> None:
        """This range of the weights to rank 0 (unless it lies in rank 0's buffer already),
        then the word that it is there."""
        if not self.shares_weights:
            sends = self.channel.isend_frames(self.weights, *snapshot_shards(
                self.own_shards, self.sparse), self.leader, Tag.RANGE)
            for part in self.executor.parts:  # e.g. its block of each table's rows
                sends += [self.channel.isend_array(a, self.leader, Tag.RANGE)
                          for a in part.snapshot_arrays(self.weights)]
            self.channel.wait_frames(sends)
        self.channel.send_object(True, self.leader, Tag.CONTROL)
