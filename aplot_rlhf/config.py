"""Every knob of every job, with its default and meaning, validated in one place.

A config is built from CLI flags, a YAML file (`--config FILE`), or both (flags win). Each dataclass
field carries its help text in `metadata["help"]`; the CLI parser is generated from the fields, so the
flags and the docs cannot drift apart.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import yaml

from .errors import ConfigError, InputNotFoundError

LOSSES = ("bt", "bt_smooth", "margin", "aplot")


def knob(default, help: str, **kw):
    """A dataclass field with a help line (lists get a default factory)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    model_name_or_path: str = knob("", "HF model folder (local path) or hub name; the backbone of the reward model")
    gguf_file: str = knob("", "GGUF file name inside model_name_or_path (or a full path) to load weights from")
    tokenizer_name_or_path: str = knob("", "tokenizer folder; defaults to the model's")
    trust_remote_code: bool = knob(False, "allow custom model code from the model folder")
    embedding_pooling: str = knob("token", "APLOT embedding: 'token' (hidden state at the reward token) or 'mean' "
                                           "(mean over response tokens)")
    gradient_checkpointing: bool = knob(False, "recompute activations in backward to save memory")
    attn_implementation: str = knob("sdpa", "attention kernel passed to transformers (sdpa, eager, flash_attention_2, "
                                    "aplot_varlen_sdpa, flex_attention: --share_prompt's GPU path)")
    disable_dropout: bool = knob(True, "set every dropout to 0 (reward scores should not be noisy)")
    packing: bool = knob(False, "padding-free batches: several sequences share a row, attention stays within each "
                         "(flash_attention_2 varlen when the model runs it, else a block-diagonal mask for sdpa/eager)")
    share_prompt: bool = knob(False, "decoders: lay each pair out as ONE copy of its prompt followed by both "
                              "responses, each attending to the prompt and to itself only, so the prompt is "
                              "computed once (exact). Needs attention sdpa, eager, aplot_varlen_sdpa or "
                              "flex_attention; with flash attention it falls back to the unshared layout (one log "
                              "line); encoders (bidirectional) are refused")
    lora_rank: int = knob(0, "LoRA (peft) rank of the adapters; 0 = full fine-tuning. With LoRA the base weights are "
                          "frozen and only the adapters and the score head train")
    lora_alpha: float = knob(16.0, "LoRA alpha: the adapters' update is scaled by lora_alpha / lora_rank")
    lora_dropout: float = knob(0.0, "dropout on the adapters' inputs (kept even with --disable_dropout; PPO "
                                    "refuses it above 0)")
    lora_target_modules: list = knob(["auto"], "modules that get adapters: 'auto' (every linear layer of the blocks: "
                                     "q/k/v/o/gate/up/down_proj for Llama-family, query/key/value/dense for "
                                     "BERT-family, else peft's all-linear), 'all-linear', or module names")


@dataclass
class DataConfig:
    train_data: list = knob([], "training pair files (jsonl/json/parquet/arrow) or hub dataset names; repeatable")
    eval_data: list = knob([], "eval sets as FILE or NAME=FILE; repeatable; each is reported by name")
    eval_split_fraction: float = knob(0.0, "hold out this fraction of the training pool as eval set 'id_val' (fixed "
                                           "seed)")
    split_seed: int = knob(1234, "seed of the train/validation split (independent of the training seed)")
    duplicate_pairs: str = knob("drop", "training pairs with the same prompt, chosen and rejected: 'drop' (keep the "
                                        "first, count the rest) or 'keep' (counted); either way all copies land on "
                                        "one side of the train/validation split")
    max_train_pairs: int = knob(0, "use only the first N training pairs after the split (0 = all)")
    max_eval_pairs: int = knob(0, "use only the first N pairs of each eval set (0 = all)")
    prompt_key: str = knob("prompt", "key of the prompt (string, or list of chat messages)")
    chosen_key: str = knob("chosen", "key of the preferred response (string, or list of chat messages)")
    rejected_key: str = knob("rejected", "key of the dispreferred response")
    strength_key: str = knob("strength", "key of the graded preference strength, used by the 'margin' loss")
    hub_split: str = knob("train", "split to read when a data entry is a hub dataset name")
    chat_template: str = knob("auto", "'auto' (use the tokenizer's chat template for message lists), 'always', or "
                                      "'never'")
    max_length: int = knob(512, "tokens per sequence (prompt + response); prompts are cut from the left to fit")
    response_separator: str = knob(" ", "text between prompt and response in the plain-text format")
    long_response: str = knob("keep_end", "a response longer than max_length: 'keep_end' (drop the prompt and the "
                                          "response's start, counted) or 'skip' (drop the pair, counted)")
    export_reward_stats_pairs: int = knob(256, "without an eval set, the export's reward mean/std (PPO normalizes "
                                          "scores with them) come from the first N training pairs")
    group_by_length: bool = knob(False, "put pairs of similar length in one micro-batch (less padding; the same pairs "
                                        "per epoch, order still seeded and resumable)")


