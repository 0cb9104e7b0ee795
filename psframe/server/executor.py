"""Executor: carries out a push decision on one server's range, and answers the pulls it frees."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import ProtocolError
from ..policies import PushDecision
from ..sparse.server_rows import ServerRows
from ..transport import Channel, Field, Flag, Op, Sends, Tag, new_header, open_server_links
from ..transport.parts import ServerPart
from .checkpoint_state import restore_server_state
from .group import Group
from .inbox import GradientInbox
from .pushes import Push, PushBook, PushState
from .recorder import Recorder
from .updates import Update, UpdateEngine

__all__ = ["Executor"]

Pull = Tuple[int, Any]  # (worker, the clock its pull is for)


class Executor:
    """One server's range of the weights and everything that acts on it: the links to the
    workers, the payload parts, the inbox, the update engine and the book of pushes.

    Rank 0 (psframe.server.parameter_server) decides; the other servers
    (psframe.server.shard_server) follow its orders. Each owns one Executor, which lands
    pushes, carries out a decision (drop, gather, step with the mean, apply one) and runs
    the update frame by frame while the answered pulls' weights go out. It decides nothing.
    """

    def __init__(self, channel: Channel, layout: Any, weights: Any, *, optimizer: Any,
                 groups: Sequence[Group], worker_ranks: Sequence[int], recorder: Recorder,
                 on_bad_gradient: str = "raise", transport: str = "mpi",
                 keep_sent_weights: bool = False, owner: int = 0,
                 own_shards: Optional[Tuple[int, int]] = None,
                 layer_shards: Optional[Sequence[Tuple[int, int]]] = None,
                 sparse: Any = None, sparse_on_arrival: Optional[float] = None,
                 index: int = 0, resume: Optional[Tuple[Any, Any]] = None) -> None:
        self.channel = channel
        self.layout = layout
        self.workers = list(worker_ranks)  # worker index i is rank self.workers[i]
        n = len(self.workers)
        self.own_shards = tuple(own_shards) if own_shards is not None else (0, layout.n_shards)
        self.own = layout.shard_range(*self.own_shards)  # the elements this server updates
        self.index = index  # this server's place among the servers
        # With row-sparse tables a server's range holds dense weights only: its rows of the
        # tables are a block of each (sparse.row_blocks), which its part copies in itself.
        dense_own = self.own if sparse is None else tuple(min(e, sparse.dense_end)
                                                          for e in self.own)
        initial = weights
        self.window, weights, self.links = open_server_links(
            channel, layout, weights, self.workers, transport, owner=owner, own=dense_own)
        self.groups = list(groups)
        self.group_of: Dict[int, Tuple[Group, int]] = {}
        for g in self.groups:
            for local, w in enumerate(g.workers):
                self.group_of[w] = (g, local)
        if sorted(self.group_of) != list(range(n)):
            raise ValueError("every worker must belong to exactly one group")
        self.recorder = recorder
        self.engine = UpdateEngine(layout, weights, optimizer, n, keep_sent_weights)
        # The payload parts besides the dense frames (psframe.transport.parts): the
        # row-sparse tables' rows, when the model has some.
        self.parts: List[ServerPart] = []
        if sparse is not None:
            rows = ServerRows(sparse, self.engine.weights, optimizer, self.engine.opt_state,
                              self.links, index=index, on_arrival=sparse_on_arrival)
            if weights is not initial:  # moved into the shared window: its rows too
                rows.copy_rows(sparse.views(initial))
            self.parts.append(rows)
        self.engine.parts = self.parts  # checkpointed with the engine's state
        self.inbox = GradientInbox(layout, self.links, recorder.stats, on_bad_gradient,
                                   layer_shards)
        self.book = PushBook()
        self._sends = Sends(channel)  # one answer's sends at a time: reused
        self._reply_headers = [new_header() for _ in range(n)]
        dense = dense_own[1] - dense_own[0]
        self.n_params = dense + sum(p.params() for p in self.parts)
        if resume is not None:
            restore_server_state(resume[0], resume[1], self.engine, self.groups, recorder,
                                 self.own_shards)
        recorder.own_shards = self.own_shards  # what stats["servers"] says of this server
        recorder.own_params = self.n_params
        # A push whose every part can be applied as it lands may stream (see streams).
        self._parts_stream = all(not p.lands_whole for p in self.parts)

    @property
    def weights(self) -> Any:
        return self.engine.weights

    # -- landing ----------------------------------------------------------------------------
    def start(self, workers: Sequence[int]) -> None:
        for part in self.parts:
            part.start(workers)

    def announce(self, worker: int, fields: List[int]) -> Optional[Push]:
        """Worker's request header is here: post its payload's receives. A push comes back
        as a Push in the book (streamed, or to hand on once landed); None otherwise."""
        op = fields[Field.OP]
        if op != Op.DONE:
            for part in self.parts:
                part.announce(worker, push=op != Op.PULL)
        if op not in (Op.PUSH, Op.PUSH_PULL):
            return None
        group, _ = self.group_of[worker]
        lo, hi = self.check_shards(worker, fields, group)
        if worker in self.book.pushes:  # its last push, unless freed already
            self.book.make_room(worker, fields[Field.CLOCK])
        landing = self.inbox.post(worker, lo, hi, int(fields[Field.COUNT]))
        push = Push(worker, fields, landing, self.streams(worker, fields, landing),
                    self.inbox.check_frame)
        if push.streamed:
            self.recorder.stats.pushes_streamed += 1
        self.book.add(push)
        return push

    def streams(self, worker: int, fields: List[int], landing: Any) -> bool:
        """Whether a push is handled as its frames land: it comes by message on a link that
        streams (by default, from another node: Link.streams), one receive per frame in the
        layout's frame order, its worker checked it whole and found it finite (so every
        server takes it alike), and every other part of it may be applied as it lands (the
        row-sparse rows land whole)."""
        return bool(landing is not None and self.links[worker].streams
                    and int(fields[Field.FLAGS]) & Flag.FINITE
                    and self._parts_stream and self.inbox.layer_shards is None)

    def land(self, worker: int, fields: List[int], push: Push) -> bool:
        """Land and check worker's push (its dense frames; a streamed one: its size only, its
        frames as the update reads them). True if it is usable."""
        # Its shard range was checked when it was announced.
        lo, hi = int(fields[Field.SHARD_LO]), int(fields[Field.SHARD_HI])
        count, clock = int(fields[Field.COUNT]), int(fields[Field.CLOCK])
        if push.streamed:  # finite by its worker's check; frames checked as they land
            self.inbox.check_size(worker, lo, hi, count, clock)
            return True
        accepted = self.inbox.receive(worker, lo, hi, count, clock, int(fields[Field.FLAGS]),
                                      push.landing)
        push.state = PushState.LANDED
        return accepted

    def land_parts(self, worker: int, push: bool) -> bool:
        """Land every other part of worker's request, counted in its bytes pushed; False when
        one is not finite."""
        finite = True
        for part in self.parts:
            ok, nbytes = part.land(worker, push)
            self.recorder.moved(worker, pushed=nbytes)
            finite = finite and ok
        return finite

    def accepted(self, worker: int) -> None:
        for part in self.parts:
            part.accepted(worker)

    def close(self, worker: int) -> None:
        for part in self.parts:
            part.close(worker)

    # -- carrying out a decision ------------------------------------------------------------
    def carry_out(self, decision: Optional[PushDecision], group: Group,
                  worker: int) -> Tuple[Optional[Update], List[int]]:
        """Run a decision's actions on worker's push; (the update to run frame by frame or
        None, the workers whose pushes it reads)."""
        if decision is None:
            return None, []
        if decision.drop:
            self.book.drop(worker)
            self.recorder.dropped()
        if decision.accumulate:
            self.book.gather(worker)
        update: Optional[Update] = None
        reads: List[int] = []
        if decision.apply:
            for part in self.parts:
                part.apply_one(worker, decision.weight)
            reads = [worker]
            update = self.engine.one(self.inbox.gradient(worker), worker, decision.weight,
                                     decision.compensation)
        if decision.complete:
            order = self.book.gathered(group.workers)
            if order:  # a step whose every gradient was rejected changes nothing
                for part in self.parts:
                    part.apply_mean(order, decision.scale, decision.weight)
                reads = order
                update = self.engine.mean_of([self.inbox.gradient(w) for w in order],
                                             decision.scale, decision.weight)
        return update, reads

    def update_and_send(self, group: Group, update: Optional[Update], reads: Sequence[int],
                        pulls: Sequence[Pull], answer: Callable[[int, Group, Any], bool],
                        before: Optional[Callable[[], None]] = None) -> None:
        """Run ``update`` over the group's shards, sending the new weights to every answered
        pull frame by frame (UpdateEngine.update_and_send). ``answer(worker, group, clock)``
        fills each pull's reply header and says whether weights follow; ``before()`` runs
        once they are filled, before this server starts on its range (rank 0 orders the
        others then). Reply headers go first on the links that reply first (messages); the
        others' once all their frames are there. ``reads``: the workers whose pushes
        ``update`` reads; those still landing are waited for frame by frame."""
        book = self.book
        read = book.read_by_update(reads) if update is not None and reads else []
        for w, _ in pulls:
            book.answered(w, read)
        answered = [(w, self.links[w]) for w, clock in pulls if answer(w, group, clock)]
        if before is not None:
            before()
        for w, _ in pulls:
            if self.links[w].reply_first:
                self.send_reply(w)
        sends = self._sends
        landing = [p for p in read if p.streamed] if read else []
        self.engine.update_and_send(group.shard_range, update, answered, sends, landing)
        if self.parts:
            for w, _ in answered:  # before the shared links' replies: their parts are there
                for part in self.parts:
                    self.recorder.moved(w, pulled=part.serve(w, sends.requests))
        last = [w for w, _ in pulls if not self.links[w].reply_first]
        if last:
            for link in {self.links[w].ready_key: self.links[w] for w in last}.values():
                link.replies_ready()  # once per window, however many workers share it
            for w in last:
                if book.is_gathered(w):  # its reply would let it overwrite that gradient
                    raise ProtocolError(f"the policy answered worker {w}'s pull while its "
                                        "shared gradient still waits for an update")
                self.send_reply(w)
        sends.wait()
        if read:
            book.freed(read)

    # -- replies ----------------------------------------------------------------------------
    def reply_header(self, worker: int) -> Any:
        """Worker's reply header: filled before it is sent, reused (one pull at a time)."""
        return self._reply_headers[worker]

    def send_reply(self, worker: int) -> None:
        self.channel.send_header(self._reply_headers[worker], self.workers[worker], Tag.REPLY)

    def check_shards(self, worker: int, header: Any, group: Group) -> Tuple[int, int]:
        lo, hi = int(header[Field.SHARD_LO]), int(header[Field.SHARD_HI])
        if (lo, hi) != group.shard_range:
            raise ProtocolError(
                f"worker {worker} asked for shards [{lo}, {hi}); its group owns "
                f"{group.shard_range}"
            )
        return lo, hi
