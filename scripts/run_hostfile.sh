#!/usr/bin/env bash
# Run psframe with N MPI ranks spread over the hosts of a hostfile. Rank 0, the server, runs
# on the first host listed.
#
# Usage: scripts/run_hostfile.sh HOSTFILE N [psframe train options... | script.py args...]
#
#   printf 'node1:4\nnode2:4\n' > hosts      # MPICH: host:slots; Open MPI: "node1 slots=4"
#   scripts/run_hostfile.sh hosts 8 --data mnist --epochs 5 --log-dir runs/a
#
# Every host needs the same venv at the same path (a shared filesystem is simplest: put the
# checkout and its .venv on it), and passwordless ssh from this host to the others.
#   PSFRAME_VENV           the venv (default: the checkout's .venv)
#   PSFRAME_MPIEXEC_ARGS   extra mpiexec options, e.g. "-iface eth1" to pick a network
#   PSFRAME_DRY_RUN=1      print the command instead of running it
set -euo pipefail

usage() { sed -n '2,9s/^# \{0,1\}//p' "$0" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PSFRAME_VENV:-$root/.venv}
me=run_hostfile.sh
# shellcheck source=launch-common.sh
source "$root/scripts/launch-common.sh"

[[ $# -ge 2 && $2 =~ ^[0-9]+$ ]] || usage
hostfile=$1
n=$2
shift 2
[[ -r $hostfile ]] || { echo "run_hostfile.sh: cannot read hostfile $hostfile" >&2; exit 2; }
psframe_check_venv

psframe_pick_target "$@" || shift

psframe_environment
# MPICH's Hydra takes -f and forwards the whole environment; Open MPI takes --hostfile and
# forwards only what -x names.
if "$venv/bin/mpiexec" --version 2>&1 | grep -qi "open mpi\|openrte\|prrte"; then
    hosts=(--hostfile "$hostfile" -x PYTHONPATH -x PSFRAME_LAUNCHED)
    [[ -n ${PSFRAME_TTY:-} ]] && hosts+=(-x PSFRAME_TTY)
else
    hosts=(-f "$hostfile")
fi
cmd=("$venv/bin/mpiexec" "${hosts[@]}" ${extra[@]+"${extra[@]}"} -n "$n"
     "$venv/bin/python" -m mpi4py "${target[@]}" "$@")
psframe_exec "${cmd[@]}"