@dataclass
class LossConfig:
    loss: str = knob("aplot", f"one of {LOSSES}")
    label_smoothing: float = knob(0.1, "bt_smooth: probability mass put on the rejected response")
    margin_scale: float = knob(1.0, "margin loss: margin = strength * margin_scale (pairs without strength get 0)")
    aplot_lambda: float = knob(0.1, "APLOT: weight of the semantic term in the cost, C = (1-lam)*D + lam*S")
    aplot_eps: float = knob(0.1, "APLOT: entropic regularization of the Sinkhorn problem")
    aplot_iters: int = knob(50, "APLOT: Sinkhorn iterations (no early stop)")
    aplot_gamma: float = knob(1.0, "APLOT: margin scale gamma")
    aplot_gamma_warmup_steps: int = knob(0, "APLOT: linear warm-up of gamma from 0 over this many optimizer steps")
    aplot_signed: bool = knob(False, "APLOT: signed reward term 1 - sigmoid(rc_i - rr_j) instead of |.|")
    aplot_ot_batch: str = knob("global", "APLOT: 'global' (all-gather across data-parallel ranks) or 'local' (per "
                                         "rank)")
    aplot_backend: str = knob("auto", "APLOT: Sinkhorn backend: auto | triton | torch")
    aplot_hard_threshold: float = knob(0.3, "APLOT diagnostics: margins above this count as 'hard' pairs "
                                            "(aplot/hard_frac)")
    aplot_easy_threshold: float = knob(0.05, "APLOT diagnostics: margins below this count as 'easy' pairs "
                                             "(aplot/easy_frac)")


@dataclass
class EngineConfig:
    zero_stage: int = knob(3, "DeepSpeed ZeRO stage 0/1/2/3")
    precision: str = knob("bf16", "bf16 | fp16 | fp32 (on CPU: bf16 where it has bf16 units, flags amx_bf16 or "
                                 "avx512_bf16, else fp32; fp16 is fp32)")
    offload_optimizer: bool = knob(False, "ZeRO: keep optimizer states on CPU")
    offload_param: bool = knob(False, "ZeRO-3: keep parameters on CPU")
    optimizer: str = knob("auto", "auto | adamw_torch | fused_adam | cpu_adam (auto: cpu_adam with offload, fused on "
                                  "CUDA, torch AdamW on CPU)")
    ds_config: str = knob("", "DeepSpeed JSON to start from (values 'auto' are filled from this config)")
    micro_batch_size: int = knob(4, "pairs per GPU per micro-step (each pair is two sequences)")
    gradient_accumulation_steps: int = knob(1, "micro-steps per optimizer step")
    learning_rate: float = knob(1e-5, "peak learning rate")
    weight_decay: float = knob(0.0, "AdamW weight decay")
    adam_betas: list = knob([0.9, 0.95], "AdamW betas")
    warmup_ratio: float = knob(0.03, "fraction of optimizer steps spent in linear warm-up")
    lr_scheduler: str = knob("cosine", "cosine | linear | constant (after warm-up)")
    min_lr_ratio: float = knob(0.1, "final learning rate as a fraction of the peak (cosine, linear)")
    max_grad_norm: float = knob(1.0, "gradient clipping (0 = off)")
    timeout_s: int = knob(600, "collective timeout: a rank that dies or hangs fails the others after this")
    dist_backend: str = knob("auto", "auto (nccl on CUDA, gloo on CPU) | nccl | gloo")
    fused_torch_adam: bool = knob(True, "torch AdamW (optimizer adamw_torch, or auto on CPU): its fused one-kernel "
                                        "step instead of the per-tensor loop")


@dataclass
class RunConfig:
    output_dir: str = knob("runs/rm", "where checkpoints, metrics.jsonl, tensorboard logs and the export go")
    seed: int = knob(42, "training seed (model head init, data order, dropout)")
    epochs: float = knob(1.0, "passes over the training pairs")
    max_steps: int = knob(0, "stop after this many optimizer steps (0 = from epochs)")
    eval_steps: int = knob(0, "evaluate every N optimizer steps (0 = only at the end)")
    eval_at_start: bool = knob(False, "also evaluate before the first step")
    eval_batch_size: int = knob(16, "pairs per forward in evaluation")
    save_steps: int = knob(0, "checkpoint every N optimizer steps (0 = only at the end)")
    save_total_limit: int = knob(2, "keep this many most recent checkpoints (0 = keep all)")
    resume: bool = knob(False, "resume from the latest checkpoint in output_dir")
    export: bool = knob(True, "write a transformers folder (AutoModelForSequenceClassification) at the end")
    log_steps: int = knob(1, "log metrics every N optimizer steps")
    tensorboard: bool = knob(True, "write tensorboard event files under output_dir/tb")
    wandb_project: str = knob("", "log to this Weights & Biases project (needs wandb installed)")
    progress: bool = knob(True, "tqdm progress bar on rank 0")
    dry_run: bool = knob(False, "validate the config, read every data file as training would, print the memory plan, "
                                "and exit")
    overwrite_output_dir: bool = knob(False, "without --resume, move an earlier run found in output_dir aside (to "
                                             "previous_run.<time>) instead of refusing to start")
    resume_allow_config_change: bool = knob(False, "--resume even if the config differs from the checkpoint's in keys "
                                                   "that change the model, the data order or the step arithmetic")
    preempt_signals: list = knob(["SIGTERM", "SIGUSR1"], "on these signals (or a file output_dir/PREEMPT) every rank "
                                                         "finishes its optimizer step, all save one checkpoint, and "
                                                         "the run exits with status 75 (requeue it; --resume "
                                                         "continues)")
    checkpoint_storage: str = knob("shared", "shared: output_dir is one folder every rank reads and writes (checked "
                                             "at start-up); per_node: each node writes its own ranks' checkpoint "
                                             "files there, and you copy every node's checkpoints/step_N into one "
                                             "folder before --resume")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_ranges(cfg, rules: dict) -> list[str]:
    """rules: field -> (lo, hi, lo_open, hi_open) with None for an unbounded side; -> one message per violation."""
    errors = []
    for name, (lo, hi, lo_open, hi_open) in rules.items():
        v = getattr(cfg, name)
        ok = _finite(v) and (lo is None or (v > lo if lo_open else v >= lo)) and (
            hi is None or (v < hi if hi_open else v <= hi))
        if not ok:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            span = (f"in {left}{lo}, {hi}{right}" if lo is not None and hi is not None
                    else f"{'>' if lo_open else '>='} {lo}" if lo is not None else f"{'<' if hi_open else '<='} {hi}")
            errors.append(f"{name} must be {span}, got {v!r}")
    return errors


