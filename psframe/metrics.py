"""Run metrics: server counters, staleness histogram, history, and the TrainResult users get."""
from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ServerStats", "TrainResult", "Stopwatch", "jsonable"]


class Stopwatch:
    """Accumulates seconds spent inside ``with`` blocks."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start: Optional[float] = None

    def __enter__(self) -> Stopwatch:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._start is not None, "a Stopwatch is left only after it is entered"
        self.total += time.perf_counter() - self._start


@dataclass
class ServerStats:
    """Counters the server keeps while it serves; ``as_dict`` becomes ``TrainResult.stats``."""

    updates_applied: int = 0
    updates_dropped: int = 0
    updates_rejected: int = 0
    staleness: Counter[int] = field(default_factory=Counter)
    pulls_answered: int = 0
    pushes_received: int = 0
    pushes_streamed: int = 0  # applied frame by frame as they landed (ParameterServer._streams)
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    samples: int = 0
    weight_sum: float = 0.0  # the applied updates' weights (see Optimizer.apply)
    recent_loss: Optional[float] = None  # moving average of the workers' reported batch losses

    def record_loss(self, loss: float) -> None:
        # A short moving average: one worker's batch loss is too noisy to show alone.
        self.recent_loss = loss if self.recent_loss is None else 0.9 * self.recent_loss + 0.1 * loss

    def record_update(self, staleness: int, weight: float = 1.0) -> None:
        self.updates_applied += 1
        self.staleness[int(staleness)] += 1
        self.weight_sum += weight

    def as_dict(self) -> Dict[str, Any]:
        return {
            "updates_applied": self.updates_applied,
            "updates_dropped": self.updates_dropped,
            "updates_rejected": self.updates_rejected,
            "max_staleness": max(self.staleness, default=0),
            "staleness_hist": dict(sorted(self.staleness.items())),
            "pulls_answered": self.pulls_answered,
            "pushes_received": self.pushes_received,
            "pushes_streamed": self.pushes_streamed,
            "bytes_pulled": self.bytes_pulled,
            "bytes_pushed": self.bytes_pushed,
            "samples": self.samples,
            # Sync: about 1; Async or SSP under scale="auto": 1/N. Times updates_applied it is
            # how many full optimizer steps the run took.
            "mean_update_weight": (self.weight_sum / self.updates_applied
                                   if self.updates_applied else 0.0),
        }


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} GiB"


@dataclass
class TrainResult:
    """What ``ps.train`` returns on the server rank."""

    params: Dict[str, Any]
    history: List[Dict[str, Any]]
    stats: Dict[str, Any]
    config: Dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> Dict[str, Any]:
        return self.history[-1] if self.history else {}

    def summary(self) -> str:
        s, c, last = self.stats, self.config, self.final
        rows: List[Tuple[str, Any]] = [
            ("mode / policy", f"{c.get('mode')} / {c.get('policy')}"),
            ("workers", s.get("n_workers")),
            ("optimizer", c.get("optimizer")),
            ("steps per worker", s.get("steps_per_worker")),
            ("updates applied", s["updates_applied"]),
            ("max staleness", s["max_staleness"]),
            ("update weighting", s.get("update_weighting") or "n/a"),
            ("train loss", _num(last.get("train_loss"))),
            ("test loss", _num(last.get("eval_loss"))),
            ("test accuracy", _num(last.get("eval_accuracy"))),
            ("wall time", f"{s['wall_s']:.2f} s"),
            ("samples/s", f"{s['samples_per_s']:,.0f}"),
            ("payload path", _paths(s.get("worker_transport"))),
            ("bytes pulled", _fmt_bytes(s["bytes_pulled"])),
            ("bytes pushed", _fmt_bytes(s["bytes_pushed"])),
            ("worker wait share", f"{s.get('worker_wait_share', 0.0):.1%}"),
            ("server CPU share", f"{s.get('server_cpu_share', 0.0):.1%}"),
        ]
        servers = s.get("servers") or []
        if len(servers) > 1:  # each server's share: weights, bytes in and out, CPU
            rows.append(("servers", len(servers)))
            rows += [(f"  server {v['rank']}",
                      f"{v['params']:,} weights, {_fmt_bytes(v['bytes_pushed'])} in, "
                      f"{_fmt_bytes(v['bytes_pulled'])} out, {v['updates']} updates, "
                      f"CPU {v['cpu_share']:.0%}") for v in servers]
        sparse = s.get("sparse")
        if sparse:  # the row-sparse tables: what moved of them, and their rows' staleness
            total = sum(t["rows"] for t in sparse["tables"])
            rows.append(("sparse tables", f"{len(sparse['tables'])} ({total:,} rows): "
                         f"{sparse['rows_pulled']:,} rows pulled, {sparse['rows_pushed']:,} "
                         f"pushed, max row staleness {max(sparse['staleness'], default=0)}"))
        width = max(len(k) for k, _ in rows)
        lines = ["psframe run summary"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        return "\n".join(lines)


def _paths(per_worker: Optional[Sequence[str]]) -> str:
    """How the workers' payload travelled: "shared-read x3", "mpi x1, shared-copy x2"."""
    if not per_worker:
        return "n/a"
    counts = Counter(per_worker)
    return ", ".join(f"{path} x{n}" for path, n in sorted(counts.items()))


def _num(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy scalars as numbers, tuples as lists, and NaN/inf as null: strict JSON."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
