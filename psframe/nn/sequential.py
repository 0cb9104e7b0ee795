"""Sequential: a chain of layers and a loss, the model that modes model and hybrid can cut."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..backend import xp
from ..data import Features
from .layers import Dense, Embedding, Layer, Reshape
from .losses import Loss
from .model import Model, _count_equal, _eval_size


class Sequential(Model):
    """A chain of layers followed by a loss; parameters are named ``"{i}.{name}"``."""

    can_pipeline = True

    def __init__(self, layers: Sequence[Layer], loss: Loss):
        layers = list(layers)
        if not layers:
            raise ValueError("Sequential needs at least one layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"layer {i} is a {type(layer).__name__}, not a psframe.layers.Layer"
                )
        if not isinstance(loss, Loss):
            raise TypeError(f"loss must be a psframe.losses.Loss, got {type(loss).__name__}")
        for i, layer in enumerate(layers[1:], start=1):
            if isinstance(layer, Embedding):
                raise ValueError(f"layer {i} is an Embedding, which takes integer ids: it can "
                                 "only be a Sequential's first layer")
        self.layers = layers
        self.loss = loss
        out = self.out_features(None)
        self._n_outputs = out[0] if isinstance(out, tuple) and len(out) == 1 else out
        # Below the first parameterised layer no gradient is needed: backward stops there
        # (len(layers) when no layer has parameters).
        self.first_trained = next((i for i, layer in enumerate(layers) if layer.param_shapes()),
                                   len(layers))
        # (local, global) parameter names per layer, fixed once here.
        self._names = [
            [(name, f"{i}.{name}") for name in layer.param_shapes()]
            for i, layer in enumerate(layers)
        ]

    def out_features(self, in_features: Any, stop: Optional[int] = None) -> Any:
        """Shape of a sample after layers [0, stop): an int (flat), a tuple, or None."""
        shape = in_features
        for i, layer in enumerate(self.layers[:stop]):
            try:
                shape = layer.out_features(shape)
            except ValueError as exc:
                raise ValueError(f"layer {i}: {exc}") from None
        return shape

    @property
    def n_features(self) -> Optional[int]:
        """Input width of flat rows: the first Dense layer's n_in, or a leading Reshape's
        size (None without one, or when a layer before it changes the shape)."""
        for layer in self.layers:
            if isinstance(layer, Dense):
                return layer.n_in
            if isinstance(layer, Reshape):
                return layer.size
            if not layer.keeps_width:
                return None
        return None

    @property
    def n_outputs(self) -> Any:
        """Output width: the last Dense layer's n_out (None without one)."""
        return self._n_outputs

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        shapes = {}
        for i, layer in enumerate(self.layers):
            for name, shape in layer.param_shapes().items():
                shapes[f"{i}.{name}"] = tuple(shape)
        return shapes

    def layer_param_names(self, i: int) -> List[str]:
        return [full for _, full in self._names[i]]

    def _embedding(self) -> Optional[Embedding]:
        first = self.layers[0]
        return first if isinstance(first, Embedding) else None

    def id_inputs(self):
        return {None} if self._embedding() is not None else set()

    def embedding_inputs(self):
        table = self._embedding()
        return {"0.W": None} if table is not None and table.sparse else {}

    def flops(self, batch: int) -> float:
        """Approximate forward FLOPs for a batch of ``batch`` rows."""
        return sum(layer.flops(batch) for layer in self.layers)

    def init_params(self, rng):
        params = {}
        for i, layer in enumerate(self.layers):
            local = layer.init_params(rng)
            expected = [name for name, _ in self._names[i]]
            if sorted(local) != sorted(expected):
                raise ValueError(
                    f"layer {i} ({layer!r}) initialised parameters {sorted(local)} "
                    f"but param_shapes() declares {sorted(expected)}"
                )
            for name, full in self._names[i]:
                params[full] = local[name]
        return params

    def _layer_params(self, params, i):
        return {local: params[full] for local, full in self._names[i]}

    def _forward(self, params, X, hooks=None):
        """The training forward: outputs and every layer's cache."""
        caches = []
        h = X
        for i, layer in enumerate(self.layers):
            if hooks is not None:
                hooks.before_layer(i)
            h, cache = layer.forward(self._layer_params(params, i), h)
            caches.append(cache)
        return h, caches

    def _infer(self, params, X):
        """The evaluation forward (evaluate, predict): no caches, no dropout."""
        h = X
        for i, layer in enumerate(self.layers):
            h = layer.infer(self._layer_params(params, i), h)
        return h

    def loss_and_grad(self, params, X, y, hooks=None):
        """(loss, gradients). ``hooks`` (layer-wise overlap, psframe.worker.layerwise) sees
        the passes layer by layer: ``before_layer(i)`` before layer i's forward (its weights
        may still be arriving), ``after_forward(loss)``, and ``after_backward(i, grads)``
        with layer i's gradients by full name as soon as its backward has made them, last
        layer first."""
        out, caches = self._forward(params, X, hooks)
        loss, loss_cache = self.loss.forward(out, y)
        if hooks is not None:
            hooks.after_forward(float(loss))
        d = self.loss.backward(loss_cache)
        grads = {}
        for i in range(len(self.layers) - 1, self.first_trained - 1, -1):
            layer = self.layers[i]
            lp = self._layer_params(params, i)
            if i == self.first_trained and layer.can_skip_dx:
                g, d = layer.backward(lp, caches[i], d, need_dx=False)
            else:
                g, d = layer.backward(lp, caches[i], d)
            for local, full in self._names[i]:
                grads[full] = g[local]
            if hooks is not None and self._names[i]:
                hooks.after_backward(i, {full: g[local] for local, full in self._names[i]})
        return float(loss), grads

    def predict(self, params, X):
        return self.loss.predict(self._infer(params, X))

    def evaluate(self, params, X, y, chunk=4096):
        chunk, n = _eval_size(X, chunk)
        scored = bool(getattr(self.loss, "classification", False))
        total, correct = 0.0, 0
        for lo in range(0, n, chunk):
            Xc, yc = X[lo:lo + chunk], y[lo:lo + chunk]
            out = self._infer(params, Xc)
            loss, _ = self.loss.forward(out, yc)
            total += float(loss) * Xc.shape[0]
            if scored:
                correct += _count_equal(self.loss.predict(out), yc)
        return {"loss": total / n, "accuracy": correct / n if scored else None}

    def validate_data(self, X, y):
        if isinstance(X, (Features, Mapping)):
            raise ValueError(f"{self!r} takes one input array, but the data has several "
                             f"({', '.join(map(repr, X.keys()))})")
        X = np.asarray(X) if xp(X) is np else X
        if self._embedding() is not None:
            self._embedding().check_ids(X, "data")
        if X.ndim < 2:
            raise ValueError(
                f"data must be a 2-D array (rows x features), or (rows, *sample shape) for a "
                f"model that takes images; got shape {X.shape}"
            )
        if X.shape[0] == 0:
            raise ValueError("data has no rows")
        n_features = self.n_features
        if X.ndim == 2 and n_features is not None and X.shape[1] != n_features:
            raise ValueError(
                f"data has {X.shape[1]} features but the model's first layer expects {n_features}"
            )
        sample = X.shape[1] if X.ndim == 2 else tuple(X.shape[1:])
        try:
            self.out_features(sample)
        except ValueError as exc:
            raise ValueError(f"data with samples of shape {sample} does not fit the model: "
                             f"{exc}") from None
        if X.dtype.kind not in "iuf":
            raise ValueError(f"data must be numeric; got dtype {X.dtype}")
        if not bool(xp(X).isfinite(X).all()):
            raise ValueError("data contains non-finite values (nan or inf)")
        n_y = len(y)
        if n_y != X.shape[0]:
            raise ValueError(f"data has {X.shape[0]} rows but {n_y} labels/targets")
        if self.n_outputs is not None:
            self.loss.check_targets(y, self.n_outputs)
        return None

    def __repr__(self):
        layers = ", ".join(repr(layer) for layer in self.layers)
        return f"Sequential([{layers}], {self.loss!r})"
