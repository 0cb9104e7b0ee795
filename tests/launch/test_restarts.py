"""Restarts: a job whose ranks (the server too) are SIGKILLed at random steps heals from its
newest checkpoint, bitwise as if never killed; stops, bad input and spent restarts end it."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import psframe as ps
from psframe.server.checkpoints import Checkpointer
from psframe.training import leftovers, supervisor
from psframe.training.options import RunOptions
from launch_env import assert_no_processes, clean_env

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = os.path.join(ROOT, "tests", "scripts")
BIN = os.path.dirname(sys.executable)
MPIEXEC = os.path.join(BIN, "mpiexec")
# A healed run is up to 5 starts of 3 small Pythons: ~3 s here, far more on a loaded CI.
JOB_TIMEOUT_S = 120
STEPS = 20
TRAIN = ["--data", "synthetic:400,16,4", "--model", os.path.join(SCRIPTS, "chaos_model.py:build"),
         "--steps", str(STEPS), "--batch-size", "8", "--lr", "0.05", "--momentum", "0.9",
         "--eval-every", "1", "--checkpoint-every", "2", "--log-every", "1", "--quiet"]
RESTART_LINE = re.compile(r"^psframe: the job failed \(exit status \d+\); restart (\d+)/(\d+) "
                          r"from (?:step (\d+) \(checkpoint (\S+)\)|the start .*)$", re.M)

pytestmark = [pytest.mark.skipif(not os.path.exists(MPIEXEC),
                                 reason="no mpiexec beside this Python (make install)"),
              pytest.mark.timeout(JOB_TIMEOUT_S + 60)]


def kill_plans(seed=18, runs=6, kills=4):
    """Per healed run: shuffle or not, and its kills, one per start: (rank, its step in that
    start). At most 4 steps a start, so each start but the last dies before step 20."""
    rng = random.Random(seed)
    return [(i % 2 == 0, [(rng.randrange(3), rng.randint(1, 4)) for _ in range(kills)])
            for i in range(runs)]


PLANS = kill_plans()


def start(cmd, **env):
    # Its own session: on a failure the test kills the launcher's whole group, and the
    # launcher's death signal takes its mpiexec down too.
    return subprocess.Popen(cmd, cwd=ROOT, env=clean_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc, timeout=JOB_TIMEOUT_S):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"hung past {timeout} s:\n{out[-3000:]}\n{err[-3000:]}")
    return proc.returncode, out, err


def run(cmd, timeout=JOB_TIMEOUT_S, **env):
    # timeout -k: a bound outside Python as well; its SIGTERM reaches the job through the
    # launcher, and SIGKILL follows if even that does not end it.
    return finish(start(["timeout", "-k", "10", str(timeout), *cmd], **env), timeout + 20)


def psframe_train(*args, **env):
    return run([sys.executable, "-m", "psframe", "train", "-n", "3", *TRAIN, *args], **env)


def plan_env(plan):
    return ",".join(f"{rank}:{step}" for rank, step in plan)


def weights(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def records(log_dir):
    with open(os.path.join(log_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def no_orphans(marker):
    # Waits up to ORPHAN_WAIT_S: a killed job's ranks can outlive its mpiexec by a moment.
    assert_no_processes(marker)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The unkilled run's weights and metrics, shuffled and not."""
    out = {}
    for shuffle in (True, False):
        d = tmp_path_factory.mktemp("reference")
        flag = "--shuffle" if shuffle else "--no-shuffle"
        rc, _, err = psframe_train(flag, "--checkpoint-dir", str(d / "ckpt"), "--log-dir",
                                   str(d / "log"), "--save", str(d / "w.npz"))
        assert rc == 0, err[-3000:]
        out[shuffle] = (weights(d / "w.npz"), records(d / "log"))
    return out


def test_the_plans_kill_every_rank_the_server_included_twenty_times_or_more():
    kills = [rank for _, plan in PLANS for rank, _ in plan]
    assert len(kills) >= 20 and set(kills) == {0, 1, 2}
    assert {shuffle for shuffle, _ in PLANS} == {True, False}


