# Sourced by the slurm launchers. run_requeueable OUTDIR CMD...: run CMD (srun ...) so that the job
# survives preemption and the time limit.
#   - `#SBATCH --signal=B:USR1@180` makes slurm signal this batch shell 180 s before it kills the job;
#     the trap creates OUTDIR/PREEMPT, which every trainer rank checks after each optimizer step (the
#     signal itself would reach only torchrun, not the ranks behind it): all ranks finish the step, save
#     one checkpoint together, rank 0 writes OUTDIR/PREEMPTED, and the ranks exit with status 75.
#   - A run that left OUTDIR/PREEMPTED is requeued (`#SBATCH --requeue`); the requeued run gets --resume
#     (SLURM_RESTART_COUNT > 0) and continues from that checkpoint.
resume_flag() {
  if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then echo --resume; fi
}

run_requeueable() {
  local outdir=$1; shift
  mkdir -p "$outdir"
  trap 'echo "slurm: time limit or preemption near: asking the ranks to checkpoint" >&2; touch "$outdir/PREEMPT"' USR1 TERM
  "$@" &
  local pid=$! rc=0
  while true; do  # a trapped signal interrupts `wait`; keep waiting for the job step itself
    wait "$pid" && rc=0 || rc=$?
    kill -0 "$pid" 2>/dev/null || break
  done
  if [ -f "$outdir/PREEMPTED" ]; then
    echo "slurm: checkpoint written ($(cat "$outdir/PREEMPTED")); requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  exit "$rc"
}
