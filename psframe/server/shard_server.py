"""ShardServer: a server other than rank 0; it carries out rank 0's orders on its own range."""
from __future__ import annotations

import time

from ..errors import ProtocolError
from ..transport import Field, Flag, Op, Status, Tag, fill_header
from .checkpoint_state import range_arrays
from .followers import snapshot_shards
from .orders import Kind, OrderReader
from .parameter_server import ParameterServer

__all__ = ["ShardServer"]


class ShardServer(ParameterServer):
    """Updates shards ``own_shards`` with its own optimizer state, as rank 0 orders.

    It runs no policy: rank 0 does, and sends one order per request it handles, before
    doing its own part (psframe.server.orders). For each, this server takes that worker's
    request (the workers send one to every server whose range their shards meet), lands
    its range of the gradient, carries out the decision (gather, step with the mean, apply
    alone, drop) and answers the pulls the order answers, with rank 0's status. Orders come
    in the order rank 0 decided them, so every server applies the same updates in the same
    order: Sync's steps, a backup's drops, SSP's bound and a stop agree on every range.
    """

    def __init__(self, channel, layout, weights, *, leader=0, index=1, **kwargs):
        super().__init__(channel, layout, weights, owner=leader, index=index, **kwargs)
        self.leader = leader
        self.interrupted = False
        self._replies = {}
        # The workers whose shards meet this range: they send it requests; the others never.
        # With row-sparse tables every worker may touch rows here.
        self.serves = [w for w in range(len(self.workers))
                       if self.rows is not None or self._meets(self.group_of[w][0])]
        self._queue_index = {w: i for i, w in enumerate(self.serves)}
        # Weights in rank 0's own buffer (the node's shared window): a snapshot is a word.
        self.shares_weights = self.window.segment(leader) is not None

    @staticmethod
    def _meets(group):
        lo, hi = group.shard_range
        return hi > lo

    def request_stop(self):
        """A signal here changes nothing: rank 0 decides the stop, and orders it."""

    def run(self):
        self.requests = self.channel.requests_from([self.workers[w] for w in self.serves],
                                                   Tag.REQUEST)
        orders = OrderReader(self.channel, self.leader, len(self.workers))
        if self.rows is not None:
            self.rows.start(self.serves)
        self._landing = {}  # worker -> (its request's fields, the receives posted for it)
        self._landed_frames = 0
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
                for worker in list(self._inflight):  # none is left unless a push was forgotten
                    self._finish_landing(worker)
                self.interrupted = order.interrupted
                wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
                load = self.recorder.load(self.channel.rank, self.own_shards,
                                          self.n_params, wall, cpu)
                if self.rows is not None:
                    load["sparse"] = self.rows.stats()
                self.channel.send_object(load, self.leader, Tag.CONTROL)
                return None

    def _follow(self, order):
        worker, op = order.worker, order.op
        group, _ = self.group_of[worker]
        if worker not in self._queue_index:
            return  # none of this worker's shards are here
        self._waiting = worker  # its request, which rank 0 has already handled
        if worker not in self._landing:
            self._start_landing(worker)
        fields, posted = self._landing.pop(worker)
        if fields[Field.OP] != op:
            raise ProtocolError(f"worker {worker} sent server {self.index} op "
                                f"{fields[Field.OP]} where rank 0 had op {op}")
        if op in (Op.PUSH, Op.PUSH_PULL):
            self._land(worker, fields, group, posted)
        elif op == Op.PULL and self.rows is not None:
            self._land_rows(worker)
        if op in (Op.PULL, Op.PUSH_PULL):
            self._check_shards(worker, fields, group)
            self._awaiting[worker] = True
        if op == Op.DONE:
            self.requests.close(self._queue_index[worker])
            if self.rows is not None:
                self.rows.close(worker)
        self._replies = {w: (status, version, batch)
                         for w, status, version, batch in order.replies}
        decision = order.decision
        update = None
        self._reads = []
        for flag, action in self.actions:
            if getattr(decision, flag):
                update = action(decision, group, worker) or update
        self._update_and_send(group, update, [(w, None) for w in self._replies], None,
                              self._reads)
        if update is not None:
            self.recorder.stats.record_update(decision.staleness, decision.weight)

    def waiting_for(self):
        if self._waiting is None:
            return "rank 0's next order"
        return (f"the request of worker {self._waiting} (rank {self.workers[self._waiting]}) "
                "that rank 0 has already handled")

    def _prefetch(self):
        """Start landing every push whose header is here, whoever's turn is next: each
        worker's range then moves at once, not one worker after another in rank 0's order
        (rank 0 decides on arrival of its own range; this one's may come later)."""
        for i in self.requests.arrived():
            worker = self.serves[i]
            if worker not in self._landing:  # its earlier request is not carried out yet
                self._start_landing(worker)

    def _start_landing(self, worker):
        fields = self.requests.take(self._queue_index[worker])
        posted = None
        if self.rows is not None and fields[Field.OP] != Op.DONE:
            self.rows.post(worker, push=fields[Field.OP] != Op.PULL)
        if fields[Field.OP] in (Op.PUSH, Op.PUSH_PULL):
            group, _ = self.group_of[worker]
            if worker in group.pending:
                # Its slot still holds the gradient a gathered step will read: no shipped
                # policy lets it push again first, so this is a protocol error.
                raise ProtocolError(f"worker {worker} pushed before its previous gradient "
                                    "was applied or dropped")
            if worker in self._inflight:  # its frames go first into the slot the next takes
                self._finish_landing(worker)
            lo, hi = self._check_shards(worker, fields, group)
            posted = self.inbox.post(worker, lo, hi, int(fields[Field.COUNT]))
        self._landing[worker] = (fields, posted)

    def _land(self, worker, fields, group, posted):
        lo, hi = self._check_shards(worker, fields, group)
        count = int(fields[Field.COUNT])
        if self._streams(worker, fields, posted):  # as rank 0 does: applied as its frames land
            self.inbox.check_size(worker, lo, hi, count, int(fields[Field.CLOCK]))
            self._stream(worker, posted)
            accepted = True
        else:
            accepted = self.inbox.receive(worker, lo, hi, count, int(fields[Field.CLOCK]),
                                          int(fields[Field.FLAGS]), posted)
        self.recorder.moved(worker, pushed=count * self.layout.dtype.itemsize)
        if self.rows is not None:
            # Every server refuses a push alike: the worker flags non-finite rows too, and
            # unflagged ones here would be applied here and refused by rank 0.
            if not self._land_rows(worker) and not int(fields[Field.FLAGS]) & Flag.NON_FINITE:
                raise ProtocolError(f"worker {worker} pushed non-finite rows to server "
                                    f"{self.index} without flagging them")
            if accepted and self.sparse_on_arrival is not None:
                self.rows.apply_one(worker, self.sparse_on_arrival)
        return accepted

    def _answer(self, worker, group, clock):
        """Rank 0's reply to this pull, for this server's range of it."""
        status, version, batch = self._replies[worker]
        lo, hi, count = 0, 0, 0
        if status == Status.OK:
            lo, hi = group.shard_range
            start, stop = self.layout.shard_range(lo, hi)
            count = stop - start
            self.recorder.pulled(worker, count * self.layout.dtype.itemsize)
        fill_header(self._reply_headers[worker], 0, 0, 0, lo, hi, count, version, 0.0, 0,
                    status, batch)
        return status == Status.OK

    def _send_range(self):
        """This range of the weights to rank 0 (unless it lies in rank 0's buffer already),
        then the word that it is there."""
        if not self.shares_weights:
            sparse = self.rows.tables if self.rows is not None else None
            sends = self.channel.isend_frames(self.weights, *snapshot_shards(
                self.own_shards, sparse), self.leader, Tag.RANGE)
            if sparse is not None:  # its block of each table's rows, in the tables' order
                tables = sparse.views(self.weights)
                sends += [self.channel.comm.Isend(tables[name][a:b], self.leader, Tag.RANGE)
                          for name, (a, b) in self.rows.row_ranges.items()]
            self.channel.wait_frames(sends)
        self.channel.send_object(True, self.leader, Tag.CONTROL)
