#!/usr/bin/env bash
# Run psframe with N MPI ranks on this machine: rank 0 serves, ranks 1..N-1 are workers.
#
# Usage: scripts/run_local.sh N [psframe train options...]
#        scripts/run_local.sh N script.py [script args...]
#
#   scripts/run_local.sh 4 --data digits --model mlp:64,128,10 --epochs 5 --log-dir runs/a
#   scripts/run_local.sh 4 --config run.toml
#   scripts/run_local.sh 3 examples/train.py
#
# Uses the venv's own mpiexec and python: a system mpiexec from another MPI than the one
# mpi4py is bound to fails with PMI errors.
#   PSFRAME_VENV           the venv (default: the checkout's .venv, made by `make install`)
#   PSFRAME_MPIEXEC_ARGS   extra mpiexec options, e.g. "--oversubscribe" for Open MPI
#   PSFRAME_DRY_RUN=1      print the command instead of running it
set -euo pipefail

usage() { sed -n '2,9s/^# \{0,1\}//p' "$0" >&2; exit 2; }

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${PSFRAME_VENV:-$root/.venv}
me=run_local.sh
# shellcheck source=launch-common.sh
source "$root/scripts/launch-common.sh"

[[ $# -ge 1 && $1 =~ ^[0-9]+$ ]] || usage
n=$1
shift
psframe_check_venv

psframe_pick_target "$@" || shift

psframe_environment
cmd=("$venv/bin/mpiexec" ${extra[@]+"${extra[@]}"} -n "$n"
     "$venv/bin/python" -m mpi4py "${target[@]}" "$@")
psframe_exec "${cmd[@]}"
