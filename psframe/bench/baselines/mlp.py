"""A plain NumPy MLP (ReLU, softmax cross-entropy) on one flat weight vector, and SGD."""
import math

import numpy as np


class MLP:
    """Dense layers of ``sizes`` with ReLU between them; weights live in one flat vector, so a
    gradient is one buffer to send (a single Allreduce, a single RPC argument)."""

    def __init__(self, sizes, dtype=np.float32):
        self.sizes = [int(s) for s in sizes]
        self.dtype = np.dtype(dtype)
        self.shapes = []
        for n_in, n_out in zip(self.sizes[:-1], self.sizes[1:]):
            self.shapes += [(n_in, n_out), (n_out,)]
        self.offsets = np.cumsum([0] + [math.prod(s) for s in self.shapes]).tolist()
        self.size = self.offsets[-1]

    def views(self, flat):
        """[W0, b0, W1, b1, ...] as views of ``flat``: writing them writes the vector."""
        return [flat[a:b].reshape(s)
                for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def init(self, rng):
        """He-normal weights and zero biases, as psframe's Dense layers start."""
        flat = np.zeros(self.size, self.dtype)
        for i, v in enumerate(self.views(flat)):
            if i % 2 == 0:
                v[...] = rng.normal(0.0, math.sqrt(2.0 / v.shape[0]), size=v.shape)
        return flat

    def _logits(self, layers, X, keep):
        hidden, h = [], X
        for k in range(0, len(layers), 2):
            if keep:
                hidden.append(h)
            h = h @ layers[k] + layers[k + 1]
            if k + 2 < len(layers):
                h = np.maximum(h, 0)
        return h, hidden

    @staticmethod
    def _log_softmax(z):
        z = z - z.max(axis=1, keepdims=True)  # no overflow in exp
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def loss_and_grad(self, flat, X, y, grad):
        """Mean cross-entropy of the batch; its gradient is written into ``grad``."""
        layers = self.views(flat)
        logits, hidden = self._logits(layers, X, keep=True)
        logp = self._log_softmax(logits)
        n = len(y)
        loss = -float(logp[np.arange(n), y].sum()) / n
        d = np.exp(logp)
        d[np.arange(n), y] -= 1
        d /= n
        g = self.views(grad)
        for k in range(len(layers) - 2, -1, -2):
            h = hidden[k // 2]
            np.matmul(h.T, d, out=g[k])
            np.sum(d, axis=0, out=g[k + 1])
            if k:
                d = d @ layers[k].T
                d *= h > 0
        return loss

    def evaluate(self, flat, X, y):
        """(mean test loss, accuracy)."""
        logits, _ = self._logits(self.views(flat), X, keep=False)
        logp = self._log_softmax(logits)
        loss = -float(logp[np.arange(len(y)), y].mean())
        return loss, float((logits.argmax(axis=1) == y).mean())


class SGD:
    """SGD with momentum, Nesterov and weight decay in PyTorch's convention (as psframe's):
    g += wd·w;  v = μ·v + g;  w -= lr·v  (Nesterov: w -= lr·(g + μ·v))."""

    def __init__(self, size, dtype, lr, momentum=0.0, weight_decay=0.0, nesterov=False):
        self.lr, self.mu, self.wd, self.nesterov = float(lr), float(momentum), \
            float(weight_decay), bool(nesterov)
        self.v = np.zeros(size, dtype) if self.mu else None

    def step(self, w, g):
        if self.wd:
            g += self.wd * w
        if self.mu:
            self.v *= self.mu
            self.v += g
            if self.nesterov:
                g += self.mu * self.v
            else:
                g = self.v
        w -= self.lr * g
