"""The report's PNG plots: accuracy over time, throughput by workers, staleness, bytes moved."""
import math
import os
import statistics
import textwrap

__all__ = ["write_all"]

PANELS_PER_FILE = 9
STALENESS_BUCKETS = 16  # staleness 0..14 each, then one bar for 15 and more


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and no GUI toolkit needed
    import matplotlib.pyplot as plt

    return plt


def _label(key):
    return key["policy"] if key["system"] == "psframe" else key["system"]


def _ok(runs):
    return [r for r in runs if r["status"] == "ok"]


class _Colors:
    """One colour per line label, the same in every plot of a report."""

    def __init__(self, labels, plt):
        names = list(dict.fromkeys(labels))
        # tab10 while it suffices; past 10 lines (8 policies + 4 peers) tab20, so no two
        # lines of one plot share a colour.
        cmap, n = (plt.get_cmap("tab10"), 10) if len(names) <= 10 else (plt.get_cmap("tab20"), 20)
        self.of = {name: cmap(i % n) for i, name in enumerate(names)}

    def __call__(self, name):
        return self.of[name]


def _panels(plt, n, width=5.4, height=3.9):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = axes.ravel().tolist()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _save(plt, fig, out, name, title):
    # Wrapped to the figure's width: a one-panel figure is narrow.
    fig.suptitle(textwrap.fill(title, width=int(fig.get_figwidth() * 11)), fontsize=12)
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return name


def _chunks(items, size=PANELS_PER_FILE):
    return [items[i:i + size] for i in range(0, len(items), size)]


def _file(stem, i, n):
    return f"{stem}.png" if n == 1 else f"{stem}_{i + 1}.png"


def _where(key, *fields):
    names = {"workers": lambda v: f"{v} worker{'s' * (v != 1)}",
             "straggler": lambda v: "no straggler" if v == "none" else f"straggler {v}",
             "mode": lambda v: f"{v} mode"}
    return " · ".join(names.get(f, str)(key[f]) for f in fields if key.get(f) is not None)


# -- test accuracy against wall time -------------------------------------------------------------
def _accuracy_panels(groups):
    """Panels of psframe runs by workload, mode, workers and straggler; a baseline joins the
    panels of its workload whose workers and straggler it matches (serial joins them all)."""
    panels = {}
    for key, runs in groups:
        if key["system"] == "psframe":
            where = tuple(key[f] for f in ("workload", "mode", "workers", "straggler"))
            panels.setdefault(where, []).append((key, runs))
    if not panels:  # baselines only
        for key, runs in groups:
            panels.setdefault((key["workload"], None, key["workers"], key["straggler"]),
                              []).append((key, runs))
        return panels
    for key, runs in groups:
        if key["system"] == "psframe":
            continue
        for (workload, _, workers, straggler), lines in panels.items():
            serial = key["system"] == "serial"
            if key["workload"] == workload and (serial or (key["workers"] == workers and
                                                           key["straggler"] == straggler)):
                lines.append((key, runs))
    return panels


def accuracy_vs_time(plt, groups, colors, out):
    panels = [(w, lines) for w, lines in _accuracy_panels(groups).items()
              if any(r.get("history") for _, runs in lines for r in _ok(runs))]
    names = []
    chunks = _chunks(panels)
    for i, chunk in enumerate(chunks):
        fig, axes = _panels(plt, len(chunk))
        for ax, ((workload, mode, workers, straggler), lines) in zip(axes, chunk):
            target = None
            for key, runs in lines:
                name = _label(key)
                style = "-" if key["system"] == "psframe" else "--"
                for j, r in enumerate(_ok(runs)):
                    rows = [h for h in r.get("history") or [] if h.get("eval_accuracy") is not None]
                    target = r["metrics"].get("target_accuracy") or target
                    if rows:
                        ax.plot([h["time_s"] for h in rows], [h["eval_accuracy"] for h in rows],
                                style, marker=".", color=colors(name), alpha=0.85, linewidth=1.4,
                                label=name if j == 0 else None)
            if target:
                ax.axhline(target, color="0.4", linestyle=":", linewidth=1,
                           label=f"target {target:g}")
            ax.set_title(_where({"workload": workload, "mode": mode, "workers": workers,
                                 "straggler": straggler},
                                "workload", "mode", "workers", "straggler"), fontsize=10)
            ax.set_xlabel("wall time (s)")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
        title = "Test accuracy against wall time (one line per seed; dashed: baselines)"
        names.append(_save(plt, fig, out, _file("accuracy_vs_time", i, len(chunks)), title))
    return names


