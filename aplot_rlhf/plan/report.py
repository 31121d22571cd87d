"""A plan as text and as data: format_plan (the per-GPU table, verdict and suggestion) and plan_to_dict (JSON)."""
from __future__ import annotations

import dataclasses
from typing import Any

from .breakdown import MemoryPhase, PlanInput
from .memory import FRAGMENTATION_SHARE_OF_ACTIVATIONS, GIB, RESERVE_FIXED_GIB, VLLM_ASLEEP_GIB
from .search import Plan
from .shapes import ModelShape

_ROWS = (("parameters", "params_bytes"), ("gradients", "grads_bytes"), ("optimizer states", "optimizer_bytes"),
         ("activations", "activations_bytes"), ("vLLM weights", "vllm_weights_bytes"),
         ("vLLM KV cache", "vllm_kv_cache_bytes"), ("reserve", "reserve_bytes"))


def _setup_line(inp: PlanInput) -> str:
    offload = [n for n, on in (("optimizer", inp.offload_optimizer), ("params", inp.offload_param)) if on]
    parts = [f"{inp.job.upper()} {inp.model.name}", f"{inp.nodes}x{inp.gpus_per_node} GPUs x {inp.gpu_mem_gib:g} GiB",
             f"ZeRO-{inp.zero}" + (f" offload {'+'.join(offload)}" if offload else ""), inp.dtype,
             f"micro-batch {inp.micro_batch}" + (" pairs" if inp.job == "rm" else ""),
             f"seq {inp.seq_len if inp.job == 'rm' else inp.prompt_len + inp.gen_len}",
             "grad-ckpt" if inp.grad_ckpt else "no grad-ckpt", inp.attn_implementation]
    if inp.lora_rank:
        parts.append(f"LoRA rank {inp.lora_rank} ({inp.lora_targets})")
    if inp.job == "ppo":
        util = "auto" if inp.vllm_gpu_util is None else f"{inp.vllm_gpu_util:g}"
        parts.append(f"vLLM tp {inp.vllm_tp} util {util}" + (" sleep" if inp.vllm_sleep else ""))
        if not inp.critic:
            parts.append("no critic")
    return ", ".join(parts)


def format_plan(plan: Plan) -> str:
    """A readable per-GPU table (one column per phase), the verdict, host RAM, notes, and the suggestion."""
    inp, est = plan.input, plan.estimate
    lines = [_setup_line(inp), ""]
    names = [p.name for p in est.phases]
    lines.append(f"{'per GPU (GiB)':<20}" + "".join(f"{n:>12}" for n in names))
    for label, attr in _ROWS:
        lines.append(f"{label:<20}" + "".join(f"{getattr(p, attr) / GIB:>12.2f}" for p in est.phases))
    lines.append(f"{'total':<20}" + "".join(f"{p.total_bytes / GIB:>12.2f}" for p in est.phases))
    lines.append("")
    for role, info in est.roles.items():
        if role == "vllm":
            lines.append(f"  vllm: {info['model']} tp {info['tp']}, weights {info['weights_gib']:.2f} GiB/GPU, "
                         f"KV needed {info['kv_needed_gib']:.2f} GiB/GPU")
        else:
            kind = "trained" if info["trainable"] else "frozen"
            if info["trainable"] and info["trainable_params"] < info["params"]:
                kind = f"LoRA rank {inp.lora_rank}: {info['trainable_params'] / 1e6:.1f} M trained"
            lines.append(f"  {role}: {info['model']} ({info['params'] / 1e9:.2f} B params, {kind}): "
                         f"states {info['gpu_gib']:.2f} GiB/GPU, activations {info['activations_gib']:.2f} GiB")
    if inp.job == "ppo":
        lines.append("vLLM KV cache row: vLLM's share beyond its weights (KV blocks + workspace; "
                     f"{VLLM_ASLEEP_GIB:g} GiB residual while asleep)")
    lines.append(f"reserve = {RESERVE_FIXED_GIB:g} GiB fixed (CUDA context, NCCL, workspaces) + "
                 f"{FRAGMENTATION_SHARE_OF_ACTIVATIONS:.0%} of activations (allocator fragmentation)")
    cpu_line = f"host RAM per node: {est.cpu_bytes_per_node / GIB:.1f} GiB (peak, model load included)"
    if inp.cpu_mem_gib is not None:
        cpu_line += f" of {inp.cpu_mem_gib:g} GiB"
    lines.append(cpu_line)
    ck = est.checkpoint
    lines.append(f"checkpoint: {ck['total_bytes'] / GIB:,.1f} GiB per save ({ck['busiest_rank_bytes'] / GIB:,.1f} "
                 f"GiB from the busiest rank, {ck['busiest_node_bytes'] / GIB:,.1f} GiB from the busiest node); at "
                 f"{inp.ckpt_write_gbps:g} GB/s per node a save takes ~{ck['write_s']:,.0f} s: warn the job at least "
                 f"{ck['preempt_lead_s']:,} s before a kill (slurm: #SBATCH --signal=B:USR1@{ck['preempt_lead_s']})")
    lines.extend(f"note: {n}" for n in est.notes)
    peak = est.peak
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(f"verdict: {verdict}: peak {peak.total_bytes / GIB:.2f} GiB ({peak.name}) of "
                 f"{inp.gpu_mem_gib:g} GiB per GPU")
    if not plan.fits:
        if plan.suggestion is None:
            lines.append(f"no combination of the known changes fits (searched up to {inp.max_nodes} nodes)")
        else:
            s = plan.suggestion
            lines.append(f"smallest change that fits: {'; '.join(s.steps)} -> peak "
                         f"{s.estimate.peak.total_bytes / GIB:.2f} GiB, host RAM "
                         f"{s.estimate.cpu_bytes_per_node / GIB:.1f} GiB/node")
    return "\n".join(lines)


