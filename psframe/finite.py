"""frame_finite: whether a flat gradient frame is all finite, in one BLAS pass."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["frame_finite"]


def frame_finite(grad: np.ndarray) -> bool:
    """Whether every element of ``grad`` is finite."""
    # One BLAS pass, no temporaries: g·g is finite whenever every element is (unless the
    # sum of squares overflows, for absurdly large but finite gradients: the exact,
    # slower check settles that rare case, so no finite gradient is refused).
    with np.errstate(over="ignore", invalid="ignore"):
        squares = float(np.dot(grad, grad))
    return math.isfinite(squares) or bool(np.isfinite(grad).all())
