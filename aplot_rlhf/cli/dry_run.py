"""`--dry_run` for train_rm and train_ppo: check a launch before it spends a node-hour.

No GPU, no process group, no weights, no tokenizer: validates the config, builds the DeepSpeed JSON
and runs it through DeepSpeed's own parser, checks that data files exist, reads the model's
config.json, and prints the memory plan for the hardware the launchers export:
APLOT_PLAN_NODES, APLOT_PLAN_GPUS_PER_NODE, APLOT_PLAN_GPU_MEM_GIB (default 1 x 1 x 80 GiB; without
APLOT_PLAN_GPUS_PER_NODE, WORLD_SIZE / nodes) and, optionally, APLOT_PLAN_CPU_MEM_GIB (host RAM per
node, checked when set). Exit 0 if it fits, 1 if not (with the planner's smallest change that fits),
2 if the config itself is wrong (bad DeepSpeed JSON, batch sizes, missing files).
"""
from __future__ import annotations

import copy
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

    Plans the requested precision (bf16 stays bf16 here even though a CPU run would fall back to fp32).
    """
    from .. import engine as eng
    ds_cfg = eng.build_ds_config(cfg, world, precision=cfg.precision)
    _parse_with_deepspeed(ds_cfg, world, f"the config ({cfg.ds_config})" if cfg.ds_config else "the config")
    _check_flags_match_json(cfg, ds_cfg)
    return ds_cfg


def _parse_with_deepspeed(ds_cfg: dict, world: int, what: str) -> None:
    """Batch arithmetic for `world` ranks, then DeepSpeed's own parser; ValueError naming `what` if rejected."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from .. import engine as eng
    eng.check_ds_config(ds_cfg, world)
    # Without a process group DeepSpeedConfig takes world size 1 (an mpu is not consulted before
    # dist.get_rank() fails), so hand it the per-rank share; the world-size arithmetic was checked above.
    probe = copy.deepcopy(ds_cfg)
    if isinstance(probe.get("train_batch_size"), int):
        probe["train_batch_size"] //= world
    try:
        DeepSpeedConfig(probe)
    except Exception as exc:  # pydantic ValidationError, AssertionError, ValueError: all mean "rejected"
        raise ValueError(f"DeepSpeed rejects {what}: {type(exc).__name__}: {exc}") from exc


def _check_role_json(cfg, path: str, role: str, actor_ds_cfg: dict, world: int) -> None:
    from .. import engine as eng
    ds_cfg = eng.role_ds_config(cfg, world, path, role, actor_ds_cfg, precision=cfg.precision)
    _parse_with_deepspeed(ds_cfg, world, f"the {role} config ({path})")


def _check_flags_match_json(cfg, ds_cfg: dict) -> None:
    """The trainers read --zero_stage / --precision / --offload_* as well as the JSON: they must agree."""
    zero = ds_cfg.get("zero_optimization", {})
    from .. import engine as eng
    offload = lambda key: zero.get(key, {}).get("device", "none") not in ("none", None)  # noqa: E731
    json_precision = eng.ds_precision(ds_cfg)
    pairs = [("zero_stage", cfg.zero_stage, "zero_optimization.stage", zero.get("stage", 0)),
             ("precision", cfg.precision, "bf16/fp16.enabled", json_precision),
             ("offload_optimizer", cfg.offload_optimizer, "zero_optimization.offload_optimizer", offload("offload_optimizer")),
             ("offload_param", cfg.offload_param, "zero_optimization.offload_param", offload("offload_param"))]
    wrong = [f"--{flag} {ours} but {cfg.ds_config or 'the DeepSpeed JSON'} has {key} = {theirs}"
             for flag, ours, key, theirs in pairs if ours != theirs]
    if wrong:
        raise ValueError("flags and DeepSpeed JSON disagree (make them match, or use \"auto\" in the JSON):\n  "
                         + "\n  ".join(wrong))


