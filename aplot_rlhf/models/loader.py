"""The one way in for every model and tokenizer a job reads, with the role as data.

Every role (the reward model train_rm trains, a reward model that scores, the PPO actor, reference and
critic, the model eval_rm scores) goes through `load_tokenizer`, `load_config` and `load_model` here, so
an input check added once holds for every role: the path exists (a local folder or file, else a hub name),
a folder holds `config.json` and tokenizer files, safetensors files are whole, a scoring role's checkpoint
has a one-output trained head, GGUF files are de-quantized into ordinary weights, the attention
implementation is registered (ours) or falls back to eager where the model has no sdpa, and gradient
checkpointing is set. Each failure is one line naming the role's flag and the path.

Under ZeRO-3 the caller creates transformers' HfDeepSpeedConfig first (trainers.run.Run.loading), so the
weights are partitioned while loading instead of materialized on one rank.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass

from ..config import reward_specs
from ..errors import InputNotFoundError, ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Role:
    """What a job loads a model for.

    what: the role in messages; flag: the option that names its path; kind: the transformers class
    (seq_cls: AutoModelForSequenceClassification with one output, causal_lm, backbone: AutoModel);
    trained_head: the checkpoint must already hold a trained one-output head (scoring roles)."""
    what: str
    flag: str
    kind: str
    trained_head: bool = False


ROLES = {
    "reward": Role("reward model", "--model_name_or_path", "seq_cls"),  # train_rm: a fresh head on any backbone
    "reward_scorer": Role("reward model", "--reward_model", "seq_cls", trained_head=True),  # PPO's rewards
    "eval": Role("model", "--model", "seq_cls", trained_head=True),  # eval_rm
    "served": Role("reward model", "--model", "seq_cls", trained_head=True),  # serve_rm
    "actor": Role("actor", "--actor_model", "causal_lm"),
    "reference": Role("reference model", "--reference_model", "causal_lm"),
    "critic_from_actor": Role("critic (critic_init 'actor')", "--actor_model", "backbone"),
    "critic_from_reward": Role("critic (critic_init 'reward')", "--reward_model", "seq_cls", trained_head=True),
}

# files a tokenizer is built from (one of them must be in a local folder that carries its own tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "spiece.model",
                   "sentencepiece.bpe.model", "tokenizer.tiktoken", "qwen.tiktoken")


def role(name: str) -> Role:
    if name not in ROLES:
        raise KeyError(f"unknown model role {name!r}; roles: {', '.join(ROLES)}")
    return ROLES[name]


def split_gguf(model_name_or_path: str, gguf_file: str) -> tuple[str, str | None]:
    """Accept a .gguf path in either argument -> (folder, file name or None)."""
    if model_name_or_path.endswith(".gguf") and not gguf_file:
        return os.path.dirname(os.path.abspath(model_name_or_path)), os.path.basename(model_name_or_path)
    if gguf_file and os.path.isabs(gguf_file):
        return os.path.dirname(gguf_file), os.path.basename(gguf_file)
    return model_name_or_path, (gguf_file or None)


def _looks_like_hub_name(path: str) -> bool:
    """'org/name' or 'name': what the hub accepts; anything with a leading '/', '.', '~' or more parts is a path."""
    return bool(path) and not path.startswith(("/", ".", "~")) and path.count("/") <= 1 and "\\" not in path


def resolve(role_name: str, path: str, gguf_file: str = "", weights: bool = True) -> tuple[str, str | None]:
    """(folder or hub name, GGUF file name or None), after checking that a local path is there and whole.

    A path that does not exist locally is taken as a hub name only if it looks like one ('org/name');
    otherwise InputNotFoundError naming the role's flag. A local folder must hold config.json (unless a
    GGUF file is given) and its safetensors files must be as long as their headers say (`weights`: a
    tokenizer alone needs neither)."""
    r = role(role_name)
    if not path:
        raise InputNotFoundError(f"{r.flag}: no path given for the {r.what}")
    folder, gguf = split_gguf(path, gguf_file)
    if gguf:
        file = os.path.join(folder, gguf)
        if not os.path.isfile(file):
            raise InputNotFoundError(f"{r.flag} {path}: GGUF file {file} does not exist")
        return folder, gguf
    if not os.path.exists(folder):
        if _looks_like_hub_name(folder):
            return folder, None
        raise InputNotFoundError(f"{r.flag} {path}: no such folder")
    if not os.path.isdir(folder):
        raise InputNotFoundError(f"{r.flag} {path}: not a folder (a model is a folder with config.json, or a "
                                 ".gguf file)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        if os.path.isfile(os.path.join(folder, "adapter_config.json")):  # <run>/model_adapter, passed for <run>/model
            merged = folder.rstrip("/")[:-len("_adapter")] if folder.rstrip("/").endswith("_adapter") else ""
            use = (f"pass {r.flag} {merged}, the merged model written beside it"
                   if merged and os.path.isfile(os.path.join(merged, "config.json")) else
                   "pass the merged model folder")
            raise ModelError(f"{r.flag} {path}: a LoRA adapter folder, not a model: {use} (or load the adapter "
                             "over its base model with peft)")
        if weights:
            raise ModelError(f"{r.flag} {path}: no config.json in this folder, so it is not a transformers model")
    if not weights:
        return folder, None
    check_safetensors(folder, r.flag)
    return folder, None


def check_safetensors(folder: str, flag: str = "") -> None:
    """ModelError naming the file if a *.safetensors in `folder` is shorter than its header says (a copy
    cut short), read from the 8-byte header length and the header's data offsets: no tensor is loaded."""
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        file = os.path.join(folder, name)
        size = os.path.getsize(file)
        try:
            with open(file, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > size - 8:
                    raise ValueError(f"header of {n} bytes in a file of {size}")
                header = json.loads(fh.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (struct.error, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{flag} {file}: not a readable safetensors file ({exc})".strip()) from None
        if 8 + n + end > size:
            raise ModelError(f"{flag} {file}: {size} bytes, its header needs {8 + n + end}: the file is truncated "
                             "(copy it again)".strip())


def load_tokenizer(role_name: str, path: str, gguf_file: str = "", tokenizer_path: str = "",
                   trust_remote_code: bool = False):
    """The role's tokenizer: from `tokenizer_path` if given, else from the model's folder or GGUF file.

    A local folder without any tokenizer file is refused (transformers would build an empty tokenizer that
    maps every text to a handful of special ids, and the run would train on nothing)."""
    from transformers import AutoTokenizer
    r = role(role_name)
    if tokenizer_path:
        source, gguf, flag = tokenizer_path, None, "--tokenizer_name_or_path"
        if not os.path.exists(source) and not _looks_like_hub_name(source):
            raise InputNotFoundError(f"{flag} {source}: no such folder")
    else:
        source, gguf = resolve(role_name, path, gguf_file, weights=False)
        flag = r.flag
    if not gguf and os.path.isdir(source) and not any(os.path.isfile(os.path.join(source, f))
                                                        for f in TOKENIZER_FILES):
        hint = ", or pass --tokenizer_name_or_path" if r.flag == "--model_name_or_path" and not tokenizer_path else ""
        raise ModelError(f"{flag} {tokenizer_path or path}: no tokenizer files in this folder (looked for "
                         f"{', '.join(TOKENIZER_FILES[:4])}, ...): save the tokenizer with the model{hint}")
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:  # a hub name that is not there (or no network)
        raise InputNotFoundError(f"{flag} {tokenizer_path or path}: no tokenizer could be loaded ({exc})") from None
    if len(tok) < 16:
        raise ModelError(f"{flag} {tokenizer_path or path}: the tokenizer has {len(tok)} tokens: not a real "
                         "vocabulary (are its files missing?)")
    return tok


def load_config(role_name: str, path: str, gguf_file: str = "", trust_remote_code: bool = False):
    """The role's transformers config alone (no weights): cheap start-up checks. A scoring role's config
    must describe one output (num_labels 1)."""
    from transformers import AutoConfig
    r = role(role_name)
    source, gguf = resolve(role_name, path, gguf_file)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **kwargs)
    except OSError as exc:
        raise InputNotFoundError(f"{r.flag} {path}: no model config could be loaded ({exc})") from None
    check_head_outputs(r, path, config)
    return config


def check_head_outputs(r: Role, path: str, config) -> None:
    """A scoring role reads one number per sequence: a classifier saved with several labels is refused."""
    n = getattr(config, "num_labels", 1)
    if r.trained_head and n != 1 and _is_classifier(config):
        raise ModelError(f"{r.flag} {path}: its classification head has {n} outputs (num_labels={n}); a reward "
                         "model has one (train one with train_rm)")


def _is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or ()))


