"""Will this run fit? `python -m aplot_rlhf.cli.plan --model llama3-8b --job rm --zero 3 --micro-batch 4 ...`

Prints a per-GPU memory table and a verdict; with --json the last line is one JSON object.
Exit status: 0 fits, 1 does not fit, 2 bad flags or model. All logic lives in aplot_rlhf.plan.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ..plan import (
    ATTN_IMPLEMENTATIONS,
    DTYPE_BYTES,
    JOBS,
    KNOWN_MODELS,
    PlanInput,
    format_plan,
    plan_from_namespace,
    plan_to_dict,
)
from . import HelpFormatter

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(PlanInput)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aplot_rlhf.cli.plan", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
        epilog=f"built-in models: {', '.join(KNOWN_MODELS)} (or a folder / config.json path)")
    d = _DEFAULTS
    p.add_argument("--model", required=True, help="RM backbone or PPO actor: built-in name or model folder")
    p.add_argument("--job", choices=JOBS, default=d["job"])
    p.add_argument("--nodes", type=int, default=d["nodes"])
    p.add_argument("--gpus-per-node", type=int, default=d["gpus_per_node"])
    p.add_argument("--gpu-mem-gib", type=float, default=d["gpu_mem_gib"], help="memory of one GPU")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=d["zero"], help="DeepSpeed ZeRO stage")
    p.add_argument("--offload-optimizer", action="store_true", help="optimizer states on CPU")
    p.add_argument("--offload-param", action="store_true", help="parameters on CPU (ZeRO-3)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=d["dtype"],
                   help="training dtype; bf16/fp16 keep fp32 master weights and Adam states")
    p.add_argument("--micro-batch", type=int, default=d["micro_batch"],
                   help="per GPU: pairs for rm (2 sequences each), sequences for ppo")
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="rm: tokens per sequence")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing")
    p.add_argument("--attn-implementation", choices=ATTN_IMPLEMENTATIONS, default=d["attn_implementation"])
    ppo = p.add_argument_group("ppo")
    ppo.add_argument("--critic-model", default=None, help="defaults to --reward-model")
    ppo.add_argument("--no-critic", dest="critic", action="store_false",
                     help="a critic-free estimator (grpo, rloo, reinforce_pp): no critic weights or states")
    ppo.add_argument("--ref-model", dest="reference_model", default=None, help="defaults to --model")
    ppo.add_argument("--reward-model", default=None, help="defaults to --model")
    ppo.add_argument("--offload-frozen", action="store_true", help="ZeRO-3 param offload of reference and reward model")
    ppo.add_argument("--vllm-tp", type=int, default=d["vllm_tp"], help="vLLM tensor-parallel size")
    ppo.add_argument("--vllm-gpu-util", type=float, default=None,
                     help="vLLM gpu_memory_utilization (default: just what weights + KV cache need)")
    ppo.add_argument("--vllm-sleep", action="store_true", help="vLLM sleeps (weights to CPU) while training")
    ppo.add_argument("--gen-batch", type=int, default=d["gen_batch"], help="sequences in flight per vLLM engine")
    ppo.add_argument("--prompt-len", type=int, default=d["prompt_len"], help="max prompt tokens")
    ppo.add_argument("--gen-len", type=int, default=d["gen_len"], help="max generated tokens")
    p.add_argument("--lora-rank", type=int, default=d["lora_rank"],
                   help="LoRA rank (0 = full fine-tuning): optimizer states and gradients for the adapters only")
    p.add_argument("--lora-targets", default=d["lora_targets"],
                   help="adapted linears, comma-separated (q_proj,k_proj,...,down_proj), auto or all-linear")
    p.add_argument("--cpu-mem-gib", type=float, default=None,
                   help="host RAM per node: checked, and the fix search respects it (else offload may need TBs)")
    p.add_argument("--max-nodes", type=int, default=d["max_nodes"], help="search bound when suggesting more nodes")
    p.add_argument("--ckpt-write-gbps", type=float, default=d["ckpt_write_gbps"],
                   help="GB/s one node writes to the checkpoint storage: sizes the save time and the preemption "
                        "warning lead")
    p.add_argument("--json", action="store_true", help="also print one JSON object as the last line")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        plan = plan_from_namespace(args)
    except ValueError as e:  # unknown model, malformed config.json, impossible setup
        parser.error(str(e))
    print(format_plan(plan))
    if args.json:
        print(json.dumps(plan_to_dict(plan)))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
