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
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable

GIB = 2**30

# DeepSpeed estimators' default `additional_buffer_factor`: host-side pinned buffers and allocator slack.
DS_CPU_BUFFER_FACTOR = 1.5
# Fixed per-GPU reserve: CUDA context (~0.5 GiB), NCCL communicators and their buffers (~0.5-1 GiB),
# cuBLAS workspaces and DeepSpeed reduce/prefetch buckets (~0.5 GiB); none of it is in the terms above.
RESERVE_FIXED_GIB = 2.0
# The caching allocator fragments around tensors whose sizes change every step (activations); model states
# live in flat buffers allocated once, so only activations get this slack.
FRAGMENTATION_SHARE_OF_ACTIVATIONS = 0.10
# A sleeping vLLM (level 1) keeps its CUDA-graph pools and small buffers on the GPU; an assumed, unmeasured figure.
VLLM_ASLEEP_GIB = 1.0
# vLLM's own forward/sampler workspace next to weights and KV cache, used when no utilization is given.
VLLM_WORKSPACE_GIB = 1.0

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTN_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "eager")
JOBS = ("rm", "ppo")


class ModelConfigError(ValueError):
    """A model folder's config.json is missing, unreadable, or lacks a field the planner needs."""


# ----------------------------------------------------------------------------------------------------------
# Model shapes and exact parameter counts
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """Shape of a Llama-family decoder (Llama, Mistral, Qwen2/2.5, Qwen3): enough to count every parameter.

    head_dim 0 means hidden_size // num_heads. qkv_bias: biases on q/k/v projections (Qwen2).
    qk_norm: RMSNorm over each head of q and k (Qwen3).
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool = False
    qk_norm: bool = False
    head_dim: int = 0

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    def _layer_linears(self) -> dict[str, int]:
        """Parameter count of each module with weights in one decoder layer (DeepSpeed's 'layer' = module)."""
        h, d, a, kv, i = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, self.intermediate_size
        bias = 1 if self.qkv_bias else 0
        mods = {
            "q_proj": h * a * d + bias * a * d,
            "k_proj": h * kv * d + bias * kv * d,
            "v_proj": h * kv * d + bias * kv * d,
            "o_proj": a * d * h,
            "gate_proj": h * i,
            "up_proj": h * i,
            "down_proj": i * h,
            "input_layernorm": h,
            "post_attention_layernorm": h,
        }
        if self.qk_norm:
            mods["q_norm"] = d
            mods["k_norm"] = d
        return mods

    def num_params(self, head: str) -> int:
        """Exact parameter count. head: 'lm' (causal LM: actor, reference) or 'scalar' (RM / critic: h x 1 score)."""
        body = self.vocab_size * self.hidden_size + self.num_layers * sum(self._layer_linears().values())
        body += self.hidden_size  # final norm
        if head == "lm":
            return body + (0 if self.tie_embeddings else self.vocab_size * self.hidden_size)
        if head == "scalar":
            return body + self.hidden_size  # nn.Linear(h, 1, bias=False), as transformers' score head
        raise ValueError(f"head must be 'lm' or 'scalar', got {head!r}")

    def lora_params(self, rank: int, targets: tuple[str, ...], head: str) -> int:
        """Trainable parameters with LoRA: rank x (in + out) per targeted linear per layer, plus a scalar head
        (trained fully); the lm head is not adapted."""
        h, d, a, kv, i = self.hidden_size, self.head_dim, self.num_heads, self.num_kv_heads, self.intermediate_size
        in_out = {"q_proj": (h, a * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (a * d, h),
                  "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
        per_layer = sum(rank * sum(in_out[t]) for t in targets)
        return self.num_layers * per_layer + (h if head == "scalar" else 0)

    def largest_layer_params(self, head: str) -> int:
        """Params of the largest single module, as DeepSpeed's `model_to_params` counts it (ZeRO-3 gathers it whole)."""
        embed = self.vocab_size * self.hidden_size  # a tied lm_head is the same module's weight
        return max(embed, max(self._layer_linears().values()))


LORA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_target_names(spec) -> tuple[str, ...]:
    """--lora_target_modules (a list or a comma-separated string) -> the adapted Llama-family linears;
    'auto' and 'all-linear' adapt all seven."""
    names = [n.strip() for part in ([spec] if isinstance(spec, str) else spec) for n in str(part).split(",") if n.strip()]
    if not names or set(names) & {"auto", "all-linear", "all"}:
        return LORA_LINEARS
    unknown = sorted(set(names) - set(LORA_LINEARS))
    if unknown:
        raise ValueError(f"lora targets {unknown} are not linears the planner knows: {', '.join(LORA_LINEARS)}, "
                         "auto or all-linear")
    return tuple(n for n in LORA_LINEARS if n in names)


def _known(name, h, layers, heads, kv, inter, vocab, tied, bias=False) -> ModelShape:
    return ModelShape(name, h, layers, heads, kv, inter, vocab, tied, qkv_bias=bias)


# Real shapes from each model's config.json on the Hugging Face hub.
KNOWN_MODELS: dict[str, ModelShape] = {
    m.name: m
    for m in (
        _known("llama3-8b", 4096, 32, 32, 8, 14336, 128256, False),
        _known("llama3-70b", 8192, 80, 64, 8, 28672, 128256, False),
        _known("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, False, bias=True),
        _known("qwen2.5-14b", 5120, 48, 40, 8, 13824, 152064, False, bias=True),
        _known("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, False, bias=True),
        _known("mistral-7b", 4096, 32, 32, 8, 14336, 32000, False),  # v0.1; v0.3 has vocab 32768
    )
}
_ALIASES = {
    "metallama38b": "llama3-8b", "metallama370b": "llama3-70b", "llama318b": "llama3-8b",
    "llama3170b": "llama3-70b", "llama3370b": "llama3-70b", "mistral7bv01": "mistral-7b",
}


def _key(name: str) -> str:
    """'meta-llama/Meta-Llama-3-8B-Instruct' -> 'metallama38b': org, -instruct, punctuation and case dropped."""
    base = name.rsplit("/", 1)[-1].lower()
    base = re.sub(r"[-_](instruct|chat|base|hf)$", "", base)
    return re.sub(r"[^a-z0-9]", "", base)


def _read_config_json(path: str) -> ModelShape:
    try:
        with open(path) as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelConfigError(f"{path}: cannot read model config: {e}") from e
    if not isinstance(cfg, dict):
        raise ModelConfigError(f"{path}: expected a JSON object")
    if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]  # multimodal wrappers keep the decoder's shape here
    if any(k in cfg for k in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ModelConfigError(f"{path}: mixture-of-experts models are not supported by the planner")

    def need(key):
        if key not in cfg:
            raise ModelConfigError(f"{path}: missing required field {key!r} (needs hidden_size, "
                                   "num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)")
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ModelConfigError(f"{path}: field {key!r} must be a positive integer, got {value!r}")
        return value

    h, layers, heads = need("hidden_size"), need("num_hidden_layers"), need("num_attention_heads")
    inter, vocab = need("intermediate_size"), need("vocab_size")
    model_type = cfg.get("model_type", "")
    return ModelShape(
        name=os.path.basename(os.path.dirname(os.path.abspath(path))) or path,
        hidden_size=h, num_layers=layers, num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        intermediate_size=inter, vocab_size=vocab,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # Llama/Qwen2 configs default to untied
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),  # Qwen2 hard-codes q/k/v biases
        qk_norm=model_type.startswith("qwen3"),
        head_dim=cfg.get("head_dim") or 0,
    )


def resolve_model(name_or_path: str | ModelShape) -> ModelShape:
    """A ModelShape from a built-in name ('llama3-8b', 'Qwen/Qwen2.5-7B'), a model folder, or a config.json path.

    Raises ModelConfigError for a bad config file and ValueError (listing the known names) for an unknown name.
    """
    if isinstance(name_or_path, ModelShape):
        return name_or_path
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.exists(cfg_path):
            raise ModelConfigError(f"{path}: model folder has no config.json")
        return _read_config_json(cfg_path)
    if path.endswith(".json") and os.path.exists(path):
        return _read_config_json(path)
    key = _key(name_or_path)
    by_key = {_key(n): n for n in KNOWN_MODELS}
    name = by_key.get(key) or _ALIASES.get(key)
    if name is None:
        raise ValueError(f"unknown model {name_or_path!r}: not a folder with config.json and not a built-in "
                         f"name; known names: {', '.join(KNOWN_MODELS)}")
    return KNOWN_MODELS[name]


# ----------------------------------------------------------------------------------------------------------
# Model states (DeepSpeed ZeRO)
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class StateBytes:
    """One model's states: resident partitions per GPU, the ZeRO-3 gathered working set, host RAM per node.

    gathered_*: the largest layer gathered whole (params, and its grads before reduce-scatter); live only
    while this model computes, so a plan of several models counts only the largest one.
    """

    params_bytes: float
    grads_bytes: float
    optimizer_bytes: float
    gathered_params_bytes: float
    gathered_grads_bytes: float
    cpu_bytes_per_node: float

    @property
    def gpu_bytes(self) -> float:
        return (self.params_bytes + self.grads_bytes + self.optimizer_bytes
                + self.gathered_params_bytes + self.gathered_grads_bytes)


def model_state_bytes(n_params: int, largest_layer_params: int, *, trainable: bool, zero: int,
                      offload_optimizer: bool, offload_param: bool, dtype: str,
                      gpus_per_node: int, nodes: int) -> StateBytes:
    """Params / grads / Adam bytes per GPU and host bytes per node for one model under ZeRO `zero`.

    Mixed precision (bf16/fp16) keeps per parameter: 2 B weights, 2 B grads, and in fp32 a 4 B grad copy,
    4 B master weights, 8 B Adam (m, v): DeepSpeed's "18 = 2 grads16 + 4 grads32 + 4 params32 + 8 optim".
    fp32 drops the master copy and the fp32 grad copy. A frozen model (trainable=False) keeps weights only.
    Host bytes follow DeepSpeed's estimators (x1.5 buffer factor; ZeRO-3 assumes zero.Init).
    """
    w = DTYPE_BYTES[dtype]
    mixed = w < 4
    master = 4 if mixed else 0
    grad32 = 4 if mixed else 0
    adam = 8
    n_gpus = gpus_per_node * nodes
    p, big = float(n_params), float(largest_layer_params)
    buf = DS_CPU_BUFFER_FACTOR
    # Before ZeRO shards anything, each rank on a node materializes the model once in fp32 on the host.
    load_cpu_per_node = p * 4 * gpus_per_node * buf

    if not trainable:
        if zero == 3 and offload_param:
            return StateBytes(0, 0, 0, w * big, 0, p * w / nodes * buf)
        if zero == 3:
            return StateBytes(w * p / n_gpus, 0, 0, w * big, 0, big * 4 * gpus_per_node * buf)
        return StateBytes(w * p, 0, 0, 0, 0, load_cpu_per_node)

    if zero == 3:
        # DeepSpeed budgets 4*largest_layer (gathered 16-bit params + grads) and 18 B/param sharded
        # (mixed precision): 2 weights + 4 grads + 12 fp32 master/Adam. fp32: 4 + 4 + 8.
        grads_z3 = 4
        if offload_optimizer and offload_param:
            return StateBytes(0, 0, 0, w * big, w * big, p * (16 + w) / nodes * buf)
        if offload_optimizer:
            return StateBytes(w * p / n_gpus, 0, 0, w * big, w * big, p * 16 / nodes * buf)
        return StateBytes(w * p / n_gpus, grads_z3 * p / n_gpus, (master + adam) * p / n_gpus,
                          w * big, w * big, big * 4 * gpus_per_node * buf)
    if offload_param:
        raise ValueError("param offload needs ZeRO-3")
    if offload_optimizer:
        # Optimizer states, fp32 grads and master weights (16 B/param) live on the hosts, split over nodes
        # (DeepSpeed's stage-2 estimator does not divide by nodes; its stage-3 one does, as here).
        cpu = p * max(4 * gpus_per_node, 16 / nodes) * buf
        grads_gpu = w * p if zero <= 1 else 0.0  # ZeRO-2 streams each reduced bucket to the host
        return StateBytes(w * p, grads_gpu, 0, 0, 0, cpu)
    if zero == 2:
        return StateBytes(w * p, (w + grad32) * p / n_gpus, (master + adam) * p / n_gpus, 0, 0, load_cpu_per_node)
    if zero == 1:
        return StateBytes(w * p, w * p + grad32 * p / n_gpus, (master + adam) * p / n_gpus, 0, 0, load_cpu_per_node)
    return StateBytes(w * p, (w + grad32) * p, (master + adam) * p, 0, 0, load_cpu_per_node)


# ----------------------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------------------

def layer_saved_bytes(shape: ModelShape, batch_seqs: int, seq_len: int, dtype: str, attn_implementation: str) -> float:
    """Bytes one decoder layer saves for backward (HF Llama-family code), per GPU.

    batch_seqs x seq_len tokens, T = batch_seqs * seq_len, e = bytes of dtype:
      each RMSNorm (2):  input upcast to fp32 (4 B) + normalized (e) + weighted output (e)   -> (4 + 2e) T h
      attention:         q (e T a d), K and V (e T 2 kv' d), output (e T a d), o_proj input (e T a d),
                         where kv' = heads when HF repeats K/V (sdpa / eager with a padding mask), else kv heads;
                         sdpa / flash add a log-sum-exp (4 B x batch x heads x seq);
                         eager instead keeps the fp32 softmax and its e-byte copy: (4 + e) x batch x heads x seq^2
      MLP (SwiGLU):      gate output, silu(gate), up output, product into down_proj          -> 4 e T I
    """
    e = DTYPE_BYTES[dtype]
    t = batch_seqs * seq_len
    h, a, d, i = shape.hidden_size, shape.num_heads, shape.head_dim, shape.intermediate_size
    kv = shape.num_kv_heads if attn_implementation == "flash_attention_2" else shape.num_heads
    norms = 2 * (4 + 2 * e) * t * h
    if shape.qk_norm:
        norms += (4 + 2 * e) * t * (a + shape.num_kv_heads) * d
    attn = e * t * (a * d + 2 * kv * d + a * d)
    if attn_implementation == "eager":
        attn += (4 + e) * batch_seqs * a * seq_len * seq_len
    else:
        attn += e * t * a * d + 4 * batch_seqs * a * seq_len
    mlp = 4 * e * t * i
    return norms + attn + mlp


@dataclass(frozen=True)
class ActivationBytes:
    """Peak activation memory of one forward(+backward) per GPU: saved tensors plus the backward working set."""

    saved_bytes: float
    working_bytes: float

    @property
    def total_bytes(self) -> float:
        return self.saved_bytes + self.working_bytes


def activation_bytes(shape: ModelShape, *, batch_seqs: int, seq_len: int, dtype: str, grad_ckpt: bool,
                     head: str, attn_implementation: str = "sdpa", training: bool = True) -> ActivationBytes:
    """Activation bytes per GPU for `batch_seqs` sequences of `seq_len` tokens through the whole model.

    training, no checkpointing: every layer's saved tensors (`layer_saved_bytes`) stay until backward.
    training, checkpointing: each layer keeps only its input (e T h); one layer at a time is recomputed.
    Plus the final norm and the head: 'lm' keeps the logits (e T V) and the fp32 log-softmax (4 T V) a policy
    loss needs; 'scalar' (RM, critic) has a T x 1 output, so no vocab-sized term.
    Backward working set: the gradients in flight, e T (I + h) in a layer, or two fp32 T x V at the lm head.
    HF sdpa with a padded batch also builds a (batch, 1, seq, seq) bool mask shared by all layers.
    training=False (reference / reward scoring under no_grad): nothing is saved; the peak is the larger of
    one layer's live intermediates, e T 3I + (8 + 2e) T h, and the head: the last hidden state plus, for
    'lm', the logits, their fp32 copy (16-bit only) and the log-softmax.
    attn_implementation: 'sdpa' (default) assumes padded batches, so HF repeats K/V to all heads; pick
    'flash_attention_2' for unpadded varlen attention (no repeat, no mask).
    """
    e = DTYPE_BYTES[dtype]
    t = batch_seqs * seq_len
    h, i, v = shape.hidden_size, shape.intermediate_size, shape.vocab_size
    mask = batch_seqs * seq_len * seq_len if attn_implementation != "flash_attention_2" else 0
    if not training:
        layer_peak = e * t * 3 * i + (8 + 2 * e) * t * h
        upcast = 4 if e < 4 else 0  # logits.float() is a copy only for 16-bit logits
        head_peak = e * t * h + ((e + upcast + 4) * t * v if head == "lm" else e * t)
        # Without autograd each layer's temporaries are freed before the next runs: the peak is one or the other.
        return ActivationBytes(mask, max(layer_peak, head_peak))
    one_layer = layer_saved_bytes(shape, batch_seqs, seq_len, dtype, attn_implementation)
    if grad_ckpt:
        body = shape.num_layers * e * t * h + one_layer
    else:
        body = shape.num_layers * one_layer
    final_norm = (4 + 2 * e) * t * h
    head_saved = (e + 4) * t * v if head == "lm" else e * t
    working = max(e * t * (i + h), 8 * t * v if head == "lm" else 0)
    return ActivationBytes(mask + body + final_norm + head_saved, working)


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanInput:
    """Every knob of one planned run. `model` is the RM backbone (job 'rm') or the PPO actor.

    PPO roles: critic defaults to reward_model, reward_model and reference default to the actor.
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
            (min(self.nodes, self.gpus_per_node, self.micro_batch, self.seq_len, self.vllm_tp,
                 self.gen_batch, self.prompt_len, self.gen_len) >= 1, "counts and lengths must be >= 1"),
            (self.gpu_mem_gib > 0, "gpu_mem_gib must be > 0"),
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
class Phase:
    """Per-GPU bytes in one phase of the job (RM: 'train'; PPO: 'train' and 'generate').

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

    phases: tuple[Phase, ...]
    cpu_bytes_per_node: float
    roles: dict[str, dict[str, Any]]
    notes: tuple[str, ...]
    vllm_starts: bool = True

    @property
    def peak(self) -> Phase:
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
        ("reward_model", reward, "scalar", False),
    ]


def _add_states(a: StateBytes, b: StateBytes) -> StateBytes:
    return StateBytes(*(x + y for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b))))


def _role_states(inp: PlanInput, shape: ModelShape, head: str, trainable: bool, offload_param: bool) -> tuple[StateBytes, int]:
    """(states, trainable parameter count) of one role; LoRA: frozen base + trained adapters and head."""
    kw = dict(zero=inp.zero, offload_optimizer=inp.offload_optimizer and trainable, offload_param=offload_param,
              dtype=inp.dtype, gpus_per_node=inp.gpus_per_node, nodes=inp.nodes)
    n = shape.num_params(head)
    if not (trainable and inp.lora_rank):
        return model_state_bytes(n, shape.largest_layer_params(head), trainable=trainable, **kw), n if trainable else 0
    adapters = shape.lora_params(inp.lora_rank, lora_target_names(inp.lora_targets), head)
    largest_adapter = inp.lora_rank * (shape.hidden_size + max(shape.intermediate_size, shape.num_heads * shape.head_dim))
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

    if inp.job == "rm":
        phase = Phase("train", params, grads, optim, act, 0.0, 0.0, _reserve_bytes(act))
        return Estimate((phase,), cpu, roles, tuple(notes))

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
    train = Phase("train", params, grads, optim, act,
                  0.0 if asleep is not None else weights, asleep if asleep is not None else kv_cache,
                  _reserve_bytes(act))
    generate = Phase("generate", params - top.gathered_params_bytes, grads - top.gathered_grads_bytes, optim,
                     0.0, weights, kv_cache, _reserve_bytes(0.0))
    roles["vllm"] = {"model": actor.name, "tp": inp.vllm_tp, "weights_gib": round(weights / GIB, 3),
                     "kv_cache_gib": round(kv_cache / GIB, 3), "kv_needed_gib": round(kv_needed / GIB, 3)}
    return Estimate((train, generate), cpu, roles, tuple(notes), vllm_starts)


# ----------------------------------------------------------------------------------------------------------
# Smallest change that fits
# ----------------------------------------------------------------------------------------------------------

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
    unknown = set(values) - {f.name for f in dataclasses.fields(PlanInput)}
    if unknown:
        raise ValueError(f"unknown plan fields: {sorted(unknown)}")
    return make_plan(PlanInput(**values))


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------

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
    def phase_dict(p: Phase) -> dict[str, float]:
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
