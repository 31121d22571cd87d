# Sourced by the launchers: run the job, or with DRY_RUN=1 only check its flags and memory plan.
# run_job MODULE ARGS... : the deepspeed launcher over APLOT_PLAN_NODES x APLOT_PLAN_GPUS_PER_NODE
# (HOSTFILE names the nodes when there are several)
run_job() {
  local module=$1; shift
  if [ "${DRY_RUN:-0}" = 1 ]; then
    exec "${PYTHON:-python}" -m "$module" "$@" --dry_run
  fi
  exec deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_nodes "$APLOT_PLAN_NODES" \
    --num_gpus "$APLOT_PLAN_GPUS_PER_NODE" --module "$module" "$@"
}
