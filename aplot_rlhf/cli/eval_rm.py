"""Score a saved reward model on pair files: `python -m aplot_rlhf.cli.eval_rm --model DIR --data FILE ...`.

Prints, as its last line, {"<file stem>": {"accuracy": float, "n": int}, ...}.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="folder written by train_rm (or any num_labels=1 HF classifier)")
    p.add_argument("--data", required=True, action="append", help="pair file (jsonl/json/parquet/arrow); repeatable")
    p.add_argument("--max_length", type=int, default=0, help="tokens per sequence (default: the model's training value)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--max_pairs", type=int, default=0, help="score only the first N pairs of each file")
    p.add_argument("--prompt_key", default="prompt")
    p.add_argument("--chosen_key", default="chosen")
    p.add_argument("--rejected_key", default="rejected")
    p.add_argument("--details", action="store_true", help="print full statistics, not only accuracy and n")
    args = p.parse_args(argv)

    import os
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from ..data.preference import PairTokenizer, load_pairs, parse_eval_specs
    from ..eval import score_pairs, summarize

    if not os.path.isdir(args.model):
        raise SystemExit(f"--model {args.model}: not a folder")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1).eval()
    cfg = model.config
    max_length = args.max_length or getattr(cfg, "aplot_rlhf_max_length", 512)
    encoder = PairTokenizer(tokenizer, max_length, getattr(cfg, "aplot_rlhf_chat_template", "auto"),
                            getattr(cfg, "aplot_rlhf_response_separator", " "),
                            getattr(cfg, "aplot_rlhf_long_response", "keep_end"))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    def forward(input_ids, attention_mask, response_start):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]

    out = {}
    for name, path in parse_eval_specs(args.data):
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
    main(sys.argv[1:])
