"""Parameter layout: named tensors in one flat buffer, cut into shards, frames and server ranges."""
from __future__ import annotations

from typing import Any, Dict, Hashable, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["ParamLayout", "TensorOffsets", "FramePlan", "ServerCuts", "DEFAULT_SHARD_ELEMS",
           "server_ranges", "overlap", "recount_shards"]

# 256 Ki elements (1 MiB in float32), measured by benchmarks/transport.py on MPICH shared
# memory. Since the server updates frame by frame and sends each frame as soon as it is
# updated, several frames let the copy of one overlap the update of the next: at 4 MB the
# round trip with SGD ran at 0.62-0.74 of raw Send/Recv with 256 Ki frames, 0.46-0.61 with
# one 1 Mi frame, and at 16 and 64 MB the two were even (0.54-0.60). Before that overlap,
# 1 Mi had been the faster choice (fewer per-frame handshakes).
DEFAULT_SHARD_ELEMS = 1 << 18

SUPPORTED_DTYPES = ("float32", "float64")

Range = Tuple[int, int]  # [start, stop) of elements, or [lo, hi) of shards
Shape = Tuple[int, ...]


class TensorOffsets:
    """Named tensors laid end to end in one flat buffer: each one's shape, size and offset."""

    def __init__(self, shapes: Mapping[str, Sequence[int]]) -> None:
        self.names: List[str] = list(shapes)
        self.shapes: Dict[str, Shape] = {n: tuple(int(d) for d in shapes[n]) for n in self.names}
        self.sizes: Dict[str, int] = {n: int(np.prod(self.shapes[n], dtype=np.int64))
                                      for n in self.names}
        self.offsets: Dict[str, int] = {}
        offset = 0
        for n in self.names:
            self.offsets[n] = offset
            offset += self.sizes[n]
        self.size: int = offset

    def span(self, name: str) -> Range:
        """Elements [start, stop) of tensor ``name``."""
        return self.offsets[name], self.offsets[name] + self.sizes[name]

    def views(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """Dict name → reshaped view into ``flat`` (no copies)."""
        return {n: flat[self.offsets[n]:self.offsets[n] + self.sizes[n]].reshape(self.shapes[n])
                for n in self.names}

    def flatten(self, params: Mapping[str, np.ndarray], out: np.ndarray) -> np.ndarray:
        """Copy a dict of arrays into ``out``, checking names and shapes."""
        missing = [n for n in self.names if n not in params]
        extra = [n for n in params if n not in self.shapes]
        if missing or extra:
            raise ValueError(
                f"parameters do not match the model: missing {missing}, unexpected {extra}"
            )
        for n in self.names:
            if tuple(np.shape(params[n])) != self.shapes[n]:
                raise ValueError(
                    f"parameter {n!r} has shape {tuple(np.shape(params[n]))}, "
                    f"expected {self.shapes[n]}"
                )
            out[self.offsets[n]:self.offsets[n] + self.sizes[n]] = params[n].reshape(-1)
        return out


class FramePlan:
    """Shards, the server's units of update, and frames, the messages that carry them.

    Shards: at least one per tensor; a tensor larger than ``shard_elems`` is split further,
    and every extra cut (where one server's range meets the next) is a shard bound too.
    Frames: consecutive shards coalesced up to ``shard_elems``, so a pull or push of many
    small tensors is still a few large messages. Both sides derive the same plan from the
    layout, so frame sizes never travel on the wire.
    """

    def __init__(self, tensors: TensorOffsets, shard_elems: int, cuts: Sequence[int] = ()) -> None:
        self.shard_elems = shard_elems
        bounds = [0]
        for n in tensors.names:
            start, stop = tensors.span(n)
            bounds.extend(range(start + shard_elems, stop, shard_elems))
            if stop > bounds[-1]:
                bounds.append(stop)
        if cuts:
            bounds = sorted(set(bounds) | set(cuts))
        # bounds[k]..bounds[k+1] is shard k, contiguous and in order.
        self.bounds: np.ndarray = np.asarray(bounds, dtype=np.int64)
        self.n_shards: int = len(bounds) - 1
        # Frames are asked for once per step with the same ranges: plan each range once.
        self._cache: Dict[Hashable, List[Range]] = {}
        self.tensor_shards: Dict[str, Range] = {
            n: self.shards_of_range(*tensors.span(n)) for n in tensors.names}

    def shard_range(self, lo: int, hi: int) -> Range:
        """Element range [start, stop) covered by shards [lo, hi)."""
        return int(self.bounds[lo]), int(self.bounds[hi])

    def shards_of_range(self, start: int, stop: int) -> Range:
        """Shard range [lo, hi) that exactly covers elements [start, stop)."""
        lo = int(np.searchsorted(self.bounds, start, side="left"))
        hi = int(np.searchsorted(self.bounds, stop, side="left"))
        if self.bounds[lo] != start or self.bounds[hi] != stop:
            raise ValueError(f"elements [{start}, {stop}) do not fall on shard bounds")
        return lo, hi

    def frames(self, lo: int = 0, hi: Optional[int] = None) -> List[Range]:
        """Element ranges of the messages that carry shards [lo, hi)."""
        hi = self.n_shards if hi is None else hi
        key = (lo, hi)
        if key not in self._cache:
            self._cache[key] = self._coalesce(lo, hi)
        return self._cache[key]

    def layer_frames(self, part: Range, layer_shards: Sequence[Range]) -> List[Range]:
        """The frames of shard range ``part`` layer by layer, last layer first: the order in
        which a layer-wise push sends them as backward makes each layer's gradient.
        ``layer_shards``: each layer's shard range, in forward order, covering ``part``."""
        key = ("layers", tuple(part), tuple(layer_shards))
        if key not in self._cache:
            frames: List[Range] = []
            for shards in reversed(layer_shards):
                frames += self.frames(*overlap(part, shards))
            self._cache[key] = frames
        return self._cache[key]

    def _coalesce(self, lo: int, hi: int) -> List[Range]:
        """Shards [lo, hi) gathered into frames of at most ``shard_elems`` (or one shard)."""
        if hi <= lo:
            return []
        frames: List[Range] = []
        start = stop = int(self.bounds[lo])
        for k in range(lo, hi):
            end = int(self.bounds[k + 1])
            if end - start > self.shard_elems and stop > start:
                frames.append((start, stop))
                start = stop
            stop = end
        frames.append((start, stop))
        return frames


class ServerCuts:
    """Where the servers' ranges meet in the flat buffer: at equal shares of its elements.

    ``balance``: name → what one of the tensor's elements counts for in those shares
    (default 1; 0 for a row-sparse table, which the servers split by rows instead:
    psframe.sparse). ``cuts``: the element offsets a layout cuts its shards at.
    """

    def __init__(self, tensors: TensorOffsets, balance: Optional[Mapping[str, float]] = None,
                 cuts: Iterable[int] = ()) -> None:
        self.tensors = tensors
        self.balance: Dict[str, float] = dict(balance or {})
        self.cuts: Tuple[int, ...] = tuple(sorted({int(c) for c in cuts
                                                   if 0 < int(c) < tensors.size}))

    def counted(self) -> int:
        """How many elements the servers split by range (those that count at all)."""
        return sum(self.tensors.sizes[t] for t in self.tensors.names if self.balance.get(t, 1))

    def for_servers(self, n_servers: int) -> List[int]:
        """The cuts between ``n_servers`` servers' ranges. ValueError when there are fewer
        weights than servers."""
        n = int(n_servers)
        if n < 1:
            raise ValueError(f"servers must be >= 1, got {n_servers!r}")
        counted = self.counted()
        if counted < n:
            raise ValueError(f"the model has {counted} weights to split by range, too few to "
                             f"give each of {n} servers a shard; use fewer servers")
        return [self.cut(s, n) for s in range(1, n)]

    def cut(self, s: int, n_servers: int) -> int:
        """Where server ``s``'s range begins among ``n_servers``: at its equal share of the
        elements (as ``balance`` counts them)."""
        if not self.balance:
            return self.tensors.size * s // n_servers
        return self._balanced_point(s / n_servers)

    def ranges(self, frames: FramePlan, n_servers: int) -> List[Range]:
        """Shard ranges [lo, hi) of ``n_servers`` servers over ``frames``' shards."""
        n = int(n_servers)
        cuts = [0] + [frames.shards_of_range(0, self.cut(s, n))[1] for s in range(1, n)]
        cuts.append(frames.n_shards)
        return [(cuts[s], cuts[s + 1]) for s in range(n)]

    def _balanced_point(self, share: float) -> int:
        """The element offset below which ``share`` of the balanced elements lie."""
        t = self.tensors
        counts = [t.sizes[n] * float(self.balance.get(n, 1.0)) for n in t.names]
        target, seen = share * sum(counts), 0.0
        for n, c in zip(t.names, counts):
            if seen + c >= target and c > 0:
                return t.offsets[n] + min(t.sizes[n], int((target - seen) / c * t.sizes[n]))
            seen += c
        return t.size


def _delegated(part: str, name: str) -> Any:
    """A read-only attribute of ParamLayout that is ``name`` of its part ``part``."""
    return property(lambda self: getattr(getattr(self, part), name))


class ParamLayout:
    """Names → (offset, shape) in a flat buffer of one dtype; shards are the server's units
    of update, frames its messages, cuts the bounds between servers' ranges.

    Composed of a TensorOffsets (``tensors``), a FramePlan (``frame_plan``) and the
    ServerCuts (``server_cuts``); its attributes and methods delegate to them.
    """

    def __init__(self, shapes: Mapping[str, Sequence[int]], dtype: Any = "float32",
                 shard_elems: int = DEFAULT_SHARD_ELEMS, cuts: Iterable[int] = (),
                 balance: Optional[Mapping[str, float]] = None, *,
                 weights: Optional[Mapping[str, float]] = None) -> None:
        """``cuts``: element offsets that must also be shard bounds (where one server's range
        ends and the next one's begins, inside a tensor if need be). ``balance``: name -> what
        one of its elements counts for when the servers' ranges are balanced (default 1; 0
        for a row-sparse table, which the servers split by rows instead: psframe.sparse).
        ``weights``: the old name of ``balance``, still accepted."""
        if weights is not None:
            if balance is not None:
                raise TypeError("pass balance= only (weights= is its old name)")
            balance = weights
        if str(np.dtype(dtype)) not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        if int(shard_elems) < 1:
            raise ValueError(f"shard_elems must be >= 1, got {shard_elems}")
        self.dtype: np.dtype = np.dtype(dtype)
        self.tensors = TensorOffsets(shapes)
        self.server_cuts = ServerCuts(self.tensors, balance, cuts)
        self.frame_plan = FramePlan(self.tensors, int(shard_elems), self.server_cuts.cuts)
        # Asked several times a step by the server and every worker: bound straight to the
        # frame plan's methods, with no call in between (the methods below document them).
        plan = self.frame_plan
        self.shard_range = plan.shard_range  # type: ignore[method-assign]
        self.shards_of_range = plan.shards_of_range  # type: ignore[method-assign]
        self.frames = plan.frames  # type: ignore[method-assign]

    @classmethod
    def from_params(cls, params: Mapping[str, Any], dtype: Any = "float32",
                    shard_elems: int = DEFAULT_SHARD_ELEMS,
                    balance: Optional[Mapping[str, float]] = None) -> ParamLayout:
        return cls({n: np.shape(a) for n, a in params.items()}, dtype, shard_elems,
                   balance=balance)

    # -- the tensors ------------------------------------------------------------------------
    names = _delegated("tensors", "names")
    shapes = _delegated("tensors", "shapes")
    sizes = _delegated("tensors", "sizes")
    offsets = _delegated("tensors", "offsets")
    size = _delegated("tensors", "size")

    @property
    def nbytes(self) -> int:
        return self.tensors.size * self.dtype.itemsize

    # -- shards and frames ------------------------------------------------------------------
    shard_elems = _delegated("frame_plan", "shard_elems")
    # shard_bounds[k]..shard_bounds[k+1] is shard k, contiguous and in order.
    shard_bounds = _delegated("frame_plan", "bounds")
    n_shards = _delegated("frame_plan", "n_shards")
    tensor_shards = _delegated("frame_plan", "tensor_shards")

    def shard_range(self, lo: int, hi: int) -> Range:
        """Element range [start, stop) covered by shards [lo, hi)."""
        return self.frame_plan.shard_range(lo, hi)

    def shards_of_range(self, start: int, stop: int) -> Range:
        """Shard range [lo, hi) that exactly covers elements [start, stop)."""
        return self.frame_plan.shards_of_range(start, stop)

    def frames(self, lo: int = 0, hi: Optional[int] = None) -> List[Range]:
        """Element ranges of the messages that carry shards [lo, hi); cached, it is per step."""
        return self.frame_plan.frames(lo, hi)

    def layer_frames(self, part: Range, layer_shards: Sequence[Range]) -> List[Range]:
        """The frames of ``part`` layer by layer, last layer first (FramePlan.layer_frames)."""
        return self.frame_plan.layer_frames(part, layer_shards)

    # -- the servers' cuts ------------------------------------------------------------------
    cuts = _delegated("server_cuts", "cuts")
    balance = _delegated("server_cuts", "balance")

    @property
    def weights(self) -> Dict[str, float]:
        """The old name of ``balance`` (``weights`` now means the weight buffer only)."""
        return self.balance

    @weights.setter
    def weights(self, balance: Mapping[str, float]) -> None:
        # Kept for callers that still set it; new code passes balance= to the constructor.
        self.server_cuts = ServerCuts(self.tensors, balance, self.server_cuts.cuts)

    def signature(self, with_cuts: bool = True) -> Tuple[Any, ...]:
        """A hashable description; ranks compare it to agree on one layout. Without the
        servers' cuts it names the model's layout, whatever the number of servers."""
        sig = (str(self.dtype), self.shard_elems, tuple((n, self.shapes[n]) for n in self.names))
        return sig + (self.cuts,) if self.cuts and with_cuts else sig

    def uncut(self) -> ParamLayout:
        """This layout without the servers' cuts."""
        if not self.cuts:
            return self
        return ParamLayout(self.shapes, self.dtype, self.shard_elems, balance=self.balance)

    def cut_for(self, n_servers: int) -> ParamLayout:
        """This layout with its shards also cut where each of ``n_servers`` servers' equal
        share of the elements ends (a tensor may span servers). ValueError when there are
        fewer weights than servers."""
        cuts = self.server_cuts.for_servers(n_servers)
        if not cuts:
            return self
        return ParamLayout(self.shapes, self.dtype, self.shard_elems, cuts=cuts,
                           balance=self.balance)

    def server_cut(self, s: int, n_servers: int) -> int:
        """Where server ``s``'s range begins among ``n_servers`` (ServerCuts.cut)."""
        return self.server_cuts.cut(s, n_servers)

    # -- buffers ----------------------------------------------------------------------------
    def empty(self, xp: Any = np) -> np.ndarray:
        """An uninitialised flat buffer of the layout (``xp``: numpy or cupy)."""
        return xp.empty(self.size, dtype=self.dtype)

    def views(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """Dict name → reshaped view into ``flat`` (no copies)."""
        return self.tensors.views(flat)

    def flatten(self, params: Mapping[str, np.ndarray],
                out: Optional[np.ndarray] = None) -> np.ndarray:
        """Copy a dict of arrays into a flat buffer, checking names and shapes."""
        return self.tensors.flatten(params, self.empty() if out is None else out)

    def unflatten(self, flat: np.ndarray) -> Dict[str, np.ndarray]:
        """Dict name → independent copies (for results handed to users)."""
        return {n: v.copy() for n, v in self.views(flat).items()}

    def __repr__(self) -> str:
        return (
            f"ParamLayout({len(self.names)} tensors, {self.size} elements, {self.dtype}, "
            f"{self.n_shards} shards)"
        )


def server_ranges(layout: ParamLayout, n_servers: int) -> List[Range]:
    """Shard ranges [lo, hi) of ``n_servers`` servers: contiguous, in order, covering every
    shard, each one the shards up to the next of the layout's cuts (see cut_for), so each
    server holds an equal share of the elements, to one element."""
    return layout.server_cuts.ranges(layout.frame_plan, n_servers)


def recount_shards(counts: np.ndarray, old: ParamLayout, new: ParamLayout) -> np.ndarray:
    """Per-shard update counts of layout ``old`` carried to layout ``new`` (the same tensors,
    other cuts: a checkpoint resumed with another number of servers). Each new shard takes
    the count of the old shards its elements were in; ValueError if those differ."""
    counts = np.asarray(counts)
    out = np.empty(new.n_shards, dtype=counts.dtype)
    for k in range(new.n_shards):
        a, b = int(new.shard_bounds[k]), int(new.shard_bounds[k + 1])
        lo = int(np.searchsorted(old.shard_bounds, a, side="right")) - 1
        hi = int(np.searchsorted(old.shard_bounds, b, side="left"))
        seen = set(counts[lo:hi].tolist())
        if len(seen) != 1:
            raise ValueError(f"elements [{a}, {b}) were updated {sorted(seen)} times in the "
                             "checkpoint's shards; they cannot share one shard")
        out[k] = seen.pop()
    return out


def overlap(a: Range, b: Range) -> Range:
    """The shard range both ranges cover; empty as (lo, lo) with lo inside ``a``."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    if hi <= lo:
        lo = hi = min(max(b[0], a[0]), a[1])
    return lo, hi
