"""Policies from CLI specs such as ``sync:1``, ``ssp:2+raw`` or ``mixed:100:async+dc``."""
from __future__ import annotations

from typing import Any, Sequence

from .base import Policy
from .mixed import Mixed
from .single_spec import single_policy_from_spec, spec_name

__all__ = ["policy_from_spec"]


def _mixed_from_spec(arg: str, modifiers: Sequence[str]) -> Mixed:
    k, _, then = arg.partition(":")
    then = then or "async"
    if modifiers:  # "mixed:100+raw": the modifiers belong to the phase after the switch
        then += "+" + "+".join(modifiers)
    return Mixed(sync_steps=int(k), then=then)  # Mixed reads the phase's spec


def policy_from_spec(spec: Any) -> Policy:
    """Policy from a CLI spec; a Policy instance passes through.

    ``sync``, ``sync:1`` or ``backup:1`` (backup workers), ``async``, ``async:lr``
    (staleness-scaled steps), ``ssp:2``, ``mixed:100`` or ``mixed:100:ssp:2``. Modifiers follow
    a ``+``: ``async+raw`` (unweighted pushes), ``ssp:2+scale=0.5``, ``async+dc`` or
    ``async+dc=1`` (adaptive delay compensation), ``async+dc-c=0.04`` (constant),
    ``mixed:100:async+dc``.
    """
    if isinstance(spec, Policy) or not isinstance(spec, str):
        return single_policy_from_spec(spec)
    if spec_name(spec) != "mixed":
        return single_policy_from_spec(spec)
    head, *modifiers = spec.strip().lower().split("+")
    arg = head.partition(":")[2]
    try:
        return _mixed_from_spec(arg, modifiers)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad policy spec {spec!r}: {exc}") from None
