"""Server-side optimizers that update shards of one flat weight buffer in place."""
import math
import numbers
from typing import Any, Tuple

import numpy as np

from ..backend import xp
from . import sparse_optim

__all__ = ["Optimizer", "SGD", "Adam", "Adagrad"]

# Scratch arrays hold one chunk, not the whole buffer: reused chunk after chunk they stay in
# cache, so a step reads the gradient and weights and writes the weights, and the scratch
# costs no memory traffic (64 MB of SGD went from 6.4 to 5.1 ms here).
SCRATCH_ELEMS = 1 << 18


def _chunks(lo, hi):
    """[lo, hi) in pieces of at most SCRATCH_ELEMS: (start, stop) of each."""
    for a in range(lo, hi, SCRATCH_ELEMS):
        yield a, min(a + SCRATCH_ELEMS, hi)


def _scratch(size, dtype):
    return np.zeros(min(size, SCRATCH_ELEMS), dtype)


def _finite_number(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _in_unit_interval(value, what):
    # [0, 1): a coefficient of 1 would never forget old gradients.
    if not 0.0 <= _finite_number(value, what) < 1.0:
        raise ValueError(f"{what} must be in [0, 1), got {value!r}")


class Optimizer:
    """Base class.

    ``init_state(size, dtype)`` returns flat arrays; keys starting with ``_``
    are scratch space (reused by every call, not worth checkpointing).
    ``apply(state, w, g, lo, hi, step, weight)`` updates ``w[lo:hi]`` in
    place from the shard's gradient ``g`` without allocating arrays.

    ``weight`` says what share of one Sync step this update stands for: an asynchronous push
    under N workers carries 1/N of a Sync step's samples. Each optimizer turns it into a step
    size by its own batch-size scaling rule (``weight_rule``), and scales only this update's
    own contribution, so state that outlives the call stays consistent when weights differ
    from push to push. SGD adds weight * g to its momentum (the linear scaling rule, Goyal et
    al. 2017; past updates keep their own weights). Adam feeds its moments the raw gradient,
    counts the push as one step for bias correction, and takes a step of lr * sqrt(weight)
    (the square-root rule for adaptive methods, Malladi et al. 2022: a push's gradient, from
    1/N of the samples, is noisier, so its normalised step is already smaller). Adagrad
    counts a push as ``weight`` of a step: it adds weight * g**2 to its accumulator and
    steps lr * weight * g / (sqrt(sum) + eps), so N pushes of weight 1/N with one gradient
    move as far as one Sync step and grow the accumulator as much. With weight 1 all three
    are exactly PyTorch's update.

    Embedding tables are stepped row-wise: ``init_rows_state(n_rows, dim, dtype)`` returns a
    table's state, whose checkpointed arrays have the row as first axis (so rows can be split
    over servers), and ``apply_rows(state, table, ids, g, weight)`` steps only the rows
    ``ids`` (unique, ascending) with their gradients ``g`` (n, dim). Rows not in ``ids`` are
    neither read nor written: momentum, moments, weight decay and step counts are lazy
    (docs/sparse.md, "Sparse optimizers").
    """

    name = "optimizer"
    weight_rule = "as its apply() decides"
    # Scratch of a table's state: names of (rows, dim) buffers of the table's dtype, and of
    # (rows,) vectors with their dtype (None: the table's).
    _ROW_FLAT_SCRATCH: Tuple[str, ...] = ()
    _ROW_VECTOR_SCRATCH: Tuple[Tuple[str, Any], ...] = ()

    def __init__(self, lr):
        self.lr = lr

    def init_state(self, size, dtype):
        return {}

    def apply(self, state, w, g, lo, hi, step, weight=1.0):
        raise NotImplementedError(
            f"{type(self).__name__} must implement apply(state, w, g, lo, hi, step, weight)"
        )

    def init_rows_state(self, n_rows: int, dim: int, dtype) -> dict:
        """The state of one (n_rows, dim) table for apply_rows; "_" keys are scratch."""
        n_rows, dim = sparse_optim.table_size(n_rows, dim)
        dtype = np.dtype(dtype)
        return sparse_optim.new_rows_state(n_rows, dim, dtype,
                                           self._row_arrays(n_rows, dim, dtype),
                                           self._ROW_FLAT_SCRATCH, self._ROW_VECTOR_SCRATCH)

    def apply_rows(self, state: dict, table, ids, g, weight: float = 1.0) -> None:
        """Step the rows ``ids`` of ``table`` (and of the state) in place by their gradient
        ``g`` (len(ids), dim); ids unique and ascending. O(len(ids) * dim) work."""
        sparse_optim.check_rows(state, table, ids, g)
        rows = sparse_optim.block_rows(table.shape[1])
        for a, b in sparse_optim.row_blocks(len(ids), rows):
            idx = ids[a:b]
            local = sparse_optim.gather(state, table, idx)
            self._step_rows(local, g[a:b].reshape(-1), float(weight))
            sparse_optim.scatter(state, table, idx, local)

    def _row_arrays(self, n_rows, dim, dtype):
        """A table's checkpointed state arrays, first axis n_rows."""
        return {}

    def _step_rows(self, local, g, weight):
        """Step gathered rows: ``local`` from sparse_optim.gather, ``g`` flat."""
        raise NotImplementedError(f"{type(self).__name__} has no row-wise step")

    def validate(self):
        if _finite_number(self.lr, "lr") <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        return None

    def _check_shard(self, w, g, lo, hi):
        if not 0 <= lo <= hi <= w.shape[0] or g.shape != (hi - lo,):
            raise ValueError(
                f"gradient of shape {g.shape} does not fit shard [{lo}, {hi}) "
                f"of a buffer of {w.shape[0]} weights"
            )

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr!r})"

    @staticmethod
    def _decayed_grad(state, wv, g, wd, weight=1.0):
        """weight * (g + wd*w) in the preallocated scratch, or g itself when wd is 0 and
        weight 1 (the decay is part of the update, so it is weighted with it)."""
        if not wd and weight == 1.0:
            return g
        m, gp = xp(wv), state["_grad"][: len(g)]
        if wd:
            m.multiply(wv, wd, out=gp)
            gp += g
            if weight != 1.0:
                gp *= weight
        else:
            m.multiply(g, weight, out=gp)
        return gp


