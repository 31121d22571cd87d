# Sourced by the launchers. run_job MODULE ARGS...: start MODULE under the deepspeed launcher over
# APLOT_PLAN_NODES x APLOT_PLAN_GPUS_PER_NODE (HOSTFILE names the nodes when there are several).
# DRY_RUN=1: print the launch command, then run `python -m MODULE ARGS... --dry_run` on this machine
# instead (no GPU needed): it checks the flags, the DeepSpeed JSON, the data files and the memory plan
# for the hardware exported in APLOT_PLAN_*, and exits 0 only if the plan fits.
launch_cmd() {
  local module=$1; shift
  LAUNCH=(deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} --num_nodes "$APLOT_PLAN_NODES"
          --num_gpus "$APLOT_PLAN_GPUS_PER_NODE" --module "$module" "$@")
}

run_job() {
  local module=$1; shift
  launch_cmd "$module" "$@"
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "DRY_RUN=1: would run: ${LAUNCH[*]}" >&2
    exec "${PYTHON:-python}" -m "$module" "$@" --dry_run
  fi
  exec "${LAUNCH[@]}"
}
