"""`psframe cluster up | run | mpiexec | status | down`: a simulated cluster, from a shell."""
from __future__ import annotations

import argparse
import os
import sys

from . import cluster as clusters
from .netns import ClusterError

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    up = sub.add_parser("up", help="make N hosts (network namespaces) and a hostfile",
                        description="Make N hosts on this machine, each a network namespace "
                                    "with its own hostname, address and link, joined by a "
                                    "bridge; nothing is added to this machine's own network.")
    up.add_argument("--nodes", type=int, required=True, metavar="N", help="how many hosts")
    up.add_argument("--bandwidth", metavar="RATE", default=None,
                    help="shape each host's link in both directions, e.g. 1gbit, 100mbit")
    up.add_argument("--name", default=None, help="the cluster's name (default: psf-XXXXXX)")
    run = sub.add_parser("run", help="run PROGRAM under mpiexec across the hosts",
                         description="Run PROGRAM with NP ranks across the hosts: K ranks on a "
                                     "host before the next, cycling; rank 0 on host 0. The "
                                     "exit status and output are the job's.")
    run.add_argument("-n", type=int, required=True, metavar="NP", help="ranks")
    run.add_argument("--ppn", type=int, default=None, metavar="K",
                     help="ranks per host before the next (default: fill the hosts evenly; "
                          "1: round-robin)")
    run.add_argument("--name", default=None, help="which cluster (default: the only one)")
    run.add_argument("program", nargs=argparse.REMAINDER,
                     help="-- PROGRAM ARGS... (e.g. -- python -m mpi4py train.py)")
    mpiexec = sub.add_parser(
        "mpiexec", help="print the path of an mpiexec that runs jobs across the hosts",
        description="Print the path of an mpiexec for this cluster: it takes mpiexec's own "
                    "arguments and runs the job on host 0 across the hosts (one rank per "
                    "host, cycling). PSFRAME_MPIEXEC=$(psframe cluster mpiexec) psframe "
                    "train -n N ... then trains, and restarts, across the hosts.")
    mpiexec.add_argument("--name", default=None, help="which cluster (default: the only one)")
    status = sub.add_parser("status", help="what clusters exist")
    status.add_argument("--name", default=None)
    down = sub.add_parser("down", help="remove what up made (harmless when nothing is up)")
    down.add_argument("--name", default=None, help="only this cluster (default: all)")


def main(args: argparse.Namespace) -> int:
    try:
        return _ACTIONS[args.action](args)
    except (ClusterError, ValueError) as exc:
        print(f"psframe cluster: error: {exc}", file=sys.stderr, flush=True)
        return 2


def _up(args):
    c = clusters.up(args.nodes, bandwidth=args.bandwidth, name=args.name)
    print(c.describe())
    print(f"hostfile: {c.hostfile()}")
    print(f"run a job: psframe cluster run -n NP -- PROGRAM ARGS...  (`--name {c.name}` "
          "when several are up)")
    print(f"or: PSFRAME_MPIEXEC={c.mpiexec} psframe train -n NP ...")
    return 0


def _mpiexec(args):
    print(clusters.find(args.name).mpiexec)
    return 0


def _run(args):
    program = list(args.program)
    if program[:1] == ["--"]:
        program = program[1:]
    c = clusters.find(args.name)
    sys.stdout.flush()
    # exec, not a child: the job gets the user's Ctrl-C and a batch system's signals directly,
    # and its exit status is this command's.
    argv = c.command(args.n, program, args.ppn)
    os.execvp(argv[0], argv)


def _status(args):
    found = clusters.clusters() if args.name is None else [clusters.find(args.name)]
    if not found:
        print("no cluster is up")
    for c in found:
        print(c.describe() + ("" if c.alive() else "\n  (its maker has exited: the next "
                                                   "`up` removes it)"))
    return 0


def _down(args):
    if args.name is not None:
        names = [args.name] if clusters.remove(args.name) else []
    else:
        names = clusters.down_all()
    print(f"removed {', '.join(names)}" if names else "nothing to remove")
    return 0


_ACTIONS = {"up": _up, "run": _run, "mpiexec": _mpiexec, "status": _status, "down": _down}
