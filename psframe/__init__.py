"""psframe: a parameter-server framework for distributed training over MPI."""
from . import data, layers, losses, models
from .backend import xp
from .callbacks import Callback
from .errors import ConfigError, GradientError, TrainingInterrupted
from .metrics import TrainResult
from .models import Model, Sequential
from .optim import SGD, Adam, Optimizer
from .policies import SSP, Async, DelayCompensation, Mixed, Policy, Sync
from .runtime import train
from .torch_model import TorchModel  # torch itself loads only when one is built

__version__ = "0.1.0"

__all__ = [
    "train", "TrainResult", "ConfigError", "GradientError", "TrainingInterrupted",
    "Model", "Sequential", "TorchModel", "layers", "losses", "models", "data", "xp",
    "Policy", "Sync", "Async", "SSP", "Mixed", "DelayCompensation", "Optimizer", "SGD", "Adam", "Callback",
]
