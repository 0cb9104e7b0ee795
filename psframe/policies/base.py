"""The policy contract: Policy (a user's config), PolicyState (its per-run state machine) and
PushDecision (the instruction the server carries out). No MPI here.

Every state answers three events: ``pull(worker, clock)`` (answer now, or hold), ``push(worker,
clock, pulled_version, accepted)`` and ``finish(worker)``, the last two returning a
PushDecision. ``clock`` is the number of steps the worker has completed; ``version`` counts
the updates the server has applied. Each state also records, for every pull it answers, the
clock gap (puller's clock minus the slowest unfinished worker's clock).

A new policy subclasses Policy (``state`` builds its state; the capabilities below say what
the runtime may rely on) and PolicyState (``may_answer`` and ``push``, calling ``count_push``
first; the base class keeps the clocks, the held pulls and the gaps).
"""
from __future__ import annotations

import math
import numbers
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol, Sequence, Set, Tuple

from ..errors import ProtocolError

if TYPE_CHECKING:
    from typing import Self

__all__ = ["Policy", "PolicyState", "AnyPolicyState", "PushDecision", "positive_number"]


class AnyPolicyState(Protocol):
    """What the runtime reads and calls on a policy's state: a PolicyState, or a state that
    hands on to one (psframe.policies.mixed.MixedState). Named here so that this contract
    needs no import of the policies built on it."""

    n_workers: int
    version: int
    clocks: List[int]
    done: Set[int]
    held: Dict[int, int]
    gaps: "Counter[int]"

    def pull(self, worker: int, clock: int) -> bool: ...

    def push(self, worker: int, clock: int, pulled_version: int,
             accepted: bool = True) -> "PushDecision": ...

    def finish(self, worker: int) -> "PushDecision": ...

    def restore(self, version: int, clocks: Sequence[int]) -> Any: ...


@dataclass(frozen=True)
class PushDecision:
    """What the server does after one event.

    ``accumulate``: keep this gradient for the step being gathered.
    ``complete``: the gathered step is whole; its gradient is the sum times ``scale`` (the
    mean of those accepted).
    ``apply``: apply this gradient alone, now.
    ``weight``: how much of one optimizer step this update is (see ``Optimizer.apply``).
    ``compensation``: the DelayCompensation to correct this gradient with, or None.
    ``drop``: discard this gradient (it came too late); counted in updates_dropped.
    ``staleness``: server version when applied minus the version the gradient was computed on.
    ``release``: workers whose held pulls may now be answered.
    """

    accumulate: bool = False
    complete: bool = False
    apply: bool = False
    drop: bool = False
    scale: float = 1.0
    weight: float = 1.0
    compensation: Any = None
    staleness: int = 0
    release: Tuple[int, ...] = ()

    # The instructions by name: what a policy's push() usually returns.
    @classmethod
    def nothing(cls, release: Sequence[int] = ()) -> PushDecision:
        """Do nothing with this gradient (a rejected push), answer the released pulls."""
        return cls(release=tuple(release))

    @classmethod
    def gather(cls, release: Sequence[int] = ()) -> PushDecision:
        """Keep this gradient for the step being gathered."""
        return cls(accumulate=True, release=tuple(release))

    @classmethod
    def step(cls, scale: float, weight: float = 1.0, accumulate: bool = True,
             release: Sequence[int] = ()) -> PushDecision:
        """The gathered step is whole (with this gradient, if ``accumulate``): apply the sum
        of its gradients times ``scale``, as ``weight`` of one optimizer step."""
        return cls(accumulate=accumulate, complete=True, scale=scale, weight=weight,
                   release=tuple(release))

    @classmethod
    def apply_now(cls, weight: float = 1.0, staleness: int = 0, compensation: Any = None,
                  release: Sequence[int] = ()) -> PushDecision:
        """Apply this gradient alone, now, as ``weight`` of one optimizer step."""
        return cls(apply=True, weight=weight, staleness=staleness, compensation=compensation,
                   release=tuple(release))

    @classmethod
    def discard(cls, release: Sequence[int] = ()) -> PushDecision:
        """Drop this gradient (it came too late); counted in updates_dropped."""
        return cls(drop=True, release=tuple(release))


def positive_number(value: Any) -> bool:
    """A real, finite number above 0 (and not a bool)."""
    # typeshed's numbers.Real declares only < and <=; every concrete real also has >.
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and math.isfinite(value) and value > 0)  # type: ignore[operator]


