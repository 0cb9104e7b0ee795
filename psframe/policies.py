"""Update policies as pure state machines: they decide, the server carries out; no MPI here.

Every state answers three events: ``pull(worker, clock)`` (answer now, or hold), ``push(worker,
clock, pulled_version, accepted)`` and ``finish(worker)``, the last two returning a
PushDecision. ``clock`` is the number of steps the worker has completed; ``version`` counts
the updates the server has applied. Each state also records, for every pull it answers, the
clock gap (puller's clock minus the slowest unfinished worker's clock).
"""
from collections import Counter
from dataclasses import dataclass

from .errors import ProtocolError

__all__ = ["Policy", "Sync", "Async", "SSP", "Mixed", "PushDecision", "policy_from_spec"]


@dataclass(frozen=True)
class PushDecision:
    """What the server does after one event.

    ``accumulate``: keep this gradient for the step being gathered.
    ``complete``: the gathered step is whole; apply the sum of its gradients times ``scale``.
    ``apply``: apply this gradient alone, now, with step size lr * ``lr_scale``.
    ``drop``: discard this gradient (it came too late); counted in updates_dropped.
    ``staleness``: server version when applied minus the version the gradient was computed on.
    ``release``: workers whose held pulls may now be answered.
    """

    accumulate: bool = False
    complete: bool = False
    apply: bool = False
    drop: bool = False
    scale: float = 1.0
    lr_scale: float = 1.0
    staleness: int = 0
    release: tuple = ()


class Policy:
    """A user-facing policy: a small immutable config that builds a fresh state per run."""

    name = "policy"

    def state(self, n_workers, version=0):
        raise NotImplementedError

    def validate(self, n_workers):
        """Raise ValueError if this policy cannot run with ``n_workers``."""

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)


class PolicyState:
    """Bookkeeping every policy shares: clocks, finished workers, held pulls, clock gaps."""

    def __init__(self, n_workers, version=0):
        self.n_workers = n_workers
        self.version = version
        self.clocks = [0] * n_workers
        self.done = set()
        self.held = {}  # worker -> clock of its held pull
        self.gaps = Counter()

    def adopt(self, previous):
        """Continue from another state's clocks (a Mixed phase switch)."""
        self.version = previous.version
        self.clocks = list(previous.clocks)
        self.done = set(previous.done)
        self.gaps = previous.gaps
        return self

    def restore(self, version, clocks):
        """Continue a checkpointed run: its update count and each worker's clock."""
        self.version = version
        self.clocks = list(clocks)
        if hasattr(self, "start_version"):
            self.start_version = version
        return self

    @property
    def max_clock_gap(self):
        return max(self.gaps, default=0)

    def slowest_clock(self):
        active = [c for w, c in enumerate(self.clocks) if w not in self.done]
        return min(active) if active else max(self.clocks)

    def pull(self, worker, clock):
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

    def finish(self, worker):
        self.done.add(worker)
        self.held.pop(worker, None)
        return self.after_finish(worker)

    def _count_push(self, worker, clock):
        if worker in self.done or clock != self.clocks[worker]:
            raise ProtocolError(
                f"worker {worker} pushed for step {clock}, but has completed {self.clocks[worker]}"
            )
        self.clocks[worker] = clock + 1

    def _answered(self, worker, clock):
        self.gaps[clock - self.slowest_clock()] += 1

    def releasable(self):
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
    def may_answer(self, worker, clock):
        raise NotImplementedError

    def push(self, worker, clock, pulled_version, accepted=True):
        raise NotImplementedError

    def after_finish(self, worker):
        return PushDecision(release=self.releasable())


# -- Sync ----------------------------------------------------------------------------------------
class Sync(Policy):
    """Bulk synchronous: one update per global step, the mean of that step's gradients.

    With ``backup=k`` a step is applied once the first N-k gradients arrive; gradients for an
    already-applied step come too late and are dropped (Chen et al. 2016, backup workers).
    """

    name = "sync"

    def __init__(self, backup=0):
        if isinstance(backup, bool) or not isinstance(backup, int) or backup < 0:
            raise ValueError(f"Sync(backup=k) needs an integer k >= 0, got {backup!r}")
        self.backup = backup

    def validate(self, n_workers):
        if self.backup >= n_workers:
            raise ValueError(
                f"Sync(backup={self.backup}) needs more than {self.backup} workers, got {n_workers}"
            )

    def state(self, n_workers, version=0):
        return SyncState(n_workers, self.backup, version)

    def updates_per_round(self, n_workers):
        """Updates per round of one gradient from every worker (None: it depends on timing)."""
        return None if self.backup else 1

    def __repr__(self):
        return f"Sync(backup={self.backup})" if self.backup else "Sync()"


