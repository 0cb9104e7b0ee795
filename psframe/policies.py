"""Update policies as pure state machines: they decide, the server carries out; no MPI here.

Every state answers three events: ``pull(worker, clock)`` (answer now, or hold), ``push(worker,
clock, pulled_version, accepted)`` and ``finish(worker)``, the last two returning a
PushDecision. ``clock`` is the number of steps the worker has completed; ``version`` counts
the updates the server has applied. Each state also records, for every pull it answers, the
clock gap (puller's clock minus the slowest unfinished worker's clock).

Policies that apply gradients on arrival weight each one (``scale=``) so that the optimizer a
user tuned for Sync trains as it does under Sync: see ``push_weight`` and docs/policies.md.
"""
import math
import numbers
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .errors import ProtocolError

__all__ = ["Policy", "Sync", "Async", "SSP", "Mixed", "PushDecision", "DelayCompensation",
           "delay_compensate", "policy_from_spec", "SCALES"]

# How an on-arrival policy weights each push (a positive number is a fixed weight):
#   "auto"       1/N for N workers: a round of N pushes moves the weights as far as one Sync
#                step, whose mean of N gradients is one optimizer step;
#   "staleness"  1/max(1, tau) for an update of staleness tau (``staleness_lr=True``);
#   "none"       every push a full optimizer step: the raw behaviour before weighting.
SCALES = ("auto", "staleness", "none")


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
    compensation: object = None
    staleness: int = 0
    release: tuple = ()


def _positive_number(value):
    return (not isinstance(value, bool) and isinstance(value, numbers.Real)
            and math.isfinite(value) and value > 0)


def _check_scale(scale, staleness_lr, who):
    """The push scale a policy was given, with ``staleness_lr=True`` as "staleness"."""
    if staleness_lr:
        if scale not in ("auto", "staleness"):
            raise ValueError(f"{who}: staleness_lr=True is scale='staleness'; it cannot be "
                             f"combined with scale={scale!r}")
        return "staleness"
    if isinstance(scale, str):
        if scale not in SCALES:
            raise ValueError(f"{who}: scale must be one of {list(SCALES)} or a positive "
                             f"number, got {scale!r}")
        return scale
    if not _positive_number(scale):
        raise ValueError(f"{who}: scale must be one of {list(SCALES)} or a positive number, "
                         f"got {scale!r}")
    return float(scale)


def push_weight(scale, n_workers, staleness):
    """The weight of one on-arrival update under ``scale`` (see SCALES)."""
    if scale == "auto":
        return 1.0 / n_workers
    if scale == "staleness":
        return 1.0 / max(1, staleness)
    if scale == "none":
        return 1.0
    return scale


def describe_scale(scale, n_workers):
    """The weight each push gets, in words, for summary() and stats."""
    if scale == "auto":
        return f"1/{n_workers} per push (auto: 1/N for N={n_workers})"
    if scale == "staleness":
        return "1/max(1, staleness) per push"
    if scale == "none":
        return "1 per push (raw)"
    return f"{scale:g} per push"


