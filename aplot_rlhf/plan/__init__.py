"""Dry-run memory planner: will this RM or PPO run fit on these GPUs, and if not, what is the smallest fix?

Everything here is a pure function of shapes and knobs; nothing touches a GPU, the network or DeepSpeed.

Public API (small on purpose):
    resolve_model(name_or_path) -> ModelShape      built-in name, a model folder, or a config.json path
    PlanInput(...)                                 every knob of one planned run (frozen dataclass)
    make_plan(inp) -> Plan                         estimate + verdict + smallest fitting change
    plan_from_namespace(ns, **overrides) -> Plan   same, from argparse flags or a training config object
    format_plan(plan) -> str, plan_to_dict(plan) -> dict   the table and the JSON form

Units: all `*_bytes` are bytes per GPU unless the name says `per_node`; `*_gib` are GiB (2**30 bytes).

Where the numbers come from:
- Model states (params, grads, Adam) follow DeepSpeed's own estimators,
  `estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs` (tests compare them
  byte for byte), extended to ZeRO-0/1, fp32 and frozen (PPO reference / reward) models.
- Activations follow the tensors Hugging Face's Llama-family decoder layer saves for backward (listed in
  `layer_saved_bytes`); tests check the total against peak memory measured on CPU at tiny sizes.
- vLLM co-located on the training GPUs takes `gpu_memory_utilization` x GPU memory while awake.

Modules, each importing only those above it:
    shapes      ModelShape, KNOWN_MODELS, resolve_model, config.json reading, LoRA target names
    memory      model states (ZeRO), activations, and the constants (reserve, vLLM, buffer factor)
    breakdown   PlanInput, the per-phase breakdown, Estimate, estimate()
    search      CHANGES, find_smallest_change, Plan, make_plan, plan_from_namespace
    report      format_plan, plan_to_dict
This package re-exports their public names: `from aplot_rlhf.plan import make_plan` is the usual import.
"""
from .breakdown import JOBS, Estimate, MemoryPhase, PlanInput, estimate
from .memory import (
    ATTN_IMPLEMENTATIONS,
    DS_CPU_BUFFER_FACTOR,
    DTYPE_BYTES,
    FRAGMENTATION_SHARE_OF_ACTIVATIONS,
    GIB,
    RESERVE_FIXED_GIB,
    VLLM_ASLEEP_GIB,
    VLLM_WORKSPACE_GIB,
    ActivationBytes,
    StateBytes,
    activation_bytes,
    layer_saved_bytes,
    model_state_bytes,
)
from .report import format_plan, plan_to_dict
from .search import CHANGES, Change, Plan, Suggestion, find_smallest_change, make_plan, plan_from_namespace
from .shapes import KNOWN_MODELS, LORA_LINEARS, ModelConfigError, ModelShape, lora_target_names, resolve_model

__all__ = [
    # shapes
    "ModelConfigError", "ModelShape", "KNOWN_MODELS", "LORA_LINEARS", "lora_target_names", "resolve_model",
    # memory
    "GIB", "DS_CPU_BUFFER_FACTOR", "RESERVE_FIXED_GIB", "FRAGMENTATION_SHARE_OF_ACTIVATIONS", "VLLM_ASLEEP_GIB",
    "VLLM_WORKSPACE_GIB", "DTYPE_BYTES", "ATTN_IMPLEMENTATIONS", "StateBytes", "model_state_bytes",
    "layer_saved_bytes", "ActivationBytes", "activation_bytes",
    # breakdown
    "JOBS", "PlanInput", "MemoryPhase", "Estimate", "estimate",
    # search
    "Change", "CHANGES", "Suggestion", "find_smallest_change", "Plan", "make_plan", "plan_from_namespace",
    # report
    "format_plan", "plan_to_dict",
]