def _input_dict(inp: PlanInput) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(PlanInput):
        value = getattr(inp, f.name)
        out[f.name] = value.name if isinstance(value, ModelShape) else value
    return out


def plan_to_dict(plan: Plan) -> dict[str, Any]:
    """JSON-ready form: inputs, per-phase GiB, peak, verdict, host RAM, roles, notes, suggestion."""
    def phase_dict(p: MemoryPhase) -> dict[str, float]:
        d = {attr.replace("_bytes", "_gib"): round(getattr(p, attr) / GIB, 3) for _, attr in _ROWS}
        d["total_gib"] = round(p.total_bytes / GIB, 3)
        return d

    est = plan.estimate
    out = {
        "input": _input_dict(plan.input),
        "phases": {p.name: phase_dict(p) for p in est.phases},
        "peak_phase": est.peak.name,
        "peak_gib": round(est.peak.total_bytes / GIB, 3),
        "gpu_mem_gib": plan.input.gpu_mem_gib,
        "fits": plan.fits,
        "cpu_gib_per_node": round(est.cpu_bytes_per_node / GIB, 3),
        "roles": est.roles,
        "checkpoint": {"total_gib": round(est.checkpoint["total_bytes"] / GIB, 3),
                       "busiest_rank_gib": round(est.checkpoint["busiest_rank_bytes"] / GIB, 3),
                       "busiest_node_gib": round(est.checkpoint["busiest_node_bytes"] / GIB, 3),
                       "write_s": round(est.checkpoint["write_s"], 1),
                       "preempt_lead_s": est.checkpoint["preempt_lead_s"]},
        "notes": list(est.notes),
        "reserve": {"fixed_gib": RESERVE_FIXED_GIB, "share_of_activations": FRAGMENTATION_SHARE_OF_ACTIVATIONS},
        "suggestion": None,
    }
    if plan.suggestion is not None:
        s = plan.suggestion
        out["suggestion"] = {"steps": list(s.steps), "input": _input_dict(s.input),
                             "peak_gib": round(s.estimate.peak.total_bytes / GIB, 3),
                             "cpu_gib_per_node": round(s.estimate.cpu_bytes_per_node / GIB, 3)}
    return out
