"""Memory terms per GPU: model states under DeepSpeed ZeRO (StateBytes, model_state_bytes), activations
(layer_saved_bytes, ActivationBytes, activation_bytes), and the constants every estimate rests on.
"""
from __future__ import annotations

from dataclasses import dataclass

from .shapes import ModelShape

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
