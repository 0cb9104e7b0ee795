"""Async and SSP: each gradient applied on arrival, weighted so that Sync's tuning carries over."""
from __future__ import annotations

from typing import Any, List, Optional, Union

from ..errors import ProtocolError
from .base import Policy, PolicyState, PushDecision, positive_number
from .compensation import DelayCompensation, check_compensation

__all__ = ["Async", "SSP", "ApplyOnArrival", "SCALES", "push_weight", "describe_scale"]

# How an on-arrival policy weights each push (a positive number is a fixed weight):
#   "auto"       1/N for N workers: a round of N pushes moves the weights as far as one Sync
#                step, whose mean of N gradients is one optimizer step;
#   "staleness"  1/max(1, tau) for an update of staleness tau (``staleness_lr=True``);
#   "none"       every push a full optimizer step: the raw behaviour before weighting.
SCALES = ("auto", "staleness", "none")

# A push scale: one of SCALES, or a fixed positive weight.
Scale = Union[str, float]


def _check_scale(scale: Scale, staleness_lr: bool, who: str) -> Scale:
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
    if not positive_number(scale):
        raise ValueError(f"{who}: scale must be one of {list(SCALES)} or a positive number, "
                         f"got {scale!r}")
    return float(scale)


def push_weight(scale: Scale, n_workers: int, staleness: int) -> float:
    """The weight of one on-arrival update under ``scale`` (see SCALES)."""
    if scale == "auto":
        return 1.0 / n_workers
    if scale == "staleness":
        return 1.0 / max(1, staleness)
    if scale == "none":
        return 1.0
    return float(scale)  # a fixed weight: _check_scale made it a float already


def describe_scale(scale: Scale, n_workers: int) -> str:
    """The weight each push gets, in words, for summary() and stats."""
    if scale == "auto":
        return f"1/{n_workers} per push (auto: 1/N for N={n_workers})"
    if scale == "staleness":
        return "1/max(1, staleness) per push"
    if scale == "none":
        return "1 per push (raw)"
    return f"{scale:g} per push"


class _OnArrival(Policy):
    """What Async and SSP share: the push scale and the optional delay compensation."""

    def __init__(self, scale: Scale, staleness_lr: bool, compensation: Any) -> None:
        who = type(self).__name__
        self.scale = _check_scale(scale, staleness_lr, who)
        self.compensation = check_compensation(compensation, who)

    @property
    def bound(self) -> Optional[int]:
        """How many steps a worker's clock may run ahead of the slowest's (None: any)."""
        return None

    @property
    def staleness_lr(self) -> bool:
        return self.scale == "staleness"

    def state(self, n_workers: int, version: int = 0) -> ApplyOnArrival:
        return ApplyOnArrival(n_workers, bound=self.bound, scale=self.scale,
                              compensation=self.compensation, version=version)

    def updates_per_round(self, n_workers: int) -> Optional[int]:
        return n_workers

    def keeps_sent_weights(self) -> bool:
        return self.compensation is not None

    def describe(self, n_workers: int) -> str:
        text = describe_scale(self.scale, n_workers)
        if self.compensation is not None:
            text += "; " + self.compensation.describe()
        return text

    def _options(self) -> List[str]:
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

    def __init__(self, staleness_lr: bool = False, *, scale: Union[str, float] = "auto",
                 compensation: Any = None) -> None:
        super().__init__(scale, staleness_lr, compensation)

    def __repr__(self) -> str:
        return f"Async({', '.join(self._options())})"


class SSP(_OnArrival):
    """Stale synchronous parallel (Ho et al. 2013): applied on arrival, but no worker's clock
    runs more than ``staleness`` steps ahead of the slowest worker's. Pushes are weighted and
    compensated as in Async."""

    name = "ssp"

    def __init__(self, staleness: int = 2, staleness_lr: bool = False, *,
                 scale: Union[str, float] = "auto", compensation: Any = None) -> None:
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 0:
            raise ValueError(f"SSP(staleness=s) needs an integer s >= 0, got {staleness!r}")
        self.staleness = staleness
        super().__init__(scale, staleness_lr, compensation)

    @property
    def bound(self) -> Optional[int]:
        return self.staleness

    def __repr__(self) -> str:
        return f"SSP({', '.join([f'staleness={self.staleness}'] + self._options())})"


class ApplyOnArrival(PolicyState):
    """Async (no bound) and SSP (a pull for step c waits until min clock >= c - bound)."""

    def __init__(self, n_workers: int, bound: Optional[int] = None, scale: Scale = "auto",
                 compensation: Optional[DelayCompensation] = None, version: int = 0) -> None:
        super().__init__(n_workers, version)
        self.bound = bound
        self.scale = scale
        self.compensation = compensation

    def may_answer(self, worker: int, clock: int) -> bool:
        return self.bound is None or clock - self.slowest_clock() <= self.bound

    def push(self, worker: int, clock: int, pulled_version: int,
             accepted: bool = True) -> PushDecision:
        self.count_push(worker, clock)
        if not accepted:
            return PushDecision.nothing(self.releasable())
        staleness = self.version - pulled_version
        if staleness < 0:
            raise ProtocolError(f"worker {worker} pushed from version {pulled_version}, "
                                f"ahead of the server's {self.version}")
        self.version += 1
        # Every push goes through the compensation, fresh ones too: their correction is
        # exactly 0 (w_now == w_stale), but adaptive DC's mean square follows every gradient.
        return PushDecision.apply_now(push_weight(self.scale, self.n_workers, staleness),
                                      staleness, self.compensation, self.releasable())
