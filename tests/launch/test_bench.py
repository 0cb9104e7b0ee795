"""psframe bench end to end: the smoke grid as real jobs, its records, resume, failures, report."""
import importlib.util
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from psframe.bench import results as bench_results
from psframe.bench import spec as bench_spec

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
SMOKE = os.path.join(ROOT, "benchmarks", "configs", "smoke.toml")
needs_mpiexec = pytest.mark.skipif(not os.path.exists(os.path.join(BIN, "mpiexec")),
                                   reason="no mpiexec beside this Python (make install)")
TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not TORCH, reason="torch is not installed in this Python, so the PyTorch baselines cannot "
    "run: `make install-torch` adds the pinned CPU build (torch==2.13.0) to .venv")
# The smoke grid is 4 jobs (~4 s each on 2 idle cores) plus 2 torch cells: skipped at once
# without torch; with it, ~7 s (DDP) and ~10-25 s (RPC, 3 processes importing torch on 2 cores).
GRID_TIMEOUT_S = 110 if TORCH else 50
# Whichever test first asks for the smoke fixture runs the grid inside its own time limit.
smoke_timeout = pytest.mark.timeout(GRID_TIMEOUT_S + 60)


def clean_env():
    drop = ("PMI_", "PMIX_", "OMPI_", "MV2_", "HYDRA_", "PSFRAME_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = BIN + os.pathsep + env.get("PATH", "")
    return env


def psframe(*args, timeout=GRID_TIMEOUT_S):
    cmd = [sys.executable, "-m", "psframe", *args]
    try:
        return subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung past {timeout} s: {cmd}\n{exc.stdout}\n{exc.stderr}")


def runs(path):
    records, _ = bench_results.read(path)
    return [r for r in records if r["kind"] == "run"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke grid, run once for the module: (results path, first run's process)."""
    if not os.path.exists(os.path.join(BIN, "mpiexec")):
        pytest.skip("no mpiexec beside this Python (make install)")
    path = str(tmp_path_factory.mktemp("bench") / "smoke.jsonl")
    proc = psframe("bench", "--config", SMOKE, "--out", path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return path, proc


# -- one record per run -------------------------------------------------------------------------
@smoke_timeout
def test_smoke_grid_writes_one_record_per_cell(smoke):
    path, proc = smoke
    records = runs(path)
    by_key = {r["key"]: r for r in records}
    assert sorted(by_key) == sorted([
        "psframe/digits/sync/data/w2/none/s0", "psframe/digits/async/data/w2/none/s0",
        "serial/digits/-/-/w1/none/s0", "allreduce/digits/-/-/w2/none/s0",
        "torch_ddp/digits/-/-/w2/none/s0", "torch_rpc_ps/digits/-/-/w2/none/s0"])
    assert len(records) == 6
    for key, r in by_key.items():
        if key.startswith("torch") and not TORCH:
            assert r["status"] == "skipped" and "torch is not importable" in r["note"]
            continue
        assert r["status"] == "ok", r.get("note")
        m = r["metrics"]
        assert m["wall_s"] > 0 and m["samples_per_s"] > 0
        assert 0.5 < m["final_accuracy"] <= 1 and m["final_loss"] > 0
        assert len(r["history"]) >= 4  # eval_every_samples = 256 on ~1,350 rows
        times = [h["time_s"] for h in r["history"]]
        assert times == sorted(times)
        # Async with momentum 0.9 does not always get to 0.8 in one epoch (its interleaving
        # depends on load); time to target is then None, never a made-up time.
        hit = next((h for h in r["history"] if h["eval_accuracy"] >= 0.8), None)
        assert m["time_to_target_s"] == (hit["time_s"] if hit else None)
        if not key.startswith("psframe/digits/async"):
            assert hit is not None, key
    assert ("6 ok" if TORCH else "4 ok, 2 skipped") in proc.stdout


@smoke_timeout
def test_records_carry_config_and_environment(smoke):
    r = {r["key"]: r for r in runs(smoke[0])}["psframe/digits/async/data/w2/none/s0"]
    c = r["config"]
    assert (c["system"], c["policy"], c["mode"], c["workers"], c["ranks"]) == \
        ("psframe", "async", "data", 2, 3)
    assert c["options"]["model"] == "mlp:64,32,10" and c["options"]["epochs"] == 1
    env = r["env"]
    assert env["mpi"]["vendor"] and env["mpi"]["version"] and env["backend"] == "numpy"
    assert env["cores"]["usable"] >= 1 and env["python"] and env["numpy"]
    assert "revision" in env["git"]


@smoke_timeout
def test_psframe_metrics_come_from_the_run(smoke):
    by_key = {r["key"]: r for r in runs(smoke[0])}
    sync = by_key["psframe/digits/sync/data/w2/none/s0"]["metrics"]
    asyn = by_key["psframe/digits/async/data/w2/none/s0"]["metrics"]
    assert sync["staleness_hist"] == {"0": sync["updates_applied"]}
    assert sync["max_staleness"] == sync["max_clock_gap"] == 0
    assert asyn["updates_applied"] == 2 * sync["updates_applied"]  # one per gradient
    for m in (sync, asyn):
        assert m["bytes_pulled"] > 0 and m["bytes_pushed"] > 0
        assert 0 < m["worker_wait_share"] < 1 and 0 < m["server_busy_share"] <= 1.01


@smoke_timeout
def test_allreduce_baseline_trains_exactly_like_sync(smoke):
    # Same shards, shuffles, initial weights and SGD: Sync's mean of 2 gradients per step and
    # the Allreduce loop's are the same update, so the runs agree to float32 rounding.
    by_key = {r["key"]: r for r in runs(smoke[0])}
    sync = by_key["psframe/digits/sync/data/w2/none/s0"]
    ring = by_key["allreduce/digits/-/-/w2/none/s0"]
    assert [h["step"] for h in sync["history"]] == [h["step"] for h in ring["history"]]
    for a, b in zip(sync["history"], ring["history"]):
        assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-3)
    assert ring["metrics"]["bytes_pushed"] == pytest.approx(sync["metrics"]["bytes_pushed"],
                                                            rel=0.01)


@needs_torch
@smoke_timeout
def test_torch_baselines_train_exactly_like_sync(smoke):
    # DDP (gloo) and the RPC batch-update server start from the same weights, read the same
    # shards and apply the mean of the 2 gradients with torch's SGD: Sync's updates, so the
    # same curve to float32 rounding. Their records carry the run's torch and thread count.
    by_key = {r["key"]: r for r in runs(smoke[0])}
    sync = by_key["psframe/digits/sync/data/w2/none/s0"]
    cores = sync["env"]["cores"]["usable"]
    for key in ("torch_ddp/digits/-/-/w2/none/s0", "torch_rpc_ps/digits/-/-/w2/none/s0"):
        r = by_key[key]
        assert r["status"] == "ok", r.get("note")
        assert r["env"]["torch"] and r["run_config"]["torch"] == r["env"]["torch"]
        ranks = r["config"]["ranks"]
        assert ranks == (2 if key.startswith("torch_ddp") else 3)
        assert r["run_config"]["threads"] == max(1, cores // ranks)  # ranks x threads <= cores
        assert [h["step"] for h in r["history"]] == [h["step"] for h in sync["history"]]
        for a, b in zip(sync["history"], r["history"]):
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-3)
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-3)
            assert b["eval_accuracy"] == pytest.approx(a["eval_accuracy"], abs=0.01)
        m, s = r["metrics"], sync["metrics"]
        assert m["updates_applied"] == s["updates_applied"] and m["samples"] == s["samples"]
        assert m["updates_per_s"] == pytest.approx(m["updates_applied"] / m["wall_s"])
        assert m["samples_per_s"] == pytest.approx(m["samples"] / m["wall_s"])
        assert m["bytes_pushed"] == pytest.approx(s["bytes_pushed"], rel=0.01)
        assert m["bytes_pulled"] == pytest.approx(s["bytes_pulled"], rel=0.01)
    rpc = by_key["torch_rpc_ps/digits/-/-/w2/none/s0"]["metrics"]
    assert 0 < rpc["worker_wait_share"] < 1 and 0 < rpc["server_busy_share"] <= 1.01


@needs_torch
@needs_mpiexec
@pytest.mark.timeout(240)
def test_torch_baselines_match_sync_in_float64(tmp_path):
    # Exactness beyond the smoke grid's defaults: float64, Nesterov momentum, weight decay,
    # 3 workers, a fixed step count and a straggler's sleep. psframe Sync, DDP and the RPC
    # server must then agree to float64 rounding at every evaluation.
    spec = tmp_path / "torch64.toml"
    spec.write_text(
        '[bench]\ntimeout_s = 90\n'
        '[options]\nsteps = 6\neval_every = 3\nbatch_size = 32\noptimizer = "sgd"\n'
        'lr = 0.1\nmomentum = 0.9\nnesterov = true\nweight_decay = 1e-4\n'
        'dtype = "float64"\nlog_every = 0\n'
        '[workloads.digits]\ndata = "digits"\nmodel = "mlp:64,16,10"\n'
        '[grid]\nsystems = ["psframe", "torch_ddp", "torch_rpc_ps"]\npolicies = ["sync"]\n'
        'workers = [3]\nstragglers = ["1:0.005"]\n')
    path = str(tmp_path / "torch64.jsonl")
    proc = psframe("bench", "--config", str(spec), "--out", path, timeout=200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    by_system = {r["config"]["system"]: r for r in runs(path)}
    assert sorted(by_system) == ["psframe", "torch_ddp", "torch_rpc_ps"]
    reference = by_system["psframe"]["history"]
    assert [h["step"] for h in reference] == [3, 6]
    for system in ("torch_ddp", "torch_rpc_ps"):
        r = by_system[system]
        assert r["status"] == "ok", r.get("note")
        assert r["config"]["delay"] == {"1": 0.005}
        assert r["stats"]["steps_per_worker"] == [6, 6, 6]
        assert [h["step"] for h in r["history"]] == [3, 6]
        for a, b in zip(reference, r["history"]):
            for k in ("train_loss", "eval_loss", "eval_accuracy"):
                assert b[k] == pytest.approx(a[k], rel=1e-9), (system, a["step"], k)


# -- resume -------------------------------------------------------------------------------------
@smoke_timeout
def test_rerun_skips_every_recorded_cell(smoke):
    path = smoke[0]
    before = open(path).read()
    t0 = time.perf_counter()
    proc = psframe("bench", "--config", SMOKE, "--out", path, timeout=20)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("done earlier") == 6 and "6 reused" in proc.stdout
    assert open(path).read() == before
    assert time.perf_counter() - t0 < 15  # no job started


@smoke_timeout
def test_interrupted_grid_runs_only_the_missing_cell(smoke, tmp_path):
    path = str(tmp_path / "partial.jsonl")
    kept = [line for line in open(smoke[0]) if '"key": "serial/' not in line]
    with open(path, "w") as f:
        f.writelines(kept)
        f.write('{"kind": "run", "key": "serial/dig')  # the interrupted write
    proc = psframe("bench", "--config", SMOKE, "--out", path, timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 unreadable line" in proc.stdout
    ran = [line for line in proc.stdout.splitlines() if "done earlier" not in line
           and line.startswith("[")]
    assert len(ran) == 1 and "serial/digits" in ran[0] and " ok " in ran[0]
    records, bad = bench_results.read(path)
    assert bad == 1 and len(records) == 6
    assert {r["key"]: r for r in records}["serial/digits/-/-/w1/none/s0"]["status"] == "ok"


# -- failures are records, not crashes ----------------------------------------------------------
def test_failed_and_timed_out_cells_are_recorded_and_the_grid_goes_on(tmp_path):
    if not os.path.exists(os.path.join(BIN, "mpiexec")):
        pytest.skip("no mpiexec beside this Python")
    spec = tmp_path / "bad.toml"
    # 1,000 epochs take far longer than 1.5 s: a timeout. The serial baseline
    # implements SGD only: a failure with its reason. Both are recorded; exit status 1.
    spec.write_text('[bench]\ntimeout_s = 1.5\n[options]\noptimizer = "adam"\nepochs = 1000\n'
                    '[workloads.digits]\ndata = "digits"\nmodel = "mlp:64,16,10"\n'
                    '[grid]\nsystems = ["psframe", "serial"]\n')
    path = str(tmp_path / "bad.jsonl")
    proc = psframe("bench", "--config", str(spec), "--out", path, timeout=40)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = {r["key"].split("/")[0]: r for r in runs(path)}
    assert status["psframe"]["status"] == "timeout"
    assert "1.5 s cell timeout" in status["psframe"]["note"]
    assert status["serial"]["status"] == "failed"
    assert "implement sgd only" in status["serial"]["note"]
    # The timed-out job's ranks are gone: none still names its log directory.
    cell_dir = status["psframe"]["dir"]
    time.sleep(0.5)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert cell_dir.encode() not in f.read(), f"process {pid} outlived its cell"
        except OSError:
            continue
    # Kept by default on a rerun; --retry-failed runs them again (here: fails again).
    again = psframe("bench", "--config", str(spec), "--out", path, "--filter", "serial",
                    timeout=20)
    assert "done earlier (failed)" in again.stdout
    again = psframe("bench", "--config", str(spec), "--out", path, "--filter", "serial",
                    "--retry-failed", timeout=20)
    assert again.returncode == 1 and len(runs(path)) == 3


def test_bad_spec_is_one_error_line_and_status_2(tmp_path):
    spec = tmp_path / "typo.toml"
    spec.write_text('[grid]\npolicies = ["snyc"]\n')
    proc = psframe("bench", "--config", str(spec), "--out", str(tmp_path / "r.jsonl"),
                   timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.startswith("psframe: error: unknown policy 'snyc'")
    assert not os.path.exists(tmp_path / "r.jsonl")


# -- report ---------------------------------------------------------------------------------------
@smoke_timeout
def test_report_of_the_smoke_grid(smoke, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    proc = psframe("report", smoke[0], "--out", str(out), timeout=40)
    assert proc.returncode == 0, proc.stderr
    text = (out / "report.md").read_text()
    assert "| sync |" in text and "| allreduce |" in text and "| serial |" in text
    # The torch rows are in the table either way: measured with torch, "0/1" seeds without.
    for name in ("torch_ddp", "torch_rpc_ps"):
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        assert ("| 1/1 |" if TORCH else "| 0/1 |") in row, row
    if TORCH:
        assert "Sync updates/s / torch_rpc_ps" in text and "Sync samples/s / torch_ddp" in text
    for name in ("accuracy_vs_time.png", "throughput_vs_workers.png", "staleness.png",
                 "bytes_per_sample.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name


# -- the grid itself, without running it ----------------------------------------------------------
def test_shipped_configs_expand():
    sizes = {}
    for name in ("smoke", "policies", "modes", "scaling"):
        spec = bench_spec.load(os.path.join(ROOT, "benchmarks", "configs", f"{name}.toml"))
        cells = bench_spec.expand(spec)
        ids = [c.id for c in cells]
        assert len(ids) == len(set(ids))
        seeds = [c.seed for c in cells]
        assert seeds == sorted(seeds, key=spec["bench"]["seeds"].index)  # seeds outermost
        sizes[name] = cells
    policies = sizes["policies"]
    # 2 workloads x 3 seeds x 2 stragglers: 11 policies (3 of them delay-compensated or raw),
    # allreduce and 2 torch peers; serial once per workload and seed (no straggler).
    assert len(policies) == 2 * 3 * (2 * (11 + 3) + 1)
    slow = [c for c in policies if c.straggler.label == "0:3x"]
    assert slow and all(c.straggler.needs_calibration for c in slow)
    assert {c.target for c in policies if c.workload == "mnist"} == {0.90}
    modes = {(c.workload, c.mode.label, c.workers) for c in sizes["modes"] if c.mode}
    assert ("mnist_mlp", "model", 4) not in modes and ("deep_mlp", "model", 4) in modes
    assert ("mnist_mlp", "hybrid:2/m4", 4) in modes


def test_eval_cadence_is_set_in_samples():
    spec = bench_spec.from_flags()
    spec["bench"]["eval_every_samples"] = 512
    spec["options"]["batch_size"] = 32
    cells = bench_spec.expand(spec, {"systems": ["psframe", "serial", "allreduce"],
                                     "policies": ["sync", "async", "sync:1"], "workers": [4]})
    every = {(c.system, c.policy): c.options["eval_every"] for c in cells}
    # Sync: 4 batches per update; backup Sync: 3; Async: 1; serial: 1; Allreduce: 4.
    assert every == {("psframe", "sync"): 4, ("psframe", "async"): 16,
                     ("psframe", "sync:1"): 5, ("serial", None): 16, ("allreduce", None): 4}


@pytest.mark.parametrize("axis, value, message", [
    ("modes", ["pipeline"], "bad mode"), ("modes", ["hybrid"], "needs its stages"),
    ("stragglers", ["0:0.5x"], "bad straggler"), ("policies", ["ssp:x"], "bad policy"),
    ("systems", ["horovod"], "unknown system"), ("workers", [0], "workers must be")])
def test_bad_axis_values_are_refused(axis, value, message):
    with pytest.raises(ValueError, match=message):
        bench_spec.expand(bench_spec.from_flags(), {axis: value})


def test_options_the_grid_owns_are_refused(tmp_path):
    spec = tmp_path / "s.toml"
    spec.write_text('[options]\npolicy = "async"\n')
    with pytest.raises(ValueError, match="policy are set by the grid"):
        bench_spec.load(str(spec))


def test_straggler_factor_adds_undelayed_steps():
    s = bench_spec.Straggler.parse("0:3x,2:0.01")
    assert s.needs_calibration
    assert s.delays(step_s=0.002) == {0: pytest.approx(0.004), 2: 0.01}
    with pytest.raises(ValueError, match="calibrated"):
        s.delays()
    assert bench_spec.Straggler.parse("none").delays() is None


# -- the baselines' model against psframe's --------------------------------------------------------
def test_baseline_mlp_gradient_matches_psframe():
    import psframe as ps

    sys.path.insert(0, os.path.join(ROOT, "psframe", "bench", "baselines"))
    try:
        from mlp import MLP
    finally:
        sys.path.pop(0)
    sizes = [6, 5, 4, 3]
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(7, 6)), rng.integers(0, 3, size=7)
    ours = MLP(sizes, np.float64)
    flat = ours.init(np.random.default_rng(1))
    grad = np.empty_like(flat)
    loss = ours.loss_and_grad(flat, X, y, grad)
    reference = ps.models.MLP(sizes)
    params = reference.init_params(np.random.default_rng(1))
    names = [f"{i}.{p}" for i in (0, 2, 4) for p in ("W", "b")]
    # Same initialisation scheme, drawn in the same order: identical starting weights.
    np.testing.assert_array_equal(np.concatenate([params[n].ravel() for n in names]), flat)
    ref_loss, ref_grads = reference.loss_and_grad(params, X, y)
    assert loss == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(grad, np.concatenate([ref_grads[n].ravel() for n in names]),
                               rtol=1e-10, atol=1e-12)
