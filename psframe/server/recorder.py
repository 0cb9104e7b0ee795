"""Recorder: the run's counters, history and evaluations, the callbacks, and the TrainResult."""
from __future__ import annotations

import time
from collections import Counter
from typing import (TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Mapping, Optional,
                    Sequence, Tuple)

import numpy as np

from ..metrics import ServerStats, TrainResult

if TYPE_CHECKING:
    from ..callbacks import Callback
    from ..params import ParamLayout
    from .group import Group

__all__ = ["Recorder"]


class Recorder:
    """What the server saw, for the user: stats, the history of evaluations, the callbacks.

    ``epoch_samples`` is the history's epoch unit; ``eval_every`` records every K steps
    (default: once per epoch); ``eval_data`` is (X, y) to evaluate ``model`` on, or None.
    """

    own_shards: Tuple[int, ...]  # this server's shard range (Executor.own_shards)
    own_params: int

    def __init__(self, model: Any, layout: ParamLayout, n_workers: int, *,
                 eval_data: Optional[Tuple[Any, Any]] = None, eval_every: Optional[int] = None,
                 total_steps: Optional[int] = None, epoch_samples: int = 1,
                 callbacks: Optional[Callback] = None,
                 run_info: Optional[Mapping[str, Any]] = None, weighting: Optional[str] = None,
                 total_batches: Optional[int] = None) -> None:
        self.model = model
        self.layout = layout
        self.n_workers = n_workers
        self.eval_data = eval_data
        self.eval_every = eval_every
        self.total_steps = total_steps
        self.epoch_samples = epoch_samples
        self.callbacks = callbacks
        self.run_info = dict(run_info or {})
        self.weighting = weighting  # how the policy weights updates, in words, for stats
        self.stats = ServerStats()
        self.bytes_pulled_by = [0] * n_workers
        self.bytes_pushed_by = [0] * n_workers
        self.batch_counts = (np.zeros(total_batches, dtype=np.int64)
                             if total_batches is not None else None)
        self.worker_reports: Dict[int, Dict[str, Any]] = {}
        self.history: List[Dict[str, Any]] = []
        self._loss_sum = 0.0
        self._loss_n = 0
        self.last_logged = -1
        self._last_epoch = 0
        self._seen_version = 0
        # The checkpoint's step, when the run continues one.
        self.resumed_step: Optional[int] = None
        self._time_offset = 0.0  # a resumed history's time_s goes on from its last row
        self.t0 = time.perf_counter()
        # Called before the weights are read whole: with several servers, it gathers the
        # other servers' ranges into them (ParameterServer._gather).
        self.before_read: Callable[[], None] = lambda: None
        # Each server's load, with several servers (merge_servers).
        self.servers: Optional[List[Dict[str, Any]]] = None
        self.own_shards, self.own_params = (0, layout.n_shards), layout.size  # rank 0's range

    def _hook(self, name: str, *args: Any) -> None:
        if self.callbacks is not None:
            getattr(self.callbacks, name)(*args)

    def start(self) -> None:
        self._hook("on_start", {**self.run_info, "total_steps": self.total_steps,
                                "n_workers": self.n_workers,
                                "epoch_samples": self.epoch_samples,
                                "resumed_step": self.resumed_step})
        self.t0 = time.perf_counter()

    # -- events -----------------------------------------------------------------------------
    def pushed(self, worker: int, nbytes: int, accepted: bool, samples: int, loss: float,
               batch: int) -> None:
        self.stats.pushes_received += 1
        self.moved(worker, pushed=nbytes)
        if not accepted:
            return
        # Only the rank that saw the loss reports samples (a pipeline's last stage).
        self.stats.samples += samples
        if samples:
            self._loss_sum += loss * samples
            self._loss_n += samples
            self.stats.record_loss(loss)
        if self.batch_counts is not None:
            self.batch_counts[batch] += 1

    def pulled(self, worker: int, nbytes: int) -> None:
        self.stats.pulls_answered += 1
        self.moved(worker, pulled=nbytes)

    def moved(self, worker: int, pushed: int = 0, pulled: int = 0) -> None:
        """Bytes that moved for worker besides its push and pull counts (a server that only
        follows rank 0's decisions, the row-sparse rows)."""
        self.stats.bytes_pushed += pushed
        self.bytes_pushed_by[worker] += pushed
        self.stats.bytes_pulled += pulled
        self.bytes_pulled_by[worker] += pulled

    def dropped(self) -> None:
        self.stats.updates_dropped += 1

    def reported(self, worker: int, report: Dict[str, Any]) -> None:
        """A worker's final report (its timings and backend), sent with DONE."""
        self.worker_reports[worker] = report

    def updated(self, version: int, staleness: int, weight: float, weights: np.ndarray) -> bool:
        """An update was applied; ``version`` is the run's step count after it. Returns True
        when the run's step moved (every group has applied it)."""
        self.stats.record_update(staleness, weight)
        if version == self._seen_version:
            return False  # a pipeline stage moved, but not every stage has finished the step
        self._seen_version = version
        self._hook("on_update", version, self.stats)
        epoch = int(self.stats.samples // self.epoch_samples)
        if self.eval_every:
            due = version % self.eval_every == 0 and version != self.last_logged
        else:
            due = epoch > self._last_epoch
        self._last_epoch = max(epoch, self._last_epoch)
        if due:
            self.record(version, weights)
        return True

    def record(self, version: int, weights: np.ndarray) -> None:
        """One history row: the mean train loss since the last, and the evaluation."""
        self.last_logged = version
        row = {
            "step": version,
            "epoch": self.stats.samples / self.epoch_samples,
            "time_s": time.perf_counter() - self.t0 + self._time_offset,
            "train_loss": self._loss_sum / self._loss_n if self._loss_n else None,
            "eval_loss": None,
            "eval_accuracy": None,
        }
        self._loss_sum, self._loss_n = 0.0, 0
        if self.eval_data is not None:
            X, y = self.eval_data
            self.before_read()
            scores = self.model.evaluate(self.layout.views(weights), X, y)
            row["eval_loss"] = float(scores["loss"])
            acc = scores.get("accuracy")
            row["eval_accuracy"] = None if acc is None else float(acc)
        self.history.append(row)
        self._hook("on_record", row)

    def restore(self, version: int, samples: int, history: Iterable[Dict[str, Any]]) -> None:
        """Continue a checkpointed run's counters and history."""
        self.stats.samples = samples
        self.history = list(history)
        self._seen_version = self.last_logged = self.resumed_step = version
        self._time_offset = self.history[-1]["time_s"] if self.history else 0.0
        self._last_epoch = int(self.stats.samples // self.epoch_samples)

    def load(self, rank: int, shards: Sequence[int], n_elems: int, wall: float,
             cpu: float) -> Dict[str, Any]:
        """This server's share of the work, as ``stats["servers"]`` lists it per server."""
        s = self.stats
        return {"rank": rank, "shards": list(shards), "params": int(n_elems),
                "bytes_pushed": int(s.bytes_pushed), "bytes_pulled": int(s.bytes_pulled),
                "updates": int(s.updates_applied), "pushes_streamed": int(s.pushes_streamed),
                "cpu_s": cpu,
                "cpu_share": cpu / wall if wall > 0 else 0.0,
                "bytes_pushed_by": list(self.bytes_pushed_by),
                "bytes_pulled_by": list(self.bytes_pulled_by)}

    def merge_servers(self, loads: Iterable[Dict[str, Any]]) -> None:
        """The other servers' loads (their bytes count toward the run's totals)."""
        self.servers = list(loads)

    # -- the result -------------------------------------------------------------------------
    def result(self, weights: np.ndarray, groups: Sequence[Group], transports: Iterable[str],
               wall: float, cpu: float, wait_s: float, busy_s: float) -> TrainResult:
        stats = self.stats.as_dict()
        own = self.load(0, self.own_shards, self.own_params, wall, cpu)
        servers = [own] + list(self.servers or [])
        for key in ("bytes_pushed", "bytes_pulled"):
            stats[key] = sum(s[key] for s in servers)
        self.bytes_pushed_by = [sum(s["bytes_pushed_by"][w] for s in servers)
                                for w in range(self.n_workers)]
        self.bytes_pulled_by = [sum(s["bytes_pulled_by"][w] for s in servers)
                                for w in range(self.n_workers)]
        stats["servers"] = [{k: v for k, v in s.items() if not k.endswith("_by")}
                            for s in servers]
        reports = [self.worker_reports.get(i, {}) for i in range(self.n_workers)]
        worker_wait = [r.get("wait_s", 0.0) for r in reports]
        worker_wall = [r.get("wall_s", 0.0) for r in reports]
        gaps: Counter[int] = Counter()
        for g in groups:
            gaps.update(g.policy.gaps)
        stats.update(
            n_workers=self.n_workers,
            wall_s=wall,
            samples_per_s=stats["samples"] / wall if wall > 0 else 0.0,
            steps_per_worker=[r.get("steps", 0) for r in reports],
            worker_wait_s=worker_wait,
            worker_push_s=[r.get("push_s", 0.0) for r in reports],
            worker_compute_s=[r.get("compute_s", 0.0) for r in reports],
            worker_wait_share=sum(worker_wait) / max(sum(worker_wall), 1e-12),
            bytes_pulled_per_worker=list(self.bytes_pulled_by),
            bytes_pushed_per_worker=list(self.bytes_pushed_by),
            server_wait_s=wait_s,
            server_busy_s=busy_s,
            server_cpu_s=cpu,
            server_cpu_share=cpu / wall if wall > 0 else 0.0,
            max_clock_gap=max(gaps, default=0),
            clock_gap_hist=dict(sorted(gaps.items())),
            n_shards=self.layout.n_shards,
            n_params=self.layout.size,
            policy_switches=list(getattr(groups[0].policy, "switches", [])),
            worker_transport=list(transports),
            update_weighting=self.weighting,
        )
        if self.batch_counts is not None:
            stats["batch_counts"] = self.batch_counts.tolist()
        if any("backend" in r for r in reports):  # each worker's backend and data path
            keys = ("backend", "device", "transfer", "data_on_device", "note")
            stats["worker_backends"] = [{k: r[k] for k in keys if k in r} for r in reports]
        if any("idle_s" in r for r in reports):  # pipeline stages report their bubble
            stats["stage_idle_share"] = [
                r.get("idle_s", 0.0) / max(r.get("wall_s", 0.0), 1e-12) for r in reports
            ]
        return TrainResult(params=self.layout.unflatten(weights), history=self.history,
                           stats=stats, config=dict(self.run_info.get("config", {})))
