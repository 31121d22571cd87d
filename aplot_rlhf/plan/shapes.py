"""Model shapes for the planner: ModelShape (exact parameter counts, LoRA adapter counts), the built-in
KNOWN_MODELS, resolve_model (a built-in name, a model folder or a config.json path) and LoRA target names.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass


class ModelConfigError(ValueError):
    """A model folder's config.json is missing, unreadable, or lacks a field the planner needs."""



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
    names = [n.strip() for part in ([spec] if isinstance(spec, str) else spec)
             for n in str(part).split(",") if n.strip()]
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
