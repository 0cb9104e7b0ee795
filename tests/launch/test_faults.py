"""Faults end the job, never hang it: exceptions, NaN pushes, SIGKILL, SIGTERM and SIGINT."""
import glob
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from psframe.server.checkpoints import load_checkpoint
from launch_env import assert_no_processes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
BOUND_S = 60  # generous for a loaded 2-core machine; a hang would run to the pytest timeout

pytestmark = pytest.mark.skipif(not os.path.exists(MPIEXEC),
                                reason="no mpiexec beside this Python (make install)")


@pytest.mark.parametrize("case", range(20))
def test_exception_at_a_random_step_in_a_random_worker_ends_the_job(case):
    rng = random.Random(case)
    n = rng.choice([3, 4])
    rank, step = rng.randint(1, n - 1), rng.randint(1, 40)
    cmd = [MPIEXEC, "-n", str(n), sys.executable, os.path.join(SCRIPTS, "worker_raises.py"),
           str(rank), str(step)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=BOUND_S)
    assert proc.returncode != 0
    assert f"user bug at step {step} on rank {rank}" in proc.stderr
    assert "UNREACHABLE" not in proc.stdout


def start_long_run(tmp_path, servers=1):
    """2 workers and ``servers`` servers, checkpointing every 20 steps."""
    ckpt = str(tmp_path / "ckpt")
    proc = subprocess.Popen([MPIEXEC, "-n", str(2 + servers), sys.executable,
                             os.path.join(SCRIPTS, "long_run.py"), ckpt, str(servers)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + BOUND_S
    while len(glob.glob(os.path.join(ckpt, "ckpt-*.json"))) < 2:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run made no checkpoints: {proc.communicate()}")
        time.sleep(0.1)
    return proc, ckpt


def finish(proc):
    try:
        out, err = proc.communicate(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the job did not end after the fault")
    return out, err


def no_orphans(marker):
    """No rank of the job outlives it. mpiexec may exit a moment before the ranks it killed
    are gone (a frozen one especially), so this waits for them, up to ORPHAN_WAIT_S."""
    assert_no_processes(marker)


@pytest.mark.parametrize("servers, killed", [(1, 2), (2, 1)],
                         ids=["a-worker", "a-second-server"])
def test_sigkill_ends_the_job_and_the_newest_checkpoint_loads(tmp_path, servers, killed):
    proc, ckpt = start_long_run(tmp_path, servers)
    with open(os.path.join(ckpt, f"pid-{killed}")) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    start = time.time()
    finish(proc)
    assert proc.returncode != 0
    assert time.time() - start < 30
    manifest, arrays = load_checkpoint(ckpt)  # verifies the checksum
    assert manifest["version"] % 20 == 0 and arrays["weights"].size > 0
    no_orphans(ckpt)


@pytest.mark.parametrize("servers", [1, 2])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_a_final_checkpoint(tmp_path, sig, servers):
    proc, ckpt = start_long_run(tmp_path, servers)
    proc.send_signal(sig)
    out, err = finish(proc)
    assert proc.returncode != 0, (out, err)
    assert out.count("run interrupted") == 2 + servers, (out, err)  # every rank stopped cleanly
    manifest, arrays = load_checkpoint(ckpt)  # every server's part, checked and joined
    # The final checkpoint is the stop point: every worker's clock equals the step count.
    assert manifest["groups"][0]["clocks"] == [manifest["version"]] * 2
    assert len(manifest.get("parts", [])) == servers - 1
    assert arrays["weights"].size == 64 * 32 + 32 + 32 * 10 + 10
    no_orphans(ckpt)



# ids without "mpi": pytest-mpi takes a test whose keywords include "mpi" for one of its own
@pytest.mark.parametrize("transport", ["auto", "mpi"], ids=["shared", "messages"])
def test_signal_during_the_final_evaluation_stops_cleanly(tmp_path, transport):
    # Workers that are done wait for the server (on the shared path, to free the window
    # together); Ctrl-C then must stop the run, not abort it with a traceback.
    marker = str(tmp_path / "in-final-eval")
    proc = subprocess.Popen([MPIEXEC, "-n", "3", sys.executable,
                             os.path.join(SCRIPTS, "sigint_in_final_eval.py"), marker, transport],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + BOUND_S
    while not os.path.exists(marker):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server never reached its final evaluation: {proc.communicate()}")
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = finish(proc)
    assert "aborting all ranks" not in err, err
    assert "rank 0: interrupted: run interrupted at step 20" in out, (out, err)
    assert proc.returncode == 3, (out, err)


def start_stall_run(tmp_path, stall, stop):
    """2 workers under Sync; returns once the server has applied its first updates (the
    watchdog watches the training loop, not the start-up before it)."""
    pids = str(tmp_path / "pids")
    proc = subprocess.Popen([MPIEXEC, "-n", "3", sys.executable,
                             os.path.join(SCRIPTS, "stall_run.py"), pids, str(stall), str(stop)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + BOUND_S
    while not os.path.exists(os.path.join(pids, "started")):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"the run did not start: {proc.communicate()}")
        time.sleep(0.05)
    return proc, pids


def freeze(pids, rank):
    with open(os.path.join(pids, f"pid-{rank}")) as f:
        pid = int(f.read())
    os.kill(pid, signal.SIGSTOP)
    return pid


def test_a_frozen_worker_is_named_by_the_watchdog_and_the_job_ends(tmp_path):
    proc, pids = start_stall_run(tmp_path, stall=3, stop=10)
    frozen = freeze(pids, 2)  # worker 1
    start = time.time()
    out, err = finish(proc)
    took = time.time() - start
    assert proc.returncode != 0
    assert took < 3 + 15, took  # the timeout, the report and the abort
    assert "rank 0 stalled: no progress for 3 s" in err, err[-3000:]
    assert "a request from workers [1] (ranks [2])" in err, err[-3000:]
    assert "Its Python stack" in err and "parameter_server.py" in err
    deadline = time.time() + 10  # mpiexec took the frozen rank down too (SIGKILL ends it)
    while _alive(frozen) and time.time() < deadline:
        time.sleep(0.1)
    assert not _alive(frozen)
    no_orphans(pids)


def _alive(pid):
    """Running or stopped, not gone and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_that_cannot_finish_aborts_within_its_bound(tmp_path, sig):
    proc, pids = start_stall_run(tmp_path, stall=120, stop=3)
    freeze(pids, 1)  # worker 0: the clean stop waits for it for ever
    time.sleep(0.5)
    start = time.time()
    proc.send_signal(sig)
    out, err = finish(proc)
    took = time.time() - start
    assert proc.returncode != 0
    assert took < 3 + 15, took
    assert "the clean stop did not finish within 3 s" in err, err[-3000:]
    no_orphans(pids)
