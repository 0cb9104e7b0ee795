"""Benchmark grids: the TOML spec, its checks, and the cells it expands to."""
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from typing import Optional

from ..training import config as run_config
from ..policies import policy_from_spec

__all__ = ["SYSTEMS", "Mode", "Straggler", "Cell", "load", "from_flags", "expand",
           "check_options", "samples_per_update"]

# psframe itself, and the peers a user would pick instead (psframe/bench/baselines/).
SYSTEMS = ("psframe", "serial", "allreduce", "torch_ddp", "torch_rpc_ps")
BENCH_KEYS = {
    "name": str, "seeds": list, "timeout_s": (int, float), "target_accuracy": (int, float),
    "eval_every_samples": int, "calibration_steps": int, "results": str,
}
AXES = ("systems", "workloads", "policies", "modes", "workers", "stragglers")
# [bench] keys a workload may set for itself: a target and a cadence that suit its data.
PER_WORKLOAD = ("target_accuracy", "eval_every_samples")
# The grid sets these per cell; in [options] they would be overwritten without a word.
GRID_OWNED = ("policy", "mode", "stages", "delay", "seed", "log_dir", "quiet", "progress")
DEFAULT_WORKLOADS = {"digits": {"data": "digits", "model": "mlp:64,128,10"}}
DEFAULT_BENCH = {"name": "bench", "seeds": [0], "timeout_s": 300.0, "target_accuracy": 0.9,
                 "eval_every_samples": None, "calibration_steps": 30, "results": None}
DEFAULT_AXES = {"systems": ["psframe"], "policies": ["sync"], "modes": ["data"],
                "workers": [2], "stragglers": ["none"]}


@dataclass(frozen=True)
class Mode:
    """A parallel mode as the grid names it: ``data``, ``model``, ``model/m4`` (4
    micro-batches), ``hybrid:2`` (2 stages per pipeline), ``hybrid:2/m4``."""

    kind: str
    stages: Optional[int] = None
    micro_batches: Optional[int] = None

    @classmethod
    def parse(cls, spec):
        m = re.fullmatch(r"(data|model|hybrid)(?::(\d+))?(?:/m(\d+))?", str(spec).strip())
        if not m:
            raise ValueError(f"bad mode {spec!r}; use data, model, model/mM, hybrid:P or "
                             "hybrid:P/mM (P stages per pipeline, M micro-batches)")
        kind, stages, micro = m.group(1), m.group(2), m.group(3)
        if kind == "hybrid" and stages is None:
            raise ValueError(f"mode {spec!r}: hybrid needs its stages per pipeline, e.g. hybrid:2")
        if kind != "hybrid" and stages is not None:
            raise ValueError(f"mode {spec!r}: only hybrid takes a stage count")
        if kind == "data" and micro is not None:
            raise ValueError(f"mode {spec!r}: micro-batches apply to model and hybrid only")
        return cls(kind, int(stages) if stages else None, int(micro) if micro else None)

    @property
    def label(self):
        text = self.kind + (f":{self.stages}" if self.stages else "")
        return text + (f"/m{self.micro_batches}" if self.micro_batches else "")

    def replicas(self, workers):
        """Data-parallel copies of the model: workers, one pipeline, or workers / P."""
        return {"data": workers, "model": 1}.get(self.kind) or workers // self.stages


@dataclass(frozen=True)
class Straggler:
    """Simulated slow workers: ``none``, ``0:3x`` (worker 0 three times slower than an
    undelayed step, found by a calibration run) or ``0:0.01`` (0.01 s sleep per step)."""

    label: str
    slow: tuple = ()  # ((worker, value, "x" or "s"), ...)

    @classmethod
    def parse(cls, spec):
        spec = str(spec).strip()
        if spec in ("none", ""):
            return cls("none")
        slow = []
        for item in spec.split(","):
            m = re.fullmatch(r"(\d+):(\d+(?:\.\d*)?|\.\d+)(x?)", item.strip())
            if not m or (m.group(3) and float(m.group(2)) < 1):
                raise ValueError(f"bad straggler {spec!r}; use none, W:Fx (worker W F times "
                                 "slower, F >= 1) or W:SECONDS, comma-separated")
            slow.append((int(m.group(1)), float(m.group(2)), "x" if m.group(3) else "s"))
        return cls(spec, tuple(slow))

    @property
    def needs_calibration(self):
        return any(unit == "x" for _, _, unit in self.slow)

    def delays(self, step_s=None):
        """{worker: seconds slept per step}; a factor F adds (F - 1) undelayed steps."""
        if self.needs_calibration and step_s is None:
            raise ValueError(f"straggler {self.label!r} needs the calibrated step time")
        return {w: (v - 1.0) * step_s if unit == "x" else v for w, v, unit in self.slow} or None


