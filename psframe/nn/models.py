"""Models: the custom-model base class, Sequential, and ready MLP, CNN, linear and DLRM models."""
from __future__ import annotations

import numbers
from typing import Any, Dict, Mapping, Optional, Sequence, Set, Tuple, Union

import numpy as np

from ..backend import xp
from ..data import Features
from .layers import (Conv2D, Dense, Dropout, Embedding, Flatten, Layer, MaxPool2D, ReLU, Reshape,
                     Tanh)
from .losses import MSE, BinaryCrossEntropy, Loss, SoftmaxCrossEntropy, roc_auc

__all__ = ["Model", "Sequential", "MLP", "CNN", "SoftmaxRegression", "LinearRegression", "DLRM"]


def _check_chunk(chunk):
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def _eval_size(X, chunk):
    """(chunk, rows) of an evaluation over ``X``; an empty X or a bad chunk is refused."""
    chunk = _check_chunk(chunk)
    n = X.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    return chunk, n


def _integer_valued(y):
    if y.dtype.kind in "iub":
        return True
    if y.dtype.kind != "f":
        return False
    m = xp(y)
    return bool(m.isfinite(y).all()) and bool((y == m.floor(y)).all())


def _count_equal(pred, y):
    pred = pred.reshape(-1) if pred.size == y.shape[0] else pred
    return int((pred == y).sum())


class Model:
    """Base class for custom models.

    Subclasses implement ``init_params(rng) -> dict[str, array]`` and
    ``loss_and_grad(params, X, y) -> (float, dict[str, array])``, and may
    implement ``predict(params, X)`` and ``validate_data(X, y)``.

    What the runtime asks a model, declared here and never inferred from its class:
    ``classification`` (labels are class indices: they travel as int64) and
    ``can_pipeline`` (modes model and hybrid may cut it into stages; such a model also
    provides ``layers``, ``layer_param_names(i)``, ``out_features(n, stop)`` and
    ``first_trained``, as Sequential does). ``reseed(seed, worker)`` gives each worker its own
    random stream (dropout masks); the default has none to give. ``id_inputs()`` names the
    inputs read as integer ids and ``embedding_inputs()`` the sparse tables and the input each
    reads (both empty by default).
    """

    can_pipeline = False

    @property
    def classification(self) -> bool:
        """Whether labels are class indices (integer labels are taken as such anyway). By
        default what the model's ``loss`` says, as Sequential's losses and TorchModel's do;
        a subclass may set it, as a class attribute or on the instance."""
        given = self.__dict__.get("_classification")
        if given is not None:
            return given
        return bool(getattr(getattr(self, "loss", None), "classification", False))

    @classification.setter
    def classification(self, value: bool) -> None:
        self._classification = bool(value)

    def reseed(self, seed: int, worker: int) -> None:
        """Give worker ``worker`` of a run seeded ``seed`` random streams of its own: each of
        the model's ``layers`` with a ``reseed`` (Dropout) gets (seed, worker)."""
        for layer in getattr(self, "layers", ()):
            reseed = getattr(layer, "reseed", None)
            if reseed is not None:
                reseed(seed, worker)

    def id_inputs(self) -> Set[Optional[str]]:
        """The inputs that hold integer ids (kept as int64, not cast to the run's dtype): the
        dict keys of X, or None for X itself. By default: what the row-sparse tables read."""
        return set(self.embedding_inputs().values())

    def embedding_inputs(self) -> Dict[str, Optional[str]]:
        """{parameter name: input} for each Embedding table with ``sparse=True`` (the tables
        whose rows move by the ids a batch touches): the dict key of X whose ids it reads,
        or None where X itself is the ids array."""
        return {}

    def init_params(self, rng: np.random.Generator) -> Dict[str, np.ndarray]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement init_params(rng) returning a dict "
            "of parameter name -> numpy array"
        )

    def loss_and_grad(self, params: Dict[str, Any], X: Any,
                      y: Any) -> Tuple[float, Dict[str, Any]]:
        raise NotImplementedError(
            f"{type(self).__name__} must implement loss_and_grad(params, X, y) returning "
            "(loss as float, dict of gradients with the same names as the parameters)"
        )

    def predict(self, params: Dict[str, Any], X: Any) -> Any:
        raise NotImplementedError(
            f"{type(self).__name__} does not implement predict(params, X)"
        )

    def has_predict(self) -> bool:
        """Whether a subclass provides ``predict`` (accuracy needs it)."""
        return type(self).predict is not Model.predict

    def validate_data(self, X: Any, y: Any) -> None:
        return None

    def evaluate(self, params: Dict[str, Any], X: Any, y: Any,
                 chunk: int = 4096) -> Dict[str, Optional[float]]:
        """Mean loss over ``X`` (in chunks) and accuracy where it is defined, else None."""
        chunk, n = _eval_size(X, chunk)
        scored = self.has_predict() and _integer_valued(y)
        total, correct = 0.0, 0
        for lo in range(0, n, chunk):
            Xc, yc = X[lo:lo + chunk], y[lo:lo + chunk]
            loss, _ = self.loss_and_grad(params, Xc, yc)
            total += float(loss) * Xc.shape[0]
            if scored:
                correct += _count_equal(self.predict(params, Xc), yc)
        return {"loss": total / n, "accuracy": correct / n if scored else None}

    def __repr__(self):
        return f"{type(self).__name__}()"


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

    def out_features(self, in_features, stop=None):
        """Shape of a sample after layers [0, stop): an int (flat), a tuple, or None."""
        shape = in_features
        for i, layer in enumerate(self.layers[:stop]):
            try:
                shape = layer.out_features(shape)
            except ValueError as exc:
                raise ValueError(f"layer {i}: {exc}") from None
        return shape

    @property
    def n_features(self):
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
    def n_outputs(self):
        """Output width: the last Dense layer's n_out (None without one)."""
        return self._n_outputs

    def param_shapes(self):
        shapes = {}
        for i, layer in enumerate(self.layers):
            for name, shape in layer.param_shapes().items():
                shapes[f"{i}.{name}"] = tuple(shape)
        return shapes

    def layer_param_names(self, i):
        return [full for _, full in self._names[i]]

    def _embedding(self):
        first = self.layers[0]
        return first if isinstance(first, Embedding) else None

    def id_inputs(self):
        return {None} if self._embedding() is not None else set()

    def embedding_inputs(self):
        table = self._embedding()
        return {"0.W": None} if table is not None and table.sparse else {}

    def flops(self, batch):
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


