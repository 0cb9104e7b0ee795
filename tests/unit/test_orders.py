"""Orders: what rank 0 tells the other servers survives the int64 buffer exactly."""
import numpy as np
import pytest

from psframe.policies import DelayCompensation, PushDecision
from psframe.server.orders import Kind, Order, OrderWriter


class Capture:
    """A channel that keeps what it is asked to send."""

    def __init__(self):
        self.sent = []

    def send_header(self, buffer, dest, tag):
        self.sent.append((dest, buffer.copy()))


@pytest.mark.parametrize("decision", [
    None,
    PushDecision.gather(),
    PushDecision.step(0.25, 0.5, accumulate=True, release=(0, 2)),
    PushDecision.apply_now(1 / 3, staleness=4, compensation=DelayCompensation(0.7, decay=0.9)),
    PushDecision.apply_now(0.1, staleness=1,
                           compensation=DelayCompensation(2.0, adaptive=False)),
    PushDecision.discard(),
])
def test_a_request_order_carries_the_decision_and_the_replies(decision):
    channel = Capture()
    writer = OrderWriter(channel, [1, 2], n_workers=3)
    replies = [(0, 0, 7, 11), (2, 2, 7, 0)]
    writer.request(2, 4, decision, replies)
    assert [dest for dest, _ in channel.sent] == [1, 2]
    order = Order(np.pad(channel.sent[0][1], (0, 4)))  # what a reader's longer buffer holds
    assert order.kind == Kind.REQUEST and (order.worker, order.op) == (2, 4)
    assert order.replies == replies
    got, want = order.decision, decision or PushDecision()
    for field in ("accumulate", "complete", "apply", "drop", "scale", "weight", "staleness"):
        assert getattr(got, field) == getattr(want, field), field
    if want.compensation is None:
        assert got.compensation is None
    else:
        c, w = got.compensation, want.compensation
        assert (c.lam, c.adaptive, c.decay) == (w.lam, w.adaptive, w.decay)
    assert got.release == ()  # the replies say whom to answer, with rank 0's status


def test_plain_orders_carry_their_version_and_the_stop():
    channel = Capture()
    writer = OrderWriter(channel, [1], n_workers=2)
    writer.request(1, 4, PushDecision.step(0.5), [(0, 0, 1, 0), (1, 0, 1, 0)])
    writer.plain(Kind.CHECKPOINT, version=40)
    order = Order(channel.sent[-1][1])
    assert order.kind == Kind.CHECKPOINT and order.version == 40 and order.replies == []
    writer.plain(Kind.END, interrupted=True)
    assert Order(channel.sent[-1][1]).interrupted
