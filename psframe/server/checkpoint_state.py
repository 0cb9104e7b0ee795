"""What a server checkpoint holds: weights, optimizer state, policy clocks, samples, history."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence, Tuple

if TYPE_CHECKING:
    import numpy as np

    from .checkpoints import Checkpointer
    from .group import Group
    from .recorder import Recorder
    from .updates import UpdateEngine

__all__ = ["save_server_state", "restore_server_state", "range_arrays"]


def _dense_range(engine: UpdateEngine, own_shards: Sequence[int]) -> Tuple[int, int]:
    """The elements of a server's range it checkpoints as flat arrays: with row-sparse
    tables, their rows are checkpointed by block instead (ServerRows.state_part)."""
    start, stop = engine.layout.shard_range(*own_shards)
    for part in getattr(engine, "parts", ()):
        start, stop = part.dense_range(start, stop)
    return start, stop


def range_arrays(engine: UpdateEngine, own_shards: Sequence[int]) -> Dict[str, np.ndarray]:
    """The arrays of one server's range: its weights, optimizer state and shard counts, and
    its rows of the row-sparse tables."""
    lo, hi = own_shards
    start, stop = _dense_range(engine, own_shards)
    arrays = {"weights": engine.weights[start:stop], "shard_updates": engine.shard_updates[lo:hi]}
    for key, value in engine.opt_state.items():
        if not key.startswith("_"):  # scratch buffers carry no state
            arrays[f"opt.{key}"] = value[start:stop]
    for part in getattr(engine, "parts", ()):
        arrays.update(part.state_part())
    return arrays


def save_server_state(checkpointer: Checkpointer, version: int, engine: UpdateEngine,
                      groups: Sequence[Group], recorder: Recorder,
                      own_shards: Optional[Sequence[int]] = None,
                      parts: Optional[Sequence[Dict[str, Any]]] = None) -> str:
    """Write one checkpoint of the run's state for step ``version``; returns its path.
    ``parts``: what the other servers wrote of their ranges (one manifest names them all)."""
    own_shards = own_shards if own_shards is not None else (0, engine.layout.n_shards)
    state = {
        "groups": [{"version": g.policy.version, "clocks": list(g.policy.clocks)}
                   for g in groups],
        "samples": recorder.stats.samples,
        "history": recorder.history,
    }
    return checkpointer.save(version, range_arrays(engine, own_shards), state, parts)


def restore_server_state(manifest: Any, arrays: Any, engine: Any, groups: Any, recorder: Any,
                         own_shards: Any = None) -> None:
    """Continue from a checkpoint: weights and optimizer state of this server's range (the
    others' may lie in the same shared buffer: never write them), clocks, data position,
    history."""
    lo, hi = own_shards if own_shards is not None else (0, engine.layout.n_shards)
    start, stop = _dense_range(engine, (lo, hi))
    engine.weights[start:stop] = arrays["weights"][start:stop]
    engine.shard_updates[lo:hi] = arrays["shard_updates"][lo:hi]
    for key in engine.opt_state:
        if not key.startswith("_"):
            engine.opt_state[key][start:stop] = arrays[f"opt.{key}"][start:stop]
    for part in getattr(engine, "parts", ()):
        part.restore(arrays)
    for g, saved in zip(groups, manifest["groups"]):
        g.policy.restore(saved["version"], saved["clocks"])
    version = min(g.policy.version for g in groups)
    recorder.restore(version, manifest["samples"], manifest["history"])
