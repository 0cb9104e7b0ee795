"""psframe: a parameter-server framework for distributed training over MPI."""
import sys as _sys

from . import data
from .backend import xp
from .callbacks import Callback
from .errors import ConfigError, GradientError, TrainingInterrupted
from .metrics import TrainResult
from .nn import layers, losses, models
from .nn.models import Model, Sequential
from .nn.optim import SGD, Adagrad, Adam, Optimizer
from .nn.torch_model import TorchModel  # torch itself loads only when one is built
from .policies import (SSP, Async, DelayCompensation, Hybrid, Mixed, Policy, PolicyState,
                       PushDecision, Sync)
from .training import train
from .training.supervisor import LaunchResult, launch

# The model library lives in psframe.nn; its public modules keep their old import paths too
# (``from psframe.layers import Dense``), as users of ps.layers, ps.losses and ps.models wrote.
for _name, _module in (("layers", layers), ("losses", losses), ("models", models)):
    _sys.modules[f"{__name__}.{_name}"] = _module

__version__ = "0.1.0"

__all__ = [
    "train", "launch", "LaunchResult", "TrainResult", "ConfigError", "GradientError",
    "TrainingInterrupted",
    "Model", "Sequential", "TorchModel", "layers", "losses", "models", "data", "xp",
    "Policy", "PolicyState", "PushDecision", "Sync", "Async", "SSP", "Mixed", "Hybrid",
    "DelayCompensation", "Optimizer", "SGD", "Adam", "Adagrad", "Callback",
]
