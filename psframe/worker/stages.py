"""Model parallel planning: where to cut a model's layers into pipeline stages."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

if TYPE_CHECKING:
    from ..params import ParamLayout

__all__ = ["plan_stages", "stage_shard_range", "gpipe_bubble"]


def gpipe_bubble(n_stages: int, micro_batches: int) -> float:
    """GPipe's estimate of the idle share of each stage: (P-1) / (m+P-1)."""
    return (n_stages - 1) / (micro_batches + n_stages - 1)


def _layer_cost(layer: Any, batch: int) -> int:
    # Forward FLOPs dominate and backward is about twice that; the parameter count stands in
    # for the push/pull and optimizer work. Both scale with n_in*n_out for a Dense layer.
    n_params = sum(int(np.prod(s)) for s in layer.param_shapes().values())
    return layer.flops(batch) * 3 + n_params


def plan_stages(model: Any, n_stages: int, batch_size: int,
                stages: Optional[Sequence[Sequence[int]]] = None) -> List[List[int]]:
    """Layer indices of each stage: consecutive, every stage with a parameterised layer.

    ``stages`` (a list of lists of layer indices) sets the cut by hand; otherwise the cut
    minimises the most expensive stage (cost: FLOPs and parameters), by dynamic programming
    over cuts placed just before a parameterised layer.
    """
    if not model.can_pipeline:
        raise ValueError(
            f"model and hybrid modes cut a ps.Sequential (or MLP) into stages; "
            f"{type(model).__name__} has no layers to cut (ps.TorchModel trains in "
            "mode='data' only)"
        )
    n_layers = len(model.layers)
    has_params = [bool(layer.param_shapes()) for layer in model.layers]
    if stages is not None:
        return _check_manual(stages, n_stages, n_layers, has_params)
    param_layers = [i for i, p in enumerate(has_params) if p]
    if len(param_layers) < n_stages:
        raise ValueError(
            f"the model has {len(param_layers)} parameterised layers, too few for "
            f"{n_stages} stages; use fewer workers or stages, or a deeper model"
        )
    costs = [_layer_cost(layer, batch_size) for layer in model.layers]
    # A stage starts at a parameterised layer (the first at layer 0); cut points are indices.
    starts = [0] + param_layers[1:]
    prefix = np.concatenate([[0], np.cumsum(costs)])

    def cost(a: int, b: int) -> float:  # layers starts[a] .. starts[b]-1 (or to the end)
        stop = starts[b] if b < len(starts) else n_layers
        return prefix[stop] - prefix[starts[a]]

    n = len(starts)
    # (first start index, stages left) -> (max cost, cut list)
    best: Dict[Tuple[int, int], Tuple[float, List[int]]] = {}

    def solve(a: int, k: int) -> Tuple[float, List[int]]:
        if (a, k) in best:
            return best[(a, k)]
        if k == 1:
            result = (cost(a, n), [a])
        else:
            result = None
            for b in range(a + 1, n - k + 2):
                tail_cost, tail = solve(b, k - 1)
                candidate = (max(cost(a, b), tail_cost), [a] + tail)
                if result is None or candidate[0] < result[0]:
                    result = candidate
        assert result is not None  # a + k <= n: b took at least one value
        best[(a, k)] = result
        return result

    _, cut = solve(0, n_stages)
    bounds = [starts[c] for c in cut] + [n_layers]
    return [list(range(bounds[k], bounds[k + 1])) for k in range(n_stages)]


def _check_manual(stages: Any, n_stages: int, n_layers: int,
                  has_params: Sequence[bool]) -> List[List[int]]:
    try:
        stages = [[int(i) for i in stage] for stage in stages]
    except TypeError:
        raise ValueError(f"stages must be a list of lists of layer indices, got {stages!r}")
    if len(stages) != n_stages:
        raise ValueError(f"stages lists {len(stages)} stages, but the run has {n_stages}")
    flat = [i for stage in stages for i in stage]
    if flat != list(range(n_layers)):
        raise ValueError(
            f"stages must cover layers 0..{n_layers - 1} once each, in order, got {stages}"
        )
    for k, stage in enumerate(stages):
        if not any(has_params[i] for i in stage):
            raise ValueError(f"stage {k} (layers {stage}) has no parameters to train")
    return stages


def layer_shard_ranges(model: Any, layout: ParamLayout) -> List[Tuple[int, int]]:
    """Each trained layer's shard range, in forward order (a layer-wise push's units)."""
    return [stage_shard_range(model, layout, [i]) for i in range(len(model.layers))
            if model.layer_param_names(i)]


def stage_shard_range(model: Any, layout: ParamLayout,
                      layer_ids: Sequence[int]) -> Tuple[int, int]:
    """Shards [lo, hi) holding exactly the parameters of these layers."""
    names = [n for i in layer_ids for n in model.layer_param_names(i)]
    start = min(layout.offsets[n] for n in names)
    stop = max(layout.offsets[n] + layout.sizes[n] for n in names)
    if stop - start != sum(layout.sizes[n] for n in names):
        raise ValueError(f"the parameters of layers {layer_ids} are not contiguous")
    return layout.shards_of_range(start, stop)
