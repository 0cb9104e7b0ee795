"""Update policies: pure state machines that decide what the server does with each request.

base: the contract (Policy, PolicyState, PushDecision); sync, on_arrival (Async, SSP), mixed:
the shipped policies; compensation: DC-ASGD; specs: policies from CLI strings.
"""
from __future__ import annotations

from .base import Policy, PolicyState, PushDecision
from .compensation import DelayCompensation, delay_compensate
from .hybrid import Hybrid
from .mixed import Mixed, MixedState
from .on_arrival import SCALES, SSP, ApplyOnArrival, Async
from .specs import policy_from_spec
from .sync import Sync, SyncState

__all__ = ["Policy", "PolicyState", "PushDecision", "Sync", "SyncState", "Async", "SSP",
           "ApplyOnArrival", "Mixed", "MixedState", "Hybrid", "DelayCompensation",
           "delay_compensate", "policy_from_spec", "SCALES"]
