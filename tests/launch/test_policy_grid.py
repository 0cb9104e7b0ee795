"""Every asynchronous and bounded policy trains to Sync's accuracy at Sync's hyperparameters."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "scripts", "policy_grid.py")
MPIEXEC = os.path.join(os.path.dirname(sys.executable), "mpiexec")
TOLERANCE = 0.015  # 1.5 points of test accuracy below Sync's, on the mean over 3 seeds
# Above Sync is not a failure (staleness adds momentum of its own, and SSP(2) sometimes
# trains a point faster), but more than 3 points above would mean a different regime.
AHEAD = 0.03
# 25 epochs: at 15, Sync itself is still climbing at 8 workers (Adam 0.946, against 0.968 at
# 2), and a policy's distance from a moving target is noise. At 25 all sit near the plateau.
EPOCHS, SEEDS = 25, 3
BOUND_S = 400  # about 10-15 s of training per worker count here; 9 ranks on 2 cores


def grid(n_workers):
    cmd = ["timeout", "-k", "10", str(BOUND_S), MPIEXEC, "-n", str(n_workers + 1),
           sys.executable, "-m", "mpi4py", SCRIPT, str(EPOCHS), str(SEEDS)]
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=BOUND_S + 30)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("GRID "))
    return json.loads(line[5:])["accuracy"]


@pytest.mark.skipif(not os.path.exists(MPIEXEC), reason="no mpiexec beside this Python (make install)")
@pytest.mark.timeout(BOUND_S + 60)
@pytest.mark.parametrize("n_workers", [2, 4, 8])
def test_policies_match_sync_at_syncs_hyperparameters(n_workers):
    acc = grid(n_workers)
    for opt in ("sgd", "adam"):
        sync = acc[f"{opt}/sync"]
        assert sync > 0.93, (opt, acc)  # Sync itself trained: the comparison means something
        for policy in ("async", "ssp2", "mixed", "backup1"):
            got = acc[f"{opt}/{policy}"]
            assert sync - TOLERANCE <= got <= sync + AHEAD, (n_workers, opt, policy, got, sync)
    if n_workers == 8:
        # The same run unweighted diverges (chance is 0.10): the default is what fixes it.
        # (At 4 workers the raw run fails most times but once recovered to 0.89 by epoch 25.)
        assert acc["sgd/async-raw"] < acc["sgd/sync"] - 0.2, acc