class DelayCompensation:
    """Delay-compensated ASGD (Zheng et al. 2017): a gradient g computed on stale weights
    w_stale is corrected towards the current ones w_now with a diagonal approximation of the
    Hessian, g + lam_t * g * g * (w_now - w_stale).

    ``adaptive=True`` (the paper's DC-ASGD-a, the default) uses lam_t = lam / sqrt(MS), where
    MS is a running mean of g * g with decay ``decay``: the correction is then relative to
    the gradient's own scale, so one ``lam`` fits any model. ``adaptive=False`` is DC-ASGD-c,
    a constant lam (its useful size depends on the gradients' magnitude).

    Server cost: one model-sized copy of the weights last sent to each worker (N copies),
    plus MS when adaptive; in time, a copy per answered pull and about seven passes over
    each pushed gradient. A gradient of staleness 0 comes out unchanged (its correction is
    exactly 0), but still enters MS.
    """

    name = "dc"

    def __init__(self, lam=2.0, adaptive=True, decay=0.95):
        for value, what in ((lam, "lam"), (decay, "decay")):
            if not _positive_number(value):
                raise ValueError(f"DelayCompensation({what}) needs a positive finite number, "
                                 f"got {value!r}")
        if decay >= 1:
            raise ValueError(f"DelayCompensation(decay) must be below 1, got {decay!r}")
        self.lam = float(lam)
        self.adaptive = bool(adaptive)
        self.decay = float(decay)

    def describe(self):
        if self.adaptive:
            return f"delay-compensated, adaptive (lambda={self.lam:g}/sqrt(MS), decay {self.decay:g})"
        return f"delay-compensated, constant (lambda={self.lam:g})"

    def __repr__(self):
        if not self.adaptive:
            return f"DelayCompensation(lam={self.lam:g}, adaptive=False)"
        extra = f", decay={self.decay:g}" if self.decay != 0.95 else ""
        return f"DelayCompensation(lam={self.lam:g}{extra})"

    def __eq__(self, other):
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self):
        return hash((type(self), self.lam, self.adaptive, self.decay))


# MS starts at zero; this floor keeps lam / sqrt(MS) finite for elements never seen non-zero.
_MS_EPS = 1e-12


def delay_compensate(g, w_now, w_stale, comp, out, mean_square=None, scratch=None):
    """``out = g + lam_t * g * g * (w_now - w_stale)`` for DelayCompensation ``comp``, in
    ``out`` without temporaries. Adaptive: ``mean_square`` (MS) is first updated with g in
    place, and ``scratch`` (len(g)) holds sqrt(MS)."""
    np.subtract(w_now, w_stale, out=out)
    out *= g
    out *= g
    if comp.adaptive:
        np.multiply(g, g, out=scratch)
        scratch *= 1.0 - comp.decay
        mean_square *= comp.decay
        mean_square += scratch
        np.sqrt(mean_square, out=scratch)
        scratch += _MS_EPS
        out /= scratch
    out *= comp.lam
    out += g
    return out


def _check_compensation(compensation, who):
    if compensation is None or isinstance(compensation, DelayCompensation):
        return compensation
    if compensation == "dc":
        return DelayCompensation()
    if compensation == "dc-c":
        return DelayCompensation(0.04, adaptive=False)
    raise ValueError(f"{who}: compensation must be None, 'dc', 'dc-c' or ps.DelayCompensation(), "
                     f"got {compensation!r}")


