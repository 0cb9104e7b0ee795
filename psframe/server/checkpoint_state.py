"""What a server checkpoint holds: weights, optimizer state, policy clocks, samples, history."""
from __future__ import annotations

__all__ = ["save_server_state", "restore_server_state"]


def save_server_state(checkpointer, version, engine, groups, recorder):
    """Write one checkpoint of this server's state for step ``version``; returns its path."""
    arrays = {"weights": engine.weights, "shard_updates": engine.shard_updates}
    for key, value in engine.opt_state.items():
        if not key.startswith("_"):  # scratch buffers carry no state
            arrays[f"opt.{key}"] = value
    state = {
        "groups": [{"version": g.policy.version, "clocks": list(g.policy.clocks)}
                   for g in groups],
        "samples": recorder.stats.samples,
        "history": recorder.history,
    }
    return checkpointer.save(version, arrays, state)


def restore_server_state(manifest, arrays, engine, groups, recorder):
    """Continue from a checkpoint: weights, optimizer state, clocks, data position, history."""
    engine.weights[:] = arrays["weights"]
    engine.shard_updates[:] = arrays["shard_updates"]
    for key in engine.opt_state:
        if not key.startswith("_"):
            engine.opt_state[key][:] = arrays[f"opt.{key}"]
    for g, saved in zip(groups, manifest["groups"]):
        g.policy.restore(saved["version"], saved["clocks"])
    version = min(g.policy.version for g in groups)
    recorder.restore(version, manifest["samples"], manifest["history"])