def _check_files(paths, what):
    for p in paths:
        spec = p.split("=", 1)[1] if "=" in p and not os.path.exists(p) else p
        if not os.path.exists(spec):
            raise FileNotFoundError(f"{what}: {spec} does not exist")


def _model_folder(path: str) -> str:
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}: no config.json (dry runs read the model's shape from it)")
    return path


def _report(cfg, ds_cfg, plan) -> int:
    from ..plan import format_plan
    print("resolved config:\n" + json.dumps(vars(cfg), indent=1, default=str))
    print("DeepSpeed config:\n" + json.dumps(ds_cfg, indent=1))
    print(format_plan(plan))
    print(json.dumps({"dry_run": "ok", "fits": plan.fits}))
    return 0 if plan.fits else 1


def _run(check) -> int:
    """Run a dry run; a wrong config exits 2 with one clear line instead of a traceback."""
    try:
        code = check()
    except (ValueError, FileNotFoundError) as exc:
        print(f"dry run failed: {exc}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)
    return code


def dry_run_rm(cfg) -> int:
    def check():
        from ..plan import plan_from_namespace
        hw = hardware()
        ds_cfg = check_deepspeed_json(cfg, hw.nodes * hw.gpus_per_node)
        _check_files(cfg.train_data, "train_data")
        _check_files(cfg.eval_data, "eval_data")
        plan = plan_from_namespace(cfg, model=_model_folder(cfg.model_name_or_path), job="rm", nodes=hw.nodes,
                                   gpus_per_node=hw.gpus_per_node, gpu_mem_gib=hw.gpu_mem_gib,
                                   cpu_mem_gib=hw.cpu_mem_gib, offload_optimizer=cfg.offload_optimizer,
                                   offload_param=cfg.offload_param)
        return _report(cfg, ds_cfg, plan)
    return _run(check)


def dry_run_ppo(cfg) -> int:
    def check():
        from ..plan import plan_from_namespace
        hw = hardware()
        cfg.gradient_accumulation_steps = cfg.ppo_mini_batch_size // cfg.micro_batch_size  # as the trainer sets it
        ds_cfg = check_deepspeed_json(cfg, hw.nodes * hw.gpus_per_node)
        for path, role in ((cfg.critic_ds_config, "critic"), (cfg.reference_ds_config, "reference")):
            if path and (role != "critic" or cfg.advantage_estimator == "gae"):  # accepted by DeepSpeed, and the actor's stage and precision
                _check_role_json(cfg, path, role, ds_cfg, hw.nodes * hw.gpus_per_node)
        _check_files(cfg.prompt_data, "prompt_data")
        actor = _model_folder(cfg.actor_model)
        reward = None if cfg.reward_model.startswith("rule:") else _model_folder(cfg.reward_model)
        common = SimpleNamespace(zero_stage=cfg.zero_stage, precision=cfg.precision,
                                 micro_batch_size=cfg.micro_batch_size, gradient_checkpointing=cfg.gradient_checkpointing)
        plan = plan_from_namespace(common, model=actor, job="ppo", nodes=hw.nodes, gpus_per_node=hw.gpus_per_node,
                                   gpu_mem_gib=hw.gpu_mem_gib, cpu_mem_gib=hw.cpu_mem_gib, reward_model=reward,
                                   critic_model=actor if cfg.critic_init == "actor" or reward is None else reward,
                                   critic=cfg.advantage_estimator == "gae",
                                   reference_model=_model_folder(cfg.reference_model) if cfg.reference_model else None,
                                   offload_optimizer=cfg.offload_optimizer, offload_param=cfg.offload_param,
                                   vllm_tp=cfg.vllm_tensor_parallel_size, vllm_gpu_util=cfg.vllm_gpu_memory_utilization,
                                   vllm_sleep=cfg.vllm_sleep, gen_batch=cfg.rollout_batch_size * cfg.samples_per_prompt,
                                   prompt_len=cfg.max_prompt_length, gen_len=cfg.max_new_tokens)
        return _report(cfg, ds_cfg, plan)
    return _run(check)
