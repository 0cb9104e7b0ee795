"""Layers for Sequential models: parameter init, forward and backward on NumPy or CuPy arrays."""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..backend import xp

IntPair = Union[int, Tuple[int, int]]  # a size given once for both axes, or as (height, width)

__all__ = ["Layer", "Dense", "ReLU", "Tanh", "Reshape", "Flatten", "Conv2D", "MaxPool2D",
           "Dropout", "Embedding", "scatter_rows"]


class Layer:
    """Base class: a function of one input with named parameters.

    Subclasses with parameters override ``param_shapes`` and ``init_params``
    (same names). ``forward`` returns ``(y, cache)``; ``backward`` gets that
    cache and ``dy`` and returns ``(grads, dx)`` with ``grads`` keyed like the
    parameters. ``infer`` is the evaluation forward (no cache, no randomness).
    Layers that change the shape override ``out_features``, which maps the
    shape of one sample in to the shape out: an int for a flat row, a tuple
    such as (channels, height, width) otherwise, None when not known yet.
    """

    # A flat row keeps its width through the layer (Sequential.n_features looks past it).
    keeps_width = True
    # backward takes need_dx=False, so the first parameterised layer can skip dx.
    can_skip_dx = False

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return {}

    def init_params(self, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        return {}

    def forward(self, params: Dict[str, Any], x: Any) -> Tuple[Any, Any]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward(params, x) -> (y, cache)"
        )

    def infer(self, params: Dict[str, Any], x: Any) -> Any:
        return self.forward(params, x)[0]

    def backward(self, params: Dict[str, Any], cache: Any,
                 dy: Any) -> Tuple[Dict[str, Any], Any]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement backward(params, cache, dy) -> (grads, dx)"
        )

    def out_features(self, in_features):
        # Shape-preserving by default; None means "width not known yet".
        return in_features

    def flops(self, batch):
        return 0

    def __repr__(self):
        return f"{type(self).__name__}()"


