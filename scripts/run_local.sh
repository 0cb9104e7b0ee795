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

[[ $# -ge 1 && $1 =~ ^[0-9]+$ ]] || usage
n=$1
shift
if [[ ! -x $venv/bin/mpiexec || ! -x $venv/bin/python ]]; then
    echo "run_local.sh: no mpiexec/python in $venv; run 'make install' or set PSFRAME_VENV" >&2
    exit 2
fi

# A script to run, or the psframe CLI; -m mpi4py makes an exception in one rank abort all.
if [[ $# -ge 1 && $1 == *.py ]]; then
    target=("$1")
    shift
else
    target=(-m psframe train)
fi

# The checkout's psframe, even in a venv where it is not installed.
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# The ranks' stdout is a pipe to mpiexec; tell rank 0 whether a person watches a terminal.
if [[ -t 1 ]]; then
    PSFRAME_TTY=$(tput cols 2>/dev/null || echo 80)
    export PSFRAME_TTY
else
    unset PSFRAME_TTY
fi
export PSFRAME_LAUNCHED=1

read -r -a extra <<< "${PSFRAME_MPIEXEC_ARGS:-}"
cmd=("$venv/bin/mpiexec" ${extra[@]+"${extra[@]}"} -n "$n"
     "$venv/bin/python" -m mpi4py "${target[@]}" "$@")
if [[ -n ${PSFRAME_DRY_RUN:-} ]]; then
    printf '%q ' "${cmd[@]}"
    echo
    exit 0
fi
exec "${cmd[@]}"