@dataclass
class Cell:
    """One run of the grid: a system on a workload with a policy, mode, workers, straggler
    scenario and seed. ``options`` are psframe train options (baselines read what they use)."""

    system: str
    workload: str
    policy: str
    mode: Mode
    workers: int
    straggler: Straggler
    seed: int
    options: dict = field(default_factory=dict)
    target: Optional[float] = None  # test accuracy for time-to-target; not part of the run itself

    @property
    def id(self):
        policy = self.policy or "-"
        mode = self.mode.label if self.mode else "-"
        return (f"{self.system}/{self.workload}/{policy}/{mode}/w{self.workers}/"
                f"{self.straggler.label}/s{self.seed}")

    @property
    def ranks(self):
        """MPI ranks the job needs: a server rank beside the workers for the PS systems."""
        return {"psframe": self.workers + 1, "torch_rpc_ps": self.workers + 1,
                "serial": 1}.get(self.system, self.workers)

    @property
    def digest(self):
        """Hash of everything that decides the run: a resumed grid reuses a record only when
        it was made with the same settings."""
        text = json.dumps([self.id, self.options], sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    def describe(self):
        return {"system": self.system, "workload": self.workload, "policy": self.policy,
                "mode": self.mode.label if self.mode else None, "workers": self.workers,
                "straggler": self.straggler.label, "seed": self.seed, "ranks": self.ranks,
                "options": dict(self.options)}


# -- reading a spec ------------------------------------------------------------------------------
def check_options(values, source):
    """Train options for every cell, checked as `psframe train --config` checks them."""
    owned = sorted(set(values) & set(GRID_OWNED))
    if owned:
        raise ValueError(f"{source}: {', '.join(owned)} are set by the grid (use its axes: "
                         "policies, modes, stragglers, bench.seeds)")
    return run_config.check(values, source)


def _check_bench(values, source):
    out = dict(DEFAULT_BENCH)
    for key, value in values.items():
        if key not in BENCH_KEYS:
            raise ValueError(f"unknown key {key!r} in {source}; known: {', '.join(BENCH_KEYS)}")
        if not isinstance(value, BENCH_KEYS[key]) or isinstance(value, bool):
            raise ValueError(f"{source}: {key} has the wrong type: {value!r}")
        out[key] = value
    if not out["seeds"] or not all(isinstance(s, int) for s in out["seeds"]):
        raise ValueError(f"{source}: seeds must be a non-empty list of integers")
    return out


def _grids(raw, source):
    grids = raw.get("grid", {})
    grids = [grids] if isinstance(grids, dict) else list(grids)
    for g in grids:
        unknown = set(g) - set(AXES)
        if unknown:
            raise ValueError(f"unknown key(s) {sorted(unknown)} in [grid] of {source}; "
                             f"axes: {', '.join(AXES)}")
        for axis, values in g.items():
            if not isinstance(values, list) or not values:
                raise ValueError(f"{source}: grid axis {axis} must be a non-empty list")
    return grids or [{}]


def _workloads(raw, path):
    """({name: train options}, {name: its own [bench] settings})."""
    options, settings = {}, {}
    for name, values in raw.items():
        source = f"[workloads.{name}] of {path}"
        if not isinstance(values, dict):
            raise ValueError(f"{source} must be a table")
        own = {k: values[k] for k in PER_WORKLOAD if k in values}
        settings[name] = {k: v for k, v in _check_bench(own, source).items() if k in own}
        options[name] = check_options({k: v for k, v in values.items() if k not in own}, source)
    return options, settings


def load(path):
    """The spec in a TOML file: {"bench", "options", "workloads", "per_workload", "grids"}."""
    raw = run_config._read_toml(path)
    unknown = set(raw) - {"bench", "options", "workloads", "grid"}
    if unknown:
        raise ValueError(f"unknown table(s) {sorted(unknown)} in {path}; "
                         "use [bench], [options], [workloads.NAME] and [grid] or [[grid]]")
    workloads, per_workload = _workloads(raw.get("workloads", {}), path)
    spec = {
        "bench": _check_bench(raw.get("bench", {}), f"[bench] of {path}"),
        "options": check_options(raw.get("options", {}), f"[options] of {path}"),
        "workloads": workloads or dict(DEFAULT_WORKLOADS),
        "per_workload": per_workload,
        "grids": _grids(raw, path),
    }
    if spec["bench"]["name"] == DEFAULT_BENCH["name"]:
        spec["bench"]["name"] = os.path.splitext(os.path.basename(path))[0]
    return spec


def from_flags():
    """The spec when no file is given: digits, an MLP, Sync on 2 workers, one seed."""
    return {"bench": dict(DEFAULT_BENCH), "options": {}, "workloads": dict(DEFAULT_WORKLOADS),
            "per_workload": {}, "grids": [{}]}


# -- expanding it --------------------------------------------------------------------------------
def samples_per_update(policy, replicas, batch_size):
    """Training samples behind one server update: Sync averages one batch from each replica,
    backup Sync from all but k, the apply-on-arrival policies one batch each. Evaluating every
    so many samples, not updates, puts every policy's accuracy curve on the same footing."""
    p = policy_from_spec(policy)
    p = getattr(p, "phases", [(None, p)])[-1][1]  # Mixed: its last phase, where it spends most
    if getattr(p, "name", "") == "sync":
        return max(1, replicas - p.backup) * batch_size
    return batch_size


def _axis(grid, name, overrides):
    return overrides.get(name) or grid.get(name) or DEFAULT_AXES.get(name)


def _check_axes(systems, workloads, known_workloads, workers):
    for s in systems:
        if s not in SYSTEMS:
            raise ValueError(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    for w in workloads:
        if w not in known_workloads:
            raise ValueError(f"unknown workload {w!r}; defined: {', '.join(known_workloads)}")
    for n in workers:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"workers must be integers >= 1, got {n!r}")


def _cell(spec, system, workload, policy, mode, workers, straggler, seed):
    """The cell, or None where the combination means nothing (a mode with too few workers)."""
    options = {**spec["options"], **spec["workloads"][workload], "seed": seed}
    if system != "psframe":
        # Baselines have no policy or mode; serial runs one process and no straggler.
        policy, mode = None, None
        if system == "serial":
            workers, straggler = 1, Straggler.parse("none")
    else:
        if mode.kind == "hybrid" and workers % mode.stages:
            return None
        if mode.kind != "data" and workers < 2:
            return None
        options["policy"], options["mode"] = policy, mode.kind
        if mode.stages:
            options["stages"] = mode.stages
        if mode.micro_batches:
            options["micro_batches"] = mode.micro_batches
    if any(w >= workers for w, _, _ in straggler.slow):
        return None  # no such worker at this worker count
    bench = {**spec["bench"], **spec["per_workload"].get(workload, {})}
    every = bench["eval_every_samples"]
    if every and options.get("eval_every") is None:
        batch = options.get("batch_size", run_config.OPTIONS["batch_size"].default)
        per_update = {"psframe": None, "serial": batch}.get(system, workers * batch)
        if per_update is None:
            per_update = samples_per_update(policy, mode.replicas(workers), batch)
        options["eval_every"] = max(1, round(every / per_update))
    return Cell(system, workload, policy, mode, workers, straggler, seed, options,
                target=bench["target_accuracy"])


def expand(spec, overrides=None):
    """Every cell of every grid, in order, without duplicates (baselines ignore the policy
    and mode axes, so they would otherwise repeat). ``overrides`` replace axes of all grids."""
    overrides = {k: v for k, v in (overrides or {}).items() if v}
    seeds = overrides.pop("seeds", None) or spec["bench"]["seeds"]
    cells, seen = [], set()
    for grid in spec["grids"]:
        systems = _axis(grid, "systems", overrides)
        workloads = _axis(grid, "workloads", overrides) or list(spec["workloads"])
        workers = _axis(grid, "workers", overrides)
        _check_axes(systems, workloads, spec["workloads"], workers)
        policies = _axis(grid, "policies", overrides)
        for p in policies:
            policy_from_spec(p)  # a typo fails here, before any run
        modes = [Mode.parse(m) for m in _axis(grid, "modes", overrides)]
        stragglers = [Straggler.parse(s) for s in _axis(grid, "stragglers", overrides)]
        for seed, workload, n, straggler, mode, system, policy in itertools.product(
                seeds, workloads, workers, stragglers, modes, systems, policies):
            cell = _cell(spec, system, workload, policy, mode, n, straggler, seed)
            if cell is not None and cell.id not in seen:
                seen.add(cell.id)
                cells.append(cell)
    # Seeds outermost, across grids too: an interrupted grid has every configuration at the
    # first seeds, and load that drifts during a long grid falls on all of them alike.
    cells.sort(key=lambda c: seeds.index(c.seed))
    return cells
