# Shared by run_local.sh and run_hostfile.sh (sourced, not run): check the venv, pick what to
# run, set the environment, and run or print the final mpiexec command.
# Needs: $root, $venv, $me (the calling script's name). Sets: target (array).

psframe_check_venv() {
    if [[ ! -x $venv/bin/mpiexec || ! -x $venv/bin/python ]]; then
        echo "$me: no mpiexec/python in $venv; run 'make install' or set PSFRAME_VENV" >&2
        exit 2
    fi
}

# A script to run, or the psframe CLI; -m mpi4py makes an exception in one rank abort all.
# Returns 1 when it took a script path from the arguments, so the caller shifts it.
psframe_pick_target() {
    if [[ $# -ge 1 && $1 == *.py ]]; then
        target=("$1")
        return 1
    fi
    target=(-m psframe train)
    return 0
}

psframe_environment() {
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
}

psframe_exec() {
    if [[ -n ${PSFRAME_DRY_RUN:-} ]]; then
        printf '%q ' "$@"
        echo
        exit 0
    fi
    exec "$@"
}
