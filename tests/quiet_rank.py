"""Exec the rest of argv with stdout/stderr in a log file on every MPI rank but rank 0.

All ranks run the same pytest session; rank 0 alone talks to the terminal. This must happen
before pytest starts, since pytest keeps its own copy of the terminal's file descriptor.
"""
import os
import sys

rank = int(os.environ.get("PMI_RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or 0)
if rank > 0:
    log_dir = os.environ.get("PSFRAME_TEST_LOGS", ".test-logs")
    os.makedirs(log_dir, exist_ok=True)
    label = os.environ.get("PSFRAME_TEST_LABEL", "mpi")
    fd = os.open(os.path.join(log_dir, f"{label}-rank{rank}.log"),
                 os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
os.execv(sys.executable, [sys.executable] + sys.argv[1:])
