"""The parameter server: its request loop and the parts it carries decisions out with.

parameter_server: the loop (rank 0's, which runs the policy); shard_server: another
server's, which follows rank 0's orders (orders, followers) on its own range; executor:
what both carry decisions out with; pushes: a push's life; inbox: pushed gradients and
their checks; updates: the weights and optimizer; stopping: clean stops; recorder: stats,
history, result; checkpoint_state and checkpoints: what a checkpoint holds and its files;
dispatch: dynamic batches; group: workers per range.
"""
from __future__ import annotations

import importlib
from typing import Any

from ..errors import GradientError  # raised by the inbox; importable from here as before

# Loaded on first use: `import psframe` must not start MPI (the `psframe train -n N`
# launcher is a plain process), and the server's loop needs mpi4py.MPI, where checkpoints
# and dispatch, which the run's checks use, do not.
_WHERE = {
    "ParameterServer": "parameter_server", "ShardServer": "shard_server",
    "Followers": "followers", "Group": "group", "GradientInbox": "inbox",
    "UpdateEngine": "updates", "StopControl": "stopping", "Recorder": "recorder",
    "BatchDispatcher": "dispatch", "Checkpointer": "checkpoints",
    "CheckpointError": "checkpoints", "load_checkpoint": "checkpoints",
    "write_atomic": "checkpoints", "Executor": "executor", "Push": "pushes",
    "PushBook": "pushes", "PushState": "pushes",
}

__all__ = list(_WHERE) + ["GradientError"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