def _positive_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _pair(value, what, minimum=1):
    """An int or a pair of ints (height, width), each >= minimum, as a tuple of two."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    ok = len(pair) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum
        for v in pair)
    if not ok:
        kind = "positive" if minimum else "non-negative"
        raise ValueError(f"{what} must be a {kind} integer or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def _size(shape):
    return shape if isinstance(shape, int) else int(np.prod(shape))


def _image_shape(layer, in_features):
    """(channels, height, width) for a layer that takes images, or None when not known."""
    if in_features is None:
        return None
    if isinstance(in_features, int) or len(in_features) != 3:
        got = (f"flat rows of {in_features}" if isinstance(in_features, int)
               else f"samples of shape {tuple(in_features)}")
        raise ValueError(
            f"{layer!r} takes images of shape (channels, height, width) but receives {got}; "
            "put a Reshape((channels, height, width)) before it"
        )
    return tuple(int(d) for d in in_features)


def _out_size(size, kernel, stride):
    return (size - kernel) // stride + 1


class Dense(Layer):
    """Fully connected layer: y = x @ W + b."""

    INITS = ("he", "glorot")
    can_skip_dx = True

    def __init__(self, n_in: int, n_out: int, init: str = "he"):
        self.n_in = _positive_int(n_in, "Dense n_in")
        self.n_out = _positive_int(n_out, "Dense n_out")
        if init not in self.INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {list(self.INITS)}")
        self.init = init

    def param_shapes(self):
        return {"W": (self.n_in, self.n_out), "b": (self.n_out,)}

    def init_params(self, rng):
        shape = (self.n_in, self.n_out)
        if self.init == "he":
            W = rng.normal(0.0, math.sqrt(2.0 / self.n_in), size=shape)
        else:
            limit = math.sqrt(6.0 / (self.n_in + self.n_out))
            W = rng.uniform(-limit, limit, size=shape)
        return {"W": W, "b": np.zeros(self.n_out)}

    def forward(self, params, x):
        return x @ params["W"] + params["b"], x

    def backward(self, params, cache, dy, need_dx=True):
        # need_dx=False lets the first layer skip a matmul as large as dW's.
        x = cache
        grads = {"W": x.T @ dy, "b": dy.sum(axis=0)}
        dx = dy @ params["W"].T if need_dx else None
        return grads, dx

    def out_features(self, in_features):
        if isinstance(in_features, tuple):
            if len(in_features) != 1:
                raise ValueError(
                    f"{self!r} takes flat rows but receives samples of shape {in_features}; "
                    "put a Flatten() before it"
                )
            in_features = in_features[0]
        if in_features is not None and in_features != self.n_in:
            raise ValueError(
                f"{self!r} expects {self.n_in} inputs but receives {in_features}"
            )
        return self.n_out

    def flops(self, batch):
        return 2 * batch * self.n_in * self.n_out + batch * self.n_out

    def __repr__(self):
        extra = "" if self.init == "he" else f", init={self.init!r}"
        return f"Dense({self.n_in}, {self.n_out}{extra})"


class ReLU(Layer):
    """max(x, 0), elementwise."""

    def forward(self, params, x):
        mask = x > 0
        return x * mask, mask

    def infer(self, params, x):
        return xp(x).maximum(x, 0)

    def backward(self, params, cache, dy):
        # bool mask times dy keeps dy's dtype.
        return {}, dy * cache


class Tanh(Layer):
    """tanh(x), elementwise."""

    def forward(self, params, x):
        y = xp(x).tanh(x)
        return y, y

    def backward(self, params, cache, dy):
        y = cache
        return {}, dy * (1 - y * y)


class Reshape(Layer):
    """Each sample to ``shape``, the batch axis kept: (batch, *shape), as torch's view."""

    keeps_width = False

    def __init__(self, shape: Union[int, Sequence[int]]):
        dims = (shape,) if isinstance(shape, (int, numbers.Integral)) else tuple(shape)
        self.shape = tuple(_positive_int(d, "Reshape dimension") for d in dims)
        if not self.shape:
            raise ValueError("Reshape needs at least one dimension")
        self.size = _size(self.shape)

    def forward(self, params, x):
        return x.reshape((x.shape[0],) + self.shape), x.shape

    def backward(self, params, cache, dy):
        return {}, dy.reshape(cache)

    def out_features(self, in_features):
        if in_features is not None and _size(in_features) != self.size:
            raise ValueError(
                f"{self!r} needs {self.size} values per sample but receives {in_features}"
            )
        return self.shape if len(self.shape) > 1 else self.size

    def __repr__(self):
        return f"Reshape({self.shape})"


class Flatten(Layer):
    """Each sample to one flat row, (batch, -1), as torch's flatten from dim 1."""

    def forward(self, params, x):
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, params, cache, dy):
        return {}, dy.reshape(cache)

    def out_features(self, in_features):
        return None if in_features is None else _size(in_features)


