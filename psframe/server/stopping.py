"""StopControl: a clean stop after SIGINT/SIGTERM, at a step every worker of a unit agrees on."""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

__all__ = ["StopControl"]


class StopControl:
    """Which pulls a stopping run answers with INTERRUPT.

    Workers in one stop unit must stop at the same step: all of them under a lockstep policy
    (so the stopped run resumes exactly), one pipeline's stages otherwise (a stage left
    waiting for activations would hang). A unit stops after the last step any of its workers
    has been answered for.
    """

    def __init__(self, n_workers: int, stop_units: Optional[Sequence[int]] = None) -> None:
        self.stopping = False
        self.units: List[int] = list(range(n_workers) if stop_units is None else stop_units)
        self.answered_clock = [-1] * n_workers
        self.stop_at: Dict[int, int] = {}

    def request(self) -> None:
        """Stop cleanly: every worker's next pull is answered with INTERRUPT (signal-safe)."""
        self.stopping = True

    def answered(self, worker: int, clock: int) -> None:
        self.answered_clock[worker] = clock

    def stops(self, worker: int, clock: int) -> bool:
        """Whether this pull is past its unit's last step (in a stopping run)."""
        if not self.stopping:
            return False
        unit = self.units[worker]
        if unit not in self.stop_at:
            members = [v for v, u in enumerate(self.units) if u == unit]
            self.stop_at[unit] = max(self.answered_clock[v] for v in members) + 1
        return clock >= self.stop_at[unit]
