# Sourced by the sbatch scripts. `run_or_requeue COMMAND...` runs the job's processes; when they stop
# for the time limit (SLURM signals them requeue_grace_s before it, sbatch --signal=USR1@S; they
# commit what they can and exit 75), the job is requeued: it waits in the queue again and resumes
# from its committed shards or checkpoint, and the jobs that depend on it wait for it.
run_or_requeue() {
  local status=0
  "$@" || status=$?
  if [ "$status" -eq 75 ]; then
    echo "$(date -Is) job ${SLURM_JOB_ID} stopped before its time limit: requeued (restart $((${SLURM_RESTART_COUNT:-0} + 1)))"
    scontrol requeue "${SLURM_JOB_ID}"
    exit 0
  fi
  return "$status"
}
