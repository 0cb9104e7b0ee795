"""A user's model file for `psframe train --model tests/scripts/user_model.py:FUNC`."""
import psframe as ps


def build():
    return ps.models.MLP([6, 12, 3])


def broken():
    raise RuntimeError("cannot build: no weights for this size")


def not_a_model():
    return [ps.layers.Dense(6, 3)]
