"""psframe report from a synthetic results file: medians and spread, targets, plots; no MPI."""
import argparse
import json
import math

import pytest

from psframe.bench import metrics as bench_metrics
from psframe.bench import report
from psframe.bench import results as bench_results


def record(system="psframe", policy="sync", mode="data", workers=2, straggler="none", seed=0,
           status="ok", workload="digits", history=None, note=None, **metrics):
    """A run record shaped like psframe bench's, with the metrics given and sane defaults."""
    if system != "psframe":
        policy, mode = None, None
    history = history if history is not None else [
        {"step": 10, "epoch": 0.5, "time_s": 0.5, "eval_accuracy": 0.5, "eval_loss": 1.0,
         "train_loss": 1.2},
        {"step": 20, "epoch": 1.0, "time_s": 1.0, "eval_accuracy": 0.8, "eval_loss": 0.6,
         "train_loss": 0.7}]
    m = {"samples_per_s": 100.0, "updates_per_s": 10.0, "wall_s": 1.0, "target_accuracy": 0.75,
         "time_to_target_s": 1.0, "final_accuracy": 0.8, "final_loss": 0.6,
         "bytes_per_sample": 2048.0, "max_staleness": 0, "max_clock_gap": 0,
         "staleness_hist": {"0": 20}, "worker_wait_share": 0.25, "server_busy_share": 0.5,
         "bubble_share": None}
    m.update(metrics)
    key = f"{system}/{workload}/{policy or '-'}/{mode or '-'}/w{workers}/{straggler}/s{seed}"
    return {"kind": "run", "key": key, "digest": "x", "status": status, "note": note,
            "config": {"system": system, "workload": workload, "policy": policy, "mode": mode,
                       "workers": workers, "straggler": straggler, "seed": seed},
            "env": {"host": "h", "cores": {"usable": 2}, "mpi": {"vendor": "MPICH"}},
            "load_before": 0.5, "metrics": m if status == "ok" else None,
            "history": history if status == "ok" else None}


def write(tmp_path, records, name="results.jsonl"):
    path = tmp_path / name
    for r in records:
        bench_results.append(str(path), r)
    return str(path)


