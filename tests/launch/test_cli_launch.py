"""Launching: `psframe train -n N`, --dry-run, the scripts/ launchers, progress and run logs."""
import io
import json
import os
import shlex
import subprocess
import sys

import pytest

from psframe.cli import progress
from psframe.training import launch
from psframe.metrics import ServerStats, TrainResult
from launch_env import clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
VENV = os.path.dirname(BIN)  # the scripts take the venv this test runs in (.venv under make)
MPIEXEC = os.path.join(BIN, "mpiexec")
needs_mpiexec = pytest.mark.skipif(not os.path.exists(MPIEXEC),
                                   reason="no mpiexec beside this Python (make install)")
TRAIN = ["--data", "digits", "--model", "mlp:64,32,10", "--epochs", "1"]
# A launch starts 3 Pythons that import scikit-learn on 2 cores: ~5 s idle, more when busy.
JOB_TIMEOUT_S = 60


def run(cmd, timeout=JOB_TIMEOUT_S, **env):
    try:
        return subprocess.run(cmd, cwd=ROOT, env=clean_env(**env), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung past {timeout} s: {shlex.join(cmd)}\n{exc.stdout}\n{exc.stderr}")


def psframe(*args, **env):
    return run([sys.executable, "-m", "psframe", "train", *args], **env)


# -- the launch command, without running it ----------------------------------------------------
class TestDryRun:
    def test_prints_the_mpiexec_command_without_the_launch_options(self):
        proc = psframe("-n", "3", *TRAIN, "--dry-run", timeout=30)
        assert proc.returncode == 0, proc.stderr
        cmd = shlex.split(proc.stdout)
        assert os.access(cmd[0], os.X_OK) and os.path.basename(cmd[0]) in ("mpiexec", "mpirun")
        if os.path.exists(MPIEXEC):
            assert cmd[0] == MPIEXEC  # the one beside this Python comes first
        assert cmd[1:] == ["-n", "3", sys.executable, "-m", "mpi4py", "-m", "psframe", "train",
                           *TRAIN]

    @pytest.mark.parametrize("form", [["-n4"], ["--nprocs", "4"], ["--nprocs=4"], ["-n", "4"]])
    def test_every_spelling_of_n_is_taken_out(self, form):
        proc = psframe(*form, "--quiet", "--dry-run", timeout=30,
                       PSFRAME_MPIEXEC="/opt/x/mpiexec", PSFRAME_MPIEXEC_ARGS="--oversubscribe")
        assert proc.returncode == 0, proc.stderr
        assert shlex.split(proc.stdout) == [
            "/opt/x/mpiexec", "--oversubscribe", "-n", "4", sys.executable, "-m", "mpi4py",
            "-m", "psframe", "train", "--quiet"]

    def test_under_mpi_it_does_not_launch_again(self):
        for env in ({"PMI_RANK": "0", "PMI_SIZE": "3"}, {"OMPI_COMM_WORLD_SIZE": "3"},
                    {"PSFRAME_LAUNCHED": "1"}):
            proc = psframe("-n", "3", "--dry-run", timeout=30, **env)
            assert proc.returncode == 0, proc.stderr
            assert "nothing to launch" in proc.stdout and "mpiexec" not in proc.stdout

    def test_bad_config_fails_before_launching(self, tmp_path):
        path = tmp_path / "run.toml"
        path.write_text('data = "digits"\nlrr = 0.1\n')
        proc = psframe("-n", "3", "--config", str(path), timeout=30)
        assert proc.returncode == 2
        assert proc.stderr.count(f"psframe: error: unknown key 'lrr' in {path}; known keys:") == 1
        assert proc.stdout == ""

    def test_one_rank_is_refused(self):
        proc = psframe("-n", "1", *TRAIN, timeout=30)
        assert proc.returncode == 2 and "at least 2 ranks" in proc.stderr


def test_child_argv_drops_only_launch_options():
    argv = ["train", "-n", "3", "--data", "digits", "--dry-run", "--model", "mlp:64,10"]
    assert launch.child_argv(argv) == ["train", "--data", "digits", "--model", "mlp:64,10"]


def test_find_mpiexec_prefers_override_then_this_venv():
    assert launch.find_mpiexec({"PSFRAME_MPIEXEC": "/x/mpiexec"}) == "/x/mpiexec"
    if os.path.exists(MPIEXEC):
        assert launch.find_mpiexec({}) == MPIEXEC


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_libmpi_is_found_without_starting_mpi():
    # In a child: finding libmpi loads mpi4py.MPI with initialization off, for good.
    code = ("from psframe.training import launch; d = launch._libmpi_dirs(); from mpi4py import MPI; "
            "print(d[0] if d else ''); print(MPI.Is_initialized())")
    proc = run([sys.executable, "-c", code], timeout=30)
    lib_dir, initialized = proc.stdout.split("\n")[:2]
    assert initialized == "False", proc.stderr
    assert any(name.startswith(("libmpi", "libmpich")) for name in os.listdir(lib_dir))


def test_mpi_detection_reads_the_environment_only():
    assert not launch.under_mpi({"PATH": "/bin"})
    assert launch.under_mpi({"PMIX_RANK": "2"}) and launch.env_rank({"PMIX_RANK": "2"}) == 2
    assert launch.env_size({"OMPI_COMM_WORLD_SIZE": "5"}) == 5
    assert launch.env_rank({}) is None


# -- whole jobs ---------------------------------------------------------------------------------
@needs_mpiexec
class TestJobs:
    def test_auto_launch_trains_end_to_end(self):
        proc = psframe("-n", "3", *TRAIN)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("psframe run summary") == 1  # rank 0 alone reports
        assert "workers            2" in proc.stdout
        # Not a terminal: today's one line per evaluation, and no bar.
        assert [ln for ln in proc.stdout.splitlines() if ln.startswith("step")][-1].startswith(
            "step     22/22")
        assert "\r" not in proc.stdout

    def test_error_before_training_is_said_once_and_ends_the_job(self, tmp_path):
        proc = psframe("-n", "3", *TRAIN, "--init", str(tmp_path / "missing.npz"))
        assert proc.returncode == 2
        assert proc.stderr.count("psframe: error: cannot read init weights") == 1

    def test_run_local_sh_with_config_file_and_log_dir(self, tmp_path):
        cfg = tmp_path / "run.toml"
        cfg.write_text('data = "digits"\nmodel = "mlp:64,32,10"\nepochs = 1\nlr = 0.5\n'
                       "log_every = 5\n")
        logs = tmp_path / "logs"
        proc = run([os.path.join(ROOT, "scripts", "run_local.sh"), "3", "--config", str(cfg),
                    "--lr", "0.05", "--momentum", "0.9", "--log-dir", str(logs),
                    "--progress", "bar"], PSFRAME_VENV=VENV)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.count("psframe run summary") == 1
        assert "samples/s" in proc.stdout and "staleness 0" in proc.stdout  # the bar

        saved = json.loads((logs / "config.json").read_text())
        assert saved["lr"] == 0.05 and saved["momentum"] == 0.9   # flags win
        assert saved["epochs"] == 1 and saved["log_every"] == 5   # from the file
        assert saved["batch_size"] == 32                          # default

        records = [json.loads(line) for line in (logs / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((logs / "summary.json").read_text())
        steps = summary["stats"]["updates_applied"]
        kinds = [r["kind"] for r in records]
        assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("eval") == 1
        assert [r["step"] for r in records if r["kind"] == "update"] == list(range(5, steps + 1, 5))
        assert all(r["time"] > 1e9 for r in records)
        evaluation = next(r for r in records if r["kind"] == "eval")
        assert evaluation["step"] == steps and 0.5 < evaluation["eval_accuracy"] <= 1.0
        assert evaluation["train_loss"] > 0 and evaluation["epoch"] == 1.0
        assert summary["final"]["eval_accuracy"] == evaluation["eval_accuracy"]
        assert (logs / "summary.txt").read_text().startswith("psframe run summary")

        for rank in (1, 2):
            text = (logs / f"worker-{rank}.log").read_text()
            assert f"rank {rank}: started" in text and f"rank {rank}: finished in" in text
        assert not (logs / "worker-0.log").exists()


# -- the scripts' commands ----------------------------------------------------------------------
def script(name, *args, **env):
    return run([os.path.join(ROOT, "scripts", name), *args], timeout=30, **env)


def test_run_local_sh_usage_and_script_mode():
    proc = script("run_local.sh")
    assert proc.returncode == 2 and "Usage: scripts/run_local.sh N" in proc.stderr
    proc = script("run_local.sh", "3", "train.py", "--x", PSFRAME_VENV=VENV, PSFRAME_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    assert shlex.split(proc.stdout) == [f"{VENV}/bin/mpiexec", "-n", "3", f"{VENV}/bin/python",
                                        "-m", "mpi4py", "train.py", "--x"]
    proc = script("run_local.sh", "3", PSFRAME_VENV="/nonexistent")
    assert proc.returncode == 2 and "no mpiexec/python in /nonexistent" in proc.stderr


def test_run_hostfile_sh_passes_the_hostfile(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("localhost:4\n")
    proc = script("run_hostfile.sh", str(hosts), "4", "--data", "digits",
                  PSFRAME_VENV=VENV, PSFRAME_DRY_RUN="1")
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert str(hosts) in cmd and cmd[cmd.index("-n") + 1] == "4"
    assert cmd[-4:] == ["psframe", "train", "--data", "digits"]
    assert script("run_hostfile.sh", str(tmp_path / "none"), "4", PSFRAME_VENV=VENV).returncode == 2


@pytest.mark.parametrize("launcher, first", [("mpiexec", f"{VENV}/bin/mpiexec"), ("srun", "srun")])
def test_slurm_sbatch_builds_its_command(launcher, first):
    proc = script("slurm.sbatch", "--data", "digits", "--log-dir", "runs/%j", PSFRAME_VENV=VENV,
                  PSFRAME_DRY_RUN="1", PSFRAME_LAUNCHER=launcher, SLURM_NTASKS="8",
                  SLURM_JOB_ID="123", SLURM_SUBMIT_DIR=ROOT)
    assert proc.returncode == 0, proc.stderr
    cmd = shlex.split(proc.stdout)
    assert cmd[0] == first and cmd[cmd.index("-n") + 1] == "8"
    assert cmd[-6:] == ["psframe", "train", "--data", "digits", "--log-dir", "runs/123"]


# -- the progress bar and the metrics log, driven by hand (no MPI) ------------------------------
def drive(callback, steps=10, eval_at=(5, 10)):
    stats = ServerStats()
    callback.on_start({"total_steps": steps, "n_workers": 2})
    for version in range(1, steps + 1):
        stats.record_update(3 if version == 4 else 0)
        stats.samples += 64
        callback.on_update(version, stats)
        if version in eval_at:
            callback.on_record({"step": version, "epoch": version / 5, "time_s": 0.1 * version,
                                "train_loss": 0.5, "eval_loss": float("nan"),
                                "eval_accuracy": 0.9})
    result = TrainResult(params={}, history=[{"step": steps, "eval_accuracy": 0.9}],
                         stats=dict(stats.as_dict(), wall_s=1.0, samples_per_s=640.0,
                                    n_workers=2, steps_per_worker=[steps, steps]),
                         config={"policy": "Sync()"})
    callback.on_end(result)
    return result


def test_progress_bar_shows_what_the_issue_asks():
    out = io.StringIO()
    drive(progress.ProgressBar(n_rows=320, batch_size=32, file=out, ncols=160, interval=0))
    last = out.getvalue().split("\r")[-1]
    for part in ("step 10/10", "epoch 2.00", "loss 0.5000", "acc 0.9000", "samples/s",
                 "staleness 3"):
        assert part in last, last


def test_metrics_log_records_and_summary(tmp_path):
    result = drive(progress.MetricsLog(str(tmp_path), every=3, n_rows=320, batch_size=32))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]  # strict JSON: NaN became null
    assert [(r["kind"], r["step"]) for r in records] == [
        ("start", 0), ("update", 3), ("eval", 5), ("update", 6), ("update", 9), ("eval", 10),
        ("end", 10)]
    assert records[2]["eval_loss"] is None and records[2]["epoch"] == 1.0
    assert records[1]["epoch"] == 0.6  # 3 updates of 64 samples; an epoch is 2 x 5 x 32
    assert records[-1]["max_staleness"] == 3 and records[-1]["samples"] == 640
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stats"]["staleness_hist"] == {"0": 9, "3": 1}
    assert (tmp_path / "summary.txt").read_text() == result.summary() + "\n"


def test_display_mode():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert progress.display_mode("auto", quiet=True, stream=Tty(), env={}) is None
    assert progress.display_mode("auto", stream=Tty(), env={}) == "bar"
    assert progress.display_mode("auto", stream=io.StringIO(), env={}) == "lines"
    assert progress.display_mode("auto", stream=io.StringIO(), env={"PSFRAME_TTY": "120"}) == "bar"
    assert progress.display_mode("lines", stream=Tty(), env={}) == "lines"


def test_worker_log_records_a_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with progress.worker_log(str(tmp_path), 3):
            raise RuntimeError("boom")
    text = (tmp_path / "worker-3.log").read_text()
    assert "rank 3: started" in text and "rank 3: stopped after" in text and "boom" in text
    assert len(text.splitlines()) == 2 and all(" rank 3: " in ln for ln in text.splitlines())
