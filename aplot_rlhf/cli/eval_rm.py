"""Score a saved reward model on evaluation files: `python -m aplot_rlhf.cli.eval_rm --model DIR --data FILE ...`.

Formats (detected from the content, or --format): plain pairs (prompt/chosen/rejected), RM-Bench (chosen and
rejected: lists of 3 styles; a file or a folder of *_filtered.json), RewardBench (v1: rows with a subset) and
RewardBench 2 (best-of-4: one chosen, three rejected; its Ties subset is refused, or dropped by --skip_ties).
Every response is scored once; a comparison is won only if the chosen score is strictly above the rejected
one (ties lose, as RM-Bench and RewardBench count).

Prints, as its last line, one JSON object {"<name>": {...}, ...}: one entry per --data, named by NAME=FILE or
the file stem (stems shared by two files take their parent folder, see parse_eval_specs). Every entry has
accuracy (over all compared chosen/rejected pairs), n (items: pairs, or rows/prompts), n_pairs, format and
length (accuracy where the chosen response is longer / shorter in characters, their counts, and the accuracy
of "the shorter wins" alone); RM-Bench adds hard, normal, easy, overall and domains; RewardBench adds score,
sections, subsets, unknown_subsets; RewardBench 2 adds score, subsets, unknown_subsets.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time

from . import HelpFormatter

log = logging.getLogger(__name__)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="folder written by train_rm (or any num_labels=1 HF classifier)")
    p.add_argument("--data", required=True, action="append",
                   help="evaluation file (jsonl/json/parquet/arrow) or RM-Bench folder, or NAME=FILE; repeatable")
    p.add_argument("--format", default="auto", choices=["auto", "pairs", "rm-bench", "rewardbench", "rewardbench2"],
                   help="the files' format; auto: from the content (lists of 3 chosen and 3 rejected: rm-bench; "
                        "1 chosen and several rejected: rewardbench2; strings with a subset: rewardbench)")
    p.add_argument("--skip_ties", action="store_true",
                   help="RewardBench 2: leave out the Ties subset (its own scoring rule is not implemented) "
                        "instead of refusing the file")
    p.add_argument("--packing", default="auto", choices=["auto", "on", "off"],
                   help="score packed batches (no padding) where the model supports them (auto), always (on) or "
                        "never (off); the scores are the same")
    p.add_argument("--scores_dir", default="",
                   help="also write every response's score, one <name>.jsonl per --data, into this folder")
    p.add_argument("--max_length", type=int, default=0, help="tokens per sequence (0: the model's training value)")
    p.add_argument("--batch_size", type=int, default=16, help="pairs per forward (2 x batch_size responses)")
    p.add_argument("--max_pairs", type=int, default=0,
                   help="score only the first N pairs (benchmarks: items) of each file (0 = all)")
    p.add_argument("--prompt_key", default="prompt")
    p.add_argument("--chosen_key", default="chosen")
    p.add_argument("--rejected_key", default="rejected")
    p.add_argument("--details", action="store_true",
                   help="print full statistics too (pairs: reward statistics; RM-Bench: each domain's 3x3 matrix)")
    p.add_argument("--allow_untrained_reward_head", action="store_true",
                   help="score with a model whose head is not in its checkpoint (random: for debugging only)")
    args = p.parse_args(argv)
    for flag in ("max_length", "max_pairs"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0")
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")

    import os

    from ..data.export_contract import encoder_from_export
    from ..data.pairs import parse_eval_specs
    from ..errors import InputNotFoundError
    from ..eval import scoring_forward
    from ..models.loader import check_max_length, load_config, load_model, load_tokenizer

    if not os.path.isdir(args.model):
        raise InputNotFoundError(f"--model {args.model}: not a folder")
    specs = parse_eval_specs(args.data)  # duplicate names fail before the model loads
    sets = read_sets(specs, args)  # and so do malformed files
    tokenizer = load_tokenizer("eval", args.model)
    model_config = load_config("eval", args.model)
    encoder, _ = encoder_from_export(tokenizer, model_config, args.max_length)  # as train_rm tokenized
    check_max_length(encoder.max_length, model_config, tokenizer, what=f"model {args.model}")
    model = load_model("eval", args.model, dtype=None, allow_untrained_head=args.allow_untrained_reward_head).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    forward, pack = scoring_forward(model, tokenizer.pad_token_id, encoder.max_length, args.packing)

    out = {}
    for name, bench in sets:
        out[name] = evaluate_set(name, bench, args, encoder, forward, pack, tokenizer.pad_token_id)
    print(json.dumps(out))
    return out


def read_sets(specs: list[tuple[str, str]], args) -> list[tuple[str, object]]:
    """[(name, eval_formats.Benchmark)] of every --data, read and checked (format detected unless --format)."""
    from ..eval_formats import read_benchmark
    return [(name, read_benchmark(path, args.format, prompt_key=args.prompt_key, chosen_key=args.chosen_key,
                                  rejected_key=args.rejected_key, max_items=args.max_pairs, skip_ties=args.skip_ties))
            for name, path in specs]


def evaluate_set(name: str, bench, args, encoder, forward, pack, pad_id: int) -> dict:
    """Score each response of one read --data once and return its summary (eval.benchmark_report)."""
    import copy
    import os

    import torch

    from ..eval import attach_scores, benchmark_report, encode_items, score_sequences
    path = bench.path
    if bench.format != "pairs":  # a benchmark's score needs every response: one too long keeps its end
        encoder = copy.copy(encoder)
        encoder.long_response = "keep_end"
    seqs, items = encode_items(encoder, bench.items, path)
    start = time.perf_counter()
    with torch.no_grad():
        rewards = score_sequences(forward, seqs, args.batch_size, pad_id, torch.device("cpu"), pack=pack)
    seconds = time.perf_counter() - start
    scored = attach_scores(items, rewards.tolist())
    report = benchmark_report(bench.format, scored, details=args.details)
    log.info("%s (%s, %s batches): %d responses in %.1f s: %.1f responses/s, %.1f compared pairs/s", name, bench.format,
             "packed" if pack is not None else "padded", len(seqs), seconds, len(seqs) / max(seconds, 1e-9),
             report["n_pairs"] / max(seconds, 1e-9))
    if report.get("unknown_subsets"):
        log.warning("%s: %d rows in subsets outside the official score (%s): reported per subset only", name,
                    sum(report["unknown_subsets"].values()), ", ".join(sorted(report["unknown_subsets"])))
    if args.scores_dir:
        os.makedirs(args.scores_dir, exist_ok=True)
        with open(os.path.join(args.scores_dir, f"{name}.jsonl"), "w", encoding="utf-8") as fh:
            for item in scored:
                fh.write(json.dumps({k: item[k] for k in ("origin", "subset", "domain", "chosen_scores",
                                                          "rejected_scores")}) + "\n")
    if bench.format == "pairs" and not args.details:  # as before: accuracy and n, plus the length diagnostic
        return {k: report[k] for k in ("accuracy", "n", "n_pairs", "format", "length")}
    return report


if __name__ == "__main__":
    from ..errors import run_cli
    run_cli(main, sys.argv[1:])
