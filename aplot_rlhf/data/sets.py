"""The pair sets a reward-model run reads: the training pool, its held-out split, the eval sets, tokenized."""
from __future__ import annotations

from .pair_tokenizer import input_format_of
from .pairs import handle_duplicates, load_pairs, parse_eval_specs, split_pairs
from .reading import DataError, SkipCounter


def load_rm_data(cfg, encoder=None, report: dict | None = None) -> tuple[list[dict], dict]:
    """(training pairs, {eval name: pairs}) exactly as train_rm uses them: train pool, held-out split,
    max_* caps, eval sets with unique names, tokenized when `encoder` (a PairTokenizer) is given.

    report: filled with {set name: {"pairs": n, "skipped": {reason: n}}} (the dry run prints it), and the
    training data's input format ('chat' or 'text', `input_format_of`) under report["train_data"]."""
    report = {} if report is None else report
    keys = dict(prompt_key=cfg.prompt_key, chosen_key=cfg.chosen_key, rejected_key=cfg.rejected_key,
                strength_key=cfg.strength_key, hub_split=cfg.hub_split)
    train_skips = SkipCounter()
    pool = load_pairs(cfg.train_data, what="train_data", skips=train_skips, **keys)
    pool = handle_duplicates(pool, cfg.duplicate_pairs, train_skips)
    train_skips.report("train_data")  # the duplicates (report() warns each count once)
    train, id_val = split_pairs(pool, cfg.eval_split_fraction, cfg.split_seed)
    if cfg.max_train_pairs:
        train = train[:cfg.max_train_pairs]
    cap = (lambda pairs: pairs[:cfg.max_eval_pairs]) if cfg.max_eval_pairs else (lambda pairs: pairs)
    sets = [("train_data", train, train_skips)] + ([("id_val", cap(id_val), SkipCounter())] if id_val else [])
    for name, path in parse_eval_specs(cfg.eval_data, reserved=("id_val",) if cfg.eval_split_fraction > 0 else ()):
        skips = SkipCounter()
        sets.append((name, cap(load_pairs(path, what=f"eval_data {name}", skips=skips, **keys)), skips))
    out = {}
    for name, pairs, skips in sets:
        if encoder is not None:
            pairs = encoder.encode_pairs(pairs, "train_data" if name == "train_data" else f"eval set {name}",
                                         skips=skips)
        out[name] = pairs
        report[name] = {"pairs": len(pairs), "skipped": dict(skips.counts)}
    train_pairs = out.pop("train_data")
    report["train_data"]["input_format"] = input_format_of(train, cfg.chat_template)  # the export records it
    if cfg.loss == "margin" and all(p["strength"] is None for p in train_pairs):
        raise DataError(f"loss 'margin' needs a {cfg.strength_key!r} column, but every training pair lacks it")
    return train_pairs, out
