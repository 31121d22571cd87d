"""Dropout off everywhere in a model: modules, and the float rates that attention layers read directly.

Transformers' attention layers do not use `nn.Dropout`: they copy `config.attention_dropout` (or
`attn_pdrop`, ...) into a float attribute at init and pass it to the attention kernel while training.
Zeroing only `nn.Dropout` modules leaves those on, so train-mode and eval-mode forwards differ.
"""
from __future__ import annotations

from torch import nn

_RATE_WORDS = ("dropout", "pdrop")


def _is_rate(name: str, value) -> bool:
    return isinstance(value, float) and not isinstance(value, bool) and any(w in name.lower() for w in _RATE_WORDS)


def _zero_config(config, seen: set) -> int:
    if config is None or id(config) in seen:
        return 0
    seen.add(id(config))
    n = 0
    for name, value in list(vars(config).items()):
        if _is_rate(name, value) and value != 0.0:
            setattr(config, name, 0.0)
            n += 1
        elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (text_config, ...)
            n += _zero_config(value, seen)
    return n


def disable_dropout(model: nn.Module) -> int:
    """Set every dropout probability in `model` (and its configs) to 0; returns how many were non-zero."""
    n, seen = 0, set()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            n += m.p != 0.0
            m.p = 0.0
            continue
        for name, value in list(vars(m).items()):
            if _is_rate(name, value) and value != 0.0:
                setattr(m, name, 0.0)
                n += 1
        n += _zero_config(getattr(m, "config", None), seen)
    return n
