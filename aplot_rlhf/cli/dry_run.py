"""`--dry_run` for train_rm and train_ppo: check a launch before it spends a node-hour.

No GPU, no process group, no weights: validates the config, builds the DeepSpeed JSON and runs it
through DeepSpeed's own parser, reads every data file through the loader training uses (tokenized
with the model's tokenizer when the folder has one: skip counts as training would log them), checks
max_length against the model's positions, reads the model's config.json, and prints the memory plan
for the hardware the launchers export:
APLOT_PLAN_NODES, APLOT_PLAN_GPUS_PER_NODE, APLOT_PLAN_GPU_MEM_GIB (default 1 x 1 x 80 GiB; without
APLOT_PLAN_GPUS_PER_NODE, WORLD_SIZE / nodes) and, optionally, APLOT_PLAN_CPU_MEM_GIB (host RAM per
node, checked when set). Exit 0 if it fits, 1 if not (with the planner's smallest change that fits),
2 if the config or the data is wrong (bad DeepSpeed JSON, batch sizes, missing files, a malformed line).
"""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace


def hardware() -> SimpleNamespace:
    """The hardware to plan for, from the launchers' environment variables."""
    env = os.environ
    nodes = int(env.get("APLOT_PLAN_NODES", 1))
    gpus = int(env.get("APLOT_PLAN_GPUS_PER_NODE", max(1, int(env.get("WORLD_SIZE", nodes)) // nodes)))
    cpu = env.get("APLOT_PLAN_CPU_MEM_GIB")
    return SimpleNamespace(nodes=nodes, gpus_per_node=gpus, gpu_mem_gib=float(env.get("APLOT_PLAN_GPU_MEM_GIB", 80)),
                           cpu_mem_gib=float(cpu) if cpu else None)


def check_deepspeed_json(cfg, world: int) -> dict:
    """Our DeepSpeed config for `world` ranks, accepted by DeepSpeed's parser; raises ValueError if not.

    Plans the requested precision (bf16 stays bf16 here even where a CPU without bf16 units would train in fp32).
    """
    from ..engine import deepspeed as ds_api
    ds_cfg = ds_api.build_ds_config(cfg, world, precision=cfg.precision)
    _parse_with_deepspeed(ds_cfg, world, f"the config ({cfg.ds_config})" if cfg.ds_config else "the config")
    _check_flags_match_json(cfg, ds_cfg)
    return ds_cfg


def _parse_with_deepspeed(ds_cfg: dict, world: int, what: str) -> None:
    from ..engine import deepspeed as ds_api
    ds_api.parse_with_deepspeed(ds_cfg, world, what)


def _check_role_json(cfg, path: str, role: str, actor_ds_cfg: dict, world: int) -> None:
    from ..engine import deepspeed as ds_api
    ds_cfg = ds_api.role_ds_config(cfg, world, path, role, actor_ds_cfg, precision=cfg.precision)
    _parse_with_deepspeed(ds_cfg, world, f"the {role} config ({path})")


def _check_flags_match_json(cfg, ds_cfg: dict) -> None:
    """The trainers read --zero_stage / --precision / --offload_* as well as the JSON: they must agree."""
    zero = ds_cfg.get("zero_optimization", {})
    from ..engine import deepspeed as ds_api
    offload = lambda key: zero.get(key, {}).get("device", "none") not in ("none", None)  # noqa: E731
    json_precision = ds_api.ds_precision(ds_cfg)
    pairs = [("zero_stage", cfg.zero_stage, "zero_optimization.stage", zero.get("stage", 0)),
             ("precision", cfg.precision, "bf16/fp16.enabled", json_precision),
             ("offload_optimizer", cfg.offload_optimizer, "zero_optimization.offload_optimizer",
              offload("offload_optimizer")),
             ("offload_param", cfg.offload_param, "zero_optimization.offload_param", offload("offload_param"))]
    wrong = [f"--{flag} {ours} but {cfg.ds_config or 'the DeepSpeed JSON'} has {key} = {theirs}"
             for flag, ours, key, theirs in pairs if ours != theirs]
    if wrong:
        raise ValueError("flags and DeepSpeed JSON disagree (make them match, or use \"auto\" in the JSON):\n  "
                         + "\n  ".join(wrong))


def _tokenizer_or_none(role: str, path: str, tokenizer_path: str = "", gguf_file: str = "",
                       trust_remote_code: bool = False):
    """The model's tokenizer if it loads from local files (cheap: no weights); None, said, if the folder is a
    shape only (config.json, no weights: what the launchers' dry runs plan with). A folder with weights but no
    tokenizer files is an error, as it is for the training run."""
    from ..models.loader import load_tokenizer, split_gguf
    folder, gguf = split_gguf(path, gguf_file)
    files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
    weights = os.path.isdir(folder) and any(n.endswith((".safetensors", ".bin")) for n in os.listdir(folder))
    if not tokenizer_path and not gguf and weights and not any(os.path.exists(os.path.join(folder, f))
                                                               for f in files):
        load_tokenizer(role, path, gguf_file, tokenizer_path, trust_remote_code)  # a real model lacking one: error
    if not tokenizer_path and not gguf and not any(os.path.exists(os.path.join(folder, f)) for f in files):
        print(f"dry run: {folder} has no tokenizer files: data read and validated, but not tokenized "
              "(truncation and skip counts unchecked)", file=sys.stderr)
        return None
    try:
        return load_tokenizer(role, path, gguf_file, tokenizer_path, trust_remote_code)
    except (OSError, ValueError) as exc:
        print(f"dry run: tokenizer of {path} did not load ({exc}): data not tokenized", file=sys.stderr)
        return None


def _check_rm_data(cfg, world: int) -> dict:
    """Every train/eval file through train_rm's own loader; -> {set: {pairs, skipped}}."""
    from ..data.pair_tokenizer import PairTokenizer
    from ..data.reading import DataError
    from ..data.sampler import PairSampler
    from ..data.sets import load_rm_data
    from ..models.loader import check_max_length, load_config
    tok = _tokenizer_or_none("reward", cfg.model_name_or_path, cfg.tokenizer_name_or_path, cfg.gguf_file,
                             cfg.trust_remote_code)
    if os.path.exists(os.path.join(cfg.model_name_or_path, "config.json")):  # a missing one is reported later
        check_max_length(cfg.max_length,
                         load_config("reward", cfg.model_name_or_path, cfg.gguf_file, cfg.trust_remote_code),
                         tok, what=f"model {cfg.model_name_or_path}")
    encoder = None
    if tok is not None:
        encoder = PairTokenizer(tok, cfg.max_length, cfg.chat_template, cfg.response_separator, cfg.long_response)
    report = {}
    train, _ = load_rm_data(cfg, encoder, report)
    sampler = PairSampler(len(train), cfg.micro_batch_size, world, 0, cfg.seed)
    if sampler.batches_per_rank // cfg.gradient_accumulation_steps == 0:
        raise DataError(f"{len(train)} training pairs make no full optimizer step (micro batch {cfg.micro_batch_size}"
                        f" x accumulation {cfg.gradient_accumulation_steps} x {world} ranks)")
    return report


def _check_prompt_data(cfg, world: int) -> dict:
    """Every prompt file through train_ppo's own loader (and the actor's tokenizer when it has one)."""
    from ..data.prompts import PromptFormatter, check_prompt_count, load_prompts
    from ..data.reading import SkipCounter
    from ..data.sampler import PairSampler
    from ..models.loader import check_max_length, load_config
    skips = SkipCounter()
    prompts = load_prompts(cfg.prompt_data, skips=skips)
    if cfg.max_prompts:
        prompts = prompts[:cfg.max_prompts]
    tok = _tokenizer_or_none("actor", cfg.actor_model, "", cfg.actor_gguf_file)
    if cfg.actor_gguf_file or os.path.exists(os.path.join(cfg.actor_model, "config.json")):
        check_max_length(cfg.max_prompt_length + cfg.max_new_tokens,
                         load_config("actor", cfg.actor_model, cfg.actor_gguf_file),
                         tok, flag="--max_prompt_length + --max_new_tokens", what=f"actor {cfg.actor_model}")
    if tok is not None:
        formatter = PromptFormatter(tok, cfg.max_prompt_length, cfg.prompt_format)
        for p in prompts:
            formatter(p["prompt"])
        formatter.skips.report("prompt_data")
        for reason, n in formatter.skips.counts.items():
            skips.add(reason, n)
    n_eval = min(cfg.eval_prompts, len(prompts) // 2)
    check_prompt_count(len(prompts), n_eval, cfg.rollout_batch_size, world)
    PairSampler(len(prompts) - n_eval, cfg.rollout_batch_size, world, 0, cfg.seed)  # enough for one iteration
    return {"prompt_data": {"prompts": len(prompts) - n_eval, "eval_prompts": n_eval, "skipped": dict(skips.counts)}}


def _model_folder(path: str) -> str:
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json (dry runs read the model's shape from it)")
    return path


def _report(cfg, ds_cfg, plan, data: dict) -> int:
    from ..plan import format_plan
    print("resolved config:\n" + json.dumps(vars(cfg), indent=1, default=str))
    print("data (as training reads it):\n" + json.dumps(data, indent=1))
    print("DeepSpeed config:\n" + json.dumps(ds_cfg, indent=1))
    print(format_plan(plan))
    print(json.dumps({"dry_run": "ok", "fits": plan.fits}))
    return 0 if plan.fits else 1


def _run(check) -> int:
    """Run a dry run; a wrong config or data file exits 2 with one clear message instead of a traceback."""
    from ..errors import UserError
    try:
        code = check()
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"dry run failed: {exc}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)
    return code


def dry_run_rm(cfg) -> int:
    def check():
        from ..models.loader import check_run_paths
        from ..plan import plan_from_namespace
        check_run_paths(cfg, "rm")
        hw = hardware()
        ds_cfg = check_deepspeed_json(cfg, hw.nodes * hw.gpus_per_node)
        data = _check_rm_data(cfg, hw.nodes * hw.gpus_per_node)
        plan = plan_from_namespace(cfg, model=_model_folder(cfg.model_name_or_path), job="rm", nodes=hw.nodes,
                                   gpus_per_node=hw.gpus_per_node, gpu_mem_gib=hw.gpu_mem_gib,
                                   cpu_mem_gib=hw.cpu_mem_gib, offload_optimizer=cfg.offload_optimizer,
                                   offload_param=cfg.offload_param)
        return _report(cfg, ds_cfg, plan, data)
    return _run(check)


def dry_run_ppo(cfg) -> int:
    def check():
        from ..models.loader import check_run_paths
        from ..plan import plan_from_namespace
        check_run_paths(cfg, "ppo")
        hw = hardware()
        ds_cfg = check_deepspeed_json(cfg, hw.nodes * hw.gpus_per_node)
        for path, role in ((cfg.critic_ds_config, "critic"), (cfg.reference_ds_config, "reference")):
            # accepted by DeepSpeed, and the actor's stage and precision
            if path and (role != "critic" or cfg.advantage_estimator == "gae"):
                _check_role_json(cfg, path, role, ds_cfg, hw.nodes * hw.gpus_per_node)
        data = _check_prompt_data(cfg, hw.nodes * hw.gpus_per_node)
        actor = _model_folder(cfg.actor_model)
        from ..config import reward_specs
        from ..rewards import check_reward_functions
        check_reward_functions(cfg)  # python: sources import and name a function
        # only reward models loaded in this process take GPU memory here (not functions, rules or servers)
        in_process = [_model_folder(target) for _, kind, target in reward_specs(cfg) if kind == "model"]
        reward = in_process[0] if len(cfg.reward_model) == 1 and in_process else None  # the critic's start
        common = SimpleNamespace(zero_stage=cfg.zero_stage, precision=cfg.precision,
                                 micro_batch_size=cfg.micro_batch_size,
                                 gradient_checkpointing=cfg.gradient_checkpointing,
                                 lora_rank=cfg.lora_rank, lora_target_modules=cfg.lora_target_modules)
        plan = plan_from_namespace(common, model=actor, job="ppo", nodes=hw.nodes, gpus_per_node=hw.gpus_per_node,
                                   gpu_mem_gib=hw.gpu_mem_gib, cpu_mem_gib=hw.cpu_mem_gib,
                                   reward_models=tuple(in_process),
                                   critic_model=actor if cfg.critic_init == "actor" or reward is None else reward,
                                   critic=cfg.advantage_estimator == "gae",
                                   reference_model=_model_folder(cfg.reference_model) if cfg.reference_model else None,
                                   offload_optimizer=cfg.offload_optimizer, offload_param=cfg.offload_param,
                                   vllm_tp=cfg.vllm_tensor_parallel_size, vllm_gpu_util=cfg.vllm_gpu_memory_utilization,
                                   vllm_sleep=cfg.vllm_sleep, gen_batch=cfg.rollout_batch_size * cfg.samples_per_prompt,
                                   prompt_len=cfg.max_prompt_length, gen_len=cfg.max_new_tokens)
        return _report(cfg, ds_cfg, plan, data)
    return _run(check)
