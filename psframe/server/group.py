"""Group: the workers that update one shard range under one policy state."""
from __future__ import annotations

from typing import Any, Iterable, List, Tuple

__all__ = ["Group"]


class Group:
    """Workers that update one shard range under one policy state.

    Data parallel: one group, every worker, every shard. A pipeline: one group per stage,
    holding that stage's worker from each pipeline and the shards of that stage's layers.
    """

    def __init__(self, policy_state: Any, workers: Iterable[int],
                 shard_range: Tuple[int, int]) -> None:
        self.policy = policy_state
        self.workers: List[int] = list(workers)  # global worker indices; the policy sees 0..len-1
        self.shard_range = tuple(shard_range)
        self.pending: List[int] = []  # global workers whose gradient waits for the step gathered
