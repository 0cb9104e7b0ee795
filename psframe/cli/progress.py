"""Progress and run logs: a tqdm bar and metrics.jsonl on the server, a log file per worker."""
import contextlib
import json
import math
import os
import socket
import sys
import time

from .. import env as environ
from ..callbacks import Callback
from ..data import steps_per_epoch
from ..metrics import jsonable
from ..server.checkpoints import write_atomic

__all__ = ["ProgressBar", "MetricsLog", "display_mode", "worker_log"]


def display_mode(progress="auto", quiet=False, stream=None, env=None):
    """"bar", "lines" or None. Auto gives a bar only when a person is watching a terminal."""
    if quiet:
        return None
    if progress != "auto":
        return progress
    stream = sys.stdout if stream is None else stream
    return "bar" if stream.isatty() or environ.tty_columns(env) is not None else "lines"


def _tty_columns(env=None):
    return environ.tty_columns(env)


class _RunClock(Callback):
    """What the bar and the log both need: epochs done and samples/s so far.

    An epoch is counted in samples, as the server's history does: ``epoch_samples`` from the
    server when it says, else derived from ``n_rows``, ``batch_size`` and ``dispatch`` the
    way ps.train derives it.
    """

    def __init__(self, n_rows=None, batch_size=None, dispatch="static"):
        self.n_rows, self.batch_size, self.dispatch = n_rows, batch_size, dispatch
        self.epoch_samples = None
        self.total = None
        self.stats = None

    def on_start(self, info):
        self.t0 = time.perf_counter()
        self.total = info.get("total_steps")
        self.epoch_samples = info.get("epoch_samples")
        if self.epoch_samples is None and self.n_rows and self.batch_size:
            if self.dispatch == "dynamic":  # every row once per epoch, whoever trains it
                self.epoch_samples = self.n_rows
            else:  # each worker's block, rounded up to whole batches
                n, b = info["n_workers"], self.batch_size
                self.epoch_samples = steps_per_epoch(self.n_rows, n, b) * n * b

    def epoch(self):
        if self.stats is None or not self.epoch_samples:
            return None
        return self.stats.samples / self.epoch_samples

    def rate(self, now):
        elapsed = now - self.t0
        return self.stats.samples / elapsed if self.stats is not None and elapsed > 0 else 0.0


def _max_staleness(stats):
    return max(stats.staleness, default=0) if stats is not None else 0


