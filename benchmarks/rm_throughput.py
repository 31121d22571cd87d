"""Reward-model training throughput: one configuration timed for `bt` and `aplot` in one run.

Prints step time, tokens/s, model TFLOP/s, MFU, peak memory, and APLOT's overhead over BT in percent.
Runs on CUDA (the numbers that matter) and on CPU (small shapes; say so when reporting).

  python benchmarks/rm_throughput.py                       # 1.03B Llama shape, ZeRO-3, 8 pairs x 512, CUDA
  python benchmarks/rm_throughput.py --preset cpu-tiny     # what a CPU can run
  deepspeed --num_gpus 8 benchmarks/rm_throughput.py ...   # several GPUs: per-GPU numbers, global OT batch

The model is built from a config (random weights: speed does not depend on them) and saved to a temp
folder, then loaded the way training loads it (from_pretrained, partitioned under ZeRO-3).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PRESETS = {
    # ~1.03B parameters (Llama shape as in the naive baseline)
    "llama-1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000, pairs=8, seq_len=512),
    "cpu-tiny": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4, vocab_size=8192, pairs=4, seq_len=128),
}


def peak_flops(dtype: str) -> float:
    """Dense peak of the device for MFU (bf16/fp16 tensor cores; fp32 on CPU is not meaningful)."""
    if not torch.cuda.is_available():
        return float("nan")
    name = torch.cuda.get_device_name()
    for key, tflops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12)):
        if key in name:
            return tflops
    return float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-1b" if torch.cuda.is_available() else "cpu-tiny", choices=PRESETS)
    p.add_argument("--pairs", type=int, default=0, help="pairs per GPU per step (default: preset)")
    p.add_argument("--seq_len", type=int, default=0, help="tokens per sequence (default: preset)")
    p.add_argument("--zero_stage", type=int, default=3)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--grad_ckpt", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--steps", type=int, default=10, help="timed steps per loss")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--losses", default="bt,aplot")
    p.add_argument("--out", default="", help="append one JSON line per loss to this file")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()

    from transformers import LlamaConfig, LlamaForCausalLM

    from aplot_rlhf.config import RMConfig
    from aplot_rlhf.engine import deepspeed as ds_api
    from aplot_rlhf.engine import distributed as comm
    from aplot_rlhf.losses import bt_loss
    from aplot_rlhf.models.reward import load_reward_model
    from aplot_rlhf.ot import last_backend, sinkhorn_margin

    preset = dict(PRESETS[args.preset])
    pairs, seq_len = preset.pop("pairs"), preset.pop("seq_len")
    pairs, seq_len = args.pairs or pairs, args.seq_len or seq_len
    rank, world, _ = ds_api.init_distributed("auto", 600)
    dev = comm.device()
    cfg = RMConfig(model_name_or_path="x", train_data=["x"], zero_stage=args.zero_stage, precision=args.precision,
                   micro_batch_size=pairs, learning_rate=1e-5, warmup_ratio=0.0, lr_scheduler="constant")
    ds_cfg = ds_api.build_ds_config(cfg, world)
    precision = ds_api.effective_precision(args.precision)

    tmp = tempfile.mkdtemp(prefix="rm_bench_")
    if rank == 0:
        config = LlamaConfig(**preset, max_position_embeddings=max(2048, seq_len), pad_token_id=0,
                             tie_word_embeddings=False)
        LlamaForCausalLM(config).save_pretrained(tmp)
    comm.barrier()
    paths = [tmp]
    if world > 1:
        torch.distributed.broadcast_object_list(paths, src=0)
    folder = paths[0]
    config = LlamaConfig.from_pretrained(folder)
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter, vocab = config.intermediate_size, config.vocab_size
    # parameters of the RM: the backbone without the LM head, plus a scalar head
    n_params = vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * inter + 2 * hidden) + hidden + hidden

    class Tok:  # the loader only reads pad_token_id
        pad_token_id = 0
    hf_ds = ds_api.zero3_context(ds_cfg)
    model = load_reward_model(folder, tokenizer=Tok(), dtype=ds_api.torch_dtype(precision),
                              gradient_checkpointing=args.grad_ckpt)
    engine, _ = ds_api.initialize(model, ds_cfg, cfg, total_steps=10 ** 6)
    del hf_ds

    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(1, vocab, (2 * pairs, seq_len), generator=gen).to(dev)
    mask = torch.ones_like(ids)
    tokens_per_step = 2 * pairs * seq_len * world
    # 6 N per token for forward+backward of the dense part, plus attention (12 L h s per token), x4/3 with recompute
    flops_per_token = 6 * n_params + 12 * layers * hidden * seq_len
    if args.grad_ckpt:
        flops_per_token = flops_per_token * 4 / 3
    results = []
    for loss_name in args.losses.split(","):
        times = []
        for i in range(args.warmup + args.steps):
            if dev.type == "cuda":
                torch.cuda.synchronize()
                if i == args.warmup:
                    torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            rewards, emb = engine(ids, mask)
            rc, rr = rewards[:pairs], rewards[pairs:]
            margin = None
            if loss_name == "aplot":
                with torch.no_grad():
                    g = [comm.all_gather_no_grad(t) for t in (rc.float(), rr.float(), emb[:pairs], emb[pairs:])]
                    margin = sinkhorn_margin(*g)[rank * pairs:(rank + 1) * pairs]
            engine.backward(bt_loss(rc, rr, margin))
            engine.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        times.sort()
        step_s = times[len(times) // 2]
        tflops = flops_per_token * tokens_per_step / step_s / world / 1e12
        row = {"loss": loss_name, "preset": args.preset, "params": n_params, "pairs_per_gpu": pairs, "seq_len": seq_len,
               "world": world, "zero": args.zero_stage, "precision": precision, "grad_ckpt": args.grad_ckpt,
               "step_s": step_s, "tokens_per_s": tokens_per_step / step_s, "model_tflops_per_gpu": tflops,
               "mfu": tflops * 1e12 / peak_flops(precision),
               "peak_mem_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan"),
               "ot_backend": last_backend() if loss_name == "aplot" else "",
               "device": torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores)"}
        results.append(row)
    if rank == 0:
        print(f"\n{results[0]['device']}, {args.preset} ({n_params / 1e9:.3f}B params), ZeRO-{args.zero_stage}, "
              f"{precision}, {pairs} pairs x {seq_len} tokens per GPU, world {world}, grad ckpt {args.grad_ckpt}")
        print(f"{'loss':<6} {'step_s':>8} {'tokens/s':>10} {'TFLOP/s/GPU':>12} {'MFU':>6} {'peak GiB':>9}")
        for r in results:
            print(f"{r['loss']:<6} {r['step_s']:>8.3f} {r['tokens_per_s']:>10.0f} {r['model_tflops_per_gpu']:>12.2f} "
                  f"{r['mfu']:>6.3f} {r['peak_mem_gib']:>9.2f}")
        by = {r["loss"]: r for r in results}
        if "bt" in by and "aplot" in by:
            print(f"APLOT overhead over BT: {100 * (by['aplot']['step_s'] / by['bt']['step_s'] - 1):+.1f}% "
                  f"(OT backend: {by['aplot']['ot_backend']})")
        if args.out:
            with open(args.out, "a") as fh:
                for r in results:
                    fh.write(json.dumps(r) + "\n")
    comm.shutdown()


if __name__ == "__main__":
    main()
