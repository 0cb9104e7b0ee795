"""Wire protocol: message tags, operations, reply statuses and the fixed int64 header."""
from __future__ import annotations

import enum
import struct

import numpy as np

__all__ = ["Tag", "Op", "Field", "Flag", "Status", "HEADER_LEN", "new_header", "fill_header",
           "float_bits", "float_of"]


class Tag(enum.IntEnum):
    """MPI tags; one per kind of message so frames never match a header's receive."""

    REQUEST = 11  # worker → server: header of a pull, push or done
    PUSH = 12  # worker → server: gradient frames of a push
    REPLY = 13  # server → worker: header answering a pull
    WEIGHTS = 14  # server → worker: weight frames of a pull
    CONTROL = 15  # either way: small pickled objects (final stats), never on the hot path
    ACT = 16  # pipeline stage k → k+1: a micro-batch's activations
    ACT_GRAD = 17  # pipeline stage k+1 → k: the gradient of those activations
    ORDER = 18  # rank 0 → the other servers: what to do with the next request (orders.py)
    RANGE = 19  # another server → rank 0: its range of the weights (evaluation, the result)
    SPARSE_IDS = 20  # worker → server: a request's row ids of its push and its pull
    SPARSE_ROWS = 21  # worker → server: a push's gradient rows (psframe.sparse)
    SPARSE_PULL = 22  # server → worker: the rows a pull asked for


class Op(enum.IntEnum):
    PULL = 1
    PUSH = 2
    DONE = 3
    PUSH_PULL = 4  # a push, then the pull of the worker's next step: one request per step


class Status(enum.IntEnum):
    """Carried in a REPLY header: whether weights follow or the worker must stop."""

    OK = 0
    STOP = 1  # no more work for this worker (dynamic dispatch ran out of batches)
    INTERRUPT = 2  # the run was interrupted (SIGINT/SIGTERM); in a PULL: please stop


class Field(enum.IntEnum):
    """Slots of the fixed int64 header; LOSS holds a float64 by bit pattern."""

    OP = 0
    WORKER = 1
    CLOCK = 2  # steps this worker has completed (a push carries the clock it computed at)
    SHARD_LO = 3
    SHARD_HI = 4
    COUNT = 5  # payload elements that follow, so the receiver can check the size
    VERSION = 6  # server version the weights came from (pull reply) or were pulled at (push)
    LOSS = 7
    SAMPLES = 8
    STATUS = 9
    BATCH = 10  # dynamic dispatch: the batch a pull reply assigns, and a push trained on
    FLAGS = 11  # a push's Flag bits


class Flag(enum.IntFlag):
    """Bits of a push's FLAGS field."""

    NON_FINITE = 1  # the worker found its whole gradient non-finite
    # The worker checked its whole gradient and found it finite: a server may apply each
    # frame as it lands, before the rest of the push is there (ParameterServer streams it).
    FINITE = 2


HEADER_LEN = len(Field)


def new_header() -> np.ndarray:
    return np.zeros(HEADER_LEN, dtype=np.int64)


def float_bits(value: float) -> int:
    """The int64 that holds float64 ``value`` bit for bit (a header's LOSS field, an
    order's scale, weight and compensation)."""
    return struct.unpack("=q", struct.pack("=d", value))[0]


def float_of(bits: int) -> float:
    """The float64 whose bits an int64 field holds (see float_bits)."""
    return struct.unpack("=d", struct.pack("=q", bits))[0]


def fill_header(header: np.ndarray, op: int, worker: int, clock: int, lo: int, hi: int,
                count: int, version: int, loss: float, samples: int, status: int, batch: int,
                flags: int = 0) -> None:
    """Every field at once, in Field order: one write instead of twelve, on every step."""
    header[:] = (op, worker, clock, lo, hi, count, version, float_bits(loss), samples, status,
                 batch, flags)


assert [f.name for f in Field] == ["OP", "WORKER", "CLOCK", "SHARD_LO", "SHARD_HI", "COUNT",
                                   "VERSION", "LOSS", "SAMPLES", "STATUS", "BATCH", "FLAGS"], \
    "fill_header writes the fields in this order"
