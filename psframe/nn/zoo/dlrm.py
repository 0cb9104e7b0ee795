"""DLRM: a click model on dense features and id fields, with its two MLP towers."""
from __future__ import annotations

from typing import Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np

from ...backend import xp
from ...data import Features
from ..layers import Dense, Embedding, Layer, ReLU
from ..losses import BinaryCrossEntropy, roc_auc
from ..model import Model, _count_equal, _eval_size


class _Chain:
    """Layers run one after another, their parameters named ``"{prefix}.{i}.{name}"``: the
    towers of a model with several inputs (DLRM's bottom and top MLPs)."""

    def __init__(self, prefix: str, layers: Sequence[Layer]):
        self.layers = list(layers)
        self.names = [[(name, f"{prefix}.{i}.{name}") for name in layer.param_shapes()]
                      for i, layer in enumerate(self.layers)]

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
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


def _mlp_layers(sizes: Sequence[int], relu_last: bool) -> List[Layer]:
    layers: List[Layer] = []
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
