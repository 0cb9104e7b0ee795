"""scripts/slurm.sbatch under a real one-node Slurm: mpiexec and srun runs, and a failing run."""
import json
import os
import re
import shutil
import sys
import tempfile

import pytest

from local_slurm import LocalSlurm, install, state_dir, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "slurm.sbatch")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
JOB_TIMEOUT_S = 90  # 8 to 25 s here, idle or loaded; then the job is cancelled
TRAIN = ["--data", "digits", "--model", "mlp:64,128,10", "--epochs", "5"]

# The first test to run pays for installing the packages (about 10 s, a minute with lists to
# fetch) and starting the daemons. The bound is above the sum of the test's own deadlines
# (install 180 s, start 60 s, a job 90 s), so those fire first and the finalizers run.
pytestmark = [
    pytest.mark.timeout(420),
    pytest.mark.skipif(not os.path.exists(MPIEXEC),
                       reason="no mpiexec beside this Python (make install)"),
]


@pytest.fixture(scope="module")
def slurm():
    reason = install()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    sweep()
    # Not pytest's tmp_path: munged's socket path must stay short, and nothing is kept.
    state = state_dir()
    cluster = LocalSlurm(state)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        leftovers = cluster.leftovers()
        shutil.rmtree(state, ignore_errors=True)
        assert not leftovers, f"processes left running: {leftovers}"


@pytest.fixture
def job_dir(slurm):
    path = tempfile.mkdtemp(prefix="job-", dir=slurm.state)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def submit(slurm, sbatch_args, train_args, cwd, **env):
    env = slurm.env(PSFRAME_VENV=sys.prefix, **env)
    job = slurm.sbatch([*sbatch_args, SCRIPT, *train_args], cwd=cwd, env=env)
    return job, slurm.wait(job, JOB_TIMEOUT_S)


def read(path):
    with open(path) as f:
        return f.read()


def check_training(job, fields, out, runs, workers):
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, out)
    # Every task is a rank of one world: one server, the rest workers.
    assert re.search(rf"^  workers +{workers}$", out, re.M), out
    accuracy = float(re.search(r"^  test accuracy +([0-9.]+)$", out, re.M).group(1))
    assert accuracy > 0.8, out
    with open(os.path.join(runs, job, "summary.json")) as f:  # "%j" became the job id
        assert round(json.load(f)["final"]["eval_accuracy"], 4) == accuracy


def test_mpiexec_under_sbatch_starts_its_ranks_through_slurm(slurm, job_dir):
    # Submitted from the checkout with PSFRAME_ROOT unset: the script finds it by the submit
    # directory, as documented.
    runs = os.path.join(job_dir, "runs")
    job, fields = submit(slurm, ["--ntasks=4", f"--output={job_dir}/out-%j.txt"],
                         [*TRAIN, "--log-dir", f"{runs}/%j"], cwd=ROOT)
    out = read(os.path.join(job_dir, f"out-{job}.txt"))
    check_training(job, fields, out, runs, workers=3)
    # Hydra saw the allocation and started its proxy as step 0 of the job, through srun,
    # rather than forking the ranks itself.
    assert f"launch task StepId={job}.0 " in slurm.log("slurmd"), slurm.log("slurmd")[-3000:]


def test_srun_launcher_with_pmi2(slurm, job_dir):
    # PSFRAME_ROOT given, submitted from elsewhere: the default output file lands there. The
    # task count comes from --ntasks-per-node, which the script must not override.
    runs = os.path.join(job_dir, "runs")
    job, fields = submit(slurm, ["--nodes=1", "--ntasks-per-node=3"],
                         [*TRAIN, "--log-dir", f"{runs}/%j"], cwd=job_dir,
                         PSFRAME_ROOT=ROOT, PSFRAME_LAUNCHER="srun")
    out = read(os.path.join(job_dir, f"psframe-{job}.out"))
    check_training(job, fields, out, runs, workers=2)
    assert f"launch task StepId={job}.0 " in slurm.log("slurmd")


def test_a_failing_run_fails_the_job_with_its_exit_status(slurm, job_dir):
    missing = os.path.join(job_dir, "missing.npz")
    job, fields = submit(slurm, ["--ntasks=2", f"--output={job_dir}/out-%j.txt"],
                         ["--data", missing], cwd=job_dir, PSFRAME_ROOT=ROOT)
    out = read(os.path.join(job_dir, f"out-{job}.txt"))
    assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", (fields, out)
    assert f"psframe: error: data file {missing} does not exist" in out, out


def test_no_task_count_is_refused_with_the_reason(slurm, job_dir):
    # The script sets no task count of its own (see its header), so one must be given.
    job, fields = submit(slurm, [f"--output={job_dir}/out-%j.txt"], TRAIN, cwd=job_dir,
                         PSFRAME_ROOT=ROOT)
    out = read(os.path.join(job_dir, f"out-{job}.txt"))
    assert fields["ExitCode"] == "2:0", (fields, out)
    assert "slurm.sbatch: need 2 or more tasks (SLURM_NTASKS=unset)" in out, out
