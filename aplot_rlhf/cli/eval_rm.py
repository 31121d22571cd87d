"""Score a saved reward model on pair files: `python -m aplot_rlhf.cli.eval_rm --model DIR --data FILE ...`.

Prints, as its last line, {"<name>": {"accuracy": float, "n": int}, ...}: one entry per --data, named by
NAME=FILE or the file stem (stems shared by two files take their parent folder, see parse_eval_specs).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from . import HelpFormatter


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="folder written by train_rm (or any num_labels=1 HF classifier)")
    p.add_argument("--data", required=True, action="append",
                   help="pair file (jsonl/json/parquet/arrow), or NAME=FILE; repeatable")
    p.add_argument("--max_length", type=int, default=0, help="tokens per sequence (0: the model's training value)")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per forward")
    p.add_argument("--max_pairs", type=int, default=0, help="score only the first N pairs of each file (0 = all)")
    p.add_argument("--prompt_key", default="prompt")
    p.add_argument("--chosen_key", default="chosen")
    p.add_argument("--rejected_key", default="rejected")
    p.add_argument("--details", action="store_true", help="print full statistics, not only accuracy and n")
    p.add_argument("--allow_untrained_reward_head", action="store_true",
                   help="score with a model whose head is not in its checkpoint (random: for debugging only)")
    args = p.parse_args(argv)
    for flag in ("max_length", "max_pairs"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")

    import os

    import torch

    from ..data.export_contract import encoder_from_export
    from ..data.pairs import load_pairs, parse_eval_specs
    from ..errors import InputNotFoundError
    from ..eval import score_pairs, summarize
    from ..models.loader import check_max_length, load_config, load_model, load_tokenizer

    if not os.path.isdir(args.model):
        raise InputNotFoundError(f"--model {args.model}: not a folder")
    specs = parse_eval_specs(args.data)  # duplicate names fail before the model loads
    tokenizer = load_tokenizer("eval", args.model)
    model_config = load_config("eval", args.model)
    encoder, _ = encoder_from_export(tokenizer, model_config, args.max_length)  # as train_rm tokenized
    check_max_length(encoder.max_length, model_config, tokenizer, what=f"model {args.model}")
    model = load_model("eval", args.model, dtype=None, allow_untrained_head=args.allow_untrained_reward_head).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    def forward(input_ids, attention_mask, response_start):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    out = {}
    for name, path in specs:
        pairs = load_pairs(path, prompt_key=args.prompt_key, chosen_key=args.chosen_key,
                           rejected_key=args.rejected_key, what=path)
        if args.max_pairs:
            pairs = pairs[:args.max_pairs]
        encoded = encoder.encode_pairs(pairs, path)
        with torch.no_grad():
            c, r = score_pairs(forward, encoded, args.batch_size, tokenizer.pad_token_id, torch.device("cpu"))
        stats = summarize(c, r)
        out[name] = stats if args.details else {"accuracy": stats["accuracy"], "n": stats["n"]}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    from ..errors import run_cli
    run_cli(main, sys.argv[1:])
