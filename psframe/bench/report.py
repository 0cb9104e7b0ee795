"""`psframe report`: Markdown tables (median and spread over seeds) and PNG plots of bench runs."""
import math
import os
import statistics

from . import results as bench_results
from .metrics import time_to_target

__all__ = ["add_arguments", "main", "load", "group", "spread", "markdown", "checks"]

# The columns that name a configuration; a group is every seed of one configuration.
KEY_FIELDS = ("workload", "straggler", "mode", "workers", "system", "policy")


def add_arguments(p):
    p.add_argument("results", nargs="+", help="JSONL files written by psframe bench")
    p.add_argument("--out", metavar="DIR",
                   help="where report.md and the PNGs go (default: RESULTS-report/ beside the "
                        "first file)")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="target test accuracy for time-to-target (default: the runs' own)")


# -- data ----------------------------------------------------------------------------------------
def load(paths):
    """The latest record of every cell across ``paths``, in first-seen order; and the count of
    unreadable lines."""
    records, bad = [], 0
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"no such results file: {path}")
        more, n_bad = bench_results.read(path)
        records += more
        bad += n_bad
    latest = bench_results.latest(records)
    return list(latest.values()), bad


def retarget(records, target):
    """Time to ``target`` recomputed from each run's history (the bench's target is a default)."""
    for r in records:
        if r.get("status") == "ok":
            t, ep = time_to_target(r.get("history") or [], target)
            r["metrics"].update(target_accuracy=target, time_to_target_s=t, epochs_to_target=ep)


def label(config):
    """What a line or row is called: the policy for psframe, the system for a baseline."""
    return config["policy"] if config["system"] == "psframe" else config["system"]


def group(records):
    """[(key dict, [records of every seed])], in first-seen order."""
    groups = {}
    for r in records:
        c = r["config"]
        key = tuple(c.get(f) for f in KEY_FIELDS)
        groups.setdefault(key, []).append(r)
    return [(dict(zip(KEY_FIELDS, key)), rs) for key, rs in groups.items()]


def values(runs, name):
    return [r["metrics"].get(name) for r in runs if r["metrics"].get(name) is not None]


def spread(xs):
    """(median, half the range): the middle seed, and how far the others stray either way."""
    if not xs:
        return None, None
    if any(math.isinf(x) for x in xs):
        return statistics.median(xs), math.inf
    return statistics.median(xs), (max(xs) - min(xs)) / 2


# -- the table -----------------------------------------------------------------------------------
def _fmt(xs, digits=2, scale=1.0, unit="", thousands=False):
    """"median ±half-range" of ``xs``; digits "auto" keeps three significant digits."""
    med, half = spread([x * scale for x in xs])
    if med is None:
        return "–"
    if math.isinf(med):
        return "not reached"
    if digits == "auto":
        digits = max(2, 2 - math.floor(math.log10(abs(med)))) if med else 2
    form = f",.{digits}f" if thousands else f".{digits}f"
    text = f"{med:{form}}{unit}"
    if len(xs) > 1 and not math.isinf(half):
        text += f" ±{half:{form}}{unit}"
    return text


def _time_to_target(runs):
    times = [r["metrics"].get("time_to_target_s") for r in runs]
    reached = [t for t in times if t is not None]
    if not runs or runs[0]["metrics"].get("target_accuracy") is None:
        return "–"
    text = _fmt([math.inf if t is None else t for t in times], "auto")
    return f"{text} ({len(reached)}/{len(times)})" if len(reached) < len(times) else text


# (header, how to show a group's ok runs)
SPEED = (
    ("samples/s", lambda rs: _fmt(values(rs, "samples_per_s"), 0, thousands=True)),
    ("updates/s", lambda rs: _fmt(values(rs, "updates_per_s"), 0, thousands=True)),
    ("wall s", lambda rs: _fmt(values(rs, "wall_s"), "auto")),
    ("time to target s", _time_to_target),
    ("final test acc", lambda rs: _fmt(values(rs, "final_accuracy"), 4)),
    ("final test loss", lambda rs: _fmt(values(rs, "final_loss"), 4)),
)
COST = (
    ("KiB moved/sample", lambda rs: _fmt(values(rs, "bytes_per_sample"), 2, 1 / 1024)),
    ("max staleness", lambda rs: _fmt(values(rs, "max_staleness"), 0)),
    ("max clock gap", lambda rs: _fmt(values(rs, "max_clock_gap"), 0)),
    ("worker wait", lambda rs: _fmt(values(rs, "worker_wait_share"), 1, 100, "%")),
    ("server busy", lambda rs: _fmt(values(rs, "server_busy_share"), 1, 100, "%")),
    ("pipeline bubble", lambda rs: _fmt(values(rs, "bubble_share"), 1, 100, "%")),
)


