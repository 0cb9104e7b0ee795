"""Hooks the server calls as a run goes: progress displays and metric loggers plug in here."""
from __future__ import annotations

import sys
from typing import Any, Dict, Iterable, Optional, TextIO

__all__ = ["Callback", "PrintProgress", "CallbackList"]


class Callback:
    """Override what you need; every hook runs on the server rank only."""

    def on_start(self, info: Dict[str, Any]) -> None:
        """``info``: total_steps, n_workers and the run's config, before the first request."""

    def on_update(self, version: int, stats: Any) -> None:
        """After each applied update; ``version`` counts updates. Keep it cheap."""

    def on_record(self, row: Dict[str, Any]) -> None:
        """After each history row (an evaluation point), with the row's dict."""

    def on_end(self, result: Any) -> None:
        """With the TrainResult, before train() returns it."""


class PrintProgress(Callback):
    """One line per history row: what ``verbose=True`` and the CLI print."""

    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream or sys.stdout
        self.total: Optional[int] = None

    def on_start(self, info: Dict[str, Any]) -> None:
        self.total = info.get("total_steps")

    def on_record(self, row: Dict[str, Any]) -> None:
        def fmt(x: Optional[float]) -> str:
            return "  n/a " if x is None else f"{x:.4f}"

        print(
            f"step {row['step']:>6}/{self.total}  epoch {row['epoch']:6.2f}  "
            f"train_loss {fmt(row['train_loss'])}  eval_loss {fmt(row['eval_loss'])}  "
            f"eval_acc {fmt(row['eval_accuracy'])}  {row['time_s']:7.2f} s",
            file=self.stream,
            flush=True,
        )


class CallbackList(Callback):
    """Fans each hook out to many callbacks, in order."""

    def __init__(self, callbacks: Iterable[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_start(self, info: Dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_start(info)

    def on_update(self, version: int, stats: Any) -> None:
        for c in self.callbacks:
            c.on_update(version, stats)

    def on_record(self, row: Dict[str, Any]) -> None:
        for c in self.callbacks:
            c.on_record(row)

    def on_end(self, result: Any) -> None:
        for c in self.callbacks:
            c.on_end(result)