class SyncState(PolicyState):
    """A step gathers one gradient per worker; pulls wait while their worker has given one."""

    def __init__(self, n_workers, backup=0, version=0):
        super().__init__(n_workers, version)
        self.backup = backup
        self.start_version = version  # pushes computed before a phase switch join the first step
        self.arrived = set()
        self.n_accepted = 0

    def adopt(self, previous):
        super().adopt(previous)
        self.start_version = self.version
        return self

    def may_answer(self, worker, clock):
        return worker not in self.arrived

    def push(self, worker, clock, pulled_version, accepted=True):
        self._count_push(worker, clock)
        if self.start_version <= pulled_version < self.version:
            # Its step was applied without it: a backup worker's late gradient.
            return PushDecision(drop=True, release=self.releasable())
        if worker in self.arrived:
            raise ProtocolError(f"worker {worker} pushed twice for step {self.version}")
        self.arrived.add(worker)
        self.n_accepted += int(accepted)
        return self._maybe_complete(accumulate=accepted)

    def after_finish(self, worker):
        return self._maybe_complete(accumulate=False)

    def _needed(self):
        able = self.n_workers - len(self.done - self.arrived)
        return max(1, min(self.n_workers - self.backup, able))

    def _maybe_complete(self, accumulate):
        if not self.arrived or len(self.arrived) < self._needed():
            return PushDecision(accumulate=accumulate, release=self.releasable())
        scale = 1.0 / self.n_accepted if self.n_accepted else 0.0
        self.version += 1
        self.arrived.clear()
        self.n_accepted = 0
        return PushDecision(accumulate=accumulate, complete=True, scale=scale,
                            release=self.releasable())


# -- Async and SSP -------------------------------------------------------------------------------
class Async(Policy):
    """Asynchronous: every gradient is applied on arrival; with ``staleness_lr`` an update of
    staleness τ uses step size lr / max(1, τ)."""

    name = "async"

    def __init__(self, staleness_lr=False):
        self.staleness_lr = bool(staleness_lr)

    def state(self, n_workers, version=0):
        return ApplyOnArrival(n_workers, bound=None, staleness_lr=self.staleness_lr,
                              version=version)

    def updates_per_round(self, n_workers):
        return n_workers

    def __repr__(self):
        return "Async(staleness_lr=True)" if self.staleness_lr else "Async()"


class SSP(Policy):
    """Stale synchronous parallel (Ho et al. 2013): applied on arrival, but no worker's clock
    runs more than ``staleness`` steps ahead of the slowest worker's."""

    name = "ssp"

    def __init__(self, staleness=2, staleness_lr=False):
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"SSP(staleness=s) needs an integer s >= 0, got {staleness!r}")
        self.staleness = staleness
        self.staleness_lr = bool(staleness_lr)

    def state(self, n_workers, version=0):
        return ApplyOnArrival(n_workers, bound=self.staleness, staleness_lr=self.staleness_lr,
                              version=version)

    def updates_per_round(self, n_workers):
        return n_workers

    def __repr__(self):
        extra = ", staleness_lr=True" if self.staleness_lr else ""
        return f"SSP(staleness={self.staleness}{extra})"


class ApplyOnArrival(PolicyState):
    """Async (no bound) and SSP (a pull for step c waits until min clock >= c - bound)."""

    def __init__(self, n_workers, bound=None, staleness_lr=False, version=0):
        super().__init__(n_workers, version)
        self.bound = bound
        self.staleness_lr = staleness_lr

    def may_answer(self, worker, clock):
        return self.bound is None or clock - self.slowest_clock() <= self.bound

    def push(self, worker, clock, pulled_version, accepted=True):
        self._count_push(worker, clock)
        if not accepted:
            return PushDecision(release=self.releasable())
        staleness = self.version - pulled_version
        if staleness < 0:
            raise ProtocolError(f"worker {worker} pushed from version {pulled_version}, "
                                f"ahead of the server's {self.version}")
        self.version += 1
        lr_scale = 1.0 / max(1, staleness) if self.staleness_lr else 1.0
        return PushDecision(apply=True, lr_scale=lr_scale, staleness=staleness,
                            release=self.releasable())


