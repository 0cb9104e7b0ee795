"""ps.TorchModel: a torch.nn.Module whose weights psframe's parameter servers hold and update."""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Dict, Optional

import numpy as np

from .model import Model, _check_chunk

__all__ = ["TorchModel"]

INSTALL_HINT = "pip install 'psframe[torch]' (in a checkout: make install-torch)"


def _import_torch():
    """torch, imported only when a TorchModel is built: psframe itself never needs it."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(
            f"ps.TorchModel needs PyTorch, an optional extra of psframe: {INSTALL_HINT}"
        ) from exc
    return torch


class _TorchLoss:
    """The user's loss function plus whether labels are class indices (they then travel as
    int64, which CrossEntropyLoss wants)."""

    def __init__(self, fn, classification):
        self.fn = fn
        self.classification = bool(classification)

    def __call__(self, output, target):
        return self.fn(output, target)

    def __repr__(self):
        return repr(self.fn)


class TorchModel(Model):
    """Train any ``torch.nn.Module`` with psframe (data mode).

    The parameters are ``module.named_parameters()``, with those names and shapes, and start
    from the module's own weights (the server's, i.e. rank 0's, module: seed torch the same on
    every rank only if you want every rank's copy to agree too). Gradients come from autograd
    on the worker's device. ``loss_fn(output, target)`` must average over the batch (psframe
    averages the workers' gradients); CrossEntropyLoss / NLLLoss (or F.cross_entropy,
    F.nll_loss) make it a classifier, whose accuracy is reported; ``classification=`` overrides.

    Inputs arrive as psframe's rows (N, features): put ``nn.Unflatten`` first for images.
    The module runs in train mode for gradients and in eval mode (no dropout) for
    ``evaluate``/``predict``. Buffers (BatchNorm's running statistics) are refused: the servers
    hold parameters only. The module you pass is never modified; training computes on a private
    copy whose parameters are bound to psframe's weight buffer without copying.
    ``load_params(result.params)`` copies trained weights into your module.
    """

    def __init__(self, module: Any, loss_fn: Any, classification: Optional[bool] = None):
        torch = _import_torch()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (output, target) -> loss, got {loss_fn!r}")
        buffers = [name for name, _ in module.named_buffers()]
        if buffers:
            raise ValueError(
                f"ps.TorchModel cannot train a module with buffers ({', '.join(buffers)}): "
                "psframe's servers hold parameters only, so each worker's running statistics "
                "would drift apart and never reach the result. Use LayerNorm or GroupNorm, or "
                "BatchNorm with track_running_stats=False (batch statistics in eval too)"
            )
        named = list(module.named_parameters())
        if not named:
            raise ValueError("the module has no parameters to train")
        frozen = [name for name, p in named if not p.requires_grad]
        if frozen:
            raise ValueError(
                f"parameters {frozen} have requires_grad=False; psframe's servers train every "
                "parameter, so fold frozen ones into the module as constants or unfreeze them"
            )
        reduction = getattr(loss_fn, "reduction", "mean")
        if reduction != "mean":
            raise ValueError(
                f"loss_fn has reduction={reduction!r}; psframe averages gradients over workers "
                "and losses over rows, so the loss must be the batch mean (reduction='mean')"
            )
        if classification is None:
            F = torch.nn.functional
            classification = (isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))
                              or loss_fn in (F.cross_entropy, F.nll_loss))
        self._torch = torch
        self.module = module
        self.loss = _TorchLoss(loss_fn, classification)
        # The copy that computes: its parameters are rebound to whatever weights each call
        # passes (psframe's flat-buffer views), so the user's module never points into
        # psframe's memory, which is freed when a run ends (the shared window).
        self._net = copy.deepcopy(module)
        self._params = dict(self._net.named_parameters())
        self._dtype = next(iter(self._params.values())).dtype
        self._bound = None  # name -> the array each private parameter views now
        self._streams: Dict[int, Any] = {}  # CuPy stream pointer -> torch.cuda.ExternalStream

    # -- psframe's Model contract ---------------------------------------------------------------
    def init_params(self, rng):
        """The module's own weights (``rng`` unused: torch initialised them when it was built)."""
        torch = self._torch
        out = {}
        for name, p in self.module.named_parameters():
            t = p.detach().cpu()
            if t.dtype not in (torch.float32, torch.float64):
                t = t.double()  # numpy has no bfloat16; the layout casts to the run's dtype anyway
            out[name] = t.numpy().copy()
        return out

    def loss_and_grad(self, params, X, y):
        torch = self._torch
        with self._on_stream(X), torch.enable_grad():
            self._bind(params)
            self._set_training(True)
            for p in self._params.values():
                # None, not zeros: autograd then hands over the gradient it computed (no copy,
                # no accumulation kernel).
                p.grad = None
            loss = self.loss(self._net(self._input(X)), self._target(y))
            loss.backward()
            grads = {name: self._grad_array(p) for name, p in self._params.items()}
            return loss.item(), grads

    def predict(self, params, X):
        """Class indices (argmax of the output) for a classifier, else the output itself."""
        torch = self._torch
        with self._on_stream(X), torch.no_grad():
            self._bind(params)
            self._set_training(False)
            out = self._net(self._input(X))
            if self.loss.classification:
                out = out.argmax(dim=1)
            return self._array(out)

    def evaluate(self, params, X, y, chunk=4096):
        """Mean loss (and accuracy for a classifier) in eval mode, without building a graph."""
        torch = self._torch
        chunk = _check_chunk(chunk)
        n = X.shape[0]
        if n == 0:
            raise ValueError("cannot evaluate on an empty data set")
        scored = self.loss.classification
        total, correct = 0.0, 0
        with self._on_stream(X), torch.no_grad():
            self._bind(params)
            self._set_training(False)
            for lo in range(0, n, chunk):
                out = self._net(self._input(X[lo:lo + chunk]))
                target = self._target(y[lo:lo + chunk])
                total += float(self.loss(out, target)) * out.shape[0]
                if scored:
                    correct += int((out.argmax(dim=1) == target).sum())
        return {"loss": total / n, "accuracy": correct / n if scored else None}

    def validate_data(self, X, y):
        """Classification labels must be class indices within the module's outputs: checked
        here, on every rank before any work, instead of as an IndexError in mid-run."""
        if not self.loss.classification:
            return None
        y = np.asarray(y)
        if y.ndim != 1:
            raise ValueError(f"class labels must be 1-D (one index per row), got shape {y.shape}")
        if y.dtype.kind not in "iu" and not (
                y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.floor(y)).all()):
            raise ValueError(f"class labels must be integers, got dtype {y.dtype}")
        torch = self._torch
        # The module's own weights: a binding left from an earlier run may point into memory
        # that run has freed. Rows arrive as floats in a run, so the check feeds floats too.
        self._bind(self.init_params(None))
        self._set_training(False)
        row = np.asarray(X[:1], dtype=np.float64)
        try:
            with torch.no_grad():  # one row through the module tells its number of classes
                n_classes = int(self._net(self._input(row)).shape[1])
        except Exception as exc:
            raise ValueError(
                f"the module failed on the first row of the data ({type(exc).__name__}: {exc}); "
                "check that the data's shape fits the module (rows arrive as (N, features))"
            ) from exc
        if y.min() < 0 or y.max() >= n_classes:
            raise ValueError(
                f"labels must be class indices in [0, {n_classes}) for a module with "
                f"{n_classes} outputs; got {y.min()}..{y.max()}"
            )
        return None

    def load_params(self, params):
        """Copy weights such as ``result.params`` into the module passed in, in place (its
        dtype and device stay)."""
        torch = self._torch
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                p.copy_(self._tensor(params[name]))

    def __repr__(self):
        n = sum(p.numel() for p in self.module.parameters())
        return f"TorchModel({type(self.module).__name__}, {n} weights, {self.loss!r})"

    # -- between psframe's arrays and torch's tensors -----------------------------------------
    def _bind(self, params):
        """Point the private module's parameters at ``params`` (views of psframe's flat buffer)
        without copying. A worker passes the same views every step, so after the first step
        this is a few identity checks; the weights change in place underneath."""
        if self._bound is not None and all(params.get(n) is a for n, a in self._bound.items()):
            return
        missing = sorted(set(self._params) - set(params))
        if missing:
            raise ValueError(f"params lack the module's parameters {missing}")
        for name, p in self._params.items():
            t = self._tensor(params[name])
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"param {name!r} has shape {tuple(t.shape)}, "
                                 f"the module's has {tuple(p.shape)}")
            p.grad = None  # a gradient of the old binding may not fit the new dtype/device
            p.data = t  # the leaf autograd differentiates now reads psframe's memory
        self._bound = {name: params[name] for name in self._params}
        self._dtype = next(iter(self._params.values())).dtype
        self._follow_thread_limit()

    def _tensor(self, a):
        """A tensor sharing ``a``'s memory: from_numpy on the host, DLPack for CuPy arrays."""
        torch = self._torch
        if isinstance(a, np.ndarray):
            if a.flags.writeable:
                return torch.from_numpy(a)
            # Under plain Sync a worker reads the server's weights in place, read-only. torch
            # warns it cannot honour that, but nothing here writes to them: the optimizer is
            # the server's, and gradients live in their own tensors.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                return torch.from_numpy(a)
        if isinstance(a, torch.Tensor):
            return a
        if hasattr(a, "__dlpack__"):
            return torch.from_dlpack(a)
        return torch.from_numpy(np.ascontiguousarray(a))

    def _input(self, X):
        t = self._tensor(X)
        # Floats compute in the weights' dtype (the run's); integer inputs (token ids) pass.
        if t.is_floating_point() and t.dtype != self._dtype:
            t = t.to(self._dtype)
        return t

    def _target(self, y):
        t = self._tensor(y)
        if self.loss.classification:
            return t.long()  # a no-op for psframe's int64 labels
        if t.is_floating_point() and t.dtype != self._dtype:
            t = t.to(self._dtype)
        return t

    def _grad_array(self, p):
        """The gradient as an array on the worker's device: a view of the tensor autograd
        made (zeros for a parameter the loss did not reach)."""
        g = p.grad
        if g is None:
            return self._array(self._torch.zeros_like(p))
        if g.is_sparse:  # nn.Embedding(sparse=True): the flat buffer is dense
            g = g.to_dense()
        return self._array(g)

    def _array(self, t):
        if t.device.type == "cpu":
            return t.numpy()
        import cupy

        return cupy.from_dlpack(t)

    def _set_training(self, training):
        if self._net.training != training:  # train() walks every submodule: only on a change
            self._net.train(training)

    def _on_stream(self, X):
        """On a GPU worker, torch's kernels go on the worker's CuPy stream, so they stay
        ordered with the weight copies before them and the gradient copies after them."""
        if isinstance(X, np.ndarray) or not hasattr(X, "__cuda_array_interface__"):
            return contextlib.nullcontext()
        import cupy

        ptr = cupy.cuda.get_current_stream().ptr
        if not ptr:  # CuPy's default stream is torch's default stream too
            return contextlib.nullcontext()
        if ptr not in self._streams:
            device = self._torch.device("cuda", cupy.cuda.Device().id)
            self._streams[ptr] = self._torch.cuda.ExternalStream(ptr, device=device)
        return self._torch.cuda.stream(self._streams[ptr])

    def _follow_thread_limit(self):
        """Cap torch's intra-op threads at the BLAS limit psframe set for this rank.

        psframe limits each rank's BLAS/OpenMP threads with threadpoolctl so that ranks x
        threads fit the cores; that already caps torch's own OpenMP runtime when threadpoolctl
        finds it (as with the PyPI wheels). This covers builds where it does not. Checked when
        the weights are (re)bound, which happens at a run's first step, inside the limit.
        """
        try:
            from threadpoolctl import threadpool_info
        except ImportError:
            return
        limits = [info["num_threads"] for info in threadpool_info()
                  if info.get("user_api") == "blas"]
        if limits and self._torch.get_num_threads() > min(limits):
            self._torch.set_num_threads(min(limits))
