"""`--dry_run` for train_rm and train_ppo: check a launch before it spends a node-hour.

No GPU, no process group, no weights: validates the config, builds the DeepSpeed JSON and runs it
through DeepSpeed's own parser, checks that data files exist, reads the model's config.json, and
prints the memory plan for the hardware in APLOT_PLAN_NODES / APLOT_PLAN_GPUS_PER_NODE /
APLOT_PLAN_GPU_MEM_GIB (the launchers export them; default 1 x 1 x 80 GiB). Exit 0 if it fits, 1 if not.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace


def hardware() -> tuple[int, int, float]:
    return (int(os.environ.get("APLOT_PLAN_NODES", 1)), int(os.environ.get("APLOT_PLAN_GPUS_PER_NODE", 1)),
            float(os.environ.get("APLOT_PLAN_GPU_MEM_GIB", 80)))


def check_deepspeed_json(cfg, world: int) -> dict:
    """Our DeepSpeed config for `world` ranks, accepted by DeepSpeed's parser; raises ValueError if not."""
    from deepspeed.runtime.config import DeepSpeedConfig
    from .. import engine as eng
    ds_cfg = eng.build_ds_config(cfg, world, precision=cfg.precision)
    eng.check_ds_config(ds_cfg, world)
    probe = copy.deepcopy(ds_cfg)
    probe.pop("train_batch_size", None)  # the parser sees world size 1 here; the arithmetic was checked above
    try:
        DeepSpeedConfig(probe)
    except Exception as exc:
        raise ValueError(f"DeepSpeed rejects the config{' ' + cfg.ds_config if cfg.ds_config else ''}: {exc}") from exc
    return ds_cfg


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
    print("resolved config:\n" + json.dumps({k: v for k, v in vars(cfg).items()}, indent=1, default=str))
    print("DeepSpeed config:\n" + json.dumps(ds_cfg, indent=1))
    print(format_plan(plan))
    print(json.dumps({"dry_run": "ok", "fits": plan.fits}))
    return 0 if plan.fits else 1


def dry_run_rm(cfg) -> int:
    from ..plan import plan_from_namespace
    nodes, gpus, mem = hardware()
    ds_cfg = check_deepspeed_json(cfg, nodes * gpus)
    _check_files(cfg.train_data, "train_data")
    _check_files(cfg.eval_data, "eval_data")
    plan = plan_from_namespace(cfg, model=_model_folder(cfg.model_name_or_path), job="rm", nodes=nodes,
                               gpus_per_node=gpus, gpu_mem_gib=mem, offload_optimizer=cfg.offload_optimizer,
                               offload_param=cfg.offload_param)
    code = _report(cfg, ds_cfg, plan)
    if code:
        sys.exit(code)
    return code


def dry_run_ppo(cfg) -> int:
    from ..plan import plan_from_namespace
    nodes, gpus, mem = hardware()
    cfg.gradient_accumulation_steps = cfg.ppo_mini_batch_size // cfg.micro_batch_size
    ds_cfg = check_deepspeed_json(cfg, nodes * gpus)
    _check_files(cfg.prompt_data, "prompt_data")
    actor = _model_folder(cfg.actor_model)
    reward = None if cfg.reward_model.startswith("rule:") else _model_folder(cfg.reward_model)
    common = SimpleNamespace(zero_stage=cfg.zero_stage, precision=cfg.precision, micro_batch_size=cfg.micro_batch_size,
                             gradient_checkpointing=cfg.gradient_checkpointing)
    plan = plan_from_namespace(common, model=actor, job="ppo", nodes=nodes, gpus_per_node=gpus,
                               gpu_mem_gib=mem, reward_model=reward,
                               critic_model=actor if cfg.critic_init == "actor" or reward is None else reward,
                               reference_model=_model_folder(cfg.reference_model) if cfg.reference_model else None,
                               offload_optimizer=cfg.offload_optimizer, offload_param=cfg.offload_param,
                               vllm_tp=cfg.vllm_tensor_parallel_size, vllm_gpu_util=cfg.vllm_gpu_memory_utilization,
                               vllm_sleep=cfg.vllm_sleep, gen_batch=cfg.rollout_batch_size,
                               prompt_len=cfg.max_prompt_length, gen_len=cfg.max_new_tokens)
    code = _report(cfg, ds_cfg, plan)
    if code:
        sys.exit(code)
    return code