class Policy:
    """A user-facing policy: a small immutable config that builds a fresh state per run."""

    name = "policy"

    def state(self, n_workers, version=0):
        raise NotImplementedError

    def validate(self, n_workers):
        """Raise ValueError if this policy cannot run with ``n_workers``."""

    def keeps_sent_weights(self):
        """Whether the server must keep the weights it sent each worker (delay compensation)."""
        return False

    def describe(self, n_workers):
        """How each applied update is weighted and compensated, in words."""
        return "weights as the policy's decisions set them"

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
    ``scale="auto"`` weights a step that gathers fewer than its quorum (N-k) only because the
    other workers have finished (a straggler's tail) by gradients/quorum, so each sample keeps
    the step size of a full step; ``scale="none"`` applies such a step in full.
    """

    name = "sync"

    def __init__(self, backup=0, scale="auto"):
        if isinstance(backup, bool) or not isinstance(backup, int) or backup < 0:
            raise ValueError(f"Sync(backup=k) needs an integer k >= 0, got {backup!r}")
        if scale not in ("auto", "none"):
            raise ValueError(f"Sync: scale must be 'auto' or 'none', got {scale!r}")
        self.backup = backup
        self.scale = scale

    def validate(self, n_workers):
        if self.backup >= n_workers:
            raise ValueError(
                f"Sync(backup={self.backup}) needs more than {self.backup} workers, got {n_workers}"
            )

    def state(self, n_workers, version=0):
        return SyncState(n_workers, self.backup, version, scale=self.scale)

    def updates_per_round(self, n_workers):
        """Updates per round of one gradient from every worker (None: it depends on timing)."""
        return None if self.backup else 1

    def describe(self, n_workers):
        if not self.backup:  # every step is whole under static dispatch: nothing to say
            return "mean of each step's gradients" + ("" if self.scale == "auto" else " (raw)")
        quorum = n_workers - self.backup
        tail = (f"a step short of {quorum} at the end weighted by gradients/{quorum}"
                if self.scale == "auto" else "short steps in full (raw)")
        return f"mean of each step's first {quorum} gradients; {tail}"

    def __repr__(self):
        args = [f"backup={self.backup}"] if self.backup else []
        if self.scale != "auto":
            args.append(f"scale={self.scale!r}")
        return f"Sync({', '.join(args)})"


class SyncState(PolicyState):
    """A step gathers one gradient per worker; pulls wait while their worker has given one."""

    def __init__(self, n_workers, backup=0, version=0, scale="auto"):
        super().__init__(n_workers, version)
        self.backup = backup
        self.scale = scale
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
        quorum = self.n_workers - self.backup
        # Short only because workers have finished: its samples keep a full step's size.
        weight = len(self.arrived) / quorum if self.scale == "auto" else 1.0
        self.version += 1
        self.arrived.clear()
        self.n_accepted = 0
        return PushDecision(accumulate=accumulate, complete=True, scale=scale,
                            weight=min(1.0, weight), release=self.releasable())


# -- Async and SSP -------------------------------------------------------------------------------
class _OnArrival(Policy):
    """What Async and SSP share: the push scale and the optional delay compensation."""

    bound = None

    def __init__(self, scale, staleness_lr, compensation):
        who = type(self).__name__
        self.scale = _check_scale(scale, staleness_lr, who)
        self.compensation = _check_compensation(compensation, who)

    @property
    def staleness_lr(self):
        return self.scale == "staleness"

    def state(self, n_workers, version=0):
        return ApplyOnArrival(n_workers, bound=self.bound, scale=self.scale,
                              compensation=self.compensation, version=version)

    def updates_per_round(self, n_workers):
        return n_workers

    def keeps_sent_weights(self):
        return self.compensation is not None

    def describe(self, n_workers):
        text = describe_scale(self.scale, n_workers)
        if self.compensation is not None:
            text += "; " + self.compensation.describe()
        return text

    def _options(self):
        out = []
        if self.scale == "staleness":
            out.append("staleness_lr=True")
        elif self.scale != "auto":
            out.append(f"scale={self.scale!r}")
        if self.compensation is not None:
            out.append(f"compensation={self.compensation!r}")
        return out


class Async(_OnArrival):
    """Asynchronous: every gradient is applied on arrival, weighted by ``scale`` (see SCALES:
    "auto" is 1/N); ``staleness_lr=True`` is ``scale="staleness"``, 1/max(1, τ) for an update
    of staleness τ. ``compensation=ps.DelayCompensation(lam)`` corrects stale gradients."""

    name = "async"

    def __init__(self, staleness_lr=False, *, scale="auto", compensation=None):
        super().__init__(scale, staleness_lr, compensation)

    def __repr__(self):
        return f"Async({', '.join(self._options())})"


class SSP(_OnArrival):
    """Stale synchronous parallel (Ho et al. 2013): applied on arrival, but no worker's clock
    runs more than ``staleness`` steps ahead of the slowest worker's. Pushes are weighted and
    compensated as in Async."""

    name = "ssp"

    def __init__(self, staleness=2, staleness_lr=False, *, scale="auto", compensation=None):
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"SSP(staleness=s) needs an integer s >= 0, got {staleness!r}")
        self.staleness = staleness
        super().__init__(scale, staleness_lr, compensation)

    @property
    def bound(self):
        return self.staleness

    def __repr__(self):
        return f"SSP({', '.join([f'staleness={self.staleness}'] + self._options())})"


class ApplyOnArrival(PolicyState):
    """Async (no bound) and SSP (a pull for step c waits until min clock >= c - bound)."""

    def __init__(self, n_workers, bound=None, scale="auto", compensation=None, version=0):
        super().__init__(n_workers, version)
        self.bound = bound
        self.scale = scale
        self.compensation = compensation

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
        # Every push goes through the compensation, fresh ones too: their correction is
        # exactly 0 (w_now == w_stale), but adaptive DC's mean square follows every gradient.
        return PushDecision(apply=True, weight=push_weight(self.scale, self.n_workers, staleness),
                            compensation=self.compensation, staleness=staleness,
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

    def keeps_sent_weights(self):
        return any(p.keeps_sent_weights() for _, p in self.phases)

    def describe(self, n_workers):
        return "; then ".join(f"{p.name}: {p.describe(n_workers)}" for _, p in self.phases)

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
def _mixed_from_spec(arg, modifiers):
    k, _, then = arg.partition(":")
    then = then or "async"
    if modifiers:  # "mixed:100+raw": the modifiers belong to the phase after the switch
        then += "+" + "+".join(modifiers)
    return Mixed(sync_steps=int(k), then=policy_from_spec(then))


def _async_from_spec(arg, **options):
    if arg not in ("", "lr", "staleness_lr"):
        raise ValueError(f"async takes 'lr' (staleness-scaled steps) or nothing, got {arg!r}")
    return Async(staleness_lr=bool(arg), **options)


def _sync_from_spec(backup, scale="auto", compensation=None):
    if compensation is not None:
        raise ValueError("Sync has no stale gradients to compensate; dc needs async, ssp or "
                         "mixed")
    return Sync(backup, scale=scale)


_BY_NAME = {
    "sync": lambda arg, **o: _sync_from_spec(int(arg) if arg else 0, **o),
    "backup": lambda arg, **o: _sync_from_spec(int(arg or 1), **o),
    "async": _async_from_spec,
    "ssp": lambda arg, **o: SSP(int(arg) if arg else 2, **o),
}


def _options_from(modifiers):
    """Keyword arguments from a spec's "+" modifiers: raw, scale=X, dc, dc=LAMBDA."""
    options = {}
    for mod in modifiers:
        key, eq, value = mod.partition("=")
        if key == "raw" and not eq:
            options["scale"] = "none"
        elif key == "scale" and value:
            options["scale"] = value if value in SCALES else float(value)
        elif key in ("dc", "dc-c"):
            adaptive = key == "dc"
            lam = float(value) if eq else (2.0 if adaptive else 0.04)
            options["compensation"] = DelayCompensation(lam, adaptive=adaptive)
        else:
            raise ValueError(f"unknown modifier {mod!r}; use raw, scale=auto|staleness|none|X, "
                             "dc[=LAMBDA] (adaptive) or dc-c[=LAMBDA] (constant)")
    return options


def policy_from_spec(spec):
    """Policy from a CLI spec; a Policy instance passes through.

    ``sync``, ``sync:1`` or ``backup:1`` (backup workers), ``async``, ``async:lr``
    (staleness-scaled steps), ``ssp:2``, ``mixed:100`` or ``mixed:100:ssp:2``. Modifiers follow
    a ``+``: ``async+raw`` (unweighted pushes), ``ssp:2+scale=0.5``, ``async+dc`` or
    ``async+dc=1`` (adaptive delay compensation), ``async+dc-c=0.04`` (constant),
    ``mixed:100:async+dc``.
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"policy must be a psframe policy such as ps.Sync(), got {spec!r}")
    text = spec.strip().lower()
    head, *modifiers = text.split("+")
    name, _, arg = head.partition(":")
    if name != "mixed" and name not in _BY_NAME:
        raise ValueError(f"unknown policy {spec!r}; choose one of {sorted([*_BY_NAME, 'mixed'])}")
    try:
        if name == "mixed":
            return _mixed_from_spec(arg, modifiers)
        return _BY_NAME[name](arg, **_options_from(modifiers))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad policy spec {spec!r}: {exc}") from None
