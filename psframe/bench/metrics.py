"""A run's headline metrics from its stats and history, the same for psframe and baselines."""
__all__ = ["HISTORY_KEYS", "summarize", "time_to_target", "compact_history"]

HISTORY_KEYS = ("step", "epoch", "time_s", "train_loss", "eval_loss", "eval_accuracy")


def time_to_target(history, target):
    """(seconds, epochs) at the first evaluation with test accuracy >= target, else (None, None)."""
    for row in history:
        acc = row.get("eval_accuracy")
        if acc is not None and target is not None and acc >= target:
            return row.get("time_s"), row.get("epoch")
    return None, None


def _share(part, whole):
    return part / whole if part is not None and whole else None


def _mean(values):
    values = [v for v in values or [] if v is not None]
    return sum(values) / len(values) if values else None


def summarize(stats, history, target=None):
    """Flat metrics of one run. ``stats`` uses TrainResult.stats' names; a baseline fills the
    ones that mean something for it and leaves the rest out (they become None here)."""
    s = stats
    last = history[-1] if history else {}
    wall = s.get("wall_s")
    samples = s.get("samples")
    moved = None  # a run that moves nothing (serial) has no bytes per sample, not zero
    if s.get("bytes_pulled") is not None or s.get("bytes_pushed") is not None:
        moved = (s.get("bytes_pulled") or 0) + (s.get("bytes_pushed") or 0)
    t_target, ep_target = time_to_target(history, target)
    idle = s.get("stage_idle_share")
    return {
        "wall_s": wall,
        "samples": samples,
        "samples_per_s": s.get("samples_per_s", _share(samples, wall)),
        "updates_applied": s.get("updates_applied"),
        "updates_per_s": _share(s.get("updates_applied"), wall),
        "target_accuracy": target,
        "time_to_target_s": t_target,
        "epochs_to_target": ep_target,
        "final_accuracy": last.get("eval_accuracy"),
        "final_loss": last.get("eval_loss"),
        "final_train_loss": last.get("train_loss"),
        "bytes_pulled": s.get("bytes_pulled"),
        "bytes_pushed": s.get("bytes_pushed"),
        "bytes_per_sample": moved / samples if moved is not None and samples else None,
        "staleness_hist": s.get("staleness_hist"),
        "max_staleness": s.get("max_staleness"),
        "clock_gap_hist": s.get("clock_gap_hist"),
        "max_clock_gap": s.get("max_clock_gap"),
        "updates_dropped": s.get("updates_dropped"),
        "worker_wait_share": s.get("worker_wait_share"),
        "server_busy_share": _share(s.get("server_busy_s"), wall),
        "server_cpu_share": s.get("server_cpu_share"),
        # The pipeline bubble: each stage's idle share, and their mean as one number.
        "stage_idle_share": idle,
        "bubble_share": _mean(idle),
    }


def compact_history(history):
    """History rows with only the keys the report plots, so records stay small."""
    return [{k: row.get(k) for k in HISTORY_KEYS} for row in history]