@pytest.mark.parametrize("shuffle, plan", PLANS,
                         ids=[f"{'shuffle' if s else 'noshuffle'}-{plan_env(p)}"
                              for s, p in PLANS])
def test_sigkilled_ranks_heal_bitwise_with_continuous_logs(tmp_path, reference, shuffle, plan):
    flag = "--shuffle" if shuffle else "--no-shuffle"
    rc, out, err = psframe_train(
        flag, "--checkpoint-dir", str(tmp_path / "ckpt"), "--log-dir", str(tmp_path / "log"),
        "--save", str(tmp_path / "w.npz"), "--max-restarts", str(len(plan)),
        CHAOS_KILLS=plan_env(plan))
    assert rc == 0, err[-3000:]
    lines = RESTART_LINE.findall(err)
    assert [(int(i), int(k)) for i, k, _, _ in lines] == [(i + 1, len(plan))
                                                         for i in range(len(plan))], err[-3000:]
    steps = [int(s) for _, _, s, _ in lines if s]
    assert steps == sorted(steps) and all(s % 2 == 0 and s < STEPS for s in steps)
    for _, _, step, path in lines:  # the line names the checkpoint of that step
        assert not step or path.endswith(f"ckpt-{int(step):08d}.json")
    assert "no restarts are left" not in err
    ref_weights, ref_records = reference[shuffle]
    assert_bitwise_equal(weights(tmp_path / "w.npz"), ref_weights)

    # metrics.jsonl: every step once, a restart record per restart, then the end; and the
    # evaluations are the unkilled run's, value for value.
    got = records(tmp_path / "log")
    assert [r["step"] for r in got if r["kind"] == "update"] == list(range(1, STEPS + 1))
    assert [r["restart"] for r in got if r["kind"] == "restart"] == list(
        range(1, len(plan) + 1))
    assert got[0]["kind"] == "start" and got[-1]["kind"] == "end" and got[-1]["step"] == STEPS
    evals = [(r["step"], r["train_loss"], r["eval_loss"]) for r in got if r["kind"] == "eval"]
    assert evals == [(r["step"], r["train_loss"], r["eval_loss"]) for r in ref_records
                     if r["kind"] == "eval"]
    with open(tmp_path / "log" / "worker-1.log") as f:
        starts = f.read().count(" started")
    assert starts == len(plan) + 1
    no_orphans(str(tmp_path))  # every killed start was taken down whole


@pytest.mark.parametrize("fault, extra", [
    ("1:3:raise", []),
    ("2:3:stop", ["--stall-timeout", "3"]),
], ids=["an-exception", "a-stall-the-watchdog-ends"])
def test_an_aborted_job_heals_too(tmp_path, reference, fault, extra):
    rc, _, err = psframe_train("--checkpoint-dir", str(tmp_path / "ckpt"), "--save",
                               str(tmp_path / "w.npz"), "--max-restarts", "1", *extra,
                               CHAOS_KILLS=fault)
    assert rc == 0, err[-3000:]
    assert [step for _, _, step, _ in RESTART_LINE.findall(err)] == ["2"], err[-3000:]
    assert_bitwise_equal(weights(tmp_path / "w.npz"), reference[True][0])


def test_spent_restarts_end_the_job_with_its_failure_and_say_so(tmp_path):
    rc, _, err = psframe_train("--checkpoint-dir", str(tmp_path / "ckpt"), "--max-restarts", "2",
                               CHAOS_KILLS="1:3,0:3,2:3")
    assert rc == 9, err[-3000:]  # mpiexec's status for a rank killed by signal 9
    assert len(RESTART_LINE.findall(err)) == 2
    assert err.count("psframe: the job failed (exit status 9) and no restarts are left "
                     "(2 of max_restarts 2 used); giving up") == 1
    no_orphans(str(tmp_path))