# -- Mixed ---------------------------------------------------------------------------------------
class Mixed(Policy):
    """Phases of policies switched on the fly: ``Mixed(sync_steps=K, then=Async())`` runs Sync
    for the first K updates, then ``then``. ``Mixed([(K1, p1), (K2, p2), (None, p3)])`` chains
    any number of phases; a phase's length counts the updates applied during it."""

    name = "mixed"

    def __init__(self, phases=None, *, sync_steps=None, then=None):
        if phases is None:
            if sync_steps is None:
                raise ValueError("Mixed needs sync_steps=K (and then=...) or a list of phases")
            phases = [(sync_steps, Sync()), (None, then if then is not None else Async())]
        phases = [(n, policy_from_spec(p)) for n, p in phases]
        if not phases:
            raise ValueError("Mixed needs at least one phase")
        for i, (n, p) in enumerate(phases):
            last = i == len(phases) - 1
            if not last and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"phase {i} of Mixed needs a length >= 1, got {n!r}")
            if isinstance(p, Mixed):
                raise ValueError("Mixed phases cannot themselves be Mixed")
        self.phases = phases

    def validate(self, n_workers):
        for _, p in self.phases:
            p.validate(n_workers)

    def state(self, n_workers, version=0):
        return MixedState(n_workers, self.phases, version)

    def __repr__(self):
        if len(self.phases) == 2 and self.phases[0][1] == Sync():
            return f"Mixed(sync_steps={self.phases[0][0]}, then={self.phases[1][1]!r})"
        return f"Mixed({[(n, p) for n, p in self.phases]!r})"


class MixedState:
    """Delegates to the current phase's state; switches when the phase's updates are done."""

    def __init__(self, n_workers, phases, version=0):
        self.phases = phases
        self.phase = 0
        self.inner = phases[0][1].state(n_workers, version)
        self.phase_start = version
        self.switches = []  # versions at which each later phase began

    def restore(self, version, clocks):
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

    def __getattr__(self, name):  # version, clocks, gaps, max_clock_gap, ...
        return getattr(self.inner, name)

    def pull(self, worker, clock):
        return self.inner.pull(worker, clock)

    def push(self, worker, clock, pulled_version, accepted=True):
        return self._maybe_switch(self.inner.push(worker, clock, pulled_version, accepted))

    def finish(self, worker):
        return self._maybe_switch(self.inner.finish(worker))

    def _maybe_switch(self, decision):
        length = self.phases[self.phase][0]
        if length is None or self.inner.version - self.phase_start < length:
            return decision
        # Phase over: the next state takes the clocks and re-decides the pulls still held.
        old = self.inner
        self.phase += 1
        self.inner = self.phases[self.phase][1].state(old.n_workers).adopt(old)
        self.phase_start = old.version
        self.switches.append(old.version)
        release = list(decision.release)
        for w, clock in sorted(old.held.items()):
            if self.inner.pull(w, clock):
                release.append(w)
        return PushDecision(**{**vars(decision), "release": tuple(release)})


# -- specs ---------------------------------------------------------------------------------------
def _mixed_from_spec(arg):
    k, _, then = arg.partition(":")
    return Mixed(sync_steps=int(k), then=policy_from_spec(then) if then else Async())


_BY_NAME = {
    "sync": lambda arg: Sync(int(arg) if arg else 0),
    "backup": lambda arg: Sync(backup=int(arg or 1)),
    "async": lambda arg: Async(staleness_lr=arg in ("lr", "staleness_lr")),
    "ssp": lambda arg: SSP(int(arg) if arg else 2),
    "mixed": _mixed_from_spec,
}


def policy_from_spec(spec):
    """Policy from a CLI spec; a Policy instance passes through.

    ``sync``, ``sync:1`` or ``backup:1`` (backup workers), ``async``, ``async:lr``
    (staleness-scaled lr), ``ssp:2``, ``mixed:100`` or ``mixed:100:ssp:2``.
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"policy must be a psframe policy such as ps.Sync(), got {spec!r}")
    name, _, arg = spec.strip().lower().partition(":")
    if name not in _BY_NAME:
        raise ValueError(f"unknown policy {spec!r}; choose one of {sorted(_BY_NAME)}")
    try:
        return _BY_NAME[name](arg)
    except ValueError as exc:
        raise ValueError(f"bad policy spec {spec!r}: {exc}") from None
