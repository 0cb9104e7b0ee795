"""Runs the whole suite (the type check, unit tests, then MPI tests at 2 to 6 ranks) and prints
one total."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
LOGS = os.path.join(ROOT, ".test-logs")
# An outer bound per stage, on top of pytest-timeout's per-test one: nothing may hang CI.
STAGE_TIMEOUT_S = 1200


def stages():
    py = sys.executable
    # mypy over psframe/ (config: pyproject.toml), one item in the totals: a few seconds.
    yield "mypy", [py, os.path.join(ROOT, "tests", "typecheck.py")]
    yield "unit", [py, "-m", "pytest", "tests", "-m", "not mpi", "-q"]
    # Hybrid 2x2 needs 4 workers: a fifth run covers the pipeline tests alone, and with two
    # servers a sixth; both run the several-servers tests (dense and row-sparse) at those
    # sizes too.
    servers = ["tests/mpi/test_servers.py", "tests/mpi/test_sparse.py"]
    for n, paths in ((2, ["tests/mpi"]), (3, ["tests/mpi"]), (4, ["tests/mpi"]),
                     (5, ["tests/mpi/test_pipeline.py", *servers]), (6, servers)):
        yield f"mpi-{n}", [
            "timeout", "--kill-after=10", str(STAGE_TIMEOUT_S),
            os.path.join(BIN, "mpiexec"), "-n", str(n),
            py, os.path.join(ROOT, "tests", "quiet_rank.py"), "-m", "mpi4py", "-m", "pytest",
            "--with-mpi", "-m", "mpi", *paths, "-q",
        ]


def main():
    os.makedirs(LOGS, exist_ok=True)
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for label, cmd in stages():
        summary = os.path.join(LOGS, f"{label}.json")
        if os.path.exists(summary):
            os.remove(summary)
        env = dict(os.environ, PSFRAME_TEST_SUMMARY=summary, PSFRAME_TEST_LABEL=label,
                   PSFRAME_TEST_LOGS=LOGS)
        print(f"\n=== {label}: {' '.join(os.path.relpath(c, ROOT) if c.startswith(ROOT) else c for c in cmd)}", flush=True)
        start = time.time()
        rc = subprocess.call(cmd, cwd=ROOT, env=env)
        print(f"=== {label}: exit {rc} in {time.time() - start:.1f} s", flush=True)
        counts = None
        if os.path.exists(summary):
            with open(summary) as f:
                counts = json.load(f)
        if counts is None:
            # The run died before pytest could write its summary (abort, timeout, crash).
            failures.append(f"{label}: no summary (exit {rc}); the run crashed or timed out")
            totals["failed"] += 1
            _show_rank_logs(label)
            continue
        for k in totals:
            totals[k] += counts[k]
        failures += [f"{label}: {t}" for t in counts["failed_tests"]]
        if counts["failed"] or rc not in (0, 5):
            if rc not in (0, 1, 5) and not counts["failed"]:
                failures.append(f"{label}: exit {rc} although no test failed")
                totals["failed"] += 1
            _show_rank_logs(label)
    if failures:
        print("\nFailures:")
        for f in failures:
            print(f"  {f}")
    print(f"\nsuite: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped")
    return 1 if totals["failed"] else 0


def _show_rank_logs(label):
    for name in sorted(os.listdir(LOGS)):
        if name.startswith(f"{label}-rank") and name.endswith(".log"):
            with open(os.path.join(LOGS, name)) as f:
                text = f.read()
            if text.strip():
                print(f"--- {name} (last 4000 chars) ---\n{text[-4000:]}")


if __name__ == "__main__":
    sys.exit(main())
