"""Serial SGD/Adam and an MLP written from scratch in numpy: the trusted reference for tests."""
import numpy as np


def mlp_init(sizes, rng):
    """Same draws as psframe's Dense 'he' init (normal * sqrt(2/n_in), zero bias), in order."""
    params = {}
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"{2 * k}.W"] = rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_in, n_out))
        params[f"{2 * k}.b"] = np.zeros(n_out)
    return params


def mlp_loss_and_grad(params, X, y, n_layers):
    """ReLU MLP with mean softmax cross-entropy; layers named 0, 2, 4, ... as psframe does."""
    acts, pre = [X], []
    h = X
    for k in range(n_layers):
        z = h @ params[f"{2 * k}.W"] + params[f"{2 * k}.b"]
        pre.append(z)
        h = np.maximum(z, 0.0) if k < n_layers - 1 else z
        acts.append(h)
    z = h - h.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(X)
    loss = -logp[np.arange(n), y].mean()
    d = np.exp(logp)
    d[np.arange(n), y] -= 1.0
    d /= n
    grads = {}
    for k in reversed(range(n_layers)):
        grads[f"{2 * k}.W"] = acts[k].T @ d
        grads[f"{2 * k}.b"] = d.sum(axis=0)
        if k:
            d = (d @ params[f"{2 * k}.W"].T) * (pre[k - 1] > 0)
    return loss, grads


class SerialSGD:
    def __init__(self, lr, momentum=0.0):
        self.lr, self.mu, self.v = lr, momentum, {}

    def step(self, params, grads):
        for k, g in grads.items():
            self.v[k] = self.mu * self.v.get(k, 0.0) + g
            params[k] = params[k] - self.lr * self.v[k]


class SerialAdam:
    def __init__(self, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.lr, self.b1, self.b2, self.eps = lr, b1, b2, eps
        self.m, self.s, self.t = {}, {}, 0

    def step(self, params, grads):
        self.t += 1
        for k, g in grads.items():
            self.m[k] = self.b1 * self.m.get(k, 0.0) + (1 - self.b1) * g
            self.s[k] = self.b2 * self.s.get(k, 0.0) + (1 - self.b2) * g * g
            mhat = self.m[k] / (1 - self.b1 ** self.t)
            shat = self.s[k] / (1 - self.b2 ** self.t)
            params[k] = params[k] - self.lr * mhat / (np.sqrt(shat) + self.eps)


def worker_rows(n_rows, n_workers, batch, step, shuffle=False, seed=0):
    """Rows each worker uses at ``step``: the data-sharding contract, restated independently."""
    rows = []
    for w, block in enumerate(np.array_split(np.arange(n_rows), n_workers)):
        pos = step * batch + np.arange(batch)
        if not shuffle:
            rows.append(block[pos % len(block)])
            continue
        out = []
        for p in pos:
            epoch, i = divmod(int(p), len(block))
            perm = np.random.default_rng([seed, w, epoch]).permutation(len(block))
            out.append(block[perm[i]])
        rows.append(np.array(out))
    return rows


def serial_sync(loss_and_grad, params, X, y, n_workers, batch, steps, opt, shuffle=False,
                seed=0, skip=None):
    """N-worker Sync restated serially: per step, the mean of the workers' batch gradients.

    ``skip``: optional set of (worker, step) whose gradient is left out of that step's mean.
    """
    params = {k: v.copy() for k, v in params.items()}
    for t in range(steps):
        grads = []
        for w, rows in enumerate(worker_rows(len(X), n_workers, batch, t, shuffle, seed)):
            if skip and (w, t) in skip:
                continue
            grads.append(loss_and_grad(params, X[rows], y[rows])[1])
        if grads:
            opt.step(params, {k: sum(g[k] for g in grads) / len(grads) for k in grads[0]})
    return params


def serial_mlp(sizes, init, X, y, n_workers, batch, steps, opt, shuffle=False, seed=0):
    """serial_sync of ps.models.MLP(sizes), whose layers this module restates."""
    return serial_sync(lambda p, a, b: mlp_loss_and_grad(p, a, b, len(sizes) - 1), init, X, y,
                       n_workers, batch, steps, opt, shuffle=shuffle, seed=seed)


def assert_params_match(params, expected, tol=1e-10):
    """Every expected tensor, to ``tol`` (float64 runs against the serial reference)."""
    assert set(params) == set(expected)
    for k in expected:
        np.testing.assert_allclose(params[k], expected[k], rtol=tol, atol=tol, err_msg=k)
