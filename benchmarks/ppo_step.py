"""PPO step phases and generation throughput per backend, in one run.

1. Builds a random policy of a given shape (default: SmolLM2-135M's shape; random weights, so answers
   rarely hit EOS and every backend generates the full length) and saves it as an HF folder.
2. Runs `--iterations` real PPO iterations (rule reward) and reports the median time of each phase:
   generation, experience forwards (actor, reference, critic, reward), training, weight sync.
3. Times generation alone for each backend on the same prompts: vLLM (in-process, weights synced from
   the DeepSpeed actor), HF generate on the gathered actor, HF generate under ZeRO-3 with synced_gpus.

  python benchmarks/ppo_step.py                                   # CPU-sized defaults
  deepspeed --num_gpus 8 benchmarks/ppo_step.py --preset smollm2-135m --prompts 32 --new_tokens 256
  ... --prompts 1024 --ppo_epochs 1                                # OpenRLHF's protocol (1024 prompts x 1 epoch)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152),
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=64, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=64, vocab_size=49152),
}


def build_policy(shape: str, folder: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    spec = SHAPES[shape]
    vocab = {f"t{i}": i for i in range(spec["vocab_size"])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core,
                                  unk_token="t0", bos_token="t1", eos_token="t2", pad_token="t2")
    config = LlamaConfig(**spec, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    with open(os.path.join(folder, "prompts.jsonl"), "w") as fh:
        g = torch.Generator().manual_seed(1)
        for _ in range(4096):
            ids = torch.randint(10, spec["vocab_size"], (32,), generator=g).tolist()
            fh.write(json.dumps({"prompt": " ".join(f"t{i}" for i in ids)}) + "\n")


def timed(fn, sync=True):
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="smollm2-135m", choices=SHAPES)
    p.add_argument("--prompts", type=int, default=32, help="prompts per rank per rollout")
    p.add_argument("--new_tokens", type=int, default=256)
    p.add_argument("--iterations", type=int, default=2, help="timed PPO iterations (after one warm-up)")
    p.add_argument("--ppo_epochs", type=int, default=1)
    p.add_argument("--zero_stage", type=int, default=3)
    p.add_argument("--backends", default="vllm,hf_gathered,hf_zero3_synced")
    p.add_argument("--step_backend", default="vllm", help="rollout backend of the timed PPO iterations")
    p.add_argument("--out", default="", help="append JSON lines here")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()

    from aplot_rlhf.config import PPOConfig
    from aplot_rlhf.engine import deepspeed as ds_api
    from aplot_rlhf.engine import distributed as comm
    from aplot_rlhf.rollout.hf import HFRollout
    from aplot_rlhf.trainers.ppo import PPOTrainer

    rank, world, _ = ds_api.init_distributed("auto", 1800)
    folder = [tempfile.mkdtemp(prefix="ppo_bench_") if rank == 0 else None]
    if rank == 0:
        build_policy(args.preset, folder[0])
    if world > 1:
        torch.distributed.broadcast_object_list(folder, src=0)
    folder = folder[0]
    mbs = max(1, min(8, args.prompts))
    cfg = PPOConfig(actor_model=folder, reward_model="rule:neg_length",
                    prompt_data=[os.path.join(folder, "prompts.jsonl")], prompt_format="text", eval_prompts=0,
                    rollout_backend=args.step_backend, rollout_batch_size=args.prompts,
                    ppo_mini_batch_size=args.prompts, micro_batch_size=mbs, max_new_tokens=args.new_tokens,
                    max_prompt_length=64, ppo_iterations=args.iterations + 1, ppo_epochs=args.ppo_epochs,
                    zero_stage=args.zero_stage, output_dir=os.path.join(folder, "run"), tensorboard=False,
                    progress=False, export=False, vllm_gpu_memory_utilization=0.3, learning_rate=1e-6,
                    temperature=1.0).validate()
    trainer = PPOTrainer(cfg).setup()
    phases = []
    for _ in range(args.iterations + 1):
        phases.append(trainer.step())
    phases = phases[1:]  # the first iteration warms up kernels and allocators
    med = {k: statistics.median(m[k] for m in phases)
           for k in ("gen_s", "experience_s", "train_s", "sync_s", "gen_tokens_per_s")}
    step_s = med["gen_s"] + med["experience_s"] + med["train_s"] + med["sync_s"]

    prompts = [pr[0] for pr in trainer.prompts[:args.prompts]]
    gen_rows = []
    for name in args.backends.split(","):
        if name == "vllm":
            if cfg.rollout_backend == "vllm":
                backend = trainer.backend
            else:
                from aplot_rlhf.rollout.vllm_engine import VLLMRollout
                backend = VLLMRollout(folder, dtype=trainer.precision, gpu_memory_utilization=0.3,
                                      max_model_len=64 + args.new_tokens, eos_token_id=2)
                trainer.backend = backend
                trainer.sync_weights()
        else:
            backend = HFRollout(trainer.actor.module, trainer.tok, zero3=trainer.zero3,
                                synced_gpus=name == "hf_zero3_synced" and trainer.zero3)
        backend.generate(prompts[:2], max_new_tokens=4, temperature=1.0, top_p=1.0, seeds=[0] * 2)  # warm-up
        out, sec = timed(lambda: backend.generate(prompts, max_new_tokens=args.new_tokens, temperature=1.0,
                                                  top_p=1.0, seeds=[0] * len(prompts)))
        tokens = sum(len(o) for o in out)
        total = comm.all_reduce_sum(torch.tensor([float(tokens), sec], device=comm.device())).cpu()
        gen_rows.append({"backend": backend.name if name != "hf_zero3_synced" else name, "tokens": int(total[0]),
                         "seconds": total[1].item() / world,
                         "tokens_per_s": total[0].item() / (total[1].item() / world)})
    if rank == 0:
        dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
        print(f"\n{dev}, world {world}, policy {args.preset} (random weights), ZeRO-{args.zero_stage}, "
              f"{args.prompts} prompts/rank x {args.new_tokens} new tokens, step backend {cfg.rollout_backend}")
        print(f"PPO step phases (median of {len(phases)}): generation {med['gen_s']:.2f} s, experience "
              f"{med['experience_s']:.2f} s, training {med['train_s']:.2f} s, weight sync {med['sync_s']:.2f} s "
              f"({100 * med['sync_s'] / step_s:.1f}% of the step)")
        print(f"{'backend':<18} {'tokens':>8} {'seconds':>9} {'tokens/s':>10} {'vs hf_gathered':>15}")
        base = next((r["tokens_per_s"] for r in gen_rows if r["backend"] == "hf_gathered"), float("nan"))
        for r in gen_rows:
            print(f"{r['backend']:<18} {r['tokens']:>8} {r['seconds']:>9.2f} {r['tokens_per_s']:>10.1f} "
                  f"{r['tokens_per_s'] / base:>14.1f}x")
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps({"device": dev, "world": world, "preset": args.preset, "prompts": args.prompts,
                                     "new_tokens": args.new_tokens, "phases": med, "sync_share": med["sync_s"] / step_s,
                                     "generation": gen_rows}) + "\n")
    trainer.close()


if __name__ == "__main__":
    main()
