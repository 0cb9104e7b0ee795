"""benchmarks/sparse.py --smoke under mpiexec: it runs, and its report has every part."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest
from launch_env import BIN, ROOT, clean_env

MPIEXEC = os.path.join(BIN, "mpiexec")
TORCH = importlib.util.find_spec("torch") is not None
# ~6 s on 2 idle cores (5 ranks, 4 of them importing torch for DDP); a loaded machine is slower.
RUN_TIMEOUT_S = 150


@pytest.fixture(scope="module")
def report():
    if not os.path.exists(MPIEXEC):
        pytest.skip("no mpiexec beside this Python (make install)")
    cmd = [MPIEXEC, "-n", "5", sys.executable, os.path.join(ROOT, "benchmarks", "sparse.py"),
           "--smoke", *([] if TORCH else ["--no-torch"])]
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"hung past {RUN_TIMEOUT_S} s: {cmd}\n{exc.stdout}\n{exc.stderr}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def row(out, name):
    """The numbers of the system's row in table (a)."""
    line = next(line for line in out.splitlines() if line.startswith(name))
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*\.?\d*", line[len(name):])]


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_throughput_table_has_every_system_against_allreduce(report):
    systems = ["Allreduce loop (mpi4py)", "psframe sparse (Sync)", "psframe dense tables (Sync)"]
    systems += ["torch DDP (gloo)"] if TORCH else []
    for name in systems:
        samples_per_s, ratio = row(report, name)[:2]
        assert samples_per_s > 0 and ratio > 0
    assert row(report, "Allreduce loop (mpi4py)")[1] == 1.0
    assert ("torch DDP (gloo)" in report) == TORCH


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_sparse_bytes_are_the_touched_rows(report):
    # The scaling table: pulled bytes equal rows x dim x 4 + the dense parameters.
    table = report.split("bytes per step against the rows touched")[1].split("\n\n")[0]
    lines = [c for c in map(str.split, table.splitlines()[2:]) if c and c[0].isdigit()]
    assert len(lines) == 2  # --smoke: batch 4 and the default 16
    for cells in lines:
        assert cells[2:4] == cells[4:6], cells  # "14.8 kB" == "14.8 kB"


@pytest.mark.timeout(RUN_TIMEOUT_S + 30)
def test_auc_curves_for_each_policy(report):
    part = report.split("(b) test accuracy and AUC")[1]
    for policy in ("sync", "async", "hybrid"):
        assert re.search(rf"^{policy}: [\d,]+ samples/s", part, re.M), policy
    points = re.findall(r"^\s+([\d.]+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", part, re.M)
    assert len(points) == 3 * 2  # --smoke: 2 evaluations per policy
    assert all(0 <= float(acc) <= 1 and 0 <= float(auc) <= 1 for _, _, acc, auc in points)
    assert re.search(r"^time to AUC >= [\d.]+: sync .*; async .*; hybrid .*; last AUC: ", part,
                     re.M)
    assert re.search(r"^total \d+ s; load average", report, re.M)
