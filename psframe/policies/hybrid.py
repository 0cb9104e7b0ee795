"""Hybrid: dense parameters under one policy, row-sparse tables applied on arrival."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .base import Policy
from .on_arrival import Async, _OnArrival, push_weight
from .sync import Sync

if TYPE_CHECKING:
    from .base import AnyPolicyState

__all__ = ["Hybrid"]


class Hybrid(Policy):
    """``Hybrid(dense=Sync(), sparse=Async())``: Persia's mix in one run.

    The dense parameters follow ``dense`` exactly as that policy alone would. The rows of
    the row-sparse tables (ps.layers.Embedding) that a push carries are applied as it
    arrives, weighted as ``sparse`` (an Async) weights a push, whether the dense step they
    came with is gathered, applied or dropped; a pull gets the rows as they are when it is
    answered. ``stats["sparse"]["staleness"]`` counts, per applied push, how many row
    updates ran between its rows' pull and its own, as ``staleness_hist`` does for the
    dense updates. ``sparse`` may also be the dense policy itself (then it is that policy).
    """

    name = "hybrid"

    def __init__(self, dense: Optional[Policy] = None, sparse: Optional[Policy] = None) -> None:
        self.dense: Policy = Sync() if dense is None else dense
        self.sparse: Policy = Async() if sparse is None else sparse
        if not isinstance(self.dense, Policy) or isinstance(self.dense, Hybrid):
            raise TypeError(f"Hybrid: dense must be a policy such as ps.Sync(), "
                            f"got {self.dense!r}")
        if not (type(self.sparse) is Async and self.sparse.compensation is None
                or self.sparse == self.dense):
            raise ValueError(f"Hybrid: sparse must be ps.Async() (without delay compensation)"
                             f" or the dense policy itself, got {self.sparse!r}")
        # On arrival, sparse is an Async (checked above): it has a scale.
        if (self.on_arrival and isinstance(self.sparse, Async)
                and self.sparse.scale == "staleness"):
            raise ValueError("Hybrid: sparse=Async(staleness_lr=True) is not built; rows are "
                             "weighted by a fixed scale")

    @property
    def lockstep(self) -> bool:
        # Rows applied on arrival change while workers compute: nobody may read in place.
        return self.dense.lockstep and not self.on_arrival

    @property
    def on_arrival(self) -> bool:
        """Whether the rows are applied as they arrive (else they follow the dense part)."""
        return self.sparse != self.dense

    def sparse_weight(self, n_workers: int) -> float:
        """The weight of one push's rows, applied on arrival."""
        sparse = self.sparse  # an Async on arrival; else the dense policy, if it has a scale
        if not isinstance(sparse, (_OnArrival, Sync)):
            raise AttributeError(f"{type(sparse).__name__} has no push scale")
        return push_weight(sparse.scale, n_workers, 1)

    def state(self, n_workers: int, version: int = 0) -> AnyPolicyState:
        return self.dense.state(n_workers, version)

    def validate(self, n_workers: int) -> None:
        self.dense.validate(n_workers)
        self.sparse.validate(n_workers)

    def updates_per_round(self, n_workers: int) -> Optional[int]:
        return self.dense.updates_per_round(n_workers)

    def keeps_sent_weights(self) -> bool:
        return self.dense.keeps_sent_weights()

    def describe(self, n_workers: int) -> str:
        rows = ("follow the dense updates" if not self.on_arrival else
                f"on arrival, {self.sparse.describe(n_workers)}")
        return f"dense: {self.dense.describe(n_workers)}; sparse rows: {rows}"

    def __repr__(self) -> str:
        return f"Hybrid(dense={self.dense!r}, sparse={self.sparse!r})"
