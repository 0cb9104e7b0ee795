"""The errors psframe raises on purpose, importable without starting MPI."""
from __future__ import annotations

__all__ = ["ConfigError", "GradientError", "ProtocolError", "TrainingInterrupted"]


class ConfigError(ValueError):
    """Bad input to ``train``: raised with the same message on every rank, before any work."""


class GradientError(RuntimeError):
    """A pushed gradient the server refused: wrong size or non-finite."""


class ProtocolError(RuntimeError):
    """A worker sent something the policy's state cannot have allowed (a bug, not bad data)."""


class TrainingInterrupted(RuntimeError):
    """SIGINT or SIGTERM stopped the run; raised on every rank after a clean stop."""
