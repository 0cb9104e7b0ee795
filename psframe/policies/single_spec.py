"""Specs of one policy (no phases): ``sync:1``, ``backup:1``, ``async:lr``, ``ssp:2+raw``."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

from .base import Policy
from .compensation import DelayCompensation
from .on_arrival import SCALES, SSP, Async
from .sync import Sync

__all__ = ["single_policy_from_spec", "spec_name"]


def _async_from_spec(arg: str, **options: Any) -> Async:
    if arg not in ("", "lr", "staleness_lr"):
        raise ValueError(f"async takes 'lr' (staleness-scaled steps) or nothing, got {arg!r}")
    return Async(staleness_lr=bool(arg), **options)


def _sync_from_spec(backup: int, scale: str = "auto",
                    compensation: Optional[DelayCompensation] = None) -> Sync:
    if compensation is not None:
        raise ValueError("Sync has no stale gradients to compensate; dc needs async, ssp or "
                         "mixed")
    return Sync(backup, scale=scale)


_BY_NAME: Dict[str, Callable[..., Policy]] = {
    "sync": lambda arg, **o: _sync_from_spec(int(arg) if arg else 0, **o),
    "backup": lambda arg, **o: _sync_from_spec(int(arg or 1), **o),
    "async": _async_from_spec,
    "ssp": lambda arg, **o: SSP(int(arg) if arg else 2, **o),
    "hybrid": lambda arg, **o: _hybrid_from_spec(arg, **o),
}


def _hybrid_from_spec(arg: str, **options: Any) -> Policy:
    """``hybrid``: Sync dense, Async rows; ``hybrid:ssp:2+raw``: that dense policy (the
    modifiers are its), Async rows."""
    from .hybrid import Hybrid  # here, not at the top: hybrid builds on these policies

    name, _, rest = (arg or "sync").partition(":")
    if name not in _BY_NAME or name == "hybrid":
        raise ValueError(f"hybrid:DENSE takes a dense policy spec such as sync or ssp:2, "
                         f"got {arg!r}")
    return Hybrid(dense=_BY_NAME[name](rest, **options))


def _options_from(modifiers: Sequence[str]) -> Dict[str, Any]:
    """Keyword arguments from a spec's "+" modifiers: raw, scale=X, dc, dc=LAMBDA."""
    options: Dict[str, Any] = {}
    for mod in modifiers:
        key, eq, value = mod.partition("=")
        if key == "raw" and not eq:
            options["scale"] = "none"
        elif key == "scale" and value:
            options["scale"] = value if value in SCALES else float(value)
        elif key in ("dc", "dc-c"):
            adaptive = key == "dc"
            lam = float(value) if eq else (2.0 if adaptive else 0.04)
            options["compensation"] = DelayCompensation(lam, adaptive=adaptive)
        else:
            raise ValueError(f"unknown modifier {mod!r}; use raw, scale=auto|staleness|none|X, "
                             "dc[=LAMBDA] (adaptive) or dc-c[=LAMBDA] (constant)")
    return options


def spec_name(spec: str) -> str:
    """The policy a spec names: "ssp" for "SSP:2+raw"."""
    return spec.strip().lower().split("+")[0].partition(":")[0]


def single_policy_from_spec(spec: Any) -> Policy:
    """A Policy from a spec naming one policy, with its "+" modifiers; a Policy passes
    through. ``mixed`` specs are psframe.policies.specs' (they hold phases of these)."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"policy must be a psframe policy such as ps.Sync(), got {spec!r}")
    head, *modifiers = spec.strip().lower().split("+")
    name, _, arg = head.partition(":")
    if name not in _BY_NAME:
        raise ValueError(f"unknown policy {spec!r}; choose one of {sorted([*_BY_NAME, 'mixed'])}")
    try:
        return _BY_NAME[name](arg, **_options_from(modifiers))
    except (ValueError, TypeError) as exc:
        raise ValueError(f"bad policy spec {spec!r}: {exc}") from None
