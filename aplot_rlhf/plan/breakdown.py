"""One planned run's memory: PlanInput (every knob), the per-phase breakdown per GPU, Estimate (phases, host
RAM, verdict) and estimate(), which adds up every role's states, activations and vLLM's share.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .memory import (
    ATTN_IMPLEMENTATIONS,
    DTYPE_BYTES,
    FRAGMENTATION_SHARE_OF_ACTIVATIONS,
    GIB,
    RESERVE_FIXED_GIB,
    VLLM_ASLEEP_GIB,
    VLLM_WORKSPACE_GIB,
    StateBytes,
    activation_bytes,
    model_state_bytes,
)
from .shapes import ModelShape, lora_target_names

JOBS = ("rm", "ppo")


@dataclass(frozen=True)
class PlanInput:
    """Every knob of one planned run. `model` is the RM backbone (job 'rm') or the PPO actor.

    PPO roles: critic defaults to reward_model, reward_model and reference default to the actor;
    reward_models lists the reward models held in process when not exactly that one (() for none).
    micro_batch: pairs per GPU for 'rm' (2 sequences each), sequences per GPU for 'ppo' training.
    seq_len: tokens per sequence for 'rm'; PPO trains on prompt_len + gen_len tokens.
    vllm_gpu_util None: vLLM takes just its weights + the KV cache for gen_batch sequences + a workspace.
    gen_batch: sequences in flight per vLLM engine (each engine spans vllm_tp GPUs).
    cpu_mem_gib None: host RAM is reported but not checked.
    """

    model: ModelShape
    job: str = "rm"
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    zero: int = 3
    offload_optimizer: bool = False
    offload_param: bool = False
    dtype: str = "bf16"
    micro_batch: int = 1
    seq_len: int = 2048
    grad_ckpt: bool = False
    attn_implementation: str = "sdpa"
    critic_model: ModelShape | None = None
    critic: bool = True  # False: a critic-free estimator (grpo, rloo, reinforce_pp) holds no critic at all
    reference_model: ModelShape | None = None
    reward_model: ModelShape | None = None
    reward_models: tuple | None = None  # the in-process reward models (None: one, reward_model or the actor)
    offload_frozen: bool = False
    vllm_tp: int = 1
    vllm_gpu_util: float | None = None
    vllm_sleep: bool = False
    gen_batch: int = 64
    prompt_len: int = 1024
    gen_len: int = 1024
    cpu_mem_gib: float | None = None
    max_nodes: int = 16
    lora_rank: int = 0  # > 0: trained roles hold frozen base weights plus trainable adapters (and scalar heads)
    lora_targets: str = "auto"  # comma-separated linears (q_proj,...,down_proj), auto or all-linear
    ckpt_write_gbps: float = 1.0  # GB/s one node writes to the checkpoint storage (sizes the preemption lead)

    def validate(self) -> "PlanInput":
        checks = [
            (self.job in JOBS, f"job must be one of {JOBS}, got {self.job!r}"),
            (self.zero in (0, 1, 2, 3), f"zero must be 0, 1, 2 or 3, got {self.zero}"),
            (self.dtype in DTYPE_BYTES, f"dtype must be one of {tuple(DTYPE_BYTES)}, got {self.dtype!r}"),
            (self.attn_implementation in ATTN_IMPLEMENTATIONS,
             f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {self.attn_implementation!r}"),
            (not self.offload_param or self.zero == 3, "param offload needs ZeRO-3 (--zero 3)"),
            (not self.offload_param or self.offload_optimizer,
             "param offload without optimizer offload is not a DeepSpeed-estimated setup; add --offload-optimizer"),
            (not self.offload_optimizer or self.zero >= 1, "optimizer offload needs ZeRO-1, 2 or 3"),
            *[(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
              for name in ("nodes", "gpus_per_node", "micro_batch", "seq_len", "vllm_tp", "gen_batch", "prompt_len",
                           "gen_len")],  # the plan CLI's flag names: the field with dashes
            (self.gpu_mem_gib > 0, "gpu_mem_gib must be > 0"),
            (self.ckpt_write_gbps > 0, "ckpt_write_gbps must be > 0"),
            (self.vllm_gpu_util is None or 0 < self.vllm_gpu_util < 1, "vllm_gpu_util must be in (0, 1)"),
            (self.job != "ppo" or self.vllm_tp <= self.gpus_per_node, "vllm_tp must fit inside one node"),
            (self.job != "ppo" or (self.nodes * self.gpus_per_node) % self.vllm_tp == 0,
             "total GPUs must be a multiple of vllm_tp"),
            (self.lora_rank >= 0, f"lora_rank must be >= 0, got {self.lora_rank}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self

    @property
    def n_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class MemoryPhase:
    """Per-GPU bytes in one phase of the job (RM: 'train'; PPO: 'train' and 'generate').

    Named apart from aplot_rlhf.engine.Phase, the profiler's timing phase: this one holds bytes, not seconds.

    vllm_kv_cache_bytes: all of vLLM's share beyond its weights (KV blocks and its workspace), or the
    residual of a sleeping vLLM during 'train'.
    """

    name: str
    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    activations_bytes: float
    vllm_weights_bytes: float
    vllm_kv_cache_bytes: float
    reserve_bytes: float

    @property
    def total_bytes(self) -> float:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes + self.activations_bytes
                + self.vllm_weights_bytes + self.vllm_kv_cache_bytes + self.reserve_bytes)


@dataclass(frozen=True)
class Estimate:
    """What one PlanInput needs: phases per GPU, host RAM per node, and the verdict."""

    phases: tuple[MemoryPhase, ...]
    cpu_bytes_per_node: float
    roles: dict[str, dict[str, Any]]
    notes: tuple[str, ...]
    vllm_starts: bool = True
    checkpoint: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def peak(self) -> MemoryPhase:
        return max(self.phases, key=lambda p: p.total_bytes)

    def fits(self, inp: PlanInput) -> bool:
        gpu_ok = self.peak.total_bytes <= inp.gpu_mem_gib * GIB and self.vllm_starts
        cpu_ok = inp.cpu_mem_gib is None or self.cpu_bytes_per_node <= inp.cpu_mem_gib * GIB
        return gpu_ok and cpu_ok


def _reserve_bytes(activations_bytes: float) -> float:
    return RESERVE_FIXED_GIB * GIB + FRAGMENTATION_SHARE_OF_ACTIVATIONS * activations_bytes


def _role_list(inp: PlanInput) -> list[tuple[str, ModelShape, str, bool]]:
    """(role, shape, head, trainable) for every model the job holds on the GPUs."""
    if inp.job == "rm":
        return [("reward_model", inp.model, "scalar", True)]
    reward = inp.reward_model or inp.model
    # LoRA without a --reference_model: the reference is the actor with its adapters disabled (no copy)
    base_reference = inp.lora_rank > 0 and inp.reference_model is None
    return [
        ("actor", inp.model, "lm", True),
        *([("critic", inp.critic_model or reward, "scalar", True)] if inp.critic else []),
        *([] if base_reference else [("reference", inp.reference_model or inp.model, "lm", False)]),
        # a reward function or a reward-model server holds no weights here: reward_models=() counts none
        *[("reward_model" if i == 0 else f"reward_model_{i + 1}", shape, "scalar", False)
          for i, shape in enumerate(inp.reward_models if inp.reward_models is not None else (reward,))],
    ]


def _add_states(a: StateBytes, b: StateBytes) -> StateBytes:
    return StateBytes(*(x + y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b))))


def _role_states(inp: PlanInput, shape: ModelShape, head: str, trainable: bool,
                 offload_param: bool) -> tuple[StateBytes, int]:
    """(states, trainable parameter count) of one role; LoRA: frozen base + trained adapters and head."""
    kw = dict(zero=inp.zero, offload_optimizer=inp.offload_optimizer and trainable, offload_param=offload_param,
              dtype=inp.dtype, gpus_per_node=inp.gpus_per_node, nodes=inp.nodes)
    n = shape.num_params(head)
    if not (trainable and inp.lora_rank):
        return model_state_bytes(n, shape.largest_layer_params(head), trainable=trainable, **kw), n if trainable else 0
    adapters = shape.lora_params(inp.lora_rank, lora_target_names(inp.lora_targets), head)
    largest_adapter = inp.lora_rank * (shape.hidden_size
                                       + max(shape.intermediate_size, shape.num_heads * shape.head_dim))
    base = model_state_bytes(n, shape.largest_layer_params(head), trainable=False,
                             **dict(kw, offload_optimizer=False))
    if inp.zero < 3:  # frozen base weights: whole on every GPU below ZeRO-3, as a trained model's are
        base = dataclasses.replace(base, params_bytes=DTYPE_BYTES[inp.dtype] * n)
    return _add_states(base, model_state_bytes(adapters, largest_adapter, trainable=True, **kw)), adapters


def estimate(inp: PlanInput) -> Estimate:
    """Per-GPU memory by phase and host RAM per node for `inp` (no verdict search; see make_plan)."""
    inp.validate()
    roles: dict[str, dict[str, Any]] = {}
    states: list[StateBytes] = []
    activations: list[float] = []
    notes: list[str] = []
    seq = inp.seq_len if inp.job == "rm" else inp.prompt_len + inp.gen_len
    batch_seqs = 2 * inp.micro_batch if inp.job == "rm" else inp.micro_batch
    for role, shape, head, trainable in _role_list(inp):
        # Frozen models follow --offload-param too; --offload-frozen offloads only them.
        frozen_offload = (not trainable) and (inp.offload_frozen or inp.offload_param) and inp.zero == 3
        st, n_trainable = _role_states(inp, shape, head, trainable, inp.offload_param if trainable else frozen_offload)
        train_act = activation_bytes(shape, batch_seqs=batch_seqs, seq_len=seq, dtype=inp.dtype,
                                     grad_ckpt=inp.grad_ckpt, head=head,
                                     attn_implementation=inp.attn_implementation, training=trainable)
        # PPO also scores rollouts with the trainable actor and critic under no_grad; training dominates.
        states.append(st)
        activations.append(train_act.total_bytes)
        roles[role] = {"model": shape.name, "params": shape.num_params(head), "trainable": trainable,
                       "trainable_params": n_trainable,
                       "gpu_gib": round(st.gpu_bytes / GIB, 3),
                       "activations_gib": round(train_act.total_bytes / GIB, 3),
                       "cpu_gib_per_node": round(st.cpu_bytes_per_node / GIB, 3)}
    if inp.offload_frozen and inp.zero != 3 and inp.job == "ppo":
        notes.append("offload_frozen needs ZeRO-3; frozen models stay whole on every GPU")

    # Resident partitions add up; gathered layers exist for one model at a time.
    top = max(states, key=lambda s: s.gathered_params_bytes + s.gathered_grads_bytes)
    params = sum(s.params_bytes for s in states) + top.gathered_params_bytes
    grads = sum(s.grads_bytes for s in states) + top.gathered_grads_bytes
    optim = sum(s.optimizer_bytes for s in states)
    act = max(activations)
    cpu = sum(s.cpu_bytes_per_node for s in states)

    ckpt = checkpoint_bytes(inp)
    if inp.job == "rm":
        phase = MemoryPhase("train", params, grads, optim, act, 0.0, 0.0, _reserve_bytes(act))
        return Estimate((phase,), cpu, roles, tuple(notes), checkpoint=ckpt)

    # vLLM: one engine per vllm_tp GPUs, weights and KV heads split over its GPUs.
    actor = inp.model
    vllm_w = 2  # vLLM serves the synced weights in bf16/fp16 whatever the training dtype
    weights = actor.num_params("lm") * vllm_w / inp.vllm_tp
    kv_heads_per_gpu = math.ceil(actor.num_kv_heads / inp.vllm_tp)  # vLLM replicates KV heads when tp > kv
    kv_per_token = 2 * actor.num_layers * kv_heads_per_gpu * actor.head_dim * vllm_w
    kv_needed = kv_per_token * inp.gen_batch * (inp.prompt_len + inp.gen_len)
    vllm_starts = True
    if inp.vllm_gpu_util is None:
        kv_cache = kv_needed + VLLM_WORKSPACE_GIB * GIB
        notes.append(f"vLLM needs gpu_memory_utilization >= {(weights + kv_cache) / (inp.gpu_mem_gib * GIB):.2f} "
                     f"for {inp.gen_batch} sequences of {inp.prompt_len + inp.gen_len} tokens per engine")
    else:
        kv_cache = inp.vllm_gpu_util * inp.gpu_mem_gib * GIB - weights
        kv_room = kv_cache - VLLM_WORKSPACE_GIB * GIB
        if kv_room <= 0:
            vllm_starts = False
            notes.append(f"vLLM cannot start: its weights ({weights / GIB:.1f} GiB per GPU) fill the "
                         f"{inp.vllm_gpu_util:.2f} share; raise vllm_gpu_util or vllm_tp")
        elif kv_room < kv_needed:
            notes.append(f"vLLM KV cache holds {int(kv_room // (kv_per_token * (inp.prompt_len + inp.gen_len)))} of "
                         f"{inp.gen_batch} full-length sequences at once; generation will queue or preempt")
    asleep = VLLM_ASLEEP_GIB * GIB if inp.vllm_sleep else None
    if inp.vllm_sleep:
        cpu += weights * inp.gpus_per_node  # sleep level 1 parks the weights in pinned host memory
    train = MemoryPhase("train", params, grads, optim, act,
                        0.0 if asleep is not None else weights, asleep if asleep is not None else kv_cache,
                        _reserve_bytes(act))
    generate = MemoryPhase("generate", params - top.gathered_params_bytes, grads - top.gathered_grads_bytes, optim,
                           0.0, weights, kv_cache, _reserve_bytes(0.0))
    roles["vllm"] = {"model": actor.name, "tp": inp.vllm_tp, "weights_gib": round(weights / GIB, 3),
                     "kv_cache_gib": round(kv_cache / GIB, 3), "kv_needed_gib": round(kv_needed / GIB, 3)}
    return Estimate((train, generate), cpu, roles, tuple(notes), vllm_starts, checkpoint=ckpt)


# a preemption save must also wait for the step in flight and the ranks to agree: seconds added to the write
PREEMPT_LEAD_MARGIN_S = 120


def checkpoint_bytes(inp: PlanInput) -> dict[str, float]:
    """What one checkpoint writes: bytes in all, on the busiest rank and on the busiest node, and the seconds
    a save takes at `ckpt_write_gbps` per node, with the slurm warning lead that leaves room for it.

    DeepSpeed writes every trained role's module weights (LoRA: the frozen base too) in the training dtype and
    its optimizer states (mixed precision: fp32 master + Adam m, v = 12 B per trained parameter; fp32: m, v =
    8 B). ZeRO-3 shards both over the ranks; below it rank 0 writes the weights and ZeRO-1/2 shard only the
    optimizer (ZeRO-0: rank 0 writes all)."""
    n, per_node = inp.n_gpus, inp.gpus_per_node
    total = busiest_rank = busiest_node = 0.0  # rank 0 and its node write the most
    for role, shape, head, trainable in _role_list(inp):
        if not trainable:
            continue
        weights = shape.num_params(head) * DTYPE_BYTES[inp.dtype]
        n_trained = (shape.lora_params(inp.lora_rank, lora_target_names(inp.lora_targets), head) if inp.lora_rank
                     else shape.num_params(head))
        optim = n_trained * (8 if inp.dtype == "fp32" else 12)
        total += weights + optim
        sharded = {3: weights + optim, 2: optim, 1: optim}.get(inp.zero, 0.0)
        busiest_rank += weights + optim - sharded + sharded / n
        busiest_node += weights + optim - sharded + sharded * per_node / n
    write_s = busiest_node / (inp.ckpt_write_gbps * 1e9)
    return {"total_bytes": total, "busiest_rank_bytes": busiest_rank, "busiest_node_bytes": busiest_node,
            "write_s": write_s, "preempt_lead_s": math.ceil((write_s + PREEMPT_LEAD_MARGIN_S) / 10) * 10}
