"""Test plumbing: one merged outcome per test across all MPI ranks, for tests/run_suite.py."""
import json
import os

import pytest

_outcomes = {}  # nodeid -> "passed" | "failed" | "skipped"


def _mpi_world(config):
    if not config.getoption("--with-mpi", default=False):
        return None
    from mpi4py import MPI

    return MPI.COMM_WORLD


def pytest_runtest_logreport(report):
    previous = _outcomes.get(report.nodeid, "passed")
    if report.failed:
        _outcomes[report.nodeid] = "failed"
    elif report.skipped and previous != "failed":
        _outcomes[report.nodeid] = "skipped"
    else:
        _outcomes.setdefault(report.nodeid, "passed")


def pytest_sessionfinish(session, exitstatus):
    merged = dict(_outcomes)
    world = _mpi_world(session.config)
    if world is not None and world.Get_size() > 1:
        everyone = world.gather(_outcomes, root=0)
        if world.Get_rank() != 0:
            return
        merged = {}
        for rank_outcomes in everyone:
            for nodeid, outcome in rank_outcomes.items():
                rank_of = {"passed": 0, "skipped": 1, "failed": 2}
                if rank_of[outcome] >= rank_of[merged.get(nodeid, "passed")]:
                    merged[nodeid] = outcome
    path = os.environ.get("PSFRAME_TEST_SUMMARY")
    if path:
        counts = {k: sum(1 for v in merged.values() if v == k) for k in ("passed", "failed", "skipped")}
        counts["failed_tests"] = sorted(n for n, v in merged.items() if v == "failed")
        with open(path, "w") as f:
            json.dump(counts, f)