class Policy:
    """A user-facing policy: a small immutable config that builds a fresh state per run.

    Capabilities, which the runtime asks and never infers from the class: ``lockstep``,
    ``updates_per_round`` and ``keeps_sent_weights``. The defaults promise nothing, so a new
    policy is safe until it claims more.
    """

    name: str = "policy"

    @property
    def lockstep(self) -> bool:
        """Lockstep: no update runs while any worker computes, and every worker stops at the
        same step. Then workers on the server's node may read its weights in place, and a
        stopped run resumes exactly. Only a policy whose every update waits for a gradient
        from every worker may claim it (a subclass may also set ``lockstep = True``)."""
        return False

    def state(self, n_workers: int, version: int = 0) -> AnyPolicyState:
        raise NotImplementedError

    def validate(self, n_workers: int) -> None:
        """Raise ValueError if this policy cannot run with ``n_workers``."""

    def updates_per_round(self, n_workers: int) -> Optional[int]:
        """Updates per round of one gradient from every worker (None: it depends on timing);
        gives the progress bar its total."""
        return None

    def keeps_sent_weights(self) -> bool:
        """Whether the server must keep the weights it sent each worker (delay compensation)."""
        return False

    def describe(self, n_workers: int) -> str:
        """How each applied update is weighted and compensated, in words."""
        return "weights as the policy's decisions set them"

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)


class PolicyState:
    """Bookkeeping every policy shares: clocks, finished workers, held pulls, clock gaps."""

    def __init__(self, n_workers: int, version: int = 0) -> None:
        self.n_workers = n_workers
        self.version = version
        self.clocks = [0] * n_workers
        self.done: Set[int] = set()
        self.held: Dict[int, int] = {}  # worker -> clock of its held pull: the one record of it
        self.gaps: Counter[int] = Counter()

    def adopt(self, previous: AnyPolicyState) -> Self:
        """Continue from another state's clocks (a Mixed phase switch)."""
        self.version = previous.version
        self.clocks = list(previous.clocks)
        self.done = set(previous.done)
        self.gaps = previous.gaps
        return self

    def restore(self, version: int, clocks: Sequence[int]) -> Self:
        """Continue a checkpointed run: its update count and each worker's clock."""
        self.version = version
        self.clocks = list(clocks)
        if hasattr(self, "start_version"):
            self.start_version = version
        return self

    @property
    def max_clock_gap(self) -> int:
        return max(self.gaps, default=0)

    def slowest_clock(self) -> int:
        active = [c for w, c in enumerate(self.clocks) if w not in self.done]
        return min(active) if active else max(self.clocks)

    def pull(self, worker: int, clock: int) -> bool:
        if worker in self.done or clock != self.clocks[worker]:
            raise ProtocolError(
                f"worker {worker} pulled at clock {clock}, but has completed "
                f"{self.clocks[worker]} steps" + (" and finished" if worker in self.done else "")
            )
        if self.may_answer(worker, clock):
            self._answered(worker, clock)
            return True
        self.held[worker] = clock
        return False

    def finish(self, worker: int) -> PushDecision:
        self.done.add(worker)
        self.held.pop(worker, None)
        return self.after_finish(worker)

    def count_push(self, worker: int, clock: int) -> None:
        """Advance ``worker``'s clock past step ``clock``; every push() calls it first (it
        refuses a push out of order, or from a finished worker)."""
        if worker in self.done or clock != self.clocks[worker]:
            raise ProtocolError(
                f"worker {worker} pushed for step {clock}, but has completed {self.clocks[worker]}"
            )
        self.clocks[worker] = clock + 1

    _count_push = count_push  # its name before it was public: policies written then still run

    def _answered(self, worker: int, clock: int) -> None:
        self.gaps[clock - self.slowest_clock()] += 1

    def releasable(self) -> Tuple[int, ...]:
        """Answer every held pull the state now allows; returns those workers."""
        out = []
        for w, clock in sorted(self.held.items()):
            if self.may_answer(w, clock):
                out.append(w)
        for w in out:
            del self.held[w]
            self._answered(w, self.clocks[w])
        return tuple(out)

    # Subclasses decide these.
    def may_answer(self, worker: int, clock: int) -> bool:
        """Whether ``worker``'s pull for step ``clock`` may be answered now."""
        raise NotImplementedError

    def push(self, worker: int, clock: int, pulled_version: int,
             accepted: bool = True) -> PushDecision:
        """``worker`` pushed its gradient of step ``clock``, computed on weights of version
        ``pulled_version``; ``accepted`` is False when the server refused it (non-finite)."""
        raise NotImplementedError

    def after_finish(self, worker: int) -> PushDecision:
        return PushDecision.nothing(self.releasable())
