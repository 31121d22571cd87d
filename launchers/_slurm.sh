# Sourced by the slurm launchers. run_requeueable OUTDIR CMD...: run CMD (srun ...) so that the job
# survives preemption and the time limit.
#   - `#SBATCH --signal=B:USR1@<lead>` makes slurm signal this batch shell <lead> seconds before it kills the
#     job; the trap creates OUTDIR/PREEMPT, which every trainer rank checks after each optimizer step (the
#     signal itself would reach only torchrun, not the ranks behind it): all ranks finish the step, save
#     one checkpoint together, rank 0 writes OUTDIR/PREEMPTED, and the ranks exit with status 75.
#     Size <lead> from the plan's checkpoint line (`--dry_run` or `cli.plan` prints the write time of one
#     checkpoint and the lead it needs): a 70B ZeRO-3 save is about 1 TB.
#   - Once the warning came, the job is requeued whatever happens next: the save finished (PREEMPTED), the
#     step failed, or slurm's kill (SIGTERM) arrives before the save is done. Checkpoints are atomic, so a
#     save cut short leaves the previous one, and the requeued run resumes from it. Without a warning a
#     failed or cancelled job is not requeued.
#   - The requeued run gets --resume (SLURM_RESTART_COUNT > 0) and continues from the newest checkpoint.
resume_flag() {
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then echo --resume; fi
}

_requeue_once() {
  if [ "$_requeued" = 0 ]; then
    _requeued=1
    echo "slurm: requeueing job $SLURM_JOB_ID ($1)" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
}

run_requeueable() {
  local outdir=$1; shift
  mkdir -p "$outdir"
  _warned=0 _requeued=0
  trap '_warned=1; echo "slurm: time limit or preemption near: asking the ranks to checkpoint" >&2; touch "$outdir/PREEMPT"' USR1
  # slurm's kill: a save still running is cut short (the previous checkpoint stays); requeue before the KILL
  trap 'touch "$outdir/PREEMPT"; if [ "$_warned" = 1 ]; then _requeue_once "terminated before the checkpoint finished"; fi' TERM
  "$@" &
  local pid=$! rc=0
  while true; do  # a trapped signal interrupts `wait`; keep waiting for the job step itself
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if [ -f "$outdir/PREEMPTED" ]; then
    _requeue_once "checkpoint written: $(cat "$outdir/PREEMPTED")"
  elif [ "$_warned" = 1 ] && [ "$rc" != 0 ]; then
    _requeue_once "the job step ended with status $rc after the warning; resuming from the newest complete checkpoint"
  fi
  if [ "$_requeued" = 1 ]; then exit 0; fi
  exit "$rc"
}
