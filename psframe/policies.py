"""Update policies as pure state machines: they decide, the server carries out; no MPI here."""
from dataclasses import dataclass, field

from .errors import ProtocolError

__all__ = ["Policy", "Sync", "PushDecision", "ProtocolError", "policy_from_spec"]


@dataclass(frozen=True)
class PushDecision:
    """What the server does with one push.

    ``accumulate``: add the gradient to the step being gathered.
    ``complete``: the gathered step is whole; apply the sum scaled by ``scale`` (1/n, the mean).
    ``staleness``: server version when applied minus the version the gradient was computed on.
    ``release``: workers whose held pulls may now be answered.
    """

    accumulate: bool = False
    complete: bool = False
    scale: float = 1.0
    staleness: int = 0
    release: tuple = ()


class Policy:
    """A user-facing policy: a small immutable config that builds a fresh state per run."""

    name = "policy"

    def state(self, n_workers):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class Sync(Policy):
    """Bulk synchronous: one update per global step, the mean of every worker's gradient."""

    name = "sync"

    def __init__(self, backup=0):
        if backup != 0:
            # Backup workers (drop the k slowest gradients) arrive with the policies issue.
            raise ValueError("Sync(backup=k) with k > 0 is not supported yet; use Sync()")
        self.backup = backup

    def state(self, n_workers):
        return SyncState(n_workers)

    def __repr__(self):
        return "Sync()"


@dataclass
class SyncState:
    """BSP: pulls for step c wait until step c-1 is applied; a step applies once all arrive."""

    n_workers: int
    version: int = 0
    arrived: set = field(default_factory=set)
    n_accepted: int = 0
    held: dict = field(default_factory=dict)  # worker -> clock of its held pull
    done: set = field(default_factory=set)

    def pull(self, worker, clock):
        """True: answer now. False: hold until a push or done releases it."""
        if clock > self.version + 1 or clock < self.version:
            raise ProtocolError(
                f"worker {worker} pulled for step {clock} while the server is at {self.version}"
            )
        if clock <= self.version:
            return True
        self.held[worker] = clock
        return False

    def push(self, worker, clock, pulled_version, accepted=True):
        if worker in self.done:
            raise ProtocolError(f"worker {worker} pushed after it finished")
        if clock != self.version or worker in self.arrived:
            raise ProtocolError(
                f"worker {worker} pushed for step {clock} while step {self.version} is gathering"
                + (" (twice)" if worker in self.arrived else "")
            )
        self.arrived.add(worker)
        self.n_accepted += int(accepted)
        return self._maybe_complete(accumulate=accepted)

    def finish(self, worker):
        """A worker has taken its last step; the step in flight no longer waits for it."""
        self.done.add(worker)
        self.held.pop(worker, None)
        return self._maybe_complete(accumulate=False)

    def _maybe_complete(self, accumulate):
        active = self.n_workers - len(self.done - self.arrived)
        if not self.arrived or len(self.arrived) < active:
            return PushDecision(accumulate=accumulate)
        scale = 1.0 / self.n_accepted if self.n_accepted else 0.0
        self.version += 1
        self.arrived.clear()
        self.n_accepted = 0
        release = tuple(sorted(w for w, c in self.held.items() if c <= self.version))
        for w in release:
            del self.held[w]
        return PushDecision(accumulate=accumulate, complete=True, scale=scale, release=release)


_BY_NAME = {"sync": Sync}


def policy_from_spec(spec):
    """Policy from a CLI-style spec such as ``"sync"``; a Policy instance passes through."""
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"policy must be a psframe policy such as ps.Sync(), got {spec!r}")
    name, _, arg = spec.strip().lower().partition(":")
    if name not in _BY_NAME:
        raise ValueError(f"unknown policy {spec!r}; choose one of {sorted(_BY_NAME)}")
    return _BY_NAME[name](*([int(arg)] if arg else []))
