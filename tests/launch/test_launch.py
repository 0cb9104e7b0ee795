"""Whole jobs under mpiexec: the CLI, bad launches, and faults that must end the job, not hang it."""
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
# A fault must end the job "within seconds"; this bound is generous for a loaded 2-core CI box.
FAULT_BOUND_S = 60


def mpirun(n, *args, timeout=FAULT_BOUND_S, env=None):
    cmd = [MPIEXEC, "-n", str(n), sys.executable, *args]
    start = time.time()
    environ = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env=environ)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"job hung past {timeout} s: {' '.join(cmd)}\n{exc.stdout}\n{exc.stderr}")
    return proc, time.time() - start


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside this Python (make install)")
class TestLaunch:
    def test_cli_trains_digits(self):
        proc, _ = mpirun(3, "-m", "mpi4py", "-m", "psframe", "train", "--model", "mlp:64,32,10",
                         "--data", "digits", "--epochs", "2", "--lr", "0.1", "--momentum", "0.9")
        assert proc.returncode == 0, proc.stderr
        assert "psframe run summary" in proc.stdout
        assert proc.stdout.count("psframe run summary") == 1  # the server alone reports
        acc = float(proc.stdout.split("test accuracy")[1].split()[0])
        assert acc > 0.8

    @pytest.mark.parametrize("fail_rank, fail_step", [(1, 1), (2, 3), (1, 17)])
    def test_exception_in_a_worker_ends_the_job(self, fail_rank, fail_step):
        proc, elapsed = mpirun(3, "-m", "mpi4py", os.path.join(SCRIPTS, "worker_raises.py"),
                               str(fail_rank), str(fail_step))
        assert proc.returncode != 0
        assert f"user bug at step {fail_step} on rank {fail_rank}" in proc.stderr
        assert "Traceback" in proc.stderr
        assert "UNREACHABLE" not in proc.stdout, proc.stdout + proc.stderr

    def test_exception_without_mpi4py_runner_still_aborts(self):
        # Plain `python script.py`: psframe's own abort must end the job, not the runner's.
        proc, _ = mpirun(3, os.path.join(SCRIPTS, "worker_raises.py"), "2", "2")
        assert proc.returncode != 0
        assert "user bug at step 2 on rank 2" in proc.stderr
        assert "aborting all ranks" in proc.stderr

    @pytest.mark.parametrize("transport", ["auto", "messages"])
    def test_nan_gradient_is_rejected_and_fails_clearly(self, transport):
        # Shared window: the server checks the gradient; messages, streamed (as from another
        # node): its worker does, and the server refuses the push at its header instead of
        # applying it as it lands.
        proc, _ = mpirun(3, os.path.join(SCRIPTS, "nan_push.py"),
                         "mpi" if transport == "messages" else transport,
                         env={"PSFRAME_STREAM": "always"})
        assert proc.returncode != 0
        assert "non-finite gradient" in proc.stderr and "worker 0" in proc.stderr

    def test_push_flagged_finite_that_lands_non_finite_ends_the_run(self):
        proc, _ = mpirun(2, "-m", "mpi4py", os.path.join(SCRIPTS, "nan_in_flight.py"),
                         env={"PSFRAME_STREAM": "always"})
        assert proc.returncode != 0
        assert "elements [8, 12) arrived non-finite" in proc.stderr, proc.stderr
        assert "UNREACHABLE" not in proc.stdout

    @pytest.mark.parametrize("transport, message", [
        ("auto", "answered worker 0's pull while its shared gradient still waits"),
        ("mpi", "worker 0 pushed step 1 before its previous gradient was applied"),
    ], ids=["shared", "messages"])  # no "mpi" in an id: pytest-mpi would claim the test
    def test_policy_answering_before_applying_is_refused(self, transport, message):
        proc, _ = mpirun(2, os.path.join(SCRIPTS, "policy_answers_early.py"), transport)
        assert proc.returncode != 0
        assert message in proc.stderr
        assert "UNREACHABLE" not in proc.stdout

    def test_policy_releasing_a_pull_never_held_is_refused(self):
        proc, _ = mpirun(2, os.path.join(SCRIPTS, "policy_releases_nobody.py"))
        assert proc.returncode != 0
        assert "released worker 0's pull, but it has none waiting" in proc.stderr
        assert "UNREACHABLE" not in proc.stdout

    def test_wrong_size_push_is_refused(self):
        proc, _ = mpirun(2, "-m", "mpi4py", os.path.join(SCRIPTS, "bad_push_size.py"))
        assert proc.returncode != 0
        assert "pushed 7 elements" in proc.stderr
        assert "weights changed" not in proc.stderr

    def test_one_rank_is_refused_with_a_clear_message(self):
        proc, _ = mpirun(1, "-m", "psframe", "train", "--data", "digits", "--model", "mlp:64,10")
        assert proc.returncode == 2
        assert "at least 2 MPI ranks" in proc.stderr

    def test_unknown_policy_fails_before_training(self):
        proc, _ = mpirun(3, "-m", "psframe", "train", "--data", "digits", "--model",
                         "mlp:64,10", "--policy", "bogus")
        assert proc.returncode != 0
        assert proc.stderr.count("unknown policy 'bogus'") == 1  # said once, by rank 0
        assert "step" not in proc.stdout

    def test_feature_mismatch_fails_before_training(self):
        proc, _ = mpirun(2, "-m", "psframe", "train", "--data", "digits", "--model", "mlp:784,10")
        assert proc.returncode != 0
        assert "data has 64 features" in proc.stderr
