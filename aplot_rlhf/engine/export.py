"""Hugging Face folders from a (ZeRO-3 partitioned, maybe LoRA) model, and the weights the vLLM sync reads.

Written atomically (a temporary folder swapped in); a LoRA model is written merged, in fp32 (a bf16 merge
rounds small LoRA updates away: models/lora.py), with its peft adapter folder beside it. models.lora
computes the merged weights; it receives our gather function.
"""
from __future__ import annotations

import functools
import json
import os
import shutil

import torch

from ..models import lora
from .deepspeed import gathered_params
from .distributed import Phase, barrier, is_rank0


def gathered_state_dict(module: torch.nn.Module) -> dict | None:
    """Full state dict on rank 0 (None elsewhere), gathered one tensor at a time under ZeRO-3.

    One parameter at a time keeps peak GPU memory at one layer's worth, whatever the model size.
    """
    out = {} if is_rank0() else None
    persistent = set(module.state_dict().keys())  # skips non-persistent buffers (e.g. rotary caches)
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in persistent:
            continue
        with gathered_params([tensor]):  # a no-op for tensors ZeRO-3 did not partition (buffers)
            if out is not None:
                out[name] = tensor.data.detach().cpu().clone()
    return out


def iter_gathered_named_params(module: torch.nn.Module, zero3: bool):
    """(HF name, full tensor) for every parameter, gathered one decoder layer at a time under ZeRO-3.

    LoRA: merged weights (W + scale * B @ A) under the plain names. vLLM gets merged weights rather than
    its own LoRA path: the engine keeps serving an ordinary model (same kernels, CUDA graphs, tensor
    parallel layout and weight loader as without LoRA), and merging costs one layer's matmuls per sync."""
    if lora.is_lora(module):
        yield from lora.iter_merged_named_params(module, functools.partial(gathered_params, enabled=zero3))
        return
    groups: dict[str, list] = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:3]) if "layers" in parts[:3] else parts[0]  # model.layers.N, or a top-level module
        groups.setdefault(key, []).append((name, p))
    for members in groups.values():
        with gathered_params([p for _, p in members], enabled=zero3):
            for name, p in members:
                yield name, p.data


def export_pretrained(hf_model, tokenizer, out_dir: str, extra_config: dict | None = None) -> str | None:
    """Consolidate (from ZeRO-3 if needed) and write a transformers folder atomically (rank 0).

    A LoRA (peft) model is written merged (a plain transformers folder) in lora.MERGED_EXPORT_DTYPE (fp32,
    recorded as config.json's dtype, whatever the training precision), and its adapter folder beside it,
    `<out_dir>_adapter`."""
    peft_model = hf_model if lora.is_lora(hf_model) else None
    with Phase.of("export"):
        if peft_model is not None:  # merged one layer at a time; the adapters gathered one tensor at a time
            state = lora.merged_state_dict(peft_model, gathered_params, keep=is_rank0())
            adapter = lora.adapter_state_dict(peft_model, gathered_params, keep=is_rank0())
            hf_model = peft_model.get_base_model()
        else:
            state = gathered_state_dict(hf_model)
        if is_rank0():
            config = hf_model.config
            for k, v in (extra_config or {}).items():
                setattr(config, k, v)
            merged_dtype = lora.MERGED_EXPORT_DTYPE if peft_model is not None else None
            _replace_dir(out_dir, lambda tmp: (hf_model.save_pretrained(tmp, state_dict=state, safe_serialization=True),
                                               _record_dtype(tmp, merged_dtype), tokenizer.save_pretrained(tmp)))
            if peft_model is not None:
                _replace_dir(out_dir.rstrip("/") + "_adapter", lambda tmp: lora.save_adapter(peft_model, adapter, tmp))
        barrier()
    return out_dir if is_rank0() else None


def _record_dtype(folder: str, dtype: torch.dtype | None) -> None:
    """config.json's dtype := `dtype` (save_pretrained records the live model's, the training precision)."""
    if dtype is None:
        return
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = str(dtype).split(".")[1]
    config.pop("torch_dtype", None)  # the older key, which would contradict it
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


def _replace_dir(out_dir: str, write) -> None:
    """write(tmp) into a temporary folder, then swap it in for out_dir."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    old = out_dir.rstrip("/") + ".old"
    if os.path.exists(out_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)

