"""Which pushes are applied as they land ($PSFRAME_STREAM), and waiting for their frames."""
import pytest
from mpi4py import MPI

from psframe import env
from psframe.params import ParamLayout
from psframe.transport import Channel
from psframe.transport.links import streams_between as _streams


@pytest.mark.parametrize("value, expected", [(None, "remote"), ("", "remote"),
                                             ("always", "always"), ("never", "never")])
def test_stream_setting(value, expected):
    assert env.stream({} if value is None else {env.STREAM: value}) == expected


def test_bad_stream_setting_says_what_is_allowed():
    with pytest.raises(ValueError, match="PSFRAME_STREAM must be one of remote, always, never; "
                                         "got 'sometimes'"):
        env.stream({env.STREAM: "sometimes"})


# Ranks 0 and 1 share a node; rank 2 is on another.
@pytest.mark.parametrize("mode, nodes, peer, expected", [
    ("remote", [0, 0, 2], 1, False), ("remote", [0, 0, 2], 2, True),
    ("always", [0, 0, 2], 1, True), ("never", [0, 0, 2], 2, False),
    ("remote", None, 2, False),  # nodes not counted: nothing is known to be remote
    ("always", None, 1, True),
])
def test_which_peers_stream(monkeypatch, mode, nodes, peer, expected):
    monkeypatch.setenv(env.STREAM, mode)
    channel = Channel(MPI.COMM_SELF, ParamLayout({"w": (8,)}))  # rank 0
    assert _streams(channel, nodes, peer) is expected


class Landing:
    """A receive that completes after ``polls`` status checks, and is never freed by them."""

    def __init__(self, polls):
        self.polls = polls

    def Get_status(self):  # noqa: N802 - mpi4py's name
        self.polls -= 1
        return self.polls < 0


def test_await_frames_returns_once_the_needed_ones_landed_leaving_the_rest():
    channel = Channel(MPI.COMM_SELF, ParamLayout({"w": (8,)}))
    needed, later = Landing(5), Landing(10 ** 9)
    channel.await_frames([needed], [needed, later])
    assert needed.Get_status()  # complete, and still there to be freed by a later wait
    assert not later.Get_status()