def _table(groups, columns):
    """A Markdown table; key columns equal in every row are said once above it instead."""
    shown = [f for f in KEY_FIELDS if f not in ("system", "policy")
             and len({str(k[f]) for k, _ in groups}) > 1]
    same = [f"{f} {groups[0][0][f]}" for f in KEY_FIELDS
            if f not in ("system", "policy") and f not in shown]
    head = ["run", *shown, "seeds ok", *(h for h, _ in columns)]
    lines = [("All rows: " + ", ".join(same) + ".\n") if same else "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, rs in groups:
        ok = [r for r in rs if r["status"] == "ok"]
        cells = [label(key), *("–" if key[f] is None else str(key[f]) for f in shown),
                 f"{len(ok)}/{len(rs)}",
                 *(show(ok) for _, show in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line != "")


def _not_ok(records):
    bad = [r for r in records if r["status"] != "ok"]
    if not bad:
        return "Every run finished."
    lines = ["| run | status | note |", "|---|---|---|"]
    for r in bad:
        note = " ".join((r.get("note") or "").split())[-300:].replace("|", "\\|")
        lines.append(f"| `{r['key']}` | {r['status']} | {note} |")
    return "\n".join(lines)


def _environment_line(e):
    mpi, git = e.get("mpi", {}), e.get("git", {})
    revision = (git.get("revision") or "unknown")[:10] + (" (local changes)" if git.get("dirty")
                                                          else "")
    return (f"{e.get('host')}: {e.get('cores', {}).get('usable')} cores, "
            f"{mpi.get('vendor')} {mpi.get('version')} (mpi4py {mpi.get('mpi4py')}), "
            f"backend {e.get('backend')}, Python {e.get('python')}, NumPy {e.get('numpy')}, "
            f"torch {e.get('torch') or 'not installed'}, psframe {e.get('psframe')} at {revision}")


def _environment(records):
    envs = {}
    for r in records:
        text = _environment_line(r.get("env") or {})
        envs[text] = envs.get(text, 0) + 1
    lines = [f"- {text} ({n} run{'s' * (n > 1)})" for text, n in envs.items()]
    loads = [r.get("load_before") for r in records if r.get("load_before") is not None]
    cores = min((r["env"]["cores"]["usable"] for r in records if r.get("env")), default=None)
    if loads:
        # The 1-minute average still counts the previous cell's ranks (psframe runs workers
        # + 1), so a high figure alone does not prove that other work shared the machine.
        busy = (f"; above {cores}, the node's cores: the grid's own ranks (the average still "
                "counts the previous cell) or other work. If other work ran, timings are noisy"
                ) if cores and max(loads) > cores else ""
        lines.append(f"- 1-minute load average before each run: median "
                     f"{statistics.median(loads):.2f}, max {max(loads):.2f}{busy}")
    return "\n".join(lines)


# -- the targets ---------------------------------------------------------------------------
def _median_of(groups, name, **where):
    for key, rs in groups:
        if all(key.get(k) == v for k, v in where.items()):
            ok = [r for r in rs if r["status"] == "ok"]
            xs = values(ok, name) if name != "time_to_target_s" else [
                math.inf if r["metrics"].get(name) is None else r["metrics"][name] for r in ok]
            if xs:
                return spread(xs)[0], None
            skipped = rs and rs[0]["status"] == "skipped"
            why = "skipped, " + (rs[0].get("note") or "").split(";")[0] if skipped else \
                "no finished run"
            return None, why
    return None, "not in these results"


def checks(groups):
    """[(check, where, measured, goal, verdict)] for the targets the results can speak to."""
    out = []
    sync_data = [(k, rs) for k, rs in groups
                 if k["system"] == "psframe" and k["policy"] == "sync" and k["mode"] == "data"]
    for k, _ in sync_data:
        where = dict(workload=k["workload"], workers=k["workers"], straggler=k["straggler"])
        place = f"{k['workload']}, {k['workers']} workers, straggler {k['straggler']}"
        ours, _ = _median_of(groups, "samples_per_s", **where, system="psframe", policy="sync",
                             mode="data")
        ups, _ = _median_of(groups, "updates_per_s", **where, system="psframe", policy="sync",
                            mode="data")
        for system, metric, mine, goal in (("allreduce", "samples_per_s", ours, 0.9),
                                           ("torch_ddp", "samples_per_s", ours, 1.0),
                                           ("torch_rpc_ps", "updates_per_s", ups, 2.0)):
            theirs, why = _median_of(groups, metric, **where, system=system)
            name = f"Sync {metric.replace('_per_s', '/s')} / {system}"
            if theirs is None or not mine:
                if why != "not in these results":
                    out.append((name, place, "not measured: " + (why or ""), f">= {goal:g}", "–"))
                continue
            ratio = mine / theirs
            out.append((name, place, f"{ratio:.2f}", f">= {goal:g}",
                        "met" if ratio >= goal else "MISSED"))
    slow = [(k, rs) for k, rs in groups if k["system"] == "psframe" and k["straggler"] != "none"
            and k["policy"] != "sync"]
    for k, _ in slow:
        where = {f: k[f] for f in ("workload", "mode", "workers", "straggler")}
        base, _ = _median_of(groups, "time_to_target_s", **where, system="psframe",
                             policy="sync")
        mine, _ = _median_of(groups, "time_to_target_s", **where, system="psframe",
                             policy=k["policy"])
        if base is None or mine is None:
            continue
        name = f"{k['policy']} time to target / sync's"
        place = f"{k['workload']}, {k['mode']}, {k['workers']} workers, straggler {k['straggler']}"
        if math.isinf(base) or math.isinf(mine):
            who = "sync" if math.isinf(base) else k["policy"]
            out.append((name, place, f"{who} did not reach the target", "<= 0.6", "–"))
            continue
        ratio = mine / base
        out.append((name, place, f"{ratio:.2f}", "<= 0.6", "met" if ratio <= 0.6 else "MISSED"))
    return out


SHORT_RUN_S = 2.0  # below this much training, start-up and first-touch costs dominate rates


def _checks_md(groups):
    rows = checks(groups)
    if not rows:
        return "These results hold none of the comparisons the targets need."
    lines = ["| check | where | measured | target | |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    walls = [w for _, rs in groups for w in values([r for r in rs if r["status"] == "ok"],
                                                    "wall_s")]
    if walls and min(walls) < SHORT_RUN_S:
        lines.append(f"\nSome runs trained for less than {SHORT_RUN_S:g} s (shortest "
                     f"{min(walls):.3f} s): their rates are dominated by start-up costs and "
                     "say little about the targets.")
    return "\n".join(lines)


def markdown(records, plots=(), title="psframe benchmark report"):
    groups = group(records)
    ok = [r for r in records if r["status"] == "ok"]
    targets = sorted({r["metrics"].get("target_accuracy") for r in ok} - {None})
    parts = [
        f"# {title}",
        f"{len(records)} runs in {len(groups)} configurations; every number is the median over "
        "seeds, ± half the range between the lowest and highest seed. Time to target: the "
        "wall time at the first evaluation with test accuracy >= "
        f"{', '.join(map(str, targets)) or 'the target'} (k/n: only k of n seeds got there).",
        "## Speed and accuracy", _table(groups, SPEED),
        "## Communication, staleness and waiting",
        "KiB moved/sample: bytes pulled + pushed per training sample (Allreduce baselines: "
        "each rank's gradient in and the sum out). Worker wait: share of the workers' time spent "
        "waiting for the server (Allreduce: inside the collective). Server busy: the server's "
        "time handling requests, evaluations included, over wall time. Pipeline bubble: the "
        "stages' mean idle share (model and hybrid modes).",
        _table(groups, COST),
        "## Targets", _checks_md(groups),
        "## Runs that did not finish", _not_ok(records),
        "## Environment", _environment(records),
    ]
    if plots:
        parts.append("## Plots")
        parts += [f"![{name}]({name})" for name in plots]
    return "\n\n".join(parts) + "\n"


def main(args):
    records, bad = load(args.results)
    if not records:
        raise ValueError(f"no run records in {', '.join(args.results)}")
    if args.target is not None:
        retarget(records, args.target)
    out = args.out or os.path.splitext(args.results[0])[0] + "-report"
    os.makedirs(out, exist_ok=True)
    from . import plots as bench_plots

    try:
        plots = bench_plots.write_all(group(records), out)
    except ImportError:
        plots = []
        print("psframe report: matplotlib is missing, so no plots (pip install 'psframe[bench]')")
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(markdown(records, plots))
    if bad:
        print(f"note: {bad} unreadable line(s) skipped")
    print(f"{path}" + "".join(f"\n{os.path.join(out, p)}" for p in plots))
    return 0
