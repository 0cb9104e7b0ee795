"""Workers: the data-parallel loop (pull, compute, push) and the pipeline stage, with the plan
of where a model is cut into stages."""
from __future__ import annotations

import importlib
from typing import Any

# Loaded on first use, as in psframe.server: the loops need mpi4py.MPI, the stage plan does not.
_WHERE = {"Worker": "worker", "StageWorker": "stage_worker", "LayerwiseWorker": "layerwise",
          "plan_stages": "stages", "layer_shard_ranges": "stages",
          "stage_shard_range": "stages", "gpipe_bubble": "stages"}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
