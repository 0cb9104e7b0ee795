"""The Model contract: what the runtime asks of every model, and the evaluation helpers."""
from __future__ import annotations

import numbers
from typing import Any, Dict, Optional, Set, Tuple

import numpy as np

from ..backend import xp


# The evaluation helpers below are shared by every evaluate() (Model's, Sequential's, DLRM's,
# TorchModel's), so a chunk, an empty set and accuracy are judged alike whatever the model.
def _check_chunk(chunk: Any) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk <= 0:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    return int(chunk)


def _eval_size(X: Any, chunk: Any) -> Tuple[int, int]:
    """(chunk, rows) of an evaluation over ``X``; an empty X or a bad chunk is refused."""
    chunk = _check_chunk(chunk)
    n = X.shape[0]
    if n == 0:
        raise ValueError("cannot evaluate on an empty data set")
    return chunk, n


def _integer_valued(y: Any) -> bool:
    if y.dtype.kind in "iub":
        return True
    if y.dtype.kind != "f":
        return False
    m = xp(y)
    return bool(m.isfinite(y).all()) and bool((y == m.floor(y)).all())


def _count_equal(pred: Any, y: Any) -> int:
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
