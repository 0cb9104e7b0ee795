"""Mixed: phases of policies switched on the fly, e.g. Sync for K updates, then Async."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, List, Optional, Sequence, Tuple

from .base import AnyPolicyState, Policy, PolicyState, PushDecision
from .on_arrival import Async
from .single_spec import single_policy_from_spec, spec_name
from .sync import Sync

if TYPE_CHECKING:
    from typing import Self

# A phase: how many updates it lasts (None: to the end of the run), and its policy.
Phase = Tuple[Optional[int], Policy]

__all__ = ["Mixed", "MixedState"]


class Mixed(Policy):
    """Phases of policies switched on the fly: ``Mixed(sync_steps=K, then=Async())`` runs Sync
    for the first K updates, then ``then``. ``Mixed([(K1, p1), (K2, p2), (None, p3)])`` chains
    any number of phases; a phase's length counts the updates applied during it."""

    name = "mixed"

    def __init__(self, phases: Optional[Sequence[Tuple[Optional[int], Any]]] = None, *,
                 sync_steps: Optional[int] = None, then: Any = None) -> None:
        if phases is None:
            if sync_steps is None:
                raise ValueError("Mixed needs sync_steps=K (and then=...) or a list of phases")
            phases = [(sync_steps, Sync()), (None, then if then is not None else Async())]
        checked: List[Phase] = [(n, _phase_policy(p)) for n, p in phases]
        if not checked:
            raise ValueError("Mixed needs at least one phase")
        for i, (n, p) in enumerate(checked):
            last = i == len(checked) - 1
            if not last and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"phase {i} of Mixed needs a length >= 1, got {n!r}")
            if isinstance(p, Mixed):
                raise ValueError("Mixed phases cannot themselves be Mixed")
        self.phases = checked

    def validate(self, n_workers: int) -> None:
        for _, p in self.phases:
            p.validate(n_workers)

    def state(self, n_workers: int, version: int = 0) -> MixedState:
        return MixedState(n_workers, self.phases, version)

    def keeps_sent_weights(self) -> bool:
        return any(p.keeps_sent_weights() for _, p in self.phases)

    def describe(self, n_workers: int) -> str:
        return "; then ".join(f"{p.name}: {p.describe(n_workers)}" for _, p in self.phases)

    def __repr__(self) -> str:
        if len(self.phases) == 2 and self.phases[0][1] == Sync():
            return f"Mixed(sync_steps={self.phases[0][0]}, then={self.phases[1][1]!r})"
        return f"Mixed({[(n, p) for n, p in self.phases]!r})"


class MixedState:
    """Delegates to the current phase's state; switches when the phase's updates are done."""

    def __init__(self, n_workers: int, phases: Sequence[Phase], version: int = 0) -> None:
        self.phases = phases
        self.phase = 0
        self.inner: AnyPolicyState = phases[0][1].state(n_workers, version)
        self.phase_start = version
        self.switches: List[int] = []  # versions at which each later phase began

    def restore(self, version: int, clocks: Sequence[int]) -> Self:
        """Re-enter the phase that was running at ``version``, then restore its state."""
        start = 0
        for i, (length, policy) in enumerate(self.phases):
            if length is None or version < start + length or i == len(self.phases) - 1:
                break
            start += length
            self.switches.append(start)
        self.phase, self.phase_start = i, start
        self.inner = policy.state(self.inner.n_workers).restore(version, clocks)
        return self

    def __getattr__(self, name: str) -> Any:  # version, clocks, gaps, max_clock_gap, ...
        return getattr(self.inner, name)

    def pull(self, worker: int, clock: int) -> bool:
        return self.inner.pull(worker, clock)

    def push(self, worker: int, clock: int, pulled_version: int,
             accepted: bool = True) -> PushDecision:
        return self._maybe_switch(self.inner.push(worker, clock, pulled_version, accepted))

    def finish(self, worker: int) -> PushDecision:
        return self._maybe_switch(self.inner.finish(worker))

    def _maybe_switch(self, decision: PushDecision) -> PushDecision:
        length = self.phases[self.phase][0]
        if length is None or self.inner.version - self.phase_start < length:
            return decision
        # Phase over: the next state takes the clocks and re-decides the pulls still held.
        old = self.inner
        self.phase += 1
        new = self.phases[self.phase][1].state(old.n_workers)
        assert isinstance(new, PolicyState)  # a phase is one policy, never a Mixed
        self.inner = new.adopt(old)
        self.phase_start = old.version
        self.switches.append(old.version)
        release = list(decision.release)
        for w, clock in sorted(old.held.items()):
            if self.inner.pull(w, clock):
                release.append(w)
        return PushDecision(**{**vars(decision), "release": tuple(release)})


def _phase_policy(p: Any) -> Policy:
    """A phase's Policy, from an instance or a spec of one policy."""
    if isinstance(p, str) and spec_name(p) == "mixed":
        raise ValueError("Mixed phases cannot themselves be Mixed")
    policy = single_policy_from_spec(p)
    if getattr(policy, "name", None) == "hybrid":
        # The rows' treatment is the run's, not a phase's: Mixed would drop it silently.
        raise ValueError("a Mixed phase cannot be a Hybrid; use Hybrid(dense=Mixed(...))")
    return policy
