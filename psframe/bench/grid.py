"""`psframe bench`: a grid of runs, each its own job, one JSON record per run; resumable."""
import argparse
import os
import sys

from . import cells as bench_cells
from . import machine as bench_env
from . import results as bench_results
from . import spec as bench_spec
from .spec import Cell, Mode, Straggler

__all__ = ["add_arguments", "main", "Runner"]


def _list(kind=str):
    def parse(text):
        try:
            return [kind(s.strip()) for s in text.split(",") if s.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return parse


def _setting(text):
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib
    try:  # a TOML value: 0.05, true, "adam", [0.9, 0.99]; anything else is a string
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def add_arguments(p):
    """The `bench` subcommand's flags (psframe.cli.app builds the subparser)."""
    p.add_argument("--config", metavar="FILE", help="grid spec (TOML), e.g. "
                   "benchmarks/configs/smoke.toml; without it, flags alone describe the grid")
    p.add_argument("--out", metavar="FILE", help="results JSONL to append to (default: the "
                   "spec's [bench] results, else results/bench/NAME.jsonl)")
    axes = p.add_argument_group("grid axes (comma-separated lists; each replaces the spec's)")
    for name, kind, text in (
            ("systems", str, f"of {', '.join(bench_spec.SYSTEMS)}"),
            ("workloads", str, "names of the spec's [workloads.NAME]"),
            ("policies", str, "sync, sync:1, async, ssp:2, mixed:50 ..."),
            ("modes", str, "data, model, model/m4, hybrid:2 ..."),
            ("workers", int, "worker counts, e.g. 1,2,4"),
            ("stragglers", str, "none, 0:3x (worker 0 three times slower), 0:0.01 (worker 0 "
                                "sleeps 0.01 s per step)"),
            ("seeds", int, "e.g. 0,1,2")):
        axes.add_argument(f"--{name}", type=_list(kind), metavar="LIST", help=text)
    p.add_argument("--set", dest="settings", type=_setting, action="append", default=[],
                   metavar="KEY=VALUE", help="a train option for every cell (epochs=2, "
                   "lr=0.05); repeatable; wins over the spec")
    p.add_argument("--timeout", type=float, metavar="S", help="seconds per cell")
    p.add_argument("--target", type=float, metavar="ACC", help="target test accuracy")
    p.add_argument("--filter", action="append", default=[], metavar="TEXT",
                   help="run only cells whose id contains TEXT (repeatable: all must match)")
    p.add_argument("--retry-failed", action="store_true",
                   help="run failed and timed-out cells again (default: keep their record)")
    p.add_argument("--dry-run", action="store_true", help="list the cells and exit")


def _spec(args):
    spec = bench_spec.load(args.config) if args.config else bench_spec.from_flags()
    if args.settings:
        spec["options"].update(bench_spec.check_options(dict(args.settings), "--set"))
    bench = spec["bench"]
    if args.timeout is not None:
        bench["timeout_s"] = args.timeout
    if args.target is not None:  # for every workload, whatever its own table says
        bench["target_accuracy"] = args.target
        for own in spec["per_workload"].values():
            own.pop("target_accuracy", None)
    return spec


def _results_path(args, spec):
    if args.out:
        return args.out
    return spec["bench"]["results"] or os.path.join("results", "bench",
                                                    spec["bench"]["name"] + ".jsonl")


class Runner:
    """Runs cells in order, appending a record after each; cells already recorded with the
    same settings are skipped, so an interrupted grid resumes where it stopped."""

    def __init__(self, spec, results, retry_failed=False, out=print):
        self.spec, self.bench = spec, spec["bench"]
        self.results = results
        self.cells_root = os.path.splitext(results)[0] + ".cells"
        self.retry_failed = retry_failed
        self.out = out
        self.env = None
        self.torch = bench_env.torch_version()
        records, bad = bench_results.read(results) if os.path.exists(results) else ([], 0)
        if bad:
            out(f"note: {results}: {bad} unreadable line(s) skipped (a run stopped mid-write)")
        self.done = bench_results.latest(records)
        self.calibrations = bench_results.latest(records, kind="calibration")

    # -- resume --------------------------------------------------------------------------------
    def reusable(self, cell):
        """The earlier record of this cell that stands, or None when it must run."""
        r = self.done.get(cell.id)
        if r is None or r.get("digest") != cell.digest:
            return None
        if r["status"] in ("failed", "timeout") and self.retry_failed:
            return None
        if r["status"] == "skipped" and cell.system in bench_cells.TORCH_SYSTEMS and self.torch:
            return None  # torch has arrived since
        return r

    # -- one cell ------------------------------------------------------------------------------
    def _base_record(self, cell, delays=None):
        if self.env is None:
            self.env = bench_env.environment()
        return {"kind": "run", "key": cell.id, "digest": cell.digest,
                "bench": self.bench["name"], "status": None, "note": None,
                "started": bench_env.now(), "load_before": bench_env.load_average(),
                "config": {**cell.describe(), "delay": delays, "target_accuracy": cell.target},
                "env": self.env}

    def _skip(self, cell):
        record = self._base_record(cell)
        record.update(status="skipped", note=(
            f"torch is not importable by {sys.executable}; `pip install -e '.[torch]'` in the "
            "checkout (`make install-torch`) adds the pinned CPU build that runs this baseline"))
        return record

    def _job(self, cell, delays, directory):
        record = self._base_record(cell, delays)
        cmd = bench_cells.command(cell, directory, delays)
        status, rc, seconds = bench_cells.execute(cmd, directory, self.bench["timeout_s"])
        record.update(status=status, returncode=rc, duration_s=seconds,
                      load_after=bench_env.load_average(), command=cmd, dir=directory)
        if status == "ok":
            try:
                metrics, stats, history, run_config = bench_cells.collect(
                    cell, directory, cell.target)
                record.update(metrics=metrics, stats=stats, history=history,
                              run_config=run_config)
            except (OSError, ValueError, KeyError) as exc:
                record.update(status="failed", note=f"job exited 0 but its results are "
                                                    f"unreadable: {type(exc).__name__}: {exc}")
        elif status == "timeout":
            record["note"] = f"killed after the {self.bench['timeout_s']:g} s cell timeout"
        else:
            record["note"] = bench_cells.stderr_tail(directory) or f"exit status {rc}"
        return record

    def run_cell(self, cell):
        """Run ``cell`` (calibrating its straggler first if needed); its record, appended."""
        script = bench_cells.baseline_script(cell.system)
        if cell.system in bench_cells.TORCH_SYSTEMS and not self.torch:
            record = self._skip(cell)
        elif script and not os.path.exists(script):
            record = self._base_record(cell)
            record.update(status="failed", note=f"{script} not found: the baselines are "
                                                "installed with psframe, in psframe/bench")
        else:
            directory = bench_cells.cell_dir(self.cells_root, cell)
            delays, failure = self.delays(cell)
            if failure is not None:
                record = self._base_record(cell)
                record.update(status="failed", note=failure)
            else:
                record = self._job(cell, delays, directory)
        bench_results.append(self.results, record)
        self.done[cell.id] = record
        return record

    # -- stragglers ----------------------------------------------------------------------------
    def _calibration_cell(self, cell):
        """Async psframe, no delay, a few steps, no evaluation: its workers' undelayed step
        time is what ``0:3x`` multiplies. Baselines borrow data mode's."""
        options = {k: v for k, v in cell.options.items()
                   if k not in ("policy", "mode", "stages", "micro_batches", "eval_every")}
        mode = cell.mode or Mode("data")
        options.update(policy="async", mode=mode.kind, steps=self.bench["calibration_steps"],
                       eval=False, seed=0)
        if mode.stages:
            options["stages"] = mode.stages
        if mode.micro_batches:
            options["micro_batches"] = mode.micro_batches
        return Cell("psframe", cell.workload, "async", mode, cell.workers,
                    Straggler.parse("none"), 0, options)

    def delays(self, cell):
        """({worker: seconds} or None, None), or (None, why it could not be calibrated)."""
        if not cell.straggler.needs_calibration:
            return cell.straggler.delays(), None
        probe = self._calibration_cell(cell)
        key = f"calibration/{probe.id}"
        known = self.calibrations.get(key)
        if known is None or known.get("digest") != probe.digest:
            directory = bench_cells.cell_dir(os.path.join(self.cells_root, "calibration"), probe)
            self.out(f"      calibrating {key} ...")
            run = self._job(probe, None, directory)
            known = {"kind": "calibration", "key": key, "digest": probe.digest,
                     "status": run["status"], "note": run.get("note"),
                     "started": run["started"], "duration_s": run.get("duration_s")}
            if run["status"] == "ok":
                s = run["stats"]
                steps = sum(s["steps_per_worker"]) / len(s["steps_per_worker"])
                known.update(step_s=s["wall_s"] / max(steps, 1), wall_s=s["wall_s"],
                             steps=steps)
            bench_results.append(self.results, known)
            self.calibrations[key] = known
        if known["status"] != "ok":
            return None, f"straggler calibration failed: {known.get('note')}"
        delays = cell.straggler.delays(known["step_s"])
        self.out(f"      undelayed step {known['step_s'] * 1e3:.2f} ms; sleeps per step: " +
                 ", ".join(f"worker {w} {s * 1e3:.2f} ms" for w, s in delays.items()))
        return delays, None

    # -- the grid ------------------------------------------------------------------------------
    def run(self, cells):
        counts = {"ok": 0, "failed": 0, "timeout": 0, "skipped": 0, "reused": 0}
        width = max((len(c.id) for c in cells), default=0)
        for i, cell in enumerate(cells, 1):
            tag = f"[{i}/{len(cells)}] {cell.id:<{width}}"
            earlier = self.reusable(cell)
            if earlier is not None:
                counts["reused"] += 1
                self.out(f"{tag}  done earlier ({earlier['status']})")
                continue
            record = self.run_cell(cell)
            counts[record["status"]] += 1
            self.out(f"{tag}  {_line(record)}")
        return counts


def _line(record):
    status = record["status"]
    if status != "ok":
        note = (record.get("note") or "").strip().splitlines()
        return f"{status}: {note[-1] if note else ''}"
    m = record["metrics"]
    acc = "n/a" if m["final_accuracy"] is None else f"{m['final_accuracy']:.4f}"
    return (f"ok  {record['duration_s']:5.1f} s  wall {m['wall_s']:.2f} s  "
            f"{m['samples_per_s']:,.0f} samples/s  acc {acc}")


def main(args):
    """Run the grid; 0 when every cell ran or was skipped, 1 when any failed, 2 on bad input."""
    spec = _spec(args)
    overrides = {k: getattr(args, k) for k in bench_spec.AXES + ("seeds",)}
    cells = [c for c in bench_spec.expand(spec, overrides)
             if all(text in c.id for text in args.filter)]
    results = _results_path(args, spec)
    if not cells:
        raise ValueError("the grid has no cells (check --filter and the axes)")
    runner = Runner(spec, results, retry_failed=args.retry_failed,
                    out=lambda text: print(text, flush=True))
    if args.dry_run:
        for cell in cells:
            state = "done earlier" if runner.reusable(cell) else "to run"
            print(f"{cell.id}  ({cell.ranks} rank{'s' * (cell.ranks > 1)}, {state})")
        print(f"{len(cells)} cells; results: {results}")
        return 0
    print(f"bench {spec['bench']['name']}: {len(cells)} cells, results in {results}", flush=True)
    counts = runner.run(cells)
    print(", ".join(f"{n} {k}" for k, n in counts.items() if n) +
          f"; report: psframe report {results}", flush=True)
    return 1 if counts["failed"] or counts["timeout"] else 0
