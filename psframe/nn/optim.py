"""Server-side optimizers that update shards of one flat weight buffer in place."""
import math
import numbers

import numpy as np

from ..backend import xp

__all__ = ["Optimizer", "SGD", "Adam"]

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
    1/N of the samples, is noisier, so its normalised step is already smaller). With weight
    1 both are exactly PyTorch's update.
    """

    name = "optimizer"
    weight_rule = "as its apply() decides"

    def __init__(self, lr):
        self.lr = lr

    def init_state(self, size, dtype):
        return {}

    def apply(self, state, w, g, lo, hi, step, weight=1.0):
        raise NotImplementedError(
            f"{type(self).__name__} must implement apply(state, w, g, lo, hi, step, weight)"
        )

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

    def __init__(self, lr: float = DEFAULT_LR, betas=(0.9, 0.999), eps: float = 1e-8,
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

    def _apply_chunk(self, state, w, g, lo, hi, step, weight):
        m = xp(w)
        b1, b2 = float(self.betas[0]), float(self.betas[1])
        wd, eps = float(self.weight_decay), float(self.eps)
        # The moments take the raw gradient; the weight scales only the step, by the square
        # root (Adam divides out any scale of g, so weighting g would change nothing).
        lr = float(self.lr) * (math.sqrt(weight) if weight != 1.0 else 1.0)
        wv, t = w[lo:hi], state["_tmp"][: hi - lo]
        exp_avg, exp_avg_sq = state["exp_avg"][lo:hi], state["exp_avg_sq"][lo:hi]
        gp = self._decayed_grad(state, wv, g, wd)
        exp_avg *= b1
        m.multiply(gp, 1.0 - b1, out=t)
        exp_avg += t
        exp_avg_sq *= b2
        m.multiply(gp, gp, out=t)
        t *= 1.0 - b2
        exp_avg_sq += t
        # Fold both bias corrections into scalars, as PyTorch does.
        bias1 = 1.0 - b1 ** step
        bias2_sqrt = math.sqrt(1.0 - b2 ** step)
        m.sqrt(exp_avg_sq, out=t)
        t /= bias2_sqrt
        t += eps
        m.divide(exp_avg, t, out=t)
        t *= lr / bias1
        wv -= t

    def __repr__(self):
        text = f"Adam(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r}"
        if self.weight_decay:
            text += f", weight_decay={self.weight_decay!r}"
        return text + ")"