class SGD(Optimizer):
    """SGD with optional (Nesterov) momentum and weight decay, as in PyTorch."""

    name = "sgd"
    weight_rule = "lr x weight (linear scaling)"
    DEFAULT_LR = 0.1  # the one place SGD's default learning rate is set (train, CLI, docs)
    _ROW_FLAT_SCRATCH = ("_step", "_grad")

    def __init__(self, lr: float = DEFAULT_LR, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False):
        super().__init__(lr)
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.nesterov = nesterov

    def validate(self):
        super().validate()
        _in_unit_interval(self.momentum, "momentum")
        if _finite_number(self.weight_decay, "weight_decay") < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs a momentum > 0")
        return None

    def init_state(self, size, dtype):
        state = {"_step": _scratch(size, dtype)}
        if self.momentum:
            state["momentum"] = np.zeros(size, dtype)
        state["_grad"] = _scratch(size, dtype)  # weight * (g + decay), when either applies
        return state

    def apply(self, state, w, g, lo, hi, step, weight=1.0):
        self._check_shard(w, g, lo, hi)
        for a, b in _chunks(lo, hi):
            self._apply_chunk(state, w, g[a - lo:b - lo], a, b, weight)

    def _row_arrays(self, n_rows, dim, dtype):
        return {"momentum": np.zeros((n_rows, dim), dtype)} if self.momentum else {}

    def _step_rows(self, local, g, weight):
        # The dense arithmetic on the gathered rows: a touched row steps bitwise as dense.
        w = local["_w"]
        self._apply_chunk(local, w, g, 0, w.size, weight)

    def _apply_chunk(self, state, w, g, lo, hi, weight):
        m = xp(w)
        # Python floats keep float32 arithmetic in float32 (NumPy's weak scalars).
        mu, wd = float(self.momentum), float(self.weight_decay)
        lr, weight = float(self.lr), float(weight)
        wv, d = w[lo:hi], state["_step"][: hi - lo]
        gp = self._decayed_grad(state, wv, g, wd, weight)
        if mu:
            v = state["momentum"][lo:hi]
            v *= mu
            v += gp
            if self.nesterov:
                m.multiply(v, mu, out=d)
                d += gp
                d *= lr
            else:
                m.multiply(v, lr, out=d)
        else:
            m.multiply(gp, lr, out=d)
        wv -= d

    def __repr__(self):
        text = f"SGD(lr={self.lr!r}, momentum={self.momentum!r}"
        if self.weight_decay:
            text += f", weight_decay={self.weight_decay!r}"
        if self.nesterov:
            text += ", nesterov=True"
        return text + ")"