def _at_least(lo):
    return (lo, None, False, False)


def _above(lo):
    return (lo, None, True, False)


_UNIT = (0.0, 1.0, False, False)  # [0, 1]

ENGINE_RANGES = {
    "learning_rate": _above(0.0), "weight_decay": _at_least(0.0), "warmup_ratio": _UNIT, "min_lr_ratio": _UNIT,
    "max_grad_norm": _at_least(0.0), "timeout_s": _above(0), "micro_batch_size": _at_least(1),
    "gradient_accumulation_steps": _at_least(1),
}
RUN_RANGES = {
    "seed": (0, 2 ** 32 - 1, False, False),  # numpy's seed range
    "epochs": _above(0.0), "max_steps": _at_least(0), "eval_steps": _at_least(0), "eval_batch_size": _at_least(1),
    "save_steps": _at_least(0), "save_total_limit": _at_least(0), "log_steps": _at_least(1),
}


def check_engine_and_run(cfg) -> list[str]:
    """Range checks shared by every job (EngineConfig and RunConfig knobs the job has)."""
    rules = {k: v for k, v in {**ENGINE_RANGES, **RUN_RANGES}.items()
             if hasattr(cfg, k) and k not in getattr(cfg, "UNUSED", {})}
    errors = check_ranges(cfg, rules)
    betas = cfg.adam_betas
    if len(betas) != 2 or not all(_finite(b) and 0.0 <= b < 1.0 for b in betas):
        errors.append(f"adam_betas must be two numbers in [0, 1), got {betas!r}")
    if cfg.dist_backend not in ("auto", "nccl", "gloo"):
        errors.append(f"dist_backend must be auto, nccl or gloo, got {cfg.dist_backend!r}")
    if cfg.checkpoint_storage not in ("shared", "per_node"):
        errors.append(f"checkpoint_storage must be shared or per_node, got {cfg.checkpoint_storage!r}")
    return errors


_NAME = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)=(.+)$")


def parse_reward_spec(spec: str) -> tuple[str, str, str]:
    """'[NAME=]SPEC' -> (name, kind, target); kind in rule, python, http, model. The name defaults to the
    rule, the function, 'remote' or the model folder's name (its parent's when the folder is called model)."""
    m = _NAME.match(spec)
    name, spec = (m.group(1), m.group(2)) if m and "/" not in m.group(1) else ("", spec)
    if spec.startswith("rule:"):
        return name or spec.split(":")[1], "rule", spec
    if spec.startswith("python:"):
        target = spec[len("python:"):]
        if target.count(":") < 1 or not target.rsplit(":", 1)[1]:
            raise ConfigError(f"--reward_model {spec}: write python:FILE.py:FUNCTION or python:package.module:FUNCTION")
        return name or target.rsplit(":", 1)[1], "python", target
    if spec.startswith(("http://", "https://")):
        return name or "remote", "http", spec
    folder = os.path.normpath(spec)
    default = os.path.basename(folder)
    if default == "model" and os.path.basename(os.path.dirname(folder)):
        default = os.path.basename(os.path.dirname(folder))
    return name or default, "model", spec


def reward_specs(cfg) -> list[tuple[str, str, str]]:
    """The run's reward sources as (name, kind, target), names made unique (a second 'rm' becomes 'rm_2')."""
    out, seen = [], {}
    for spec in cfg.reward_model:
        name, kind, target = parse_reward_spec(spec)
        seen[name] = seen.get(name, 0) + 1
        out.append((name if seen[name] == 1 else f"{name}_{seen[name]}", kind, target))
    return out


def reward_weights(cfg) -> list[float]:
    return [float(w) for w in cfg.reward_weights] if cfg.reward_weights else [1.0] * len(cfg.reward_model)


def reward_source_errors(cfg) -> list[str]:
    """PPO's --reward_model entries and --reward_weights: the spellings rewards.py reads, one weight each."""
    errors = []
    for spec in cfg.reward_model:
        try:
            _, kind, target = parse_reward_spec(str(spec))
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        if not target.strip():
            errors.append(f"reward_model entry {spec!r} is empty")
        elif kind == "rule" and not (target == "rule:neg_length" or (target.startswith("rule:char_frac:")
                                                                     and len(target) == len("rule:char_frac:C"))):
            errors.append(f"reward_model {target!r}: unknown rule, use rule:neg_length or rule:char_frac:C")
    if cfg.reward_weights:
        if len(cfg.reward_weights) != len(cfg.reward_model):
            errors.append(f"reward_weights has {len(cfg.reward_weights)} value(s) for {len(cfg.reward_model)} "
                          "reward_model source(s): give one weight per source, in the same order")
        try:
            weights = [float(w) for w in cfg.reward_weights]
        except (TypeError, ValueError):
            errors.append(f"reward_weights must be numbers, got {cfg.reward_weights!r}")
        else:
            if not all(math.isfinite(w) for w in weights) or not any(weights):
                errors.append(f"reward_weights must be finite and not all 0, got {cfg.reward_weights!r}")
    return errors