class Conv2D(Layer):
    """2-D cross-correlation of NCHW images, as torch.nn.functional.conv2d, plus a bias.

    ``W`` has shape (out, in, kh, kw) and ``b`` shape (out,). Init "torch" (default) is
    torch's own: W and b uniform in +-1/sqrt(fan_in), fan_in = in*kh*kw; "he" is normal
    with std sqrt(2/fan_in) and a zero bias. The windows are gathered once per forward
    (im2col, through a strided view) and multiplied with W in one matmul. The output is an
    NCHW view of channels-first memory, which the next layers keep.
    """

    INITS = ("torch", "he")
    keeps_width = False
    can_skip_dx = True
    # infer works through a batch in pieces so that their windows take at most this much.
    INFER_BYTES = 64 << 20

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntPair,
                 stride: IntPair = 1, padding: IntPair = 0, init: str = "torch"):
        self.in_channels = _positive_int(in_channels, "Conv2D in_channels")
        self.out_channels = _positive_int(out_channels, "Conv2D out_channels")
        self.kernel_size = _pair(kernel_size, "Conv2D kernel_size")
        self.stride = _pair(stride, "Conv2D stride")
        self.padding = _pair(padding, "Conv2D padding", minimum=0)
        if init not in self.INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {list(self.INITS)}")
        self.init = init
        self.fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        self._out_hw = None  # output height and width, once out_features has seen the input
        # Buffers kept from step to step: a fresh array of megabytes costs as much in page
        # faults as the work done in it. Scratch ones are used within one call; spare window
        # matrices wait from a forward until its backward hands them back.
        self._scratch: Dict[Tuple[Any, ...], Any] = {}
        self._spare: Dict[Tuple[Any, ...], List[Any]] = {}

    def __getstate__(self):  # a pickled or copied layer leaves its buffers behind
        return {**self.__dict__, "_scratch": {}, "_spare": {}}

    def _scratch_zeros(self, name, m, shape, dtype):
        """A zeroed buffer of this shape, kept: callers write only where they wrote before,
        so what was zero (padding, unused columns) stays zero."""
        key = (name, m.__name__, shape, np.dtype(dtype).str)
        if key not in self._scratch:
            self._scratch[key] = m.zeros(shape, dtype=dtype)
        return self._scratch[key]

    def _take(self, m, shape, dtype):
        spare = self._spare.get((m.__name__, shape, np.dtype(dtype).str))
        return spare.pop() if spare else m.empty(shape, dtype=dtype)

    def _give(self, array):
        key = (xp(array).__name__, array.shape, array.dtype.str)
        self._spare.setdefault(key, []).append(array)

    def param_shapes(self):
        return {"W": (self.out_channels, self.in_channels) + self.kernel_size,
                "b": (self.out_channels,)}

    def init_params(self, rng):
        shape = self.param_shapes()["W"]
        if self.init == "torch":
            bound = 1.0 / math.sqrt(self.fan_in)
            return {"W": rng.uniform(-bound, bound, size=shape),
                    "b": rng.uniform(-bound, bound, size=self.out_channels)}
        return {"W": rng.normal(0.0, math.sqrt(2.0 / self.fan_in), size=shape),
                "b": np.zeros(self.out_channels)}

    def _geometry(self, h, w):
        """Padded (height, width) and output (height, width) for images of h x w."""
        (ph, pw), (kh, kw), (sh, sw) = self.padding, self.kernel_size, self.stride
        hp, wp = h + 2 * ph, w + 2 * pw
        out_hw = (hp - kh) // sh + 1, (wp - kw) // sw + 1
        if min(out_hw) <= 0:
            raise ValueError(f"{self!r} gets images of {(h, w)}, smaller than its kernel")
        return (hp, wp), out_hw

    @staticmethod
    def _planes(flat, hp, wp):
        """A (C, N, hp*wp + tail) buffer, each (channel, sample) plane flat with ``tail``
        spare elements, as a (C, N, hp, wp) view."""
        return flat[:, :, :hp * wp].reshape(flat.shape[:2] + (hp, wp))

    def _cols(self, x, keep=True):
        """The windows of x as one (in*kh*kw, N*L) matrix, and the geometry.

        The matrix holds channels first and the batch inside (C, N, ...) so that forward
        and backward are each one large matmul, not one per sample. With stride 1 every
        output row is computed over the padded width wp (L = out_h*wp; the extra columns are
        dropped afterwards): a kernel tap is then one contiguous run of each flat padded
        plane, so the gather here and the scatter-add in backward are long copies. ``keep``
        (training): the buffers are the layer's own, kept for the next step.
        """
        n, c, h, w = x.shape
        m = xp(x)
        (hp, wp), (out_h, out_w) = self._geometry(h, w)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        wide = self.stride == (1, 1)
        planes = (c, n, hp * wp + (kw - 1 if wide else 0))
        flat = self._scratch_zeros("input", m, planes, x.dtype) if keep else m.zeros(planes,
                                                                                     x.dtype)
        image = self._planes(flat, hp, wp)
        image[:, :, ph:ph + h, pw:pw + w] = x.transpose(1, 0, 2, 3)
        item = x.itemsize
        if wide:
            length = out_h * wp
            sc, sn = flat.strides[:2]
            windows = m.lib.stride_tricks.as_strided(
                flat, (c, kh, kw, n, length), (sc, wp * item, item, sn, item))
        else:
            length = out_h * out_w
            sc, sn, row = image.strides[:3]
            windows = m.lib.stride_tricks.as_strided(
                image, (c, kh, kw, n, out_h, out_w),
                (sc, row, item, sn, row * sh, item * sw))
        shape = (self.fan_in, n * length)
        cols = self._take(m, shape, x.dtype) if keep else m.empty(shape, x.dtype)
        cols.reshape(windows.shape)[...] = windows
        return cols, (x.shape, (hp, wp), (out_h, out_w), wide)

    def _apply(self, params, cols, geometry):
        (n, _, _, _), (_, wp), (out_h, out_w), wide = geometry
        y = params["W"].reshape(self.out_channels, self.fan_in) @ cols
        y += params["b"][:, None]
        y = y.reshape(self.out_channels, n, out_h, wp if wide else out_w)
        return y[:, :, :, :out_w].transpose(1, 0, 2, 3)  # NCHW, held channels first

    def forward(self, params, x):
        cols, geometry = self._cols(x)
        return self._apply(params, cols, geometry), (cols, geometry)

    def infer(self, params, x):
        n = x.shape[0]
        per_sample = self.fan_in * x.itemsize * max(1, x.shape[2] * x.shape[3])
        piece = max(1, self.INFER_BYTES // per_sample)
        if n <= piece:
            return self._apply(params, *self._cols(x, keep=False))
        return xp(x).concatenate([self._apply(params, *self._cols(x[lo:lo + piece], keep=False))
                                  for lo in range(0, n, piece)])

    def backward(self, params, cache, dy, need_dx=True):
        """Gradients, and dx unless need_dx=False. It hands the cache's window matrix back
        to the layer for the next forward: call it once per forward."""
        cols, geometry = cache
        (n, _, _, _), (_, wp), (out_h, out_w), wide = geometry
        m = xp(dy)
        # dy as (out, N, out_h, L / out_h), zero on the extra columns so they add nothing.
        g = self._scratch_zeros("dy", m, (self.out_channels, n, out_h, wp if wide else out_w),
                                dy.dtype)
        g[:, :, :, :out_w] = dy.transpose(1, 0, 2, 3)
        g = g.reshape(self.out_channels, -1)
        W = params["W"].reshape(self.out_channels, self.fan_in)
        # cols @ g.T, not g @ cols.T: BLAS runs this long-K product faster untransposed.
        dW = m.ascontiguousarray((cols @ g.T).T)
        grads = {"W": dW.reshape(params["W"].shape), "b": g.sum(axis=1)}
        self._give(cols)  # only its shape and dtype are needed below
        if not need_dx:
            return grads, None
        dcols = m.matmul(W.T, g, out=self._scratch_zeros("dcols", m, cols.shape, cols.dtype))
        return grads, self._col2im(dcols, geometry)

    def _col2im(self, dcols, geometry):
        """Sum every window's gradient back onto the padded input: one add per kernel tap."""
        (n, c, h, w), (hp, wp), (out_h, out_w), wide = geometry
        (ph, pw), (kh, kw), (sh, sw) = self.padding, self.kernel_size, self.stride
        taps = dcols.reshape((c, kh, kw, n) + ((-1,) if wide else (out_h, out_w)))
        flat = xp(dcols).zeros((c, n, hp * wp + (kw - 1 if wide else 0)), dtype=dcols.dtype)
        image = self._planes(flat, hp, wp)
        length = taps.shape[-1]
        for i in range(kh):
            for j in range(kw):
                if wide:
                    start = i * wp + j
                    flat[:, :, start:start + length] += taps[:, i, j]
                else:
                    image[:, :, i:i + sh * out_h:sh, j:j + sw * out_w:sw] += taps[:, i, j]
        return image[:, :, ph:ph + h, pw:pw + w].transpose(1, 0, 2, 3)

    def out_features(self, in_features):
        shape = _image_shape(self, in_features)
        if shape is None:
            return None
        c, h, w = shape
        if c != self.in_channels:
            raise ValueError(f"{self!r} expects {self.in_channels} channels but receives {c}")
        _, out_hw = self._geometry(h, w)
        self._out_hw = out_hw
        return (self.out_channels,) + out_hw

    def flops(self, batch):
        if self._out_hw is None:
            return 0
        positions = batch * self._out_hw[0] * self._out_hw[1]
        return positions * self.out_channels * (2 * self.fan_in + 1)

    def __repr__(self):
        def show(pair):
            return pair[0] if pair[0] == pair[1] else pair
        extra = "" if self.stride == (1, 1) else f", stride={show(self.stride)}"
        extra += "" if self.padding == (0, 0) else f", padding={show(self.padding)}"
        extra += "" if self.init == "torch" else f", init={self.init!r}"
        return (f"Conv2D({self.in_channels}, {self.out_channels}, "
                f"{show(self.kernel_size)}{extra})")


class MaxPool2D(Layer):
    """Max over each kernel window of NCHW images, as torch's max_pool2d (no padding, floor).

    ``stride`` defaults to ``kernel_size``. Where a window holds equal maxima the gradient
    goes to the first in row-major order, as torch's does.
    """

    keeps_width = False

    def __init__(self, kernel_size: IntPair, stride: Optional[IntPair] = None):
        self.kernel_size = _pair(kernel_size, "MaxPool2D kernel_size")
        self.stride = self.kernel_size if stride is None else _pair(stride, "MaxPool2D stride")

    def _taps(self, x):
        """Each kernel tap's strided view of x, shape (N, C, out_h, out_w), in row-major order."""
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        out_h = _out_size(x.shape[2], kh, sh)
        out_w = _out_size(x.shape[3], kw, sw)
        if out_h <= 0 or out_w <= 0:
            raise ValueError(f"{self!r} gets images of {x.shape[2:]}, smaller than its kernel")
        return [x[:, :, i:i + sh * out_h:sh, j:j + sw * out_w:sw]
                for i in range(kh) for j in range(kw)]

    def infer(self, params, x):
        taps = self._taps(x)
        m = xp(x)
        y = m.empty_like(taps[0])  # in x's memory order, which a Conv2D keeps channels first
        m.copyto(y, taps[0])
        for tap in taps[1:]:
            m.maximum(y, tap, out=y)
        return y

    def forward(self, params, x):
        y = self.infer(params, x)
        return y, (x, y)

    def backward(self, params, cache, dy):
        x, y = cache
        m = xp(x)
        dx = m.zeros_like(x)
        left = dy.copy()  # each window's gradient until a tap holding its max takes it
        given = m.empty_like(left)
        for tap, dtap in zip(self._taps(x), self._taps(dx)):
            m.multiply(left, tap == y, out=given)
            dtap += given
            left -= given  # exactly zero once given: later equal maxima get nothing
        return {}, dx

    def out_features(self, in_features):
        shape = _image_shape(self, in_features)
        if shape is None:
            return None
        c, h, w = shape
        out_hw = tuple(_out_size(s, k, st) for s, k, st in
                       zip((h, w), self.kernel_size, self.stride))
        if min(out_hw) <= 0:
            raise ValueError(f"{self!r} gets images of {(h, w)}, smaller than its kernel")
        return (c,) + out_hw

    def __repr__(self):
        k = self.kernel_size[0] if self.kernel_size[0] == self.kernel_size[1] else self.kernel_size
        extra = "" if self.stride == self.kernel_size else f", stride={self.stride}"
        return f"MaxPool2D({k}{extra})"


class Dropout(Layer):
    """Zeroes each value with probability p while training, scaling the rest by 1/(1-p).

    In evaluation (``infer``: Sequential's evaluate and predict) it is the identity. The
    masks come from the layer's own generator, advanced by every training forward, so each
    step draws a fresh mask. ``init_params`` reseeds it from the run's generator and the
    layer's ``seed``: masks are reproducible from ``ps.train``'s seed. Every rank builds
    the same model, so ``ps.train`` then calls ``reseed(seed, worker)`` on each worker: each
    draws masks of its own.
    """

    def __init__(self, p: float = 0.5, seed: int = 0):
        if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0 <= p < 1:
            raise ValueError(f"Dropout p must be a probability in [0, 1), got {p!r}")
        self.p = float(p)
        self.seed = int(seed)
        self.reseed()

    def reseed(self, *key):
        """Restart the masks from a generator seeded by (seed, *key)."""
        self.rng = np.random.default_rng([self.seed, *(int(k) for k in key)])

    def init_params(self, rng):
        # A child of the run's generator: seeded by the run, without taking draws from the
        # stream that the other layers' weights come from.
        self.reseed(rng.spawn(1)[0].integers(2 ** 63))
        return {}

    def forward(self, params, x):
        if self.p == 0:
            return x, None
        dtype = x.dtype if x.dtype in (np.float32, np.float64) else np.float64
        keep = self.rng.random(x.shape, dtype=dtype) >= self.p
        mask = xp(x).asarray(keep) * x.dtype.type(1.0 / (1.0 - self.p))
        return x * mask, mask

    def infer(self, params, x):
        return x

    def backward(self, params, cache, dy):
        return {}, dy if cache is None else dy * cache

    def __repr__(self):
        extra = "" if self.seed == 0 else f", seed={self.seed}"
        return f"Dropout({self.p}{extra})"


def scatter_rows(values, ids, n_rows):
    """An (n_rows, dim) array whose row r is the sum of the ``values`` rows with ``ids`` == r.

    The gradient of a table lookup. On NumPy: the ids sorted once, then np.add.reduceat over
    the runs of equal ids. Measured (NumPy 2.4, one core): on a 1M-row table, 8192 ids of
    dim 16, 1.5 ms where np.add.at takes 7.4 ms (it walks the whole table); 64 ids, 0.014 ms
    against 8.2 ms; at worst, 32768 ids over 1000 rows of dim 64, 19 ms against 15 ms.
    On CuPy, cupyx.scatter_add.
    """
    m = xp(values)
    out = m.zeros((n_rows, values.shape[1]), dtype=values.dtype)
    if ids.size == 0:
        return out
    if m is not np:
        import cupyx

        cupyx.scatter_add(out, ids, values)
        return out
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    out[sorted_ids[starts]] = np.add.reduceat(values[order], starts, axis=0)
    return out


class Embedding(Layer):
    """A table of ``num_embeddings`` rows of ``dim``, looked up by integer ids (batch, k).

    ``combine="mean"`` or ``"sum"``: the output is (batch, dim), the mean or sum of each
    sample's k rows, as torch.nn.EmbeddingBag(mode=...) computes it; ``combine=None``: the k
    rows side by side, (batch, k*dim), as torch.nn.Embedding followed by a flatten. The
    parameter ``W`` is (num_embeddings, dim). Init "scaled" (default) draws W from
    N(0, 1/dim), so a row has about unit norm; "torch" from N(0, 1), as torch's does.

    The table may arrive with fewer rows than ``num_embeddings``, with ids indexing into it (a
    worker that pulled only the rows its batch touches, the ids remapped): forward and
    backward use ``params["W"]`` as given and its gradient has that array's shape. So the ids
    are checked against ``num_embeddings`` by ``check_ids`` (a model's validate_data, before
    training), not per step. An empty bag (k = 0) is refused. Ids have no gradient: an
    Embedding comes first in a Sequential, or reads one input of a model with several.
    ``sparse=True`` marks the table for the row-sparse protocol (only the rows a batch
    touches move); with False it is an ordinary dense parameter.
    """

    INITS = ("scaled", "torch")
    COMBINES = ("mean", "sum", None)
    keeps_width = False
    can_skip_dx = True

    def __init__(self, num_embeddings: int, dim: int, combine: Optional[str] = "mean",
                 sparse: bool = True, init: str = "scaled"):
        self.num_embeddings = _positive_int(num_embeddings, "Embedding num_embeddings")
        self.dim = _positive_int(dim, "Embedding dim")
        if combine not in self.COMBINES:
            raise ValueError(f"unknown combine {combine!r}; choose one of {list(self.COMBINES)}")
        if init not in self.INITS:
            raise ValueError(f"unknown init {init!r}; choose one of {list(self.INITS)}")
        if not isinstance(sparse, bool):
            raise ValueError(f"Embedding sparse must be True or False, got {sparse!r}")
        self.combine, self.sparse, self.init = combine, sparse, init

    def param_shapes(self):
        return {"W": (self.num_embeddings, self.dim)}

    def init_params(self, rng):
        std = 1.0 / math.sqrt(self.dim) if self.init == "scaled" else 1.0
        return {"W": rng.normal(0.0, std, size=(self.num_embeddings, self.dim))}

    def check_ids(self, ids, what="ids"):
        """One clear ValueError unless ``ids`` is an integer array (batch, k), k >= 1, of
        ids in [0, num_embeddings)."""
        m = xp(ids)
        expect = (f"{what} for {self!r} must be integers in [0, {self.num_embeddings}) of "
                  f"shape (batch, k)")
        if getattr(ids, "ndim", None) != 2:
            raise ValueError(f"{expect}; got shape {getattr(ids, 'shape', None)}")
        if ids.dtype.kind not in "iu":
            raise ValueError(f"{expect}; got dtype {ids.dtype}")
        if ids.shape[1] == 0:
            raise ValueError(f"{expect} with k >= 1: an empty bag (k = 0) has no rows to "
                             "combine")
        if ids.size:
            low, high = int(m.min(ids)), int(m.max(ids))
            if low < 0 or high >= self.num_embeddings:
                bad = low if low < 0 else high
                raise ValueError(f"{expect}; found id {bad}")

    def _lookup(self, params, ids):
        if ids.ndim != 2 or ids.shape[1] == 0:
            raise ValueError(f"{self!r} takes ids of shape (batch, k), k >= 1; got "
                             f"{ids.shape}")
        rows = xp(ids).take(params["W"], ids, axis=0)  # (batch, k, dim)
        if self.combine is None:
            return rows.reshape(ids.shape[0], -1)
        total = rows.sum(axis=1)
        return total / ids.shape[1] if self.combine == "mean" else total

    def forward(self, params, ids):
        return self._lookup(params, ids), ids

    def infer(self, params, ids):
        return self._lookup(params, ids)

    def backward(self, params, cache, dy, need_dx=True):
        ids = cache
        batch, k = ids.shape
        if self.combine is None:
            per_id = dy.reshape(batch * k, self.dim)
        else:
            d = dy / k if self.combine == "mean" else dy
            per_id = xp(dy).repeat(d, k, axis=0)  # row b*k + j: bag b's share for its id j
        return {"W": scatter_rows(per_id, ids.reshape(-1), params["W"].shape[0])}, None

    def out_features(self, in_features):
        # The input is k ids per sample: an int (or a 1-tuple) when known.
        if isinstance(in_features, tuple):
            if len(in_features) != 1:
                raise ValueError(f"{self!r} takes ids of shape (batch, k) but receives samples "
                                 f"of shape {in_features}")
            in_features = in_features[0]
        if self.combine is not None:
            return self.dim
        return None if in_features is None else in_features * self.dim

    def flops(self, batch):
        return batch * self.dim

    def __repr__(self):
        extra = "" if self.combine == "mean" else f", combine={self.combine!r}"
        extra += "" if self.sparse else ", sparse=False"
        extra += "" if self.init == "scaled" else f", init={self.init!r}"
        return f"Embedding({self.num_embeddings}, {self.dim}{extra})"