class ProgressBar(_RunClock):
    """A tqdm bar: step/total, epoch, last train loss, eval accuracy, samples/s, max staleness.

    ``n_rows``, ``batch_size`` and ``dispatch`` give epochs; it redraws at most every
    ``interval`` seconds, so the server's update path stays cheap.
    """

    def __init__(self, n_rows=None, batch_size=None, dispatch="static", file=None, ncols=None,
                 interval=0.2):
        super().__init__(n_rows, batch_size, dispatch)
        self.file = file
        self.ncols = ncols if ncols is not None else _tty_columns()
        self.interval = interval
        self.bar = None
        self.loss = self.accuracy = None
        self._drawn = -math.inf

    def on_start(self, info):
        from tqdm import tqdm

        super().on_start(info)
        self.bar = tqdm(
            total=self.total, file=self.file or sys.stdout, ncols=self.ncols, unit="step",
            # tqdm puts ", " before a non-empty postfix itself.
            bar_format="step {n_fmt}/{total_fmt} {bar} {elapsed}<{remaining}{postfix}",
            mininterval=self.interval, dynamic_ncols=self.ncols is None,
        )

    def on_update(self, version, stats):
        self.stats = stats
        if stats.recent_loss is not None:
            self.loss = stats.recent_loss
        now = time.perf_counter()
        if now - self._drawn >= self.interval:
            self._draw(version, now)

    def on_record(self, row):
        self.loss, self.accuracy = row["train_loss"], row["eval_accuracy"]
        self._draw(row["step"], time.perf_counter())

    def on_end(self, result):
        if self.bar is None:
            return
        self._draw(result.stats["updates_applied"], time.perf_counter())
        self.bar.close()

    def postfix(self, now):
        parts = []
        epoch = self.epoch()
        if epoch is not None:
            parts.append(f"epoch {epoch:.2f}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.accuracy is not None:
            parts.append(f"acc {self.accuracy:.4f}")
        parts.append(f"{self.rate(now):,.0f} samples/s")
        parts.append(f"staleness {_max_staleness(self.stats)}")
        return "  ".join(parts)

    def _draw(self, step, now):
        if self.bar is None:
            return
        self._drawn = now
        self.bar.n = step
        self.bar.set_postfix_str(self.postfix(now), refresh=False)
        self.bar.refresh()


class MetricsLog(_RunClock):
    """``DIR/metrics.jsonl``: a record at the start, every ``every`` updates, at each
    history row (evaluation) and at the end; then ``summary.json`` and ``summary.txt``.

    Each line is one JSON object with ``kind`` ("start", "update", "eval", "end"), ``step``,
    ``time`` (Unix seconds) and ``elapsed_s``; lines are flushed as written, so a crashed or
    running job's log can be read.
    """

    def __init__(self, log_dir, every=100, n_rows=None, batch_size=None, dispatch="static"):
        super().__init__(n_rows, batch_size, dispatch)
        self.log_dir = log_dir
        self.every = every
        self.file = None
        self.step = 0  # the newest step seen: a resumed run's counters start at its restart

    def _write(self, kind, step, **fields):
        now = time.perf_counter()
        record = {"kind": kind, "step": step, "epoch": self.epoch(), "time": time.time(),
                  "elapsed_s": now - self.t0}
        if self.stats is not None:
            s = self.stats
            record.update(
                samples=s.samples, samples_per_s=self.rate(now),
                updates_applied=s.updates_applied, updates_dropped=s.updates_dropped,
                updates_rejected=s.updates_rejected, max_staleness=_max_staleness(s),
                bytes_pulled=s.bytes_pulled, bytes_pushed=s.bytes_pushed,
                train_loss=s.recent_loss,
            )
        record.update(fields)
        self.file.write(json.dumps(jsonable(record), allow_nan=False) + "\n")

    def on_start(self, info):
        super().on_start(info)
        os.makedirs(self.log_dir, exist_ok=True)
        path = os.path.join(self.log_dir, "metrics.jsonl")
        resumed, restart = info.get("resumed_step"), environ.restart()
        if resumed is None and not restart:
            self.file = open(path, "w", buffering=1)
            self._write("start", 0, epoch=0.0, total_steps=self.total,
                        n_workers=info.get("n_workers"))
            return
        # A restart with no checkpoint yet starts over, from step 0.
        self.step = resumed or 0
        # The steps after the checkpoint happen again: drop the records the failed run
        # wrote of them, so that each step is in the log once.
        kept = _records_up_to(path, self.step)
        write_atomic(path, lambda f: f.write("".join(kept).encode()))
        self.file = open(path, "a", buffering=1)
        self._write("restart" if restart else "resume", self.step, total_steps=self.total,
                    n_workers=info.get("n_workers"), restart=restart or None)

    def on_update(self, version, stats):
        self.stats = stats
        self.step = version
        if self.every and version % self.every == 0:
            self._write("update", version)

    def on_record(self, row):
        self._write("eval", row["step"], epoch=row["epoch"], train_loss=row["train_loss"],
                    eval_loss=row["eval_loss"], eval_accuracy=row["eval_accuracy"],
                    time_s=row["time_s"])

    def on_end(self, result):
        stats = result.stats
        self._write("end", self.step, wall_s=stats["wall_s"],
                    samples_per_s=stats["samples_per_s"])
        self.file.close()
        summary = {"stats": stats, "final": result.final, "config": result.config}
        with open(os.path.join(self.log_dir, "summary.json"), "w") as f:
            json.dump(jsonable(summary), f, indent=2, allow_nan=False)
            f.write("\n")
        with open(os.path.join(self.log_dir, "summary.txt"), "w") as f:
            f.write(result.summary() + "\n")


def _records_up_to(path, step):
    """The lines of a metrics.jsonl whose step is at most ``step`` (never its "end"), or none
    when there is no file. A line cut short by a killed server is left out."""
    kept = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("kind") != "end" and record.get("step", 0) <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
    except FileNotFoundError:
        pass
    return kept


@contextlib.contextmanager
def worker_log(log_dir, rank):
    """``DIR/worker-RANK.log``: when and where this rank ran, how long, and how it ended.

    Workers write nothing to the terminal; this file is their record.
    """
    os.makedirs(log_dir, exist_ok=True)
    path = os.path.join(log_dir, f"worker-{rank}.log")
    t0 = time.perf_counter()

    def line(f, text):
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"{stamp} rank {rank}: {text}\n")
        f.flush()

    restart = environ.restart()
    # A restart adds to the log of the starts before it, so the file tells the whole story.
    with open(path, "a" if restart else "w") as f:
        again = f" (restart {restart})" if restart else ""
        line(f, f"started{again} on {socket.gethostname()} pid {os.getpid()}")
        try:
            yield
        except BaseException as exc:
            line(f, f"stopped after {time.perf_counter() - t0:.2f} s: {type(exc).__name__}: {exc}")
            raise
        line(f, f"finished in {time.perf_counter() - t0:.2f} s")
