"""The suite's type-check stage: `python -m mypy` over psframe/ (its config: pyproject.toml),
reported as one item, 1 passed or 1 failed, in the JSON summary run_suite.py reads."""
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
# The mypy the test extra pins needs Python 3.10 or later; on 3.9 it is not installed.
MIN_PYTHON = (3, 10)


def main():
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failed_tests": []}
    if sys.version_info < MIN_PYTHON:
        print(f"mypy: skipped (the pinned mypy needs Python {'.'.join(map(str, MIN_PYTHON))}+)")
        counts["skipped"] = 1
        return _report(counts, 0)
    start = time.time()
    try:
        run = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True,
                             text=True, timeout=TIMEOUT_S)
        rc, output = run.returncode, run.stdout + run.stderr
    except subprocess.TimeoutExpired:
        rc, output = None, f"mypy: timed out after {TIMEOUT_S} s"
    elapsed = time.time() - start
    if rc == 0:
        # One line ("Success: no issues found in N source files").
        print(f"{output.strip()} ({elapsed:.1f} s)")
        counts["passed"] = 1
        return _report(counts, 0)
    print(output.rstrip())
    lines = output.strip().splitlines()
    counts["failed"] = 1
    counts["failed_tests"] = [f"exit {rc}: {lines[-1] if lines else 'no output'}"]
    return _report(counts, 1)


def _report(counts, rc):
    path = os.environ.get("PSFRAME_TEST_SUMMARY")
    if path:
        with open(path, "w") as f:
            json.dump(counts, f)
    return rc


if __name__ == "__main__":
    sys.exit(main())