# -- throughput against workers ------------------------------------------------------------------
def throughput_vs_workers(plt, groups, colors, out):
    panels = {}
    for key, runs in groups:
        if _ok(runs):
            line = _label(key) + (f" · {key['mode']}" if key["system"] == "psframe" else "")
            panels.setdefault((key["workload"], key["straggler"]), {}).setdefault(
                (line, _label(key)), []).append((key["workers"], _ok(runs)))
    if not panels:
        return []
    fig, axes = _panels(plt, len(panels))
    for ax, ((workload, straggler), lines) in zip(axes, panels.items()):
        styles = {}
        for (line, name), points in lines.items():
            points.sort(key=lambda p: p[0])
            xs = [w for w, _ in points]
            sps = [[r["metrics"]["samples_per_s"] for r in rs] for _, rs in points]
            med = [statistics.median(v) for v in sps]
            err = [[m - min(v) for m, v in zip(med, sps)], [max(v) - m for m, v in zip(med, sps)]]
            # Same colour per policy; modes of one policy get their own marker and dash.
            k = styles.setdefault(name, 0)
            styles[name] += 1
            ax.errorbar(xs, med, yerr=err, marker="osD^v"[k % 5], capsize=3, color=colors(name),
                        linestyle=("-", "--", ":", "-.")[k % 4], label=line)
        ax.set_title(_where({"workload": workload, "straggler": straggler},
                            "workload", "straggler"), fontsize=10)
        ax.set_xlabel("workers (processes computing gradients)")
        ax.set_ylabel("throughput (training samples/s)")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.grid(alpha=0.3)
        # Outside the axes: throughput lines cross the whole panel, any corner hides one.
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return [_save(plt, fig, out, "throughput_vs_workers.png",
                  "Throughput against workers (median over seeds; bars: lowest to highest seed)")]


# -- staleness -----------------------------------------------------------------------------------
def staleness(plt, groups, colors, out):
    panels = {}
    for key, runs in groups:
        hists = [r["metrics"].get("staleness_hist") for r in _ok(runs)]
        if key["system"] == "psframe" and any(hists):
            total = [0] * STALENESS_BUCKETS
            for h in filter(None, hists):
                for s, n in h.items():
                    total[min(int(s), STALENESS_BUCKETS - 1)] += n
            where = tuple(key[f] for f in ("workload", "mode", "workers", "straggler"))
            panels.setdefault(where, []).append((key["policy"], total))
    names = []
    chunks = _chunks(list(panels.items()))
    for i, chunk in enumerate(chunks):
        fig, axes = _panels(plt, len(chunk))
        for ax, ((workload, mode, workers, straggler), bars) in zip(axes, chunk):
            top = max(max((j for j, n in enumerate(t) if n), default=0) for _, t in bars)
            xs = list(range(top + 1))
            width = 0.8 / len(bars)
            for j, (policy, total) in enumerate(bars):
                share = [100.0 * n / max(sum(total), 1) for n in total[:top + 1]]
                ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], share, width,
                       color=colors(policy), label=policy)
            # At least 0..4 on the axis: a lone bar at 0 should not fill the panel.
            shown = range(max(top, 4) + 1)
            ticks = [str(x) for x in shown]
            if top == STALENESS_BUCKETS - 1:
                ticks[-1] += "+"
            ax.set_xticks(list(shown), ticks)
            ax.set_title(_where({"workload": workload, "mode": mode, "workers": workers,
                                 "straggler": straggler},
                                "workload", "mode", "workers", "straggler"), fontsize=10)
            ax.set_xlabel("staleness (server updates between pull and apply)")
            ax.set_ylabel("share of updates (%)")
            ax.grid(alpha=0.3, axis="y")
            ax.legend(fontsize=8)
        names.append(_save(plt, fig, out, _file("staleness", i, len(chunks)),
                           "Staleness of applied updates per policy (all seeds)"))
    return names


# -- bytes moved per sample ----------------------------------------------------------------------
def bytes_per_sample(plt, groups, colors, out):
    panels = {}
    for key, runs in groups:
        moved = [r["metrics"].get("bytes_per_sample") for r in _ok(runs)]
        moved = [m for m in moved if m is not None]
        if not moved:
            continue
        what = f"psframe\n{key['mode']}" if key["system"] == "psframe" else key["system"]
        panels.setdefault(key["workload"], {}).setdefault(what, {}).setdefault(
            key["workers"], []).extend(moved)
    if not panels:
        return []
    fig, axes = _panels(plt, len(panels), width=6.4)
    for ax, (workload, cats) in zip(axes, panels.items()):
        counts = sorted({w for per in cats.values() for w in per})
        cmap = plt.get_cmap("viridis")
        width = 0.8 / len(counts)
        for j, w in enumerate(counts):
            xs = [i for i, per in enumerate(cats.values()) if w in per]
            ys = [statistics.median(per[w]) / 1024 for per in cats.values() if w in per]
            ax.bar([x - 0.4 + width * (j + 0.5) for x in xs], ys, width,
                   color=cmap(j / max(len(counts) - 1, 1) * 0.85),
                   label=f"{w} worker{'s' * (w != 1)}")
        ax.set_xticks(range(len(cats)), list(cats))
        ax.set_title(workload, fontsize=10)
        ax.set_ylabel("KiB moved per training sample\n(pulled + pushed)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    return [_save(plt, fig, out, "bytes_per_sample.png",
                  "Bytes moved per training sample, by mode (median over policies and seeds)")]


def write_all(groups, out):
    """Every plot the results have data for; the file names written, in ``out``."""
    plt = _plt()
    colors = _Colors([_label(k) for k, _ in groups], plt)
    names = []
    for plot in (accuracy_vs_time, throughput_vs_workers, staleness, bytes_per_sample):
        names += plot(plt, groups, colors, out)
    return names
