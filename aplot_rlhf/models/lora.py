"""LoRA adapters (peft) on the reward model, the PPO actor and the critic, and their merged weights.

The base weights stay frozen (no gradients, no optimizer states); only the adapters and the scalar head
(reward model's `score`/`classifier`, critic's value head, kept outside peft) train. Merged weights
(W + scale * B @ A) are computed one decoder layer at a time, gathered under ZeRO-3, and named as the
plain transformers model names them: the export and the vLLM weight sync see an ordinary model.

Precision: the sum is formed in fp32 and rounded once. Rounded to bf16 (8 mantissa bits), a LoRA update
smaller than half a unit in the last place of W vanishes: with W ~ N(0, 0.02) an update of rms 1.4e-5 is
lost in 84% of the entries, 4.3e-5 in 58%, 1.4e-4 in 24%, while the trainer's unmerged forward keeps it.
So the export writes the merge in fp32 (MERGED_EXPORT_DTYPE); the vLLM sync still rounds to the engine's
dtype, and PPO measures and can correct what that costs (--rollout_is, trainers/ppo_math.rollout_is_weights).
"""
from __future__ import annotations

import os
import re

import torch
from torch import nn

# every linear layer of a decoder block / an encoder block, per model_type; others: peft's 'all-linear'
_LLAMA_LIKE = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGETS = {
    **{t: _LLAMA_LIKE for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "smollm3")},
    **{t: ["query", "key", "value", "dense"] for t in ("bert", "roberta", "xlm-roberta", "electra")},
}
HEAD_NAMES = ("score", "classifier")  # transformers' sequence-classification heads: trained fully, never adapted
_LORA_PARTS = re.compile(r"\.(base_layer|lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(\.|$)")
_PREFIX = "base_model.model."
# the dtype of a merged export: fp32 keeps W + B @ A where bf16 and fp16 round small updates away
MERGED_EXPORT_DTYPE = torch.float32


def resolve_targets(spec, model_type: str):
    """--lora_target_modules -> peft's target_modules: 'auto' (this table), 'all-linear', or names."""
    names = [s for part in ([spec] if isinstance(spec, str) else spec) for s in str(part).split(",") if s.strip()]
    if names in (["auto"], []):
        return DEFAULT_TARGETS.get(model_type, "all-linear")
    if names == ["all-linear"]:
        return "all-linear"
    return [n.strip() for n in names]


def apply_lora(model: nn.Module, *, rank: int, alpha: float, dropout: float, targets, heads=(),
               gradient_checkpointing: bool = False):
    """Wrap `model` in a peft LoRA model; only the adapters and the named head modules stay trainable.

    heads: attribute names of head modules on `model` (trained fully, excluded from the adapters)."""
    from peft import LoraConfig, get_peft_model
    present = [h for h in heads if isinstance(getattr(model, h, None), nn.Module)]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=resolve_targets(targets, getattr(model.config, "model_type", "")),
                        exclude_modules=rf"(.*\.)?({'|'.join(present)})(\..*)?" if present else None)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:  # peft: "Target modules {...} not found in the base model"
        from ..errors import ConfigError
        raise ConfigError(f"--lora_target_modules {targets!r}: {exc}") from exc
    for h in present:
        for p in getattr(model, h).parameters():
            p.requires_grad_(True)
    if gradient_checkpointing:  # checkpointed blocks need an input that requires grad when only adapters train
        peft_model.enable_input_require_grads()
    return peft_model


