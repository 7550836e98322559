# Sourced by the fedmpi batch scripts; defines fedmpi_run and fedmpi_launch.
#
# fedmpi_run ARGS...  runs `python -m fedmpi.run ARGS...` on the job's tasks
# (fedmpi_launch MODULE ARGS... does the same for `python -m MODULE`, e.g. fedmpi.sweep --in-job):
#   - launcher: $FEDMPI_LAUNCHER if set; else `srun --mpi=$FEDMPI_SRUN_MPI` (default pmi2,
#     right for MPICH and the mpich wheel; pmix for an Open MPI built with PMIx) when this
#     SLURM offers that plugin; else `mpirun -n $SLURM_NTASKS`;
#   - SIGUSR1 and SIGTERM reaching this batch shell (#SBATCH --signal=B:USR1@...) are
#     passed on, and fedmpi writes a checkpoint and exits with status 75;
#   - status 75 requeues the job (scontrol requeue); the requeued job finds the results
#     file and continues it with --resume.

fedmpi_launcher() {
    if [ -n "${FEDMPI_LAUNCHER:-}" ]; then
        echo "$FEDMPI_LAUNCHER"
    elif [ -n "${SLURM_JOB_ID:-}" ] && command -v srun >/dev/null 2>&1 \
        && srun --mpi=list 2>&1 | grep -qw "${FEDMPI_SRUN_MPI:-pmi2}"; then
        echo "srun --mpi=${FEDMPI_SRUN_MPI:-pmi2}"
    else
        echo "mpirun -n ${SLURM_NTASKS:-1}"
    fi
}

fedmpi_run() {
    fedmpi_launch fedmpi.run "$@"
}

fedmpi_launch() {
    local module=$1 launcher pid status
    shift
    launcher=$(fedmpi_launcher)
    echo "fedmpi job ${SLURM_JOB_ID:-local} (restart ${SLURM_RESTART_COUNT:-0}): $launcher ${FEDMPI_PYTHON:-python} -m $module $*"
    # shellcheck disable=SC2086  # the launcher is a command line
    $launcher "${FEDMPI_PYTHON:-python}" -m "$module" "$@" &
    pid=$!
    trap 'kill -USR1 "$pid" 2>/dev/null' USR1
    trap 'kill -TERM "$pid" 2>/dev/null' TERM
    # bash runs traps between commands only, so wait (again) until the launcher is gone
    while true; do
        set +e
        wait "$pid"
        status=$?
        set -e
        kill -0 "$pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    if [ "$status" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        echo "fedmpi checkpointed after a signal; requeueing job $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
        return 0
    fi
    return "$status"
}

# fedmpi_start_or_resume OUT [--config FILE] [fedmpi.run options...]
# A new run writes OUT; if OUT exists (a requeued or resubmitted job) it is resumed with the
# same options (fedmpi checks that --config and --set still describe the stored run).
fedmpi_start_or_resume() {
    local out=$1
    shift
    mkdir -p "$(dirname "$out")"
    if [ -e "$out" ]; then
        fedmpi_run --resume "$out" "$@"
    else
        fedmpi_run "$@" --out "$out"
    fi
}
