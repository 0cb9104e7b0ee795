"""Losses for Sequential models: scalar loss, its gradient, target checks and predictions."""
import numpy as np

from ..backend import xp

__all__ = ["Loss", "SoftmaxCrossEntropy", "MSE", "BinaryCrossEntropy", "roc_auc"]


class Loss:
    """Base class: ``forward(pred, y) -> (loss, cache)``, ``backward(cache) -> dpred``."""

    classification = False

    def forward(self, pred, y):
        raise NotImplementedError(
            f"{type(self).__name__} must implement forward(pred, y) -> (loss, cache)"
        )

    def backward(self, cache):
        raise NotImplementedError(
            f"{type(self).__name__} must implement backward(cache) -> dpred"
        )

    def check_targets(self, y, n_out):
        return None

    def predict(self, pred):
        return pred

    def __repr__(self):
        return f"{type(self).__name__}()"


def _outputs(n_out):
    return f"{n_out} output" if n_out == 1 else f"{n_out} outputs"


def _label_str(value):
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


class SoftmaxCrossEntropy(Loss):
    """Mean cross-entropy of softmax(pred) against integer class labels."""

    classification = True

    def forward(self, pred, y):
        m = xp(pred)
        n = pred.shape[0]
        # Shift by the row max so exp never overflows (log-sum-exp).
        z = pred - pred.max(axis=1, keepdims=True)
        logp = z - m.log(m.exp(z).sum(axis=1, keepdims=True))
        labels = y.astype(m.int64, copy=False)
        loss = -float(logp[m.arange(n), labels].sum()) / n
        return loss, (logp, labels)

    def backward(self, cache):
        logp, labels = cache
        m = xp(logp)
        n = logp.shape[0]
        dpred = m.exp(logp)
        dpred[m.arange(n), labels] -= 1
        dpred /= n
        return dpred

    def check_targets(self, y, n_out):
        y = np.asarray(y)
        expect = f"labels must be integers in [0, {n_out}) for a model with {_outputs(n_out)}"
        if y.ndim != 1:
            raise ValueError(f"{expect}, given as a 1-D array; got shape {y.shape}")
        if y.size == 0:
            return None
        if y.dtype.kind == "f":
            bad = ~np.isfinite(y) | (y != np.floor(y))
            if bad.any():
                raise ValueError(f"{expect}; found label {_label_str(y[bad][0])}")
        elif y.dtype.kind not in "iub":
            raise ValueError(f"{expect}; got labels of dtype {y.dtype}")
        bad = (y < 0) | (y >= n_out)
        if bad.any():
            raise ValueError(f"{expect}; found label {_label_str(y[bad][0])}")
        return None

    def predict(self, pred):
        return pred.argmax(axis=1)


class MSE(Loss):
    """Mean over all elements of (pred - y)**2; y of shape (n,) fits pred of shape (n, 1)."""

    def forward(self, pred, y):
        if y.ndim == 1 and pred.ndim == 2 and pred.shape[1] == 1:
            y = y.reshape(-1, 1)
        if y.shape != pred.shape:
            raise ValueError(
                f"targets of shape {y.shape} do not match predictions of shape {pred.shape}"
            )
        # Cast y so a float64 target cannot upcast a float32 gradient.
        diff = pred - y.astype(pred.dtype, copy=False)
        return float((diff * diff).mean()), diff

    def backward(self, cache):
        diff = cache
        return diff * (2.0 / diff.size)

    def check_targets(self, y, n_out):
        y = np.asarray(y)
        if n_out == 1:
            ok = y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)
            want = "(n,) or (n, 1)"
        else:
            ok = y.ndim == 2 and y.shape[1] == n_out
            want = f"(n, {n_out})"
        if not ok:
            raise ValueError(
                f"targets must have shape {want} for a model with {_outputs(n_out)}; "
                f"got shape {y.shape}"
            )
        if y.dtype.kind not in "iuf":
            raise ValueError(f"targets must be numbers; got dtype {y.dtype}")
        if not np.isfinite(y).all():
            raise ValueError("targets contain non-finite values (nan or inf)")
        return None

    def predict(self, pred):
        return pred[:, 0] if pred.ndim == 2 and pred.shape[1] == 1 else pred


class BinaryCrossEntropy(Loss):
    """Mean logistic loss of one logit per row, pred (n, 1) or (n,), against labels in {0, 1}:
    torch's binary_cross_entropy_with_logits. ``predict`` is the class, 1 where the logit > 0."""

    classification = True

    def forward(self, pred, y):
        m = xp(pred)
        z = pred.reshape(-1)
        if z.shape[0] != y.shape[0]:
            raise ValueError(f"{z.shape[0]} logits for {y.shape[0]} labels")
        t = y.astype(pred.dtype, copy=False)
        # log(1 + e^z) - t*z, written so that e^z never overflows.
        loss = m.maximum(z, 0) - z * t + m.log1p(m.exp(-m.abs(z)))
        return float(loss.mean()), (z, t, pred.shape)

    def backward(self, cache):
        z, t, shape = cache
        m = xp(z)
        # sigmoid(z) through tanh: no overflow for large |z|.
        p = 0.5 * (1.0 + m.tanh(0.5 * z))
        return ((p - t) / z.shape[0]).reshape(shape)

    def check_targets(self, y, n_out):
        y = np.asarray(y)
        if n_out != 1:
            raise ValueError(f"BinaryCrossEntropy needs a model with 1 output (a logit), "
                             f"not {_outputs(n_out)}")
        if y.ndim != 1:
            raise ValueError(f"labels must be 0 or 1, given as a 1-D array; got shape {y.shape}")
        if y.dtype.kind not in "biuf":
            raise ValueError(f"labels must be 0 or 1; got dtype {y.dtype}")
        bad = ~((y == 0) | (y == 1))
        if bad.any():
            raise ValueError(f"labels must be 0 or 1; found label {_label_str(y[bad][0])}")
        return None

    def predict(self, pred):
        return (pred.reshape(-1) > 0).astype(xp(pred).int64)


def roc_auc(y, scores) -> float:
    """Area under the ROC curve of ``scores`` for binary labels ``y``: the chance that a random
    positive scores above a random negative, ties counting a half (Mann-Whitney U)."""
    y = np.asarray(y).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n_pos = int((y == 1).sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both positive and negative labels")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(y.size)
    # Tied scores share the mean of their ranks.
    starts = np.flatnonzero(np.concatenate(([True], sorted_scores[1:] != sorted_scores[:-1])))
    ends = np.append(starts[1:], y.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
