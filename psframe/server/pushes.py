"""A push's life on a server, as one object with explicit states, and the book of them."""
from __future__ import annotations

import enum
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Set, Tuple

from ..errors import ProtocolError
from ..transport import Landing

__all__ = ["PushState", "Push", "PushBook"]


class PushState(enum.Enum):
    ANNOUNCED = "announced"  # its header is here; its receives are posted
    LANDING = "landing"  # its frames are arriving (a streamed push is handled meanwhile)
    LANDED = "landed"  # every frame is in and checked: the policy decides on it
    GATHERED = "gathered"  # kept for the step being gathered (Sync): a later update reads it
    READ = "read"  # an update has read it
    FREED = "freed"  # its slot may take the worker's next push


class Push:
    """One worker's push at one server: its header's fields, the frames landing into its
    slot (``landing``; None where nothing moves: the shared window), and its state.

    A streamed push (``streamed``) is decided at its header and applied frame by frame as
    it lands: the update that reads it waits for each frame (``await_frame``), whose check
    ``check_frame`` is (the inbox's). Any other push is handled once it has landed whole.
    """

    def __init__(self, worker: int, fields: List[int], landing: Optional[Landing],
                 streamed: bool, check_frame: Callable[[int, int, int], None]) -> None:
        self.worker = worker
        self.fields = fields
        self.landing = landing
        self.streamed = streamed
        self.check_frame = check_frame  # (worker, start, stop): raises on a bad frame
        self.state = PushState.ANNOUNCED if landing is None else PushState.LANDING

    def __repr__(self) -> str:
        return f"Push(worker={self.worker}, {self.state.value}, streamed={self.streamed})"

    def has_landed(self) -> bool:
        """Whether every frame is in (always, where nothing moves)."""
        return self.landing is None or self.landing.done()

    def moved(self) -> int:
        """Frames landed so far (whether its transfer is still moving)."""
        return self.landing.count_done() if self.landing is not None else 0

    def await_frame(self, i: int, watched: Sequence[Landing]) -> None:
        """Frame i landed and checked (a streamed push read by an update). ``watched``: the
        landings of the pushes the update reads, tested without a pause while any lands."""
        assert self.landing is not None
        a, b = self.landing.wait_frame(i, watched)
        self.check_frame(self.worker, a, b)

    def finish_landing(self) -> None:
        """Wait for every frame still arriving (a streamed push that no update reads, or one
        read whole), then free its slot."""
        if self.landing is not None and self.state is not PushState.FREED:
            self.landing.wait()
        self.state = PushState.FREED


class PushBook:
    """Every push a server holds, from its header to its slot's release, and the requests
    ready to handle, in the order they got ready.

    - ``ready``: (worker, fields, push or None) of requests to handle: a pull or DONE as soon
      as its header is here, a push once it has landed (a streamed one at once).
    - ``pushes``: each worker's latest push not yet freed.
    - ``awaiting``: the workers whose pull awaits its reply (the wire's state, not the
      policy's: a policy releasing a worker that asked for nothing fails loudly instead of
      desynchronizing it).
    """

    def __init__(self) -> None:
        self.ready: List[Tuple[int, List[int], Optional[Push]]] = []
        self.pushes: Dict[int, Push] = {}
        self.arriving: Dict[int, Push] = {}  # pushes to hand on once landed whole
        self.awaiting: Set[int] = set()
        self._landed_frames = 0

    # -- landing ----------------------------------------------------------------------------
    def make_room(self, worker: int, clock: int) -> None:
        """Before worker's next push is posted: its last one must be applied or dropped."""
        last = self.pushes.get(worker)
        if last is None:
            return
        if last.state is PushState.GATHERED:
            # Its slot (or shared segment) still holds a gradient a later update will read.
            # No shipped policy answers a pull before using the gradient it follows, so this
            # is a policy bug; refusing it keeps the pending gradient from being overwritten.
            raise ProtocolError(f"worker {worker} pushed step {clock} before its previous "
                                "gradient was applied or dropped")
        if last.streamed:  # its frames go first into the slot the next one takes
            last.finish_landing()
        del self.pushes[worker]

    def add(self, push: Push) -> None:
        """A push whose header is here: the worker's latest."""
        self.pushes[push.worker] = push

    def queue(self, worker: int, fields: List[int], push: Optional[Push]) -> None:
        """A request to handle (rank 0's loop): a pull, DONE or a streamed push now, any
        other push once it has landed whole (poll)."""
        if push is None or push.streamed:
            self.ready.append((worker, fields, push))
        else:
            self.arriving[worker] = push

    def landing(self) -> List[int]:
        """Workers whose push is still arriving: announced ones not yet ready, and streamed
        ones not yet landed whole."""
        return sorted({*self.arriving, *(w for w, p in self.pushes.items()
                                         if p.streamed and p.state is not PushState.FREED
                                         and not p.has_landed())})

    def poll(self) -> bool:
        """Hand on the pushes that have landed whole; whether a request is ready."""
        for worker, push in list(self.arriving.items()):
            if push.has_landed():
                del self.arriving[worker]
                self.ready.append((worker, push.fields, push))
        return bool(self.ready)

    def moved(self, landing: Optional[Iterable[Optional[Push]]] = None) -> bool:
        """Whether a frame of a push being landed (``landing``; default: those to hand on
        once landed) completed since the last call."""
        pushes = self.arriving.values() if landing is None else landing
        done = sum(p.moved() for p in pushes if p is not None)
        moved = done > self._landed_frames
        self._landed_frames = done
        return moved

    # -- decisions --------------------------------------------------------------------------
    def gather(self, worker: int) -> None:
        self.pushes[worker].state = PushState.GATHERED

    def gathered(self, workers: Sequence[int]) -> List[int]:
        """Which of ``workers`` have a push kept for the step, in worker order."""
        return sorted(w for w in workers if self.is_gathered(w))

    def is_gathered(self, worker: int) -> bool:
        push = self.pushes.get(worker)
        return push is not None and push.state is PushState.GATHERED

    def drop(self, worker: int) -> None:
        push = self.pushes.pop(worker, None)
        if push is not None:
            push.finish_landing()

    def read_by_update(self, workers: Sequence[int]) -> List[Push]:
        """The pushes of ``workers`` an update reads; marked read."""
        pushes = [self.pushes[w] for w in workers]
        for p in pushes:
            p.state = PushState.READ
        return pushes

    def answered(self, worker: int, reads: Sequence[Push]) -> None:
        """Worker's pull is answered: it may push again, so a streamed push of its that the
        update does not read must have landed first."""
        if worker not in self.awaiting:
            raise ProtocolError(f"the policy released worker {worker}'s pull, but it has none "
                                "waiting")
        self.awaiting.discard(worker)
        push = self.pushes.get(worker)
        if push is not None and push.streamed and push not in reads:
            push.finish_landing()

    def freed(self, reads: Sequence[Push]) -> None:
        """An update has read ``reads`` whole: their slots are free."""
        for p in reads:
            p.state = PushState.FREED
            if self.pushes.get(p.worker) is p:
                del self.pushes[p.worker]

    def finish_all(self) -> None:
        """At the end: none is left unless a policy forgot a push; let those land."""
        for push in list(self.pushes.values()):
            if push.streamed:
                push.finish_landing()

    def gathering(self) -> List[int]:
        return sorted(w for w, p in self.pushes.items() if p.state is PushState.GATHERED)
