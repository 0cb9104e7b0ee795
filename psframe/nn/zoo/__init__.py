"""The model zoo: ready models built on the Model contract (psframe.nn.model)."""
from .classic import CNN, MLP, LinearRegression, SoftmaxRegression
from .dlrm import DLRM

__all__ = ["MLP", "CNN", "SoftmaxRegression", "LinearRegression", "DLRM"]