def is_lora(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def hf_name(name: str) -> str:
    """peft's parameter name -> the plain transformers name ('...q_proj.base_layer.weight' -> '...q_proj.weight')."""
    name = name[len(_PREFIX):] if name.startswith(_PREFIX) else name
    return name.replace(".base_layer.", ".")


def _owner(name: str) -> str:
    """The group a parameter is gathered with: its decoder layer ('model.layers.3'), else its module."""
    plain = _LORA_PARTS.split(name[len(_PREFIX):] if name.startswith(_PREFIX) else name)[0]
    parts = plain.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else plain


def _lora_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def iter_merged_named_params(model: nn.Module, gather, dtype: torch.dtype | None = None):
    """(plain HF name, merged full tensor) per parameter, one layer gathered at a time under ZeRO-3.

    gather(params): a context manager that makes those (ZeRO-3 partitioned) parameters whole while open;
    the engine passes its own (engine.deepspeed.gathered_params), so this module needs no DeepSpeed.
    dtype: of the floating-point tensors yielded (default: each parameter's own, as the vLLM sync wants).

    A LoRA-wrapped linear yields W + scale * B @ A (peft's own delta), summed in fp32 and rounded once to
    `dtype`, on the parameter's device; the adapters themselves are not yielded. Tensors are valid until
    the next item is requested."""
    layers = _lora_layers(model)
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():
        groups.setdefault(_owner(name), []).append((name, p))
    for members in groups.values():
        with gather([p for _, p in members]):
            for name, p in members:
                if ".lora_" in name:
                    continue
                if name.endswith(".base_layer.weight"):
                    layer = layers[name[:-len(".base_layer.weight")]]
                    delta = sum(layer.get_delta_weight(a).float() for a in layer.active_adapters)
                    yield hf_name(name), (p.data.float() + delta).to(dtype or p.dtype)
                else:
                    yield hf_name(name), p.data if dtype is None or not p.is_floating_point() else p.data.to(dtype)


def merged_state_dict(model: nn.Module, gather, keep: bool = True,
                      dtype: torch.dtype | None = MERGED_EXPORT_DTYPE) -> dict | None:
    """The merged model's full state dict (plain HF names, CPU) where `keep` (rank 0), None elsewhere;
    floating-point tensors in `dtype` (default fp32, what keeps the update; None: each parameter's own).

    Every rank must call it (gathers are collective); gather as in iter_merged_named_params."""
    out = {} if keep else None
    for name, tensor in iter_merged_named_params(model, gather, dtype):
        if out is not None:
            out[name] = tensor.detach().cpu().clone()
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers():  # buffers are never partitioned
        if name in persistent and out is not None:
            buf = buf.detach().cpu()
            out[hf_name(name)] = (buf.to(dtype) if dtype is not None and buf.is_floating_point() else buf).clone()
    return out


def adapter_state_dict(model: nn.Module, gather, keep: bool = True, heads=HEAD_NAMES) -> dict | None:
    """Adapter (and head) tensors in peft's saved-file naming where `keep` (rank 0), None elsewhere;
    gather as in iter_merged_named_params."""
    base = model.get_base_model()
    head_prefixes = tuple(f"{_PREFIX}{h}." for h in heads if isinstance(getattr(base, h, None), nn.Module))
    out = {} if keep else None
    for name, p in model.named_parameters():
        if ".lora_" not in name and not name.startswith(head_prefixes):
            continue
        with gather([p]):
            if out is not None:
                out[name.replace(".default.", ".")] = p.data.detach().cpu().clone()
    return out


def save_adapter(model: nn.Module, state: dict, out_dir: str, heads=HEAD_NAMES) -> None:
    """Write a peft adapter folder (adapter_config.json + adapter_model.safetensors) that
    `PeftModel.from_pretrained(base, out_dir)` loads; the trained head is saved as peft's modules_to_save."""
    import copy

    from safetensors.torch import save_file
    config = copy.deepcopy(model.peft_config["default"])
    base = model.get_base_model()
    present = [h for h in heads if isinstance(getattr(base, h, None), nn.Module)]
    config.modules_to_save = present or None
    if isinstance(config.target_modules, set):
        config.target_modules = sorted(config.target_modules)
    config.base_model_name_or_path = getattr(base, "name_or_path", None)
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (ZeRO-3 partitioned parameters count their full size)."""
    numel = lambda p: p.ds_numel if hasattr(p, "ds_numel") else p.numel()  # noqa: E731
    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)
