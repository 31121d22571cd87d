"""The smallest change that fits: the knobs the search may turn (Change, CHANGES), find_smallest_change, and
make_plan / plan_from_namespace, which return a Plan (estimate, verdict, suggestion).
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from .breakdown import Estimate, PlanInput, estimate
from .shapes import resolve_model


@dataclass(frozen=True)
class Change:
    """One knob the search may turn. candidates(inp) yields modified inputs, least aggressive first."""

    name: str
    applies: Callable[[PlanInput], bool]
    candidates: Callable[[PlanInput], list[PlanInput]]
    describe: Callable[[PlanInput, PlanInput], str]


def _halvings(inp: PlanInput) -> list[PlanInput]:
    out, mb = [], inp.micro_batch
    while mb > 1:
        mb //= 2
        out.append(dataclasses.replace(inp, micro_batch=mb))
    return out


CHANGES: tuple[Change, ...] = (
    Change("grad_ckpt", lambda i: not i.grad_ckpt,
           lambda i: [dataclasses.replace(i, grad_ckpt=True)],
           lambda a, b: "enable gradient checkpointing (--grad-ckpt)"),
    Change("micro_batch", lambda i: i.micro_batch > 1, _halvings,
           lambda a, b: f"micro-batch {a.micro_batch} -> {b.micro_batch} (--micro-batch {b.micro_batch}; raise "
                        f"gradient accumulation x{a.micro_batch // b.micro_batch} to keep the global batch)"),
    Change("vllm_sleep", lambda i: i.job == "ppo" and not i.vllm_sleep,
           lambda i: [dataclasses.replace(i, vllm_sleep=True)],
           lambda a, b: "put vLLM to sleep while training (--vllm-sleep)"),
    Change("zero3", lambda i: i.zero < 3,
           lambda i: [dataclasses.replace(i, zero=3)],
           lambda a, b: f"ZeRO-{a.zero} -> ZeRO-3 (--zero 3)"),
    Change("offload_optimizer", lambda i: not i.offload_optimizer,
           lambda i: [dataclasses.replace(i, offload_optimizer=True, zero=max(i.zero, 2))],
           lambda a, b: "offload optimizer states to CPU (--offload-optimizer"
                        + (f" --zero {b.zero})" if b.zero != a.zero else ")")),
    Change("offload_param", lambda i: not i.offload_param,
           lambda i: [dataclasses.replace(i, offload_param=True, offload_optimizer=True, zero=3)],
           lambda a, b: "offload parameters to CPU (--offload-param; implies --offload-optimizer --zero 3)"),
    Change("nodes", lambda i: i.nodes < i.max_nodes,
           lambda i: [dataclasses.replace(i, nodes=n) for n in range(i.nodes + 1, i.max_nodes + 1)],
           lambda a, b: f"{a.nodes} -> {b.nodes} nodes (--nodes {b.nodes}, {b.n_gpus} GPUs)"),
)


@dataclass(frozen=True)
class Suggestion:
    """The first single change, or shortest combination, from CHANGES (in that order) that makes the run fit."""

    steps: tuple[str, ...]
    input: PlanInput
    estimate: Estimate


def _fits(inp: PlanInput) -> bool:
    try:
        return estimate(inp).fits(inp)
    except ValueError:
        return False  # a combination that makes no valid setup (e.g. vllm_tp vs GPUs) does not count


def find_smallest_change(inp: PlanInput) -> Suggestion | None:
    """Try single changes in CHANGES order, then pairs, triples...; graded knobs back off to the mildest setting.

    Returns None when nothing up to `inp.max_nodes` nodes fits.
    """
    usable = [c for c in CHANGES if c.applies(inp)]
    for k in range(1, len(usable) + 1):
        for combo in itertools.combinations(usable, k):
            chosen = {c.name: c.candidates(inp)[-1] for c in combo}  # strongest setting of each knob first
            if not _fits(_apply_combo(inp, combo, chosen)):
                continue
            for change in combo:  # then soften each graded knob to its mildest setting that still fits
                for cand in change.candidates(inp):
                    if _fits(_apply_combo(inp, combo, {**chosen, change.name: cand})):
                        chosen[change.name] = cand
                        break
            final = _apply_combo(inp, combo, chosen)
            steps = tuple(c.describe(inp, chosen[c.name]) for c in combo)
            return Suggestion(steps, final, estimate(final))
    return None


def _apply_combo(base: PlanInput, combo: Iterable[Change], picked: dict[str, PlanInput]) -> PlanInput:
    """`base` with the fields each change's picked candidate (itself `base` + that one change) altered."""
    out = base
    for change in combo:
        diff = {f.name: getattr(picked[change.name], f.name) for f in dataclasses.fields(PlanInput)
                if getattr(picked[change.name], f.name) != getattr(base, f.name)}
        if change.name == "offload_optimizer" and out.zero == 3:
            diff.pop("zero", None)  # never step ZeRO-3 back down to 2
        out = dataclasses.replace(out, **diff)
    return out


@dataclass(frozen=True)
class Plan:
    """An input, what it needs, whether it fits, and (when it does not) the smallest change that does."""

    input: PlanInput
    estimate: Estimate
    fits: bool
    suggestion: Suggestion | None = None


def make_plan(inp: PlanInput) -> Plan:
    """Estimate `inp`; when it does not fit, search CHANGES for the smallest fix."""
    est = estimate(inp)
    fits = est.fits(inp)
    return Plan(inp, est, fits, None if fits else find_smallest_change(inp))


# Attribute names accepted by plan_from_namespace: CLI dest first, then aplot_rlhf.config names.
_NAMESPACE_KEYS = {
    "model": ("model", "model_name_or_path"), "zero": ("zero", "zero_stage"), "dtype": ("dtype", "precision"),
    "micro_batch": ("micro_batch", "micro_batch_size"), "seq_len": ("seq_len", "max_length"),
    "grad_ckpt": ("grad_ckpt", "gradient_checkpointing"), "lora_targets": ("lora_targets", "lora_target_modules"),
}


def plan_from_namespace(ns: Any, **overrides: Any) -> Plan:
    """Plan from any object with attributes named like the CLI flags (argparse.Namespace) or like the
    training config (RMConfig: model_name_or_path, zero_stage, precision, micro_batch_size, max_length,
    gradient_checkpointing, ...). `overrides` win (e.g. nodes=2, gpus_per_node=8, gpu_mem_gib=80, job='rm').
    Missing attributes take PlanInput's defaults; model fields may be names, folders or ModelShapes.
    """
    values: dict[str, Any] = {}
    for f in dataclasses.fields(PlanInput):
        for attr in _NAMESPACE_KEYS.get(f.name, (f.name,)):
            if getattr(ns, attr, None) is not None:
                values[f.name] = getattr(ns, attr)
                break
    values.update({k: v for k, v in overrides.items() if v is not None})
    if not isinstance(values.get("lora_targets", ""), str):  # the training config's list form
        values["lora_targets"] = ",".join(values["lora_targets"])
    if "model" not in values:
        raise ValueError("no model given (model / model_name_or_path)")
    for key in ("model", "critic_model", "reference_model", "reward_model"):
        if values.get(key) is not None:
            values[key] = resolve_model(values[key])
    if values.get("reward_models") is not None:
        values["reward_models"] = tuple(resolve_model(m) for m in values["reward_models"])
    unknown = set(values) - {f.name for f in dataclasses.fields(PlanInput)}
    if unknown:
        raise ValueError(f"unknown plan fields: {sorted(unknown)}")
    return make_plan(PlanInput(**values))
