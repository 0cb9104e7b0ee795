"""Layers for Sequential models: parameter init, forward and backward on NumPy or CuPy arrays."""
import math
import numbers

import numpy as np

from .backend import xp

__all__ = ["Layer", "Dense", "ReLU", "Tanh"]


class Layer:
    """Base class: a function of one input with named parameters.

    Subclasses with parameters override ``param_shapes`` and ``init_params``
    (same names). ``forward`` returns ``(y, cache)``; ``backward`` gets that
    cache and ``dy`` and returns ``(grads, dx)`` with ``grads`` keyed like the
    parameters. Layers that change the width override ``out_features``.
    """

    def param_shapes(self):
        return {}

    def init_params(self, rng):
        return {}

    def forward(self, params, x):
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward(params, x) -> (y, cache)"
        )

    def backward(self, params, cache, dy):
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


class Dense(Layer):
    """Fully connected layer: y = x @ W + b."""

    INITS = ("he", "glorot")

    def __init__(self, n_in, n_out, init="he"):
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
