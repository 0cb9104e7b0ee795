"""Orders: what rank 0, which runs the policy, tells the other servers to do, as int64 buffers."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ProtocolError
from ..policies import DelayCompensation, PushDecision
from ..transport import Tag, float_of
from ..transport.wire import float_bits

if TYPE_CHECKING:
    from ..transport.channel import Channel

__all__ = ["Kind", "Order", "OrderWriter", "OrderReader"]


class Kind(enum.IntEnum):
    REQUEST = 1  # carry out rank 0's decision on a worker's request, on your range
    SNAPSHOT = 2  # send rank 0 your range of the weights (evaluation, the result)
    CHECKPOINT = 3  # write your range into the checkpoint of VERSION; say what you wrote
    END = 4  # every worker is done: send your stats and stop


class _Bit(enum.IntFlag):
    DROP = 1
    ACCUMULATE = 2
    APPLY = 4
    COMPLETE = 8
    COMPENSATE = 16
    ADAPTIVE = 32  # the compensation's lam is relative to the gradient's running scale
    INTERRUPTED = 64  # END of a run a signal stopped


# Slots of an order; the replies follow, REPLY_LEN slots each.
KIND, WORKER, OP, BITS, SCALE, WEIGHT, STALENESS, LAM, DECAY, VERSION, N_REPLIES = range(11)
HEAD_LEN = 11
REPLY_LEN = 4  # worker, status, version, batch


class Order:
    """One order as read: its kind, the request's worker and op, the decision and replies."""

    def __init__(self, buffer: np.ndarray) -> None:
        f = buffer.tolist()
        self.kind = Kind(f[KIND])
        self.worker, self.op, self.version = f[WORKER], f[OP], f[VERSION]
        self.interrupted = bool(f[BITS] & _Bit.INTERRUPTED)
        self.decision = _decision_of(f)
        n = f[N_REPLIES]
        self.replies: List[Tuple[int, int, int, int]] = [
            tuple(f[HEAD_LEN + REPLY_LEN * i: HEAD_LEN + REPLY_LEN * (i + 1)]) for i in range(n)
        ]


def _decision_of(f: Sequence[int]) -> PushDecision:
    bits = _Bit(f[BITS])
    compensation = None
    if bits & _Bit.COMPENSATE:
        compensation = _compensation(float_of(f[LAM]), bool(bits & _Bit.ADAPTIVE),
                                     float_of(f[DECAY]))
    return PushDecision(drop=bool(bits & _Bit.DROP), accumulate=bool(bits & _Bit.ACCUMULATE),
                        apply=bool(bits & _Bit.APPLY), complete=bool(bits & _Bit.COMPLETE),
                        scale=float_of(f[SCALE]), weight=float_of(f[WEIGHT]),
                        staleness=f[STALENESS], compensation=compensation)


_COMPENSATIONS: Dict[Tuple[float, bool, float], DelayCompensation] = {}
_NOTHING = PushDecision()  # a pull's order: no decision about a gradient


def _compensation(lam: float, adaptive: bool, decay: float) -> DelayCompensation:
    """One DelayCompensation per setting, as rank 0's policy has (they hold no state)."""
    key = (lam, adaptive, decay)
    if key not in _COMPENSATIONS:
        _COMPENSATIONS[key] = DelayCompensation(lam, adaptive=adaptive, decay=decay)
    return _COMPENSATIONS[key]


class OrderWriter:
    """Rank 0's end: one preallocated buffer, sent to every other server in turn (small
    messages, eager: each send completes at once)."""

    def __init__(self, channel: Channel, ranks: Sequence[int], n_workers: int) -> None:
        self.channel = channel
        self.ranks = list(ranks)
        self.buffer = np.zeros(HEAD_LEN + REPLY_LEN * n_workers, dtype=np.int64)

    def _send(self, length: int) -> None:
        for rank in self.ranks:
            self.channel.send_header(self.buffer[:length], rank, Tag.ORDER)

    def request(self, worker: int, op: int, decision: Optional[PushDecision],
                replies: Sequence[Sequence[int]]) -> None:
        """The order for one request: ``decision`` (a PushDecision, or None for a pull), and
        ``replies``, the (worker, status, version, batch) of every pull it answers."""
        b = self.buffer
        b[:HEAD_LEN] = 0
        b[KIND], b[WORKER], b[OP] = Kind.REQUEST, worker, op
        decision = decision if decision is not None else _NOTHING
        bits = ((_Bit.DROP if decision.drop else 0)
                | (_Bit.ACCUMULATE if decision.accumulate else 0)
                | (_Bit.APPLY if decision.apply else 0)
                | (_Bit.COMPLETE if decision.complete else 0))
        comp = decision.compensation
        if comp is not None:
            bits |= _Bit.COMPENSATE | (_Bit.ADAPTIVE if comp.adaptive else 0)
            b[LAM], b[DECAY] = float_bits(comp.lam), float_bits(comp.decay)
        b[BITS] = int(bits)
        b[SCALE], b[WEIGHT] = float_bits(decision.scale), float_bits(decision.weight)
        b[STALENESS] = decision.staleness
        b[N_REPLIES] = len(replies)
        for i, reply in enumerate(replies):
            b[HEAD_LEN + REPLY_LEN * i: HEAD_LEN + REPLY_LEN * (i + 1)] = reply
        self._send(HEAD_LEN + REPLY_LEN * len(replies))

    def plain(self, kind: Kind, version: int = 0, interrupted: bool = False) -> None:
        b = self.buffer
        b[:HEAD_LEN] = 0
        b[KIND], b[VERSION] = kind, version
        b[BITS] = int(_Bit.INTERRUPTED) if interrupted else 0
        self._send(HEAD_LEN)


class OrderReader:
    """A server's end: rank 0's orders, one at a time, in the order rank 0 made them."""

    def __init__(self, channel: Channel, leader: int, n_workers: int) -> None:
        self.channel = channel
        self.leader = leader
        self.buffer = np.zeros(HEAD_LEN + REPLY_LEN * n_workers, dtype=np.int64)

    def next(self, while_waiting: Optional[Callable[[], Any]] = None,
             moved: Optional[Callable[[], bool]] = None) -> Order:
        """The next order; ``while_waiting()`` runs as the wait tests (a server starting to
        land the pushes already announced), and ``moved()`` says whether those transfers are
        moving (the wait then keeps testing instead of sleeping)."""
        self.buffer[:] = 0  # a short order leaves the slots past its end at zero
        request = self.channel.irecv_header(self.buffer, self.leader, Tag.ORDER)
        got = self.channel.until_received(request, self.buffer.itemsize, while_waiting, moved)
        if got < HEAD_LEN:
            raise ProtocolError("a short order from rank 0")
        return Order(self.buffer)


