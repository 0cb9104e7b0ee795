"""Models: the custom-model base class, Sequential, and ready MLP, CNN, linear and DLRM models.

The contract lives in ``model.py``, Sequential in ``sequential.py``, the ready models in
``zoo/``; this module gathers them so ``psframe.nn.models``, ``psframe.models`` and
``ps.models.X`` keep working as before.
"""
from .model import Model
from .sequential import Sequential
from .zoo import CNN, DLRM, MLP, LinearRegression, SoftmaxRegression

__all__ = ["Model", "Sequential", "MLP", "CNN", "SoftmaxRegression", "LinearRegression", "DLRM"]
