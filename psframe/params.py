"""Parameter layout: every tensor at an offset in one flat buffer, cut into shards and frames."""
import numpy as np

__all__ = ["ParamLayout", "DEFAULT_SHARD_ELEMS", "server_ranges", "overlap", "recount_shards"]

# 256 Ki elements (1 MiB in float32), measured by benchmarks/transport.py on MPICH shared
# memory. Since the server updates frame by frame and sends each frame as soon as it is
# updated, several frames let the copy of one overlap the update of the next: at 4 MB the
# round trip with SGD ran at 0.62-0.74 of raw Send/Recv with 256 Ki frames, 0.46-0.61 with
# one 1 Mi frame, and at 16 and 64 MB the two were even (0.54-0.60). Before that overlap,
# 1 Mi had been the faster choice (fewer per-frame handshakes).
DEFAULT_SHARD_ELEMS = 1 << 18

SUPPORTED_DTYPES = ("float32", "float64")


class ParamLayout:
    """Names → (offset, shape) in a flat buffer; shards are the server's units of update.

    Shards: at least one per tensor; a tensor larger than ``shard_elems`` is split further.
    Frames: consecutive shards coalesced up to ``shard_elems``, so a pull or push of many
    small tensors is still a few large messages. Both sides derive the same plan from the
    layout, so frame sizes never travel on the wire.
    """

    def __init__(self, shapes, dtype="float32", shard_elems=DEFAULT_SHARD_ELEMS, cuts=(),
                 weights=None):
        """``cuts``: element offsets that must also be shard bounds (where one server's range
        ends and the next one's begins, inside a tensor if need be). ``weights``: name -> what
        one of its elements counts for when the servers' ranges are balanced (default 1; 0
        for a row-sparse table, which the servers split by rows instead: psframe.sparse)."""
        if str(np.dtype(dtype)) not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype!r}")
        if int(shard_elems) < 1:
            raise ValueError(f"shard_elems must be >= 1, got {shard_elems}")
        self.dtype = np.dtype(dtype)
        self.shard_elems = int(shard_elems)
        self.names = list(shapes)
        self.weights = dict(weights or {})
        self.shapes = {n: tuple(int(d) for d in shapes[n]) for n in self.names}
        self.sizes = {n: int(np.prod(self.shapes[n], dtype=np.int64)) for n in self.names}
        self.offsets = {}
        offset = 0
        for n in self.names:
            self.offsets[n] = offset
            offset += self.sizes[n]
        self.size = offset
        self.nbytes = self.size * self.dtype.itemsize

        bounds = [0]
        for n in self.names:
            start, stop = self.offsets[n], self.offsets[n] + self.sizes[n]
            for cut in range(start + self.shard_elems, stop, self.shard_elems):
                bounds.append(cut)
            if stop > bounds[-1]:
                bounds.append(stop)
        self.cuts = tuple(sorted({int(c) for c in cuts if 0 < int(c) < self.size}))
        if self.cuts:
            bounds = sorted(set(bounds) | set(self.cuts))
        # shard_bounds[k]..shard_bounds[k+1] is shard k, contiguous and in order.
        self.shard_bounds = np.asarray(bounds, dtype=np.int64)
        self.n_shards = len(bounds) - 1
        self._frames = {}
        self.tensor_shards = {
            n: self.shards_of_range(self.offsets[n], self.offsets[n] + self.sizes[n])
            for n in self.names
        }

    @classmethod
    def from_params(cls, params, dtype="float32", shard_elems=DEFAULT_SHARD_ELEMS):
        return cls({n: np.shape(a) for n, a in params.items()}, dtype, shard_elems)

    def signature(self, with_cuts=True):
        """A hashable description; ranks compare it to agree on one layout. Without the
        servers' cuts it names the model's layout, whatever the number of servers."""
        sig = (str(self.dtype), self.shard_elems, tuple((n, self.shapes[n]) for n in self.names))
        return sig + (self.cuts,) if self.cuts and with_cuts else sig

    def uncut(self):
        """This layout without the servers' cuts."""
        if not self.cuts:
            return self
        return ParamLayout(self.shapes, self.dtype, self.shard_elems, weights=self.weights)

    def cut_for(self, n_servers):
        """This layout with its shards also cut where each of ``n_servers`` servers' equal
        share of the elements ends (a tensor may span servers). ValueError when there are
        fewer weights than servers."""
        n = int(n_servers)
        if n < 1:
            raise ValueError(f"servers must be >= 1, got {n_servers!r}")
        counted = sum(self.sizes[t] for t in self.names if self.weights.get(t, 1))
        if counted < n:
            raise ValueError(f"the model has {counted} weights to split by range, too few to "
                             f"give each of {n} servers a shard; use fewer servers")
        if n == 1:
            return self
        return ParamLayout(self.shapes, self.dtype, self.shard_elems,
                           cuts=[self.server_cut(s, n) for s in range(1, n)],
                           weights=self.weights)

    def server_cut(self, s, n_servers):
        """Where server ``s``'s range begins among ``n_servers``: at its equal share of the
        elements (as ``weights`` count them)."""
        if not self.weights:
            return self.size * s // n_servers
        return self._weighted_point(s / n_servers)

    def _weighted_point(self, share):
        """The element offset below which ``share`` of the layout's weighted elements lie."""
        weights = [self.sizes[n] * float(self.weights.get(n, 1.0)) for n in self.names]
        target, seen = share * sum(weights), 0.0
        for n, w in zip(self.names, weights):
            if seen + w >= target and w > 0:
                return self.offsets[n] + min(self.sizes[n], int((target - seen) / w
                                                                * self.sizes[n]))
            seen += w
        return self.size

    # -- ranges -----------------------------------------------------------------------------
    def shard_range(self, lo, hi):
        """Element range [start, stop) covered by shards [lo, hi)."""
        return int(self.shard_bounds[lo]), int(self.shard_bounds[hi])

    def shards_of_range(self, start, stop):
        """Shard range [lo, hi) that exactly covers elements [start, stop)."""
        lo = int(np.searchsorted(self.shard_bounds, start, side="left"))
        hi = int(np.searchsorted(self.shard_bounds, stop, side="left"))
        if self.shard_bounds[lo] != start or self.shard_bounds[hi] != stop:
            raise ValueError(f"elements [{start}, {stop}) do not fall on shard bounds")
        return lo, hi

    def frames(self, lo=0, hi=None):
        """Element ranges of the messages that carry shards [lo, hi); cached, it is per step."""
        hi = self.n_shards if hi is None else hi
        key = (lo, hi)
        if key not in self._frames:
            self._frames[key] = self._plan_frames(lo, hi)
        return self._frames[key]

    def layer_frames(self, part, layer_shards):
        """The frames of shard range ``part`` layer by layer, last layer first: the order in
        which a layer-wise push sends them as backward makes each layer's gradient.
        ``layer_shards``: each layer's shard range, in forward order, covering ``part``."""
        key = ("layers", tuple(part), tuple(layer_shards))
        if key not in self._frames:
            frames = []
            for shards in reversed(layer_shards):
                frames += self.frames(*overlap(part, shards))
            self._frames[key] = frames
        return self._frames[key]

    def _plan_frames(self, lo, hi):
        if hi <= lo:
            return []
        frames = []
        start = stop = int(self.shard_bounds[lo])
        for k in range(lo, hi):
            end = int(self.shard_bounds[k + 1])
            if end - start > self.shard_elems and stop > start:
                frames.append((start, stop))
                start = stop
            stop = end
        frames.append((start, stop))
        return frames

    # -- buffers ----------------------------------------------------------------------------
    def empty(self, xp=np):
        return xp.empty(self.size, dtype=self.dtype)

    def views(self, flat):
        """Dict name → reshaped view into ``flat`` (no copies)."""
        return {
            n: flat[self.offsets[n] : self.offsets[n] + self.sizes[n]].reshape(self.shapes[n])
            for n in self.names
        }

    def flatten(self, params, out=None):
        """Copy a dict of arrays into a flat buffer, checking names and shapes."""
        out = self.empty() if out is None else out
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
            out[self.offsets[n] : self.offsets[n] + self.sizes[n]] = params[n].reshape(-1)
        return out

    def unflatten(self, flat):
        """Dict name → independent copies (for results handed to users)."""
        return {n: v.copy() for n, v in self.views(flat).items()}

    def __repr__(self):
        return (
            f"ParamLayout({len(self.names)} tensors, {self.size} elements, {self.dtype}, "
            f"{self.n_shards} shards)"
        )


def server_ranges(layout, n_servers):
    """Shard ranges [lo, hi) of ``n_servers`` servers: contiguous, in order, covering every
    shard, each one the shards up to the next of the layout's cuts (see cut_for), so each
    server holds an equal share of the elements, to one element."""
    n = int(n_servers)
    cuts = [0] + [layout.shards_of_range(0, layout.server_cut(s, n))[1] for s in range(1, n)]
    cuts.append(layout.n_shards)
    return [(cuts[s], cuts[s + 1]) for s in range(n)]


def recount_shards(counts, old, new):
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


def overlap(a, b):
    """The shard range both ranges cover; empty as (lo, lo) with lo inside ``a``."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    if hi <= lo:
        lo = hi = min(max(b[0], a[0]), a[1])
    return lo, hi