def lora_errors(cfg) -> list[str]:
    """Range checks of the LoRA knobs (both jobs)."""
    errors = check_ranges(cfg, {"lora_rank": _at_least(0), "lora_alpha": _above(0.0),
                                "lora_dropout": (0.0, 1.0, False, True)})
    if not cfg.lora_target_modules or not all(isinstance(t, str) and t.strip() for t in cfg.lora_target_modules):
        errors.append(f"lora_target_modules must be 'auto', 'all-linear' or module names, "
                      f"got {cfg.lora_target_modules!r}")
    return errors


@dataclass
class RMConfig(ModelConfig, DataConfig, LossConfig, EngineConfig, RunConfig):
    """Reward-model training: every knob of the job."""

    def validate(self) -> "RMConfig":
        errors = []
        if not self.model_name_or_path:
            errors.append("model_name_or_path is required")
        if not self.train_data:
            errors.append("train_data needs at least one file")
        if self.loss not in LOSSES:
            errors.append(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            errors.append(f"zero_stage must be 0-3, got {self.zero_stage}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            errors.append(f"precision must be bf16, fp16 or fp32, got {self.precision!r}")
        if self.offload_param and self.zero_stage != 3:
            errors.append("offload_param needs zero_stage 3")
        if self.aplot_ot_batch not in ("global", "local"):
            errors.append(f"aplot_ot_batch must be global or local, got {self.aplot_ot_batch!r}")
        if self.aplot_backend not in ("auto", "triton", "torch"):
            errors.append(f"aplot_backend must be auto, triton or torch, got {self.aplot_backend!r}")
        if self.aplot_eps <= 0 or self.aplot_iters < 1:
            errors.append("aplot_eps must be > 0 and aplot_iters >= 1")
        if not 0.0 <= self.aplot_lambda <= 1.0:
            errors.append(f"aplot_lambda must be in [0, 1], got {self.aplot_lambda}")
        if not 0.0 <= self.label_smoothing < 0.5:
            errors.append(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.embedding_pooling not in ("token", "mean"):
            errors.append(f"embedding_pooling must be token or mean, got {self.embedding_pooling!r}")
        if self.long_response not in ("keep_end", "skip"):
            errors.append(f"long_response must be keep_end or skip, got {self.long_response!r}")
        if self.duplicate_pairs not in ("drop", "keep"):
            errors.append(f"duplicate_pairs must be drop or keep, got {self.duplicate_pairs!r}")
        if self.chat_template not in ("auto", "always", "never"):
            errors.append(f"chat_template must be auto, always or never, got {self.chat_template!r}")
        if self.optimizer not in ("auto", "adamw_torch", "fused_adam", "cpu_adam"):
            errors.append(f"optimizer must be auto, adamw_torch, fused_adam or cpu_adam, got {self.optimizer!r}")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            errors.append(f"lr_scheduler must be cosine, linear or constant, got {self.lr_scheduler!r}")
        if self.max_length < 8:
            errors.append(f"max_length must be >= 8, got {self.max_length}")
        if not 0.0 <= self.eval_split_fraction < 1.0:
            errors.append(f"eval_split_fraction must be in [0, 1), got {self.eval_split_fraction}")
        errors += check_ranges(self, {
            "max_train_pairs": _at_least(0), "max_eval_pairs": _at_least(0), "margin_scale": _at_least(0.0),
            "aplot_gamma": _at_least(0.0), "aplot_gamma_warmup_steps": _at_least(0),
            "aplot_hard_threshold": _at_least(0.0)})
        errors += check_engine_and_run(self) + lora_errors(self)
        from .data.pairs import parse_eval_specs
        try:  # two eval sets under one explicit name: refused before anything loads
            parse_eval_specs(self.eval_data, reserved=("id_val",) if self.eval_split_fraction > 0 else ())
        except ConfigError as exc:
            errors.append(str(exc))
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        return self


def _field_type(f: dataclasses.Field):
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return type(default)


def _default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _help_line(cls, f: dataclasses.Field) -> str:
    """The field's help for this job (a job may override it), with the real default: argparse's own
    default stays None so a YAML file can fill the value."""
    text = getattr(cls, "HELP", {}).get(f.name, f.metadata.get("help", ""))
    default = _default(f)
    if isinstance(default, bool):
        shown = "on" if default else "off"
    elif isinstance(default, list):
        shown = " ".join(map(str, default)) if default else "none"
    elif default == "":
        shown = "none"
    else:
        shown = str(default)
    return f"{text} (default: {shown})".replace("%", "%%")


def build_parser(cls, description: str = "") -> argparse.ArgumentParser:
    """argparse parser with one --flag per dataclass field the job uses (argparse defaults left unset so
    YAML can fill them; the help shows the dataclass default)."""
    parser = argparse.ArgumentParser(description=description or cls.__doc__)
    parser.add_argument("--config", default="", help="YAML file with any of the fields below (flags override it)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    not_flags = {**getattr(cls, "UNUSED", {}), **getattr(cls, "DERIVED", {})}
    for f in dataclasses.fields(cls):
        if f.name in not_flags:  # not a flag of this job: argparse then rejects it instead of ignoring it
            continue
        flag = "--" + f.name
        typ = _field_type(f)
        help_text = _help_line(cls, f)
        if typ is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif typ is list:
            default = f.default_factory()
            item = f.metadata.get("item") or (type(default[0]) if default else str)
            # extend: a repeated flag adds to the list (the default 'store' kept only the last occurrence)
            parser.add_argument(flag, dest=f.name, nargs="+", action="extend", type=item, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=typ, default=None, help=help_text)
    return parser


def _coerce(cls, name: str, value: Any, where: str):
    f = {x.name: x for x in dataclasses.fields(cls)}.get(name)
    unused, derived = getattr(cls, "UNUSED", {}), getattr(cls, "DERIVED", {})
    if name in unused:
        raise ConfigError(f"{where}: key {name!r} is not used by this job ({unused[name]})")
    if name in derived:
        raise ConfigError(f"{where}: key {name!r} is not set directly in this job ({derived[name]})")
    if f is None:
        known = ", ".join(sorted(x.name for x in dataclasses.fields(cls) if x.name not in {**unused, **derived}))
        raise ConfigError(f"{where}: unknown key {name!r}; known keys: {known}")
    typ = _field_type(f)
    if typ is list and not isinstance(value, list):
        value = [value]
    elif typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif typ is not list and not isinstance(value, typ):
        raise ConfigError(f"{where}: key {name!r} must be {typ.__name__}, got {value!r}")
    return value


def load_config(cls, argv=None, description: str = ""):
    """Parse flags (and an optional YAML file) into a validated `cls` instance."""
    parser = build_parser(cls, description)
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.config:
        if not os.path.exists(args.config):
            raise InputNotFoundError(f"config file not found: {args.config}")
        with open(args.config) as fh:
            try:
                loaded = yaml.safe_load(fh) or {}
            except yaml.YAMLError as exc:  # one line: the file, the line and what the parser expected
                mark = getattr(exc, "problem_mark", None)
                where = f"{args.config}:{mark.line + 1}" if mark is not None else args.config
                what = getattr(exc, "problem", None) or str(exc).splitlines()[0]
                raise ConfigError(f"{where}: not valid YAML ({what})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: expected a mapping of config keys at the top level")
        for k, v in loaded.items():
            values[k] = _coerce(cls, k, v, args.config)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = v
    cfg = cls(**values)
    return cfg.validate() if hasattr(cfg, "validate") else cfg


def to_dict(cfg) -> dict:
    """The config that runs, as saved in config.json and checkpoint manifests: without the fields of
    shared groups that this job does not use."""
    unused = getattr(cfg, "UNUSED", {})
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in unused}


def save_config(cfg, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(to_dict(cfg), fh, indent=2, sort_keys=True)
    os.replace(tmp, path)


KL_ESTIMATORS = ("k1", "k2", "k3")
LOSS_AGGREGATIONS = ("token_mean", "seq_mean", "seq_mean_token_sum_norm")  # trainers.ppo_math.AGGREGATIONS
ADVANTAGE_ESTIMATORS = ("gae", "grpo", "rloo", "reinforce_pp")
ROLLOUT_IS_MODES = ("off", "truncate", "mask")  # trainers.ppo_math.ROLLOUT_IS_MODES


@dataclass
class PPOSpecific:
    actor_model: str = knob("", "policy to align (SFT causal LM): local folder, hub name, or .gguf file")
    actor_gguf_file: str = knob("", "GGUF file name inside actor_model, if the actor is a GGUF")
    reward_model: list = knob([], "reward sources, repeatable, each [NAME=]SPEC: a reward model folder saved by "
                              "train_rm (any tokenizer), python:FILE.py:FUNC or python:package.module:FUNC (a "
                              "function of the prompts, responses and the prompt rows' other fields), "
                              "http://HOST:PORT (a reward-model server, `python -m aplot_rlhf.cli.serve_rm`), or "
                              "rule:neg_length / rule:char_frac:C (tests). Several are weighted by --reward_weights "
                              "and summed")
    reward_weights: list = knob([], "one weight per --reward_model source, in order (default: 1 each); each source "
                                    "is normalized by its own statistics where it has them (--normalize_reward), "
                                    "then weighted and summed", item=float)
    reward_timeout_s: float = knob(300.0, "bound on one call of a python: reward function and on one HTTP request to "
                                          "a reward server; a function over it stops the run, a request over it is "
                                          "retried (0 = unbounded)")
    reward_server_wait_s: float = knob(600.0, "how long the rollout waits and retries (with backoff) while a reward "
                                              "server is unreachable or restarting before the run stops with an "
                                              "error; the server's bearer token comes from $APLOT_RM_API_KEY")
    allow_untrained_reward_head: bool = knob(False, "accept a reward model whose score head is not in its checkpoint "
                                                    "(random scores: debugging only)")
    reference_model: str = knob("", "frozen KL reference; defaults to actor_model")
    critic_init: str = knob("reward", "initialize the critic from the 'reward' model or the 'actor'")
    critic_ds_config: str = knob("", "DeepSpeed JSON for the critic ('auto' filled as for the actor); default: the "
                                     "actor's")
    reference_ds_config: str = knob("", "DeepSpeed JSON for the frozen reference and reward model; default: the "
                                        "actor's")
    prompt_data: list = knob([], "prompt files (jsonl/json/parquet/arrow, key prompt_key); repeatable")
    prompt_format: str = knob("auto", "'auto' (HH transcripts become chat messages when the actor has a chat "
                                      "template), 'text' or 'chat'")
    max_prompts: int = knob(0, "use only the first N prompts (0 = all)")
    eval_prompts: int = knob(16, "hold out the last N prompts: never trained on, used to measure the policy's reward")
    max_prompt_length: int = knob(256, "prompt tokens; longer prompts lose their oldest tokens (counted)")
    max_new_tokens: int = knob(64, "generation length limit")
    temperature: float = knob(1.0, "sampling temperature (0 = greedy)")
    top_p: float = knob(1.0, "nucleus sampling")
    rollout_backend: str = knob("vllm", "'vllm' (in-process engine on each rank, weights synced from the actor) or "
                                        "'hf' (generate on the gathered actor)")
    vllm_gpu_memory_utilization: float = knob(0.3, "vLLM's share of GPU memory (KV cache + weights)")
    vllm_tensor_parallel_size: int = knob(1, "vLLM tensor-parallel size (ranks in a group share one engine)")
    vllm_sleep: bool = knob(True, "put vLLM to sleep during training to hand its memory to DeepSpeed")
    vllm_enforce_eager: bool = knob(True, "disable CUDA graphs in vLLM (faster start, less memory)")
    rollout_batch_size: int = knob(8, "prompts per rank per PPO iteration")
    ppo_epochs: int = knob(1, "passes over each rollout")
    # K samples count K times
    ppo_mini_batch_size: int = knob(8, "sequences per rank per optimizer step in the PPO epochs")
    skip_unmoved_old_logprobs: bool = knob(True, "when nothing reads the old log-probs before training (no KL in "
                                           "the reward, --rollout_is off), take those of the rows the policy has "
                                           "not moved for (the first mini-batch of the first epoch: every row with "
                                           "one epoch over one mini-batch) from the training forward, detached "
                                           "(ratio exactly 1, as TRL does), instead of a separate actor forward")
    critic_learning_rate: float = knob(5e-6, "critic peak learning rate (actor uses learning_rate)")
    clip_ratio: float = knob(0.2, "PPO policy clip")
    value_clip: float = knob(0.2, "value-function clip")
    gamma: float = knob(1.0, "discount of gae and reinforce_pp returns (grpo and rloo: must stay 1)")
    lam: float = knob(0.95, "GAE lambda")
    kl_estimator: str = knob("k1", f"per-token KL estimator in the reward, one of {KL_ESTIMATORS}")
    kl_coef: float = knob(0.05, "initial KL coefficient beta")
    adaptive_kl: bool = knob(False, "adapt beta toward kl_target")
    kl_target: float = knob(6.0, "adaptive KL: target KL per sequence")
    kl_horizon: int = knob(10000, "adaptive KL: horizon in sequences")
    normalize_reward: bool = knob(True, "standardize RM scores with the RM's stored mean/std")
    reward_clip: float = knob(10.0, "clip (normalized) scores to +-this")
    whiten_advantages: bool = knob(True, "whiten advantages over each rollout")
    entropy_coef: float = knob(0.0, "entropy bonus in the policy loss")
    ppo_iterations: int = knob(10, "rollout -> train -> sync cycles")
    reward_batch_size: int = knob(16, "sequences per reward-model forward")
    advantage_estimator: str = knob("gae", "gae: PPO with a critic, GAE over its values (OpenRLHF's and TRL's PPO); "
                                    "grpo: (r - group mean) / (group std + 1e-6) at the last token (TRL's GRPO with "
                                    "--kl_mode loss, OpenRLHF's group_norm with --kl_mode reward); rloo: r - mean of "
                                    "the other samples of the prompt, per-token KL in the reward (OpenRLHF's rloo); "
                                    "reinforce_pp: KL-penalized returns-to-go whitened over the global batch "
                                    "(OpenRLHF's reinforce, REINFORCE++). grpo and rloo returns are undiscounted. "
                                    "Only gae builds a critic")
    samples_per_prompt: int = knob(1, "K: every prompt is sampled K times per rollout (grpo and rloo need K >= 2); "
                                   "the rollout holds rollout_batch_size * K sequences per rank")
    grpo_std_normalize: bool = knob(True, "grpo: divide by the group's reward std. Off removes only the std; Dr. GRPO "
                                    "(Liu et al. 2025) is --no-grpo_std_normalize with --loss_aggregation "
                                    "seq_mean_token_sum_norm")
    kl_mode: str = knob("reward", "'reward': -kl_coef * KL per token in the reward (PPO's way); 'loss': kl_coef * "
                        "kl_loss_estimator KL against the reference as a loss term (GRPO's way)")
    kl_loss_estimator: str = knob("k3", f"estimator of the KL loss term with kl_mode 'loss', one of {KL_ESTIMATORS}")
    loss_aggregation: str = knob("token_mean", "policy loss (and KL loss term) over the tokens of a mini-batch, all "
                                 "its micro-batches and ranks together: 'token_mean' (every token weighs the same: "
                                 "TRL's 'dapo'), 'seq_mean' (each sequence's token mean, then the "
                                 "mean over sequences: the published GRPO, TRL's 'grpo'), 'seq_mean_token_sum_norm' "
                                 "(token sums / (sequences x max_new_tokens), no length normalization: Dr. GRPO's, "
                                 "TRL's 'dr_grpo')")
    drop_uniform_groups: bool = knob(False, "leave groups whose K rewards are all equal (no signal) out of the loss")
    rollout_is: str = knob("off", "correct the policy loss for the sampler/trainer mismatch with the ratio "
                           "r = exp(trainer's old log-prob - rollout engine's log-prob) per sampled token: 'truncate' "
                           "weighs each token's loss by min(r, rollout_is_cap) (truncated IS of Yao et al. 2025, "
                           "as OpenRLHF's --enable_vllm_is_correction and verl's rollout_is truncate); 'mask' drops "
                           "tokens with r outside [1/cap, cap] from the loss and its token counts and weighs the "
                           "others by r (verl's token-level mask mode); 'off'. The mismatch is logged either way "
                           "(ppo/rollout/logprob_abs_diff_mean, _max, logprob_mismatch_frac)")
    rollout_is_cap: float = knob(2.0, "C of --rollout_is (2, as in the TIS paper and OpenRLHF); "
                                 "ppo/rollout/logprob_mismatch_frac counts tokens with r outside [1/C, C]")


@dataclass
class PPOConfig(PPOSpecific, ModelConfig, EngineConfig, RunConfig):
    """PPO alignment: every knob of the job."""

    output_dir: str = knob("runs/ppo", "where checkpoints, metrics.jsonl, tensorboard logs and the policy go")

    def __post_init__(self):
        if isinstance(self.reward_model, str):  # PPOConfig(reward_model="folder"): one source
            self.reward_model = [self.reward_model] if self.reward_model else []

    # fields of the shared groups PPO has no use for: not flags of train_ppo, refused in its YAML, not saved
    UNUSED: ClassVar[dict] = {
        "model_name_or_path": "PPO's models are --actor_model, --reference_model and --reward_model",
        "gguf_file": "PPO reads a GGUF actor through --actor_gguf_file",
        "tokenizer_name_or_path": "PPO uses each model's own tokenizer",
        "trust_remote_code": "PPO loads models with transformers' own code only",
        "embedding_pooling": "an APLOT embedding is a reward-model training knob",
        "epochs": "PPO runs --ppo_iterations rollout/train cycles",
        "max_steps": "PPO runs --ppo_iterations rollout/train cycles",
        "eval_steps": "PPO measures the held-out --eval_prompts reward",
        "eval_at_start": "PPO measures the held-out --eval_prompts reward",
        "eval_batch_size": "PPO measures the held-out --eval_prompts reward",
    }
    # derived by validate from other fields: not flags, refused in YAML, saved in config.json as they ran
    DERIVED: ClassVar[dict] = {
        "gradient_accumulation_steps": "PPO sets it to ppo_mini_batch_size / micro_batch_size",
    }
    # help lines whose RM wording is wrong for PPO
    HELP: ClassVar[dict] = {
        "seed": "training seed (data order, sampling, dropout)",
        "micro_batch_size": "sequences per GPU per forward/backward (actor and critic)",
        "learning_rate": "actor peak learning rate (critic: critic_learning_rate)",
        "warmup_ratio": "fraction of the actor's and critic's optimizer steps spent in linear warm-up",
        "save_steps": "checkpoint every N PPO iterations (0 = only at the end)",
        "log_steps": "log metrics every N PPO iterations",
        "export": "write the aligned policy as a transformers folder (output_dir/policy) at the end",
        "resume": "resume from the latest checkpoint in output_dir (iteration, actor, critic, KL controller)",
        "dry_run": "validate the config, read every prompt file, print the memory plan, and exit",
        "gradient_checkpointing": "recompute activations in backward (actor and critic)",
        "disable_dropout": "set every dropout of actor, critic, reference and reward model to 0, so rollout "
                           "log-probs (eval mode) and training log-probs (train mode) agree",
        "packing": "padding-free experience and training forwards (actor, reference, critic): prompt+response "
                   "sequences share rows, attention stays within each (flash_attention_2 varlen, else a block mask)",
        "share_prompt": "experience and training forwards (actor, reference, critic) lay each distinct prompt of a "
                        "micro-batch out once, followed by its responses (the samples_per_prompt samples of a "
                        "group), each attending to the prompt and to itself only (exact). Needs attention sdpa, "
                        "eager, aplot_varlen_sdpa or flex_attention; otherwise it falls back to the --packing or "
                        "padded layout with one log line. The reward model's scoring is unchanged",
        "lora_rank": "LoRA (peft) rank for the actor and the critic (the same knobs for both); 0 = full fine-tuning. "
                     "With LoRA the KL reference is the actor with its adapters disabled (no second copy), the critic "
                     "trains its own adapters and value head, and vLLM receives merged weights",
        "lora_alpha": "LoRA alpha (actor and critic): the update is scaled by lora_alpha / lora_rank",
        "lora_dropout": "dropout on the adapters' inputs: must be 0 in PPO (refused otherwise), since rollout "
                        "(eval mode) and training (train mode) log-probs must agree once the adapters move",
        "lora_target_modules": "modules that get adapters (actor and critic backbones): 'auto' (every linear layer "
                               "of the blocks: q/k/v/o/gate/up/down_proj for Llama-family), 'all-linear', or "
                               "module names",
    }

    def validate(self) -> "PPOConfig":
        errors = []
        for name in ("actor_model", "reward_model"):
            if not getattr(self, name):
                errors.append(f"{name} is required")
        errors += reward_source_errors(self)
        if not self.prompt_data:
            errors.append("prompt_data needs at least one file")
        if self.rollout_backend not in ("vllm", "hf"):
            errors.append(f"rollout_backend must be vllm or hf, got {self.rollout_backend!r}")
        if self.kl_estimator not in KL_ESTIMATORS:
            errors.append(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.critic_init not in ("reward", "actor"):
            errors.append(f"critic_init must be reward or actor, got {self.critic_init!r}")
        if self.prompt_format not in ("auto", "text", "chat"):
            errors.append(f"prompt_format must be auto, text or chat, got {self.prompt_format!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            errors.append(f"zero_stage must be 0-3, got {self.zero_stage}")
        ranges = check_ranges(self, {
            "max_prompts": _at_least(0), "eval_prompts": _at_least(0), "top_p": (0.0, 1.0, True, False),
            "vllm_tensor_parallel_size": _at_least(1), "rollout_batch_size": _at_least(1), "ppo_epochs": _at_least(1),
            "ppo_mini_batch_size": _at_least(1), "critic_learning_rate": _above(0.0), "clip_ratio": _above(0.0),
            "value_clip": _above(0.0), "gamma": _UNIT, "lam": _UNIT, "kl_coef": _at_least(0.0),
            "kl_target": _above(0.0), "kl_horizon": _at_least(1), "reward_clip": _above(0.0),
            "entropy_coef": _at_least(0.0), "ppo_iterations": _at_least(1), "reward_batch_size": _at_least(1),
            "temperature": _at_least(0.0), "samples_per_prompt": _at_least(1), "reward_timeout_s": _at_least(0.0),
            "reward_server_wait_s": _at_least(0.0)}) + check_engine_and_run(self)
        errors += ranges
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            errors.append(f"advantage_estimator must be one of {ADVANTAGE_ESTIMATORS}, "
                          f"got {self.advantage_estimator!r}")
        elif self.advantage_estimator in ("grpo", "rloo") and self.samples_per_prompt < 2:
            errors.append(f"advantage_estimator {self.advantage_estimator} compares the samples of one prompt: "
                          f"samples_per_prompt must be >= 2, got {self.samples_per_prompt}")
        if self.kl_mode not in ("reward", "loss"):
            errors.append(f"kl_mode must be reward or loss, got {self.kl_mode!r}")
        if self.kl_loss_estimator not in KL_ESTIMATORS:
            errors.append(f"kl_loss_estimator must be one of {KL_ESTIMATORS}, got {self.kl_loss_estimator!r}")
        if self.rollout_is not in ROLLOUT_IS_MODES:
            errors.append(f"rollout_is must be one of {ROLLOUT_IS_MODES}, got {self.rollout_is!r}")
        if not self.rollout_is_cap > 1.0:
            errors.append(f"rollout_is_cap must be > 1 (ratios in [1/C, C]), got {self.rollout_is_cap:g}")
        if self.loss_aggregation not in LOSS_AGGREGATIONS:
            errors.append(f"loss_aggregation must be one of {LOSS_AGGREGATIONS}, got {self.loss_aggregation!r}")
        if self.advantage_estimator in ("grpo", "rloo") and self.gamma != 1.0:
            errors.append(f"--gamma {self.gamma:g}: {self.advantage_estimator} scores whole sequences and its returns "
                          "are undiscounted (gamma 1, as published); --gamma is for gae and reinforce_pp")
        errors += lora_errors(self)
        if self.lora_rank and self.lora_dropout > 0:  # with or without --disable_dropout (issue 25)
            errors.append(f"--lora_dropout {self.lora_dropout:g}: PPO needs --lora_dropout 0. Dropout on the adapters "
                          "is on in the training forward and off in the rollout's, so once the adapters have moved "
                          "the first PPO ratio is no longer 1 (--no-disable_dropout does not help: it only adds "
                          "the base model's dropout)")
        if self.drop_uniform_groups and self.samples_per_prompt < 2:
            errors.append("drop_uniform_groups needs samples_per_prompt >= 2")
        # the divisibility checks divide by these sizes: only once the ranges hold
        sequences = self.rollout_batch_size * self.samples_per_prompt
        if not ranges and sequences % self.ppo_mini_batch_size:
            errors.append(f"rollout_batch_size {self.rollout_batch_size} x samples_per_prompt "
                          f"{self.samples_per_prompt} = {sequences} sequences must be a multiple of "
                          f"ppo_mini_batch_size {self.ppo_mini_batch_size}")
        if not ranges and self.ppo_mini_batch_size % self.micro_batch_size:
            errors.append(f"ppo_mini_batch_size {self.ppo_mini_batch_size} must be a multiple of micro_batch_size "
                          f"{self.micro_batch_size}")
        elif not ranges:  # DERIVED: one optimizer step per mini-batch
            self.gradient_accumulation_steps = self.ppo_mini_batch_size // self.micro_batch_size
        if self.max_new_tokens < 1 or self.max_prompt_length < 1:
            errors.append("max_new_tokens and max_prompt_length must be >= 1")
        if not 0 < self.vllm_gpu_memory_utilization <= 1:
            errors.append("vllm_gpu_memory_utilization must be in (0, 1]")
        if errors:
            raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
        return self