def row(text, name):
    """The cells of the first table row whose run column is ``name``."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("|") and cells[0] == name:
            return cells
    raise AssertionError(f"no row {name!r} in:\n{text}")


def header(text, after):
    """Column names of the first table after the heading ``after``."""
    part = text.split(after, 1)[1]
    line = next(ln for ln in part.splitlines() if ln.startswith("| run"))
    return [c.strip() for c in line.strip("|").split("|")]


def cell(text, heading, name, column):
    return row(text.split(heading, 1)[1], name)[header(text, heading).index(column)]


# -- the numbers -------------------------------------------------------------------------------
def test_spread_is_median_and_half_range():
    assert report.spread([100.0, 130.0, 110.0]) == (110.0, 15.0)
    assert report.spread([2.0]) == (2.0, 0.0)
    med, half = report.spread([1.0, math.inf, 3.0])
    assert med == 3.0 and math.isinf(half)
    assert report.spread([]) == (None, None)


def test_table_shows_median_and_spread_over_seeds():
    runs = [record(seed=s, samples_per_s=v, final_accuracy=a)
            for s, v, a in ((0, 100.0, 0.80), (1, 130.0, 0.90), (2, 110.0, 0.84))]
    text = report.markdown(runs)
    speed = "## Speed and accuracy"
    assert cell(text, speed, "sync", "samples/s") == "110 ±15"
    assert cell(text, speed, "sync", "final test acc") == "0.8400 ±0.0500"
    assert cell(text, speed, "sync", "seeds ok") == "3/3"
    cost = "## Communication"
    assert cell(text, cost, "sync", "KiB moved/sample") == "2.00 ±0.00"
    assert cell(text, cost, "sync", "worker wait") == "25.0% ±0.0%"


def test_time_to_target_counts_the_seeds_that_missed_it():
    runs = [record(seed=0, time_to_target_s=1.0), record(seed=1, time_to_target_s=None),
            record(seed=2, time_to_target_s=3.0)]
    text = report.markdown(runs)
    # A miss counts as infinitely late: the median of (1, inf, 3) is 3.
    assert cell(text, "## Speed", "sync", "time to target s") == "3.00 (2/3)"
    runs = [record(seed=s, time_to_target_s=None) for s in range(3)]
    assert cell(report.markdown(runs), "## Speed", "sync", "time to target s") == \
        "not reached (0/3)"


def test_key_columns_equal_in_every_row_are_said_once():
    runs = [record(policy="sync"), record(policy="async", workers=4)]
    text = report.markdown(runs)
    assert "All rows: workload digits, straggler none, mode data." in text
    assert header(text, "## Speed")[:3] == ["run", "workers", "seeds ok"]
    assert row(text, "async")[1] == "4"


def test_failed_and_skipped_runs_are_listed_with_their_note():
    runs = [record(seed=0), record(seed=1, status="timeout", note="killed after 60 s"),
            record(system="torch_ddp", status="skipped", note="torch is not importable")]
    text = report.markdown(runs)
    assert cell(text, "## Speed", "sync", "seeds ok") == "1/2"
    assert cell(text, "## Speed", "torch_ddp", "samples/s") == "–"
    tail = text.split("## Runs that did not finish", 1)[1]
    assert "| timeout | killed after 60 s |" in tail
    assert "| skipped | torch is not importable |" in tail


# -- the targets ------------------------------------------------------------------------
def test_checks_compare_sync_with_allreduce_and_stragglers_with_sync():
    runs = [record(samples_per_s=95.0), record(system="allreduce", samples_per_s=100.0),
            record(system="torch_ddp", status="skipped", note="torch is not importable"),
            record(straggler="0:3x", time_to_target_s=10.0),
            record(policy="ssp:2", straggler="0:3x", time_to_target_s=5.0),
            record(policy="async", straggler="0:3x", time_to_target_s=7.0),
            record(policy="sync:1", straggler="0:3x", time_to_target_s=None)]
    found = {(c[0], c[1]): c[2:] for c in report.checks(report.group(runs))}
    place = "digits, 2 workers, straggler none"
    assert found[("Sync samples/s / allreduce", place)] == ("0.95", ">= 0.9", "met")
    assert found[("Sync samples/s / torch_ddp", place)][0] == \
        "not measured: skipped, torch is not importable"
    slow = "digits, data, 2 workers, straggler 0:3x"
    assert found[("ssp:2 time to target / sync's", slow)] == ("0.50", "<= 0.6", "met")
    assert found[("async time to target / sync's", slow)] == ("0.70", "<= 0.6", "MISSED")
    assert found[("sync:1 time to target / sync's", slow)][0] == \
        "sync:1 did not reach the target"


def test_retarget_recomputes_time_to_target_from_history():
    runs = [record()]
    report.retarget(runs, 0.4)
    assert runs[0]["metrics"]["time_to_target_s"] == 0.5
    report.retarget(runs, 0.99)
    assert runs[0]["metrics"]["time_to_target_s"] is None


def test_metrics_from_stats():
    stats = {"wall_s": 2.0, "samples": 1000, "updates_applied": 50, "bytes_pulled": 3000,
             "bytes_pushed": 1000, "server_busy_s": 0.5, "stage_idle_share": [0.2, 0.4],
             "staleness_hist": {"0": 40, "3": 10}, "max_staleness": 3}
    history = [{"time_s": 1.0, "epoch": 1.0, "eval_accuracy": 0.7},
               {"time_s": 2.0, "epoch": 2.0, "eval_accuracy": 0.9, "eval_loss": 0.3}]
    m = bench_metrics.summarize(stats, history, target=0.8)
    assert m["samples_per_s"] == 500 and m["updates_per_s"] == 25
    assert m["bytes_per_sample"] == 4.0 and m["server_busy_share"] == 0.25
    assert m["bubble_share"] == pytest.approx(0.3)
    assert (m["time_to_target_s"], m["epochs_to_target"]) == (2.0, 2.0)
    assert (m["final_accuracy"], m["final_loss"]) == (0.9, 0.3)
    # The serial baseline moves nothing: no bytes per sample rather than zero.
    assert bench_metrics.summarize({"wall_s": 1.0, "samples": 10}, [])["bytes_per_sample"] is None


# -- the results file ---------------------------------------------------------------------------
def test_torn_line_is_skipped_and_the_latest_record_of_a_cell_wins(tmp_path):
    path = str(tmp_path / "r.jsonl")
    bench_results.append(path, record(seed=0, samples_per_s=1.0))
    with open(path, "a") as f:
        f.write('{"kind": "run", "key": "torn')  # a writer killed mid-line
    bench_results.append(path, record(seed=0, samples_per_s=2.0))
    records, bad = bench_results.read(path)
    assert bad == 1 and len(records) == 2
    latest = bench_results.latest(records)
    assert [r["metrics"]["samples_per_s"] for r in latest.values()] == [2.0]


# -- the command: table and plots ---------------------------------------------------------------
def synthetic_grid():
    """Two policies x two worker counts x three seeds, baselines, and two modes."""
    runs = []
    for seed in range(3):
        for workers in (2, 4):
            for policy, speed, stale in (("sync", 100.0, {"0": 30}),
                                         ("async", 150.0, {"0": 10, "1": 12, "2": 6, "20": 2})):
                history = [{"step": k, "epoch": k / 4, "time_s": k * 0.1 * (1 + seed / 10),
                            "eval_accuracy": 1 - 0.5 / k, "eval_loss": 1 / k, "train_loss": 1 / k}
                           for k in range(1, 9)]
                runs.append(record(policy=policy, workers=workers, seed=seed, history=history,
                                   samples_per_s=speed * workers / 2 + seed,
                                   staleness_hist=stale, max_staleness=max(map(int, stale))))
            runs.append(record(system="allreduce", workers=workers, seed=seed,
                               samples_per_s=120.0 * workers / 2))
            runs.append(record(mode="model", workers=workers, seed=seed, bubble_share=0.3,
                               bytes_per_sample=1024.0))
        runs.append(record(system="serial", workers=1, seed=seed, bytes_per_sample=None))
        runs.append(record(system="torch_ddp", seed=seed, status="skipped",
                           note="torch is not importable"))
    return runs


def test_report_command_writes_markdown_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    path = write(tmp_path, synthetic_grid())
    with open(path, "a") as f:
        f.write("{not json\n")
    out = tmp_path / "rep"
    assert report.main(argparse.Namespace(results=[path], out=str(out), target=None)) == 0
    text = (out / "report.md").read_text()
    pngs = ["accuracy_vs_time.png", "throughput_vs_workers.png", "staleness.png",
            "bytes_per_sample.png"]
    for name in pngs:
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, name
        assert f"![{name}]({name})" in text
    assert cell(text, "## Communication", "sync", "pipeline bubble") == "–"
    assert row(text.split("## Communication", 1)[1], "sync")[1] == "data"
    assert "| `torch_ddp/digits/-/-/w2/none/s0` | skipped |" in text


def test_report_command_defaults_out_beside_results_and_needs_runs(tmp_path):
    pytest.importorskip("matplotlib")
    path = write(tmp_path, [record()], name="grid.jsonl")
    report.main(argparse.Namespace(results=[path], out=None, target=0.6))
    text = (tmp_path / "grid-report" / "report.md").read_text()
    assert "accuracy >= 0.6" in text
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"kind": "calibration", "key": "c"}) + "\n")
    with pytest.raises(ValueError, match="no run records"):
        report.main(argparse.Namespace(results=[str(empty)], out=None, target=None))
