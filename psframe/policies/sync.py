"""Sync: bulk synchronous updates, one per step, the mean of that step's gradients."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Set

from ..errors import ProtocolError
from .base import AnyPolicyState, Policy, PolicyState, PushDecision

if TYPE_CHECKING:
    from typing import Self


__all__ = ["Sync", "SyncState"]


class Sync(Policy):
    """Bulk synchronous: one update per global step, the mean of that step's gradients.

    With ``backup=k`` a step is applied once the first N-k gradients arrive; gradients for an
    already-applied step come too late and are dropped (Chen et al. 2016, backup workers).
    ``scale="auto"`` weights a step that gathers fewer than its quorum (N-k) only because the
    other workers have finished (a straggler's tail) by gradients/quorum, so each sample keeps
    the step size of a full step; ``scale="none"`` applies such a step in full.
    """

    name = "sync"

    def __init__(self, backup: int = 0, scale: str = "auto") -> None:
        if isinstance(backup, bool) or not isinstance(backup, int) or backup < 0:
            raise ValueError(f"Sync(backup=k) needs an integer k >= 0, got {backup!r}")
        if scale not in ("auto", "none"):
            raise ValueError(f"Sync: scale must be 'auto' or 'none', got {scale!r}")
        self.backup = backup
        self.scale = scale

    @property
    def lockstep(self) -> bool:
        """Without backups every update waits for every worker's gradient."""
        return not self.backup

    def validate(self, n_workers: int) -> None:
        if self.backup >= n_workers:
            raise ValueError(
                f"Sync(backup={self.backup}) needs more than {self.backup} workers, got {n_workers}"
            )

    def state(self, n_workers: int, version: int = 0) -> SyncState:
        return SyncState(n_workers, self.backup, version, scale=self.scale)

    def updates_per_round(self, n_workers: int) -> Optional[int]:
        return None if self.backup else 1

    def describe(self, n_workers: int) -> str:
        if not self.backup:  # every step is whole under static dispatch: nothing to say
            return "mean of each step's gradients" + ("" if self.scale == "auto" else " (raw)")
        quorum = n_workers - self.backup
        tail = (f"a step short of {quorum} at the end weighted by gradients/{quorum}"
                if self.scale == "auto" else "short steps in full (raw)")
        return f"mean of each step's first {quorum} gradients; {tail}"

    def __repr__(self) -> str:
        args = [f"backup={self.backup}"] if self.backup else []
        if self.scale != "auto":
            args.append(f"scale={self.scale!r}")
        return f"Sync({', '.join(args)})"


class SyncState(PolicyState):
    """A step gathers one gradient per worker; pulls wait while their worker has given one."""

    def __init__(self, n_workers: int, backup: int = 0, version: int = 0,
                 scale: str = "auto") -> None:
        super().__init__(n_workers, version)
        self.backup = backup
        self.scale = scale
        self.start_version = version  # pushes computed before a phase switch join the first step
        self.arrived: Set[int] = set()
        self.n_accepted = 0

    def adopt(self, previous: AnyPolicyState) -> Self:
        super().adopt(previous)
        self.start_version = self.version
        return self

    def may_answer(self, worker: int, clock: int) -> bool:
        return worker not in self.arrived

    def push(self, worker: int, clock: int, pulled_version: int,
             accepted: bool = True) -> PushDecision:
        self.count_push(worker, clock)
        if self.start_version <= pulled_version < self.version:
            # Its step was applied without it: a backup worker's late gradient.
            return PushDecision.discard(self.releasable())
        if worker in self.arrived:
            raise ProtocolError(f"worker {worker} pushed twice for step {self.version}")
        self.arrived.add(worker)
        self.n_accepted += int(accepted)
        return self._maybe_complete(accumulate=accepted)

    def after_finish(self, worker: int) -> PushDecision:
        return self._maybe_complete(accumulate=False)

    def _needed(self) -> int:
        able = self.n_workers - len(self.done - self.arrived)
        return max(1, min(self.n_workers - self.backup, able))

    def _maybe_complete(self, accumulate: bool) -> PushDecision:
        if not self.arrived or len(self.arrived) < self._needed():
            return (PushDecision.gather if accumulate else PushDecision.nothing)(self.releasable())
        scale = 1.0 / self.n_accepted if self.n_accepted else 0.0
        quorum = self.n_workers - self.backup
        # Short only because workers have finished: its samples keep a full step's size.
        weight = len(self.arrived) / quorum if self.scale == "auto" else 1.0
        self.version += 1
        self.arrived.clear()
        self.n_accepted = 0
        return PushDecision.step(scale, min(1.0, weight), accumulate=accumulate,
                                 release=self.releasable())