_ACTIVATIONS = {"relu": ReLU, "tanh": Tanh}


class MLP(Sequential):
    """Dense layers of the given sizes with an activation between them, softmax cross-entropy."""

    def __init__(self, sizes: Sequence[int], activation: str = "relu"):
        sizes = list(sizes)
        if len(sizes) < 2:
            raise ValueError(f"MLP needs at least 2 sizes (inputs and outputs), got {sizes}")
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; choose one of {sorted(_ACTIVATIONS)}"
            )
        layers = []
        for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            if k:
                layers.append(_ACTIVATIONS[activation]())
            layers.append(Dense(n_in, n_out))
        super().__init__(layers, SoftmaxCrossEntropy())
        self.sizes = [int(s) for s in sizes]
        self.activation = activation

    def __repr__(self):
        extra = "" if self.activation == "relu" else f", activation={self.activation!r}"
        return f"MLP({self.sizes}{extra})"


class CNN(Sequential):
    """Convolutions, ReLU and 2x2 max pooling per entry of ``channels``, then Dense layers of
    ``hidden`` widths (ReLU, and Dropout(dropout) where dropout > 0) and softmax cross-entropy.

    A Reshape(input_shape) comes first, so flat rows (such as ps.data.mnist's 784 pixels)
    and images (N, C, H, W) both fit. Convolutions keep the size ("same" padding, odd
    kernel). The defaults fit MNIST.
    """

    def __init__(self, input_shape=(1, 28, 28), n_classes=10, channels=(16, 32),
                 kernel_size=5, hidden=(128,), dropout=0.5):
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"CNN input_shape is (channels, height, width), got {input_shape}")
        if kernel_size % 2 == 0:
            raise ValueError(f"CNN kernel_size must be odd (same padding), got {kernel_size}")
        layers = [Reshape(input_shape)]
        c, h, w = input_shape
        for out_c in channels:
            layers += [Conv2D(c, out_c, kernel_size, padding=kernel_size // 2), ReLU(),
                       MaxPool2D(2)]
            c, h, w = out_c, h // 2, w // 2
        layers.append(Flatten())
        width = c * h * w
        for n in hidden:
            layers += [Dense(width, n), ReLU()]
            width = n
        if dropout:
            layers.append(Dropout(dropout))
        layers.append(Dense(width, n_classes))
        super().__init__(layers, SoftmaxCrossEntropy())
        self.config = dict(input_shape=input_shape, n_classes=int(n_classes),
                           channels=tuple(int(k) for k in channels),
                           kernel_size=int(kernel_size), hidden=tuple(int(n) for n in hidden),
                           dropout=float(dropout))

    def __repr__(self):
        defaults = CNN.__init__.__defaults__
        names = ("input_shape", "n_classes", "channels", "kernel_size", "hidden", "dropout")
        extra = [f"{k}={v!r}" for k, v, d in zip(names, self.config.values(), defaults)
                 if v != (tuple(d) if isinstance(d, tuple) else d)]
        return f"CNN({', '.join(extra)})"


class SoftmaxRegression(Sequential):
    """Multinomial logistic regression: one Dense layer and softmax cross-entropy."""

    def __init__(self, n_in: int, n_classes: int):
        super().__init__([Dense(n_in, n_classes, init="glorot")], SoftmaxCrossEntropy())

    def __repr__(self):
        return f"SoftmaxRegression({self.n_features}, {self.n_outputs})"


class LinearRegression(Sequential):
    """Least squares: one Dense layer with a single output and mean squared error."""

    def __init__(self, n_in: int):
        super().__init__([Dense(n_in, 1, init="glorot")], MSE())

    def __repr__(self):
        return f"LinearRegression({self.n_features})"


class _Chain:
    """Layers run one after another, their parameters named ``"{prefix}.{i}.{name}"``: the
    towers of a model with several inputs (DLRM's bottom and top MLPs)."""

    def __init__(self, prefix, layers):
        self.layers = list(layers)
        self.names = [[(name, f"{prefix}.{i}.{name}") for name in layer.param_shapes()]
                      for i, layer in enumerate(self.layers)]

    def param_shapes(self):
        return {full: tuple(layer.param_shapes()[local])
                for layer, names in zip(self.layers, self.names) for local, full in names}

    def init_params(self, rng):
        params = {}
        for layer, names in zip(self.layers, self.names):
            local = layer.init_params(rng)
            params.update({full: local[name] for name, full in names})
        return params

    def _own(self, params, i):
        return {local: params[full] for local, full in self.names[i]}

    def forward(self, params, x):
        caches = []
        for i, layer in enumerate(self.layers):
            x, cache = layer.forward(self._own(params, i), x)
            caches.append(cache)
        return x, caches

    def infer(self, params, x):
        for i, layer in enumerate(self.layers):
            x = layer.infer(self._own(params, i), x)
        return x

    def backward(self, params, caches, dy, grads, need_dx=True):
        """Gradients into ``grads``; returns dx (None when ``need_dx`` is False)."""
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if i == 0 and not need_dx and layer.can_skip_dx:
                g, dy = layer.backward(self._own(params, i), caches[i], dy, need_dx=False)
            else:
                g, dy = layer.backward(self._own(params, i), caches[i], dy)
            grads.update({full: g[local] for local, full in self.names[i]})
        return dy


def _mlp_layers(sizes, relu_last):
    layers = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(Dense(n_in, n_out))
        if relu_last or k < len(sizes) - 2:
            layers.append(ReLU())
    return layers


class DLRM(Model):
    """A DLRM-style click model (Naumov et al., 2019) on inputs ``{"dense": (n, dense_in)
    floats, field: (n, k) ids, ...}`` and labels in {0, 1}.

    The bottom MLP (Dense+ReLU of widths ``bottom``, then Dense+ReLU to ``dim``) maps the
    dense features to one vector of ``dim``; each field of ``fields`` ({name: number of ids},
    or a list of id counts for fields "c0", "c1", ...) has an Embedding(rows, dim, combine)
    bag of its ids. ``interaction="dot"``: the top MLP sees the bottom vector and the dot
    product of every pair of the F+1 vectors (F(F+1)/2 of them); ``"cat"``: the F+1 vectors
    side by side. The top MLP (Dense+ReLU of widths ``top``, then Dense to 1) gives one logit,
    trained with BinaryCrossEntropy; ``predict`` is the class (logit > 0), and ``evaluate``
    also reports the AUC. Parameters: ``bottom.{i}.W/b``, ``emb.{field}.W``, ``top.{i}.W/b``
    (i the layer's place in its tower). ``sparse`` marks the tables for the row-sparse
    protocol (``embedding_inputs()``); the tables may arrive compact (fewer rows, ids
    remapped) as Embedding allows.
    """

    INTERACTIONS = ("dot", "cat")

    def __init__(self, dense_in: int, fields: Union[Mapping[str, int], Sequence[int]],
                 dim: int = 16, bottom: Sequence[int] = (64,), top: Sequence[int] = (64,),
                 interaction: str = "dot", combine: str = "mean", sparse: bool = True):
        if isinstance(fields, Mapping):
            fields = dict(fields)
        elif isinstance(fields, (list, tuple)):
            fields = {f"c{i}": rows for i, rows in enumerate(fields)}
        else:
            raise ValueError(f"DLRM fields must be a dict name -> number of ids, or a list of "
                             f"id counts; got {fields!r}")
        if not fields:
            raise ValueError("DLRM needs at least one id field")
        if "dense" in fields:
            raise ValueError("DLRM's field names must differ from 'dense' (the dense input)")
        if interaction not in self.INTERACTIONS:
            raise ValueError(f"unknown interaction {interaction!r}; choose one of "
                             f"{list(self.INTERACTIONS)}")
        if combine not in ("mean", "sum"):
            raise ValueError(f"DLRM combine must be 'mean' or 'sum', got {combine!r}")
        self.dense_in, self.dim = int(dense_in), int(dim)
        self.bottom = _Chain("bottom", _mlp_layers([dense_in, *bottom, dim], relu_last=True))
        self.tables = {name: Embedding(rows, dim, combine=combine, sparse=sparse)
                       for name, rows in fields.items()}
        self.fields = {name: table.num_embeddings for name, table in self.tables.items()}
        n_vectors = len(fields) + 1
        width = (dim + n_vectors * (n_vectors - 1) // 2 if interaction == "dot"
                 else dim * n_vectors)
        self.top = _Chain("top", _mlp_layers([width, *top, 1], relu_last=False))
        self.interaction, self.combine, self.sparse = interaction, combine, sparse
        self.config = dict(bottom=tuple(int(b) for b in bottom), top=tuple(int(t) for t in top))
        self.loss = BinaryCrossEntropy()
        # The (i, j), i > j, of the pairs a dot interaction keeps.
        self._pairs = np.tril_indices(n_vectors, -1)

    @staticmethod
    def _table_name(field):
        return f"emb.{field}.W"

    def param_shapes(self):
        shapes = self.bottom.param_shapes()
        shapes.update({self._table_name(f): t.param_shapes()["W"] for f, t in self.tables.items()})
        shapes.update(self.top.param_shapes())
        return shapes

    def init_params(self, rng):
        params = self.bottom.init_params(rng)
        for field, table in self.tables.items():
            params[self._table_name(field)] = table.init_params(rng)["W"]
        params.update(self.top.init_params(rng))
        return params

    def id_inputs(self):
        return set(self.tables)

    def embedding_inputs(self):
        return {self._table_name(f): f for f, t in self.tables.items() if t.sparse}

    def _interact(self, vectors):
        """The top MLP's input from the bottom vector and the field bags, and its cache."""
        m = xp(vectors[0])
        if self.interaction == "cat":
            return m.concatenate(vectors, axis=1), None
        T = m.stack(vectors, axis=1)  # (batch, F+1, dim)
        Z = T @ T.transpose(0, 2, 1)
        i, j = (m.asarray(a) for a in self._pairs)
        return m.concatenate([vectors[0], Z[:, i, j]], axis=1), (T, i, j)

    def _interact_back(self, d, cache, n_vectors):
        """d of the top's input -> d of each of the F+1 vectors."""
        if cache is None:
            return [d[:, k * self.dim:(k + 1) * self.dim] for k in range(n_vectors)]
        T, i, j = cache
        m = xp(d)
        dZ = m.zeros((d.shape[0], n_vectors, n_vectors), dtype=d.dtype)
        dZ[:, i, j] = d[:, self.dim:]
        dT = (dZ + dZ.transpose(0, 2, 1)) @ T  # Z = T T^T
        dT[:, 0] += d[:, :self.dim]
        return [dT[:, k] for k in range(n_vectors)]

    def _forward(self, params, X):
        h, bottom_cache = self.bottom.forward(params, X["dense"])
        bags = [table.forward({"W": params[self._table_name(f)]}, X[f])
                for f, table in self.tables.items()]
        z, inter_cache = self._interact([h] + [bag for bag, _ in bags])
        out, top_cache = self.top.forward(params, z)
        return out, (bottom_cache, [c for _, c in bags], inter_cache, top_cache)

    def _infer(self, params, X):
        h = self.bottom.infer(params, X["dense"])
        bags = [table.infer({"W": params[self._table_name(f)]}, X[f])
                for f, table in self.tables.items()]
        return self.top.infer(params, self._interact([h] + bags)[0])

    def loss_and_grad(self, params, X, y):
        out, (bottom_cache, bag_caches, inter_cache, top_cache) = self._forward(params, X)
        loss, loss_cache = self.loss.forward(out, y)
        grads = {}
        dz = self.top.backward(params, top_cache, self.loss.backward(loss_cache), grads)
        dvectors = self._interact_back(dz, inter_cache, len(self.tables) + 1)
        self.bottom.backward(params, bottom_cache, dvectors[0], grads, need_dx=False)
        for (f, table), cache, d in zip(self.tables.items(), bag_caches, dvectors[1:]):
            name = self._table_name(f)
            grads[name] = table.backward({"W": params[name]}, cache, d)[0]["W"]
        return loss, grads

    def predict(self, params, X):
        return self.loss.predict(self._infer(params, X))

    def evaluate(self, params, X, y, chunk=4096):
        """Mean loss, accuracy and AUC (None when y holds one class only) over X, in chunks."""
        chunk, n = _eval_size(X, chunk)
        logits = np.concatenate([np.asarray(self._infer(params, X[lo:lo + chunk])).reshape(-1)
                                 for lo in range(0, n, chunk)])
        y = np.asarray(y)
        loss, _ = self.loss.forward(logits, y)
        both = 0 < int((y == 1).sum()) < n
        return {"loss": loss, "accuracy": _count_equal(self.loss.predict(logits), y) / n,
                "auc": roc_auc(y, logits) if both else None}

    def validate_data(self, X, y):
        if not isinstance(X, (Features, Mapping)):
            raise ValueError(f"{self!r} takes several inputs: X must be a dict (or "
                             f"ps.data.Features) with keys {['dense', *self.tables]}; got "
                             f"{type(X).__name__}")
        X = Features(X)
        wanted = ["dense", *self.tables]
        missing = [k for k in wanted if k not in X]
        extra = [k for k in X.keys() if k not in wanted]
        if missing or extra:
            raise ValueError(f"{self!r} reads inputs {wanted}; the data lacks {missing} and "
                             f"has unread {extra}")
        dense = X["dense"]
        if dense.ndim != 2 or dense.shape[1] != self.dense_in:
            raise ValueError(f"input 'dense' must be (rows, {self.dense_in}); got shape "
                             f"{dense.shape}")
        if dense.dtype.kind not in "iuf":
            raise ValueError(f"input 'dense' must be numeric; got dtype {dense.dtype}")
        if not bool(xp(dense).isfinite(dense).all()):
            raise ValueError("input 'dense' contains non-finite values (nan or inf)")
        for field, table in self.tables.items():
            table.check_ids(X[field], f"input {field!r}")
        if X.shape[0] == 0:
            raise ValueError("data has no rows")
        if len(y) != X.shape[0]:
            raise ValueError(f"data has {X.shape[0]} rows but {len(y)} labels")
        self.loss.check_targets(y, 1)

    def __repr__(self):
        extra = [f"dim={self.dim}"] if self.dim != 16 else []
        extra += [f"{k}={v}" for k, v in self.config.items() if v != (64,)]
        extra += [] if self.interaction == "dot" else [f"interaction={self.interaction!r}"]
        extra += [] if self.combine == "mean" else [f"combine={self.combine!r}"]
        extra += [] if self.sparse else ["sparse=False"]
        return f"DLRM({', '.join([str(self.dense_in), repr(self.fields), *extra])})"
