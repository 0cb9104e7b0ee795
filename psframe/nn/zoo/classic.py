"""Ready Sequential models: MLP, CNN, SoftmaxRegression and LinearRegression."""
from __future__ import annotations

from typing import List, Sequence

from ..layers import Conv2D, Dense, Dropout, Flatten, Layer, MaxPool2D, ReLU, Reshape, Tanh
from ..losses import MSE, SoftmaxCrossEntropy
from ..sequential import Sequential


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

    def __init__(self, input_shape: Sequence[int] = (1, 28, 28), n_classes: int = 10,
                 channels: Sequence[int] = (16, 32), kernel_size: int = 5,
                 hidden: Sequence[int] = (128,), dropout: float = 0.5):
        input_shape = tuple(int(d) for d in input_shape)
        if len(input_shape) != 3:
            raise ValueError(f"CNN input_shape is (channels, height, width), got {input_shape}")
        if kernel_size % 2 == 0:
            raise ValueError(f"CNN kernel_size must be odd (same padding), got {kernel_size}")
        layers: List[Layer] = [Reshape(input_shape)]
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
