"""Delay compensation (DC-ASGD): a stale gradient corrected towards the current weights."""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

from .base import positive_number

__all__ = ["DelayCompensation", "delay_compensate", "check_compensation"]


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

    def __init__(self, lam: float = 2.0, adaptive: bool = True, decay: float = 0.95) -> None:
        for value, what in ((lam, "lam"), (decay, "decay")):
            if not positive_number(value):
                raise ValueError(f"DelayCompensation({what}) needs a positive finite number, "
                                 f"got {value!r}")
        if decay >= 1:
            raise ValueError(f"DelayCompensation(decay) must be below 1, got {decay!r}")
        self.lam = float(lam)
        self.adaptive = bool(adaptive)
        self.decay = float(decay)

    def describe(self) -> str:
        if self.adaptive:
            return (f"delay-compensated, adaptive (lambda={self.lam:g}/sqrt(MS), "
                    f"decay {self.decay:g})")
        return f"delay-compensated, constant (lambda={self.lam:g})"

    def __repr__(self) -> str:
        if not self.adaptive:
            return f"DelayCompensation(lam={self.lam:g}, adaptive=False)"
        extra = f", decay={self.decay:g}" if self.decay != 0.95 else ""
        return f"DelayCompensation(lam={self.lam:g}{extra})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    def __hash__(self) -> int:
        return hash((type(self), self.lam, self.adaptive, self.decay))


# MS starts at zero; this floor keeps lam / sqrt(MS) finite for elements never seen non-zero.
_MS_EPS = 1e-12


def delay_compensate(g: np.ndarray, w_now: np.ndarray, w_stale: np.ndarray,
                     comp: DelayCompensation, out: np.ndarray,
                     mean_square: Optional[np.ndarray] = None,
                     scratch: Optional[np.ndarray] = None) -> np.ndarray:
    """``out = g + lam_t * g * g * (w_now - w_stale)`` for DelayCompensation ``comp``, in
    ``out`` without temporaries. Adaptive: ``mean_square`` (MS) is first updated with g in
    place, and ``scratch`` (len(g)) holds sqrt(MS)."""
    np.subtract(w_now, w_stale, out=out)
    out *= g
    out *= g
    if comp.adaptive:
        assert mean_square is not None and scratch is not None, "adaptive DC needs MS and scratch"
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


def check_compensation(compensation: Any, who: str) -> Optional[DelayCompensation]:
    if compensation is None or isinstance(compensation, DelayCompensation):
        return compensation
    if compensation == "dc":
        return DelayCompensation()
    if compensation == "dc-c":
        return DelayCompensation(0.04, adaptive=False)
    raise ValueError(f"{who}: compensation must be None, 'dc', 'dc-c' or ps.DelayCompensation(), "
                     f"got {compensation!r}")