def test_bad_input_is_never_restarted(tmp_path):
    rc, out, err = psframe_train("--checkpoint-dir", str(tmp_path / "ckpt"), "--max-restarts",
                                 "3", "--batch-size", "0")
    assert rc == 2, err[-3000:]
    assert err.count("psframe: error: batch_size") == 1
    assert "restart" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_stop_the_user_asks_for_is_not_restarted(tmp_path, sig):
    ckpt = tmp_path / "ckpt"
    proc = start([sys.executable, "-m", "psframe", "train", "-n", "3", *TRAIN, "--steps",
                  "1000000", "--delay", "0:0.002", "--checkpoint-dir", str(ckpt),
                  "--max-restarts", "3"])
    deadline = time.time() + 60
    while not list(ckpt.glob("ckpt-*.json")):
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"the run made no checkpoint: {proc.communicate()}")
        time.sleep(0.05)
    proc.send_signal(sig)  # to the launcher, as a terminal's Ctrl-C or a batch system would
    rc, _, err = finish(proc, 60)
    assert rc == 130, err[-3000:]
    assert "psframe: run interrupted at step" in err
    assert "restart" not in err
    no_orphans(str(ckpt))


def test_a_killed_launcher_takes_its_job_down(tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = start([sys.executable, "-m", "psframe", "train", "-n", "3", *TRAIN, "--steps",
                  "1000000", "--delay", "0:0.002", "--checkpoint-dir", str(ckpt),
                  "--max-restarts", "3"])
    deadline = time.time() + 60
    while not list(ckpt.glob("ckpt-*.json")) and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()  # the launcher only: its mpiexec gets its death signal, SIGTERM
    proc.communicate()
    deadline = time.time() + 30
    while True:
        pids = subprocess.run(["pgrep", "-f", str(ckpt)], capture_output=True,
                              text=True).stdout.split()
        if not pids:
            break
        if time.time() > deadline:
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            pytest.fail("the job outlived its launcher")
        time.sleep(0.1)


@pytest.mark.parametrize("args, message", [
    ([], "max_restarts needs checkpoint_dir"),
    (["--checkpoint-dir", "ckpt-unused"], None),
    (["--max-restarts", "-1"], "max_restarts must be an integer >= 0, got -1"),
], ids=["no-checkpoint-dir", "no-checkpoint-every", "negative"])
def test_restarts_without_checkpoints_are_refused_before_launching(args, message):
    cmd = [sys.executable, "-m", "psframe", "train", "-n", "3", "--data", "digits",
           "--max-restarts", "2", *args]
    rc, out, err = run(cmd, timeout=30)
    assert rc == 2 and out == ""
    expected = message or "max_restarts needs checkpoint_every K"
    assert err.count(f"psframe: error: {expected}") == 1, err


def test_max_restarts_is_a_config_file_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("max_restarts = 2\n")
    rc, _, err = run([sys.executable, "-m", "psframe", "train", "-n", "3", "--config",
                      str(path)], timeout=30)
    assert rc == 2 and err.count("psframe: error: max_restarts needs checkpoint_dir") == 1


def test_a_job_started_without_the_launcher_refuses_max_restarts(tmp_path):
    rc, _, err = run([MPIEXEC, "-n", "2", sys.executable, "-m", "mpi4py", "-m", "psframe",
                      "train", *TRAIN, "--checkpoint-dir", str(tmp_path), "--max-restarts",
                      "1"], timeout=60)
    assert rc == 2, err[-3000:]
    assert err.count("no launcher to restart it") == 1


# -- from Python --------------------------------------------------------------------------------
LAUNCH = """import sys, psframe as ps
r = ps.launch(3, sys.argv[1], *sys.argv[3:], max_restarts=3, checkpoint_dir=sys.argv[2])
print("restarts", r.restarts)
sys.exit(r.returncode)
"""


def python_launch(ckpt, out, *args, **env):
    return run([sys.executable, "-c", LAUNCH, os.path.join(SCRIPTS, "chaos_train.py"),
                str(ckpt), str(ckpt), str(out), *args], **env)


def test_ps_launch_heals_a_script_bitwise(tmp_path):
    rc, out, err = python_launch(tmp_path / "ref-ckpt", tmp_path / "ref", "noshuffle")
    assert rc == 0 and "restarts 0" in out, err[-3000:]
    rc, out, err = python_launch(tmp_path / "ckpt", tmp_path / "healed", "noshuffle",
                                 CHAOS_KILLS="0:3,2:2,1:5")
    assert rc == 0 and "restarts 3" in out, err[-3000:]
    assert len(RESTART_LINE.findall(err)) == 3
    assert_bitwise_equal(weights(tmp_path / "healed" / "weights.npz"),
                         weights(tmp_path / "ref" / "weights.npz"))
    with open(tmp_path / "healed" / "history.json") as f:
        history = json.load(f)
    assert [row["step"] for row in history] == list(range(1, STEPS + 1))
    times = [row["time_s"] for row in history]
    assert times == sorted(times)


def test_ps_launch_does_not_restart_bad_input(tmp_path):
    rc, out, err = python_launch(tmp_path / "ckpt", tmp_path / "out", "noshuffle", "-1")
    assert rc == 2 and "restarts 0" in out, err[-3000:]
    assert err.count("psframe: error: steps must be an integer >= 1, got -1") == 1
    assert "restart " not in err


def test_ps_launch_checks_its_arguments(tmp_path):
    script = os.path.join(SCRIPTS, "chaos_train.py")
    with pytest.raises(ps.ConfigError, match="max_restarts needs checkpoint_dir"):
        ps.launch(3, script, max_restarts=1)
    with pytest.raises(ps.ConfigError, match="no script"):
        ps.launch(3, str(tmp_path / "missing.py"))
    with pytest.raises(ps.ConfigError, match="nprocs must be a positive integer"):
        ps.launch(0, script)


# -- the parts, without a job -------------------------------------------------------------------
def test_a_restart_resumes_only_the_run_that_writes_that_checkpoint(tmp_path):
    path = str(tmp_path / "ckpt-00000004.json")
    env = {"PSFRAME_RESUME": path}
    mine = RunOptions(checkpoint_dir=str(tmp_path), resume="old/ckpt")
    assert supervisor.supervised_resume(mine, env).resume == path
    assert supervisor.supervised_resume(mine, {}).resume == "old/ckpt"
    other = RunOptions(checkpoint_dir=str(tmp_path / "other"))
    assert supervisor.supervised_resume(other, env).resume is None
    assert supervisor.supervised_resume(RunOptions(), env).resume is None


def test_checkpoints_from_before_the_job_are_never_restarted_from(tmp_path):
    arrays = {"weights": np.arange(4.0)}
    state = {"groups": [], "samples": 0, "history": []}
    ckpt = Checkpointer(str(tmp_path), 2, keep=5)
    ckpt.save(10, arrays, state)  # an earlier run's, into the same directory
    earlier = supervisor._identities(str(tmp_path))
    assert supervisor._newest(str(tmp_path), earlier) is None
    ckpt.save(4, arrays, state)
    assert supervisor._newest(str(tmp_path), earlier) == (
        str(tmp_path / "ckpt-00000004.json"), 4)
    with open(tmp_path / "ckpt-00000004.npz", "ab") as f:
        f.write(b"torn")  # one that does not verify is passed over
    assert supervisor._newest(str(tmp_path), earlier) is None


def test_only_unused_new_segments_are_removed(tmp_path):
    pattern = str(tmp_path / "mpich_shm_*")
    old = tmp_path / "mpich_shm_old"
    old.write_bytes(b"x")
    before = leftovers.shm_files(pattern)
    left, held = tmp_path / "mpich_shm_left", tmp_path / "mpich_shm_held"
    left.write_bytes(b"x")
    held.write_bytes(b"x")
    with open(held, "rb"):  # a job holding it open: still in use
        assert leftovers.remove_unused(before, pattern) == [str(left)]
    assert old.exists() and held.exists() and not left.exists()