class Adam(Optimizer):
    """Adam with bias correction and L2 weight decay, as in PyTorch's Adam."""

    name = "adam"
    weight_rule = "lr x sqrt(weight) (square-root scaling)"
    DEFAULT_LR = 1e-3
    DEFAULT_EPS = 1e-8
    _ROW_FLAT_SCRATCH = ("_tmp", "_grad")
    _ROW_VECTOR_SCRATCH = (("_c1", np.float64), ("_c2", np.float64), ("_d1", None),
                           ("_d2", None))

    def __init__(self, lr: float = DEFAULT_LR, betas=(0.9, 0.999), eps: float = DEFAULT_EPS,
                 weight_decay: float = 0.0):
        super().__init__(lr)
        self.betas = tuple(betas)
        self.eps = eps
        self.weight_decay = weight_decay

    def validate(self):
        super().validate()
        if len(self.betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {self.betas!r}")
        _in_unit_interval(self.betas[0], "betas[0]")
        _in_unit_interval(self.betas[1], "betas[1]")
        if _finite_number(self.eps, "eps") <= 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if _finite_number(self.weight_decay, "weight_decay") < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        return None

    def init_state(self, size, dtype):
        state = {
            "exp_avg": np.zeros(size, dtype),
            "exp_avg_sq": np.zeros(size, dtype),
            "_tmp": _scratch(size, dtype),
        }
        if self.weight_decay:
            state["_grad"] = _scratch(size, dtype)
        return state

    def apply(self, state, w, g, lo, hi, step, weight=1.0):
        self._check_shard(w, g, lo, hi)
        if step < 1:
            raise ValueError(f"Adam step counts from 1, got {step}")
        for a, b in _chunks(lo, hi):
            self._apply_chunk(state, w, g[a - lo:b - lo], a, b, step, weight)

    def _lr(self, weight):
        # The moments take the raw gradient; the weight scales only the step, by the square
        # root (Adam divides out any scale of g, so weighting g would change nothing).
        return float(self.lr) * (math.sqrt(weight) if weight != 1.0 else 1.0)

    def _moments(self, state, w, g, lo, hi):
        """Update the moments of [lo, hi) in place; their views and the scratch."""
        m = xp(w)
        b1, b2 = float(self.betas[0]), float(self.betas[1])
        t = state["_tmp"][: hi - lo]
        exp_avg, exp_avg_sq = state["exp_avg"][lo:hi], state["exp_avg_sq"][lo:hi]
        gp = self._decayed_grad(state, w[lo:hi], g, float(self.weight_decay))
        exp_avg *= b1
        m.multiply(gp, 1.0 - b1, out=t)
        exp_avg += t
        exp_avg_sq *= b2
        m.multiply(gp, gp, out=t)
        t *= 1.0 - b2
        exp_avg_sq += t
        return exp_avg, exp_avg_sq, t

    def _apply_chunk(self, state, w, g, lo, hi, step, weight):
        m = xp(w)
        b1, b2 = float(self.betas[0]), float(self.betas[1])
        exp_avg, exp_avg_sq, t = self._moments(state, w, g, lo, hi)
        # Fold both bias corrections into scalars, as PyTorch does.
        bias1 = 1.0 - b1 ** step
        bias2_sqrt = math.sqrt(1.0 - b2 ** step)
        m.sqrt(exp_avg_sq, out=t)
        t /= bias2_sqrt
        t += float(self.eps)
        m.divide(exp_avg, t, out=t)
        t *= self._lr(weight) / bias1
        w[lo:hi] -= t

    # Lazy Adam (below): each row counts its own steps and is bias-corrected by them.
    def _row_arrays(self, n_rows, dim, dtype):
        return {"exp_avg": np.zeros((n_rows, dim), dtype),
                "exp_avg_sq": np.zeros((n_rows, dim), dtype),
                "steps": np.zeros(n_rows, np.int64)}

    def _corrections(self):
        # Cached on the optimizer (all its tables share them); rebuilt if betas change.
        cached = getattr(self, "_bias_cache", None)
        if cached is None or cached[0] != self.betas:
            cached = (self.betas, sparse_optim.BiasCorrection(self.betas[0]),
                      sparse_optim.BiasCorrection(self.betas[1], sqrt=True))
            self._bias_cache = cached
        return cached[1:]

    def _step_rows(self, local, g, weight):
        m, w, steps = xp(local["_w"]), local["_w"], local["steps"]
        n = len(steps)
        steps += 1
        exp_avg, exp_avg_sq, t = self._moments(local, w, g, 0, w.size)
        bias1, bias2_sqrt = self._corrections()
        # Per-row scalars in float64, as the dense step's, then in the table's dtype, as
        # NumPy turns the dense step's Python floats into it.
        c1 = bias1.take(steps, local["_c1"][:n])
        np.divide(self._lr(weight), c1, out=c1)
        d1, d2 = local["_d1"][:n], local["_d2"][:n]
        d1[...] = c1
        d2[...] = bias2_sqrt.take(steps, local["_c2"][:n])
        t, exp_avg, exp_avg_sq = (a.reshape(n, -1) for a in (t, exp_avg, exp_avg_sq))
        m.sqrt(exp_avg_sq, out=t)
        t /= d2[:, None]
        t += float(self.eps)
        m.divide(exp_avg, t, out=t)
        t *= d1[:, None]
        rows = w.reshape(n, -1)
        rows -= t

    def __repr__(self):
        text = f"Adam(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r}"
        if self.weight_decay:
            text += f", weight_decay={self.weight_decay!r}"
        return text + ")"


class Adagrad(Optimizer):
    """Adagrad with L2 weight decay, as in PyTorch's Adagrad without its lr_decay."""

    name = "adagrad"
    weight_rule = "lr x weight, accumulator += weight x g^2 (a push is weight of a step)"
    DEFAULT_LR = 0.01
    DEFAULT_EPS = 1e-10
    _ROW_FLAT_SCRATCH = ("_tmp", "_grad")

    def __init__(self, lr: float = DEFAULT_LR, eps: float = DEFAULT_EPS,
                 initial_accumulator_value: float = 0.0, weight_decay: float = 0.0):
        super().__init__(lr)
        self.eps = eps
        self.initial_accumulator_value = initial_accumulator_value
        self.weight_decay = weight_decay

    def validate(self):
        super().validate()
        # eps > 0 (PyTorch allows 0): a row whose accumulator is still 0 would divide 0 by 0.
        if _finite_number(self.eps, "eps") <= 0:
            raise ValueError(f"eps must be positive, got {self.eps!r}")
        if _finite_number(self.initial_accumulator_value, "initial_accumulator_value") < 0:
            raise ValueError("initial_accumulator_value must be >= 0, got "
                             f"{self.initial_accumulator_value!r}")
        if _finite_number(self.weight_decay, "weight_decay") < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        return None

    def init_state(self, size, dtype):
        return {"sum": np.full(size, self.initial_accumulator_value, dtype),
                "_tmp": _scratch(size, dtype), "_grad": _scratch(size, dtype)}

    def apply(self, state, w, g, lo, hi, step, weight=1.0):
        # ``step`` is unused: without lr_decay Adagrad's step does not depend on it.
        self._check_shard(w, g, lo, hi)
        for a, b in _chunks(lo, hi):
            self._apply_chunk(state, w, g[a - lo:b - lo], a, b, weight)

    def _apply_chunk(self, state, w, g, lo, hi, weight):
        m = xp(w)
        weight = float(weight)
        wv, t, acc = w[lo:hi], state["_tmp"][: hi - lo], state["sum"][lo:hi]
        gp = self._decayed_grad(state, wv, g, float(self.weight_decay))
        m.multiply(gp, gp, out=t)
        if weight != 1.0:
            t *= weight
        acc += t
        m.sqrt(acc, out=t)
        t += float(self.eps)
        m.divide(gp, t, out=t)
        t *= float(self.lr) * weight
        wv -= t

    def _row_arrays(self, n_rows, dim, dtype):
        return {"sum": np.full((n_rows, dim), self.initial_accumulator_value, dtype)}

    def _step_rows(self, local, g, weight):
        # A row's accumulator is unchanged by a zero gradient, so lazy is dense for Adagrad
        # (without weight decay).
        w = local["_w"]
        self._apply_chunk(local, w, g, 0, w.size, weight)

    def __repr__(self):
        text = f"Adagrad(lr={self.lr!r}, eps={self.eps!r}"
        if self.initial_accumulator_value:
            text += f", initial_accumulator_value={self.initial_accumulator_value!r}"
        if self.weight_decay:
            text += f", weight_decay={self.weight_decay!r}"
        return text + ")"