def load_model(role_name: str, path: str, *, gguf_file: str = "", dtype=None, attn_implementation: str = "sdpa",
               gradient_checkpointing: bool = False, trust_remote_code: bool = False,
               allow_untrained_head: bool = False):
    """The role's transformers model (seq_cls: one output; causal_lm; backbone), checked as the module
    docstring says. A scoring role's checkpoint must carry its trained head (else ModelError, or a warning
    with `allow_untrained_head`)."""
    import transformers

    from .packing import ensure_registered
    r = role(role_name)
    source, gguf = resolve(role_name, path, gguf_file)
    attn = ensure_registered(attn_implementation)  # ours (aplot_varlen_sdpa): transformers must know it first
    cls = {"seq_cls": transformers.AutoModelForSequenceClassification, "causal_lm": transformers.AutoModelForCausalLM,
           "backbone": transformers.AutoModel}[r.kind]
    kwargs = {"gguf_file": gguf} if gguf else {}
    if r.kind == "seq_cls":
        kwargs["num_labels"] = 1
        if r.trained_head:
            check_head_outputs(r, path, load_config(role_name, path, gguf_file, trust_remote_code))
    if dtype is not None:
        kwargs["dtype"] = dtype

    def load(**attn_kwargs):
        return cls.from_pretrained(source, trust_remote_code=trust_remote_code, output_loading_info=True,
                                   **attn_kwargs, **kwargs)
    try:
        try:
            model, info = load(attn_implementation=attn)
        except (ValueError, ImportError) as exc:
            if "attn_implementation" not in str(exc) and "sdpa" not in str(exc).lower():
                raise
            log.warning("%s: %s; falling back to eager attention", path, exc)
            model, info = load()
    except OSError as exc:
        raise InputNotFoundError(f"{r.flag} {path}: the {r.what} could not be loaded ({exc})") from None
    if gguf:
        drop_gguf_quantizer(model)
    if r.trained_head:
        fresh = untrained_head_keys(model, info)
        if fresh:
            msg = (f"{r.flag} {path}: the {r.what} has no trained score head ({', '.join(fresh)} newly "
                   "initialized at random, not in the checkpoint), so its scores are noise; pass a folder written "
                   "by train_rm")
            if not allow_untrained_head:
                raise ModelError(msg + ", or --allow_untrained_reward_head to use it anyway")
            log.warning("%s (allowed by --allow_untrained_reward_head)", msg)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def drop_gguf_quantizer(model) -> None:
    """GGUF weights are dequantized at load, but transformers keeps a quantizer that refuses to save;
    the tensors are plain floats, so forget it (the export is then an ordinary HF folder)."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config


def untrained_head_keys(model, loading_info: dict) -> list[str]:
    """Parameters of the scoring head (outside the backbone) that the checkpoint lacked, i.e. that
    transformers initialized at random."""
    prefix = getattr(model, "base_model_prefix", "")
    missing = loading_info.get("missing_keys") or ()
    return sorted(k for k in missing if not (prefix and k.split(".", 1)[0] == prefix))


_UNLIMITED = 10 ** 8  # tokenizers without a limit report int(1e30)


def position_limit(config, tokenizer=None) -> tuple[int, str] | None:
    """(most tokens the model can take, where that number comes from), or None if nothing says.

    The config's position table is the model's hard limit; the tokenizer's model_max_length is
    used only where it is a real number and smaller (RoBERTa-style tables hold two extra rows)."""
    found = []
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and v > 0:
            found.append((v, f"{key}={v} in the model's config"))
            break
    tok_limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    if isinstance(tok_limit, int) and 0 < tok_limit < _UNLIMITED:
        found.append((tok_limit, f"model_max_length={tok_limit} in the tokenizer's config"))
    return min(found) if found else None


def check_max_length(length: int, config, tokenizer=None, *, flag: str = "--max_length", what: str = "model") -> None:
    """ConfigError at start-up if `length` tokens exceed the model's positions (instead of a crash later)."""
    from ..errors import ConfigError
    limit = position_limit(config, tokenizer)
    if limit is not None and length > limit[0]:
        raise ConfigError(f"{flag} {length} is more than the {what} can take: {limit[0]} tokens ({limit[1]}); "
                          f"use {flag} {limit[0]} or less")


def check_run_paths(cfg, job: str) -> None:
    """Every model, tokenizer and GGUF path the run names exists (or is a hub name) and is whole: config.json
    present, safetensors as long as their headers say; PPO's reward model scores with a one-output head.
    Reads no weights (models.loader.resolve)."""
    if job == "rm":
        resolve("reward", cfg.model_name_or_path, cfg.gguf_file)
        tok = cfg.tokenizer_name_or_path
        if tok and not os.path.exists(tok) and tok.startswith(("/", ".", "~")):
            raise InputNotFoundError(f"--tokenizer_name_or_path {tok}: no such folder")
        return
    resolve("actor", cfg.actor_model, cfg.actor_gguf_file)
    if cfg.reference_model:
        resolve("reference", cfg.reference_model)
    for _, kind, target in reward_specs(cfg):
        if kind == "model":
            load_config("reward_scorer", target)  # config.json only: its head has one output
