"""Evaluation files as eval_rm reads them: plain pairs, RM-Bench, RewardBench (v1) and RewardBench 2.

read_benchmark(path) -> Benchmark: the format (detected from the content, or given) and its items, each
{prompt, chosen: [str], rejected: [str], subset, domain, origin}. Scoring items is eval.py's job (no I/O).

- pairs: one chosen, one rejected (data.pairs.load_pairs: jsonl/json/parquet/arrow, chat messages too).
- rm-bench: chosen and rejected are lists of 3 strings (styles concise, detailed plain, detailed markdown);
  the domain (chat, math, code, safety-refuse, safety-response) comes from an item's `domain` field, else
  the file name (`chat_filtered.json`), else its `subset`. A folder of such files is one set.
- rewardbench: `prompt, chosen, rejected, subset` rows with one string each.
- rewardbench2: best-of-4 rows, `chosen: [1 str], rejected: [3 str], subset`; the Ties subset is refused
  (its score is v2's own rule, not implemented here) unless skip_ties drops its rows, counted.
"""
from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field

from .data.pairs import check_text, load_pairs, normalize_record
from .data.reading import DataError, is_messages, read_records

log = logging.getLogger(__name__)

FORMATS = ("auto", "pairs", "rm-bench", "rewardbench", "rewardbench2")
RM_BENCH_STYLES = ("concise", "detailed plain", "detailed markdown")
RM_BENCH_DOMAINS = ("chat", "math", "code", "safety-refuse", "safety-response")
# RM-Bench's upstream `subset` values, for files that carry neither a domain field nor a domain file name
_RM_BENCH_SUBSET_DOMAIN = {"alpacaeval": "chat", "math-prm": "math", "bigcode/humanevalpack": "code",
                           "refusals-dangerous": "safety-refuse", "refusals-offensive": "safety-refuse",
                           "xstest-should-refuse": "safety-refuse", "donotanswer": "safety-refuse",
                           "xstest-should-respond": "safety-response"}
V2_TIES = "ties"  # compared lower-case
V2_KEYS = ("num_correct", "num_incorrect", "total_completions")  # columns only RewardBench 2 rows carry


@dataclass
class Benchmark:
    """One evaluation set: `items` hold prompt, chosen [k], rejected [m], subset, domain, origin."""
    path: str
    format: str
    items: list[dict]
    skipped: dict = field(default_factory=dict)  # reason -> count, logged by the reader too


def _domain_from_name(path: str) -> str | None:
    stem = os.path.basename(path).split(".")[0]
    stem = stem[:-len("_filtered")] if stem.endswith("_filtered") else stem
    return stem if stem in RM_BENCH_DOMAINS else None


def _records(path: str) -> list[tuple[str, dict, str]]:
    """(origin, record, source file) of a file, or of every .json/.jsonl/.parquet file of a folder that is not
    a `datasets.save_to_disk` folder (RM-Bench ships one file per domain)."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f))
                                       for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        files = sorted(f for ext in ("json", "jsonl", "parquet") for f in glob.glob(os.path.join(path, f"*.{ext}")))
        if not files:
            raise DataError(f"{path}: a folder with no .json, .jsonl or .parquet file")
        return [(o, r, f) for f in files for o, r in read_records(f)]
    return [(o, r, path) for o, r in read_records(path)]


def _is_text_list(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(s, str) for s in x)


def _record_format(rec: dict, chosen_key: str, rejected_key: str) -> str:
    chosen, rejected = rec.get(chosen_key), rec.get(rejected_key)
    if _is_text_list(chosen) and _is_text_list(rejected) and not (is_messages(chosen) or is_messages(rejected)):
        if any(k in rec for k in V2_KEYS) or len(chosen) != 3 or len(rejected) != 3:
            return "rewardbench2"
        return "rm-bench"
    if isinstance(rec.get("subset"), str) and isinstance(chosen, str):
        return "rewardbench"
    return "pairs"


def detect_format(records: list[tuple[str, dict, str]], path: str, chosen_key="chosen",
                  rejected_key="rejected") -> str:
    """The one format every record has (RM-Bench and v2 told apart over the whole file: v2 keys or 3x3)."""
    if not records:
        raise DataError(f"{path}: no records")
    kinds = {}
    for origin, rec, _ in records:
        if not isinstance(rec, dict):
            raise DataError(f"{origin}: expected a JSON object, got {type(rec).__name__}")
        kinds.setdefault(_record_format(rec, chosen_key, rejected_key), origin)
    if set(kinds) == {"rm-bench", "rewardbench2"}:  # a v2 file whose rows happen to hold 3 and 3 responses
        return "rewardbench2"
    if len(kinds) > 1:
        raise DataError(f"{path}: the records mix formats ({', '.join(f'{k} at {o}' for k, o in kinds.items())}); "
                        "pass --format to say which one, or split the file")
    return next(iter(kinds))


def _text_list(rec: dict, key: str, origin: str, n: int | None, what: str) -> list[str]:
    value = rec.get(key)
    if value is None:
        raise DataError(f"{origin}: missing field {key!r} (fields present: {sorted(rec)})")
    if not _is_text_list(value) or (n is not None and len(value) != n):
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise DataError(f"{origin}: field {key!r} must be a list of {n or 'one or more'} strings ({what}), got {got}")
    for k, s in enumerate(value):
        if not s.strip():
            raise DataError(f"{origin}: field {key!r}[{k}] is empty")
    return value


def _subset(rec: dict, origin: str) -> str:
    subset = rec.get("subset")
    if not isinstance(subset, str) or not subset:
        raise DataError(f"{origin}: field 'subset' must be a non-empty string, got {subset!r}")
    return subset


def _rm_bench_item(origin, rec, source, prompt_key, chosen_key, rejected_key) -> dict:
    styles = ", ".join(RM_BENCH_STYLES)
    chosen = _text_list(rec, chosen_key, origin, 3, styles)
    rejected = _text_list(rec, rejected_key, origin, 3, styles)
    if prompt_key not in rec:
        raise DataError(f"{origin}: missing field {prompt_key!r}")
    prompt = check_text(rec[prompt_key], origin, prompt_key)
    domain = rec.get("domain") or _domain_from_name(source) or _RM_BENCH_SUBSET_DOMAIN.get(rec.get("subset"))
    if domain not in RM_BENCH_DOMAINS:
        raise DataError(f"{origin}: RM-Bench domain unknown (field 'domain' {rec.get('domain')!r}, subset "
                        f"{rec.get('subset')!r}, file {os.path.basename(source)}); give each item a 'domain' field "
                        f"or name the file <domain>_filtered.json, domain one of {', '.join(RM_BENCH_DOMAINS)}")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "subset": rec.get("subset"), "domain": domain,
            "origin": origin}


def _rewardbench2_item(origin, rec, prompt_key, chosen_key, rejected_key) -> dict:
    chosen = _text_list(rec, chosen_key, origin, 1, "RewardBench 2: one chosen response per row outside Ties")
    rejected = _text_list(rec, rejected_key, origin, None, "the rejected responses")
    if prompt_key not in rec:
        raise DataError(f"{origin}: missing field {prompt_key!r}")
    return {"prompt": check_text(rec[prompt_key], origin, prompt_key), "chosen": chosen, "rejected": rejected,
            "subset": _subset(rec, origin), "domain": None, "origin": origin}


def read_benchmark(path: str, fmt: str = "auto", *, prompt_key="prompt", chosen_key="chosen",
                   rejected_key="rejected", max_items: int = 0, skip_ties: bool = False) -> Benchmark:
    """Read and check one evaluation file (or RM-Bench folder). max_items: keep the first N items (0: all).

    Raises DataError naming the file, item/line and field for anything malformed; nothing is dropped silently
    (the only drops, v2 Ties rows with skip_ties, are counted in Benchmark.skipped and logged)."""
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    if fmt != "pairs":
        records = _records(path)
        if fmt == "auto":
            fmt = detect_format(records, path, chosen_key, rejected_key)
    if fmt == "pairs":
        pairs = load_pairs(path, prompt_key=prompt_key, chosen_key=chosen_key, rejected_key=rejected_key, what=path)
        items = [{"prompt": p["prompt"], "chosen": [p["chosen"]], "rejected": [p["rejected"]], "subset": None,
                  "domain": None, "origin": p["origin"]} for p in pairs]
        return Benchmark(path, fmt, items[:max_items] if max_items else items)
    items, skipped = [], {}
    ties_at = None
    for origin, rec, source in records:
        if max_items and len(items) >= max_items:
            break
        if not isinstance(rec, dict):
            raise DataError(f"{origin}: expected a JSON object, got {type(rec).__name__}")
        if fmt == "rm-bench":
            items.append(_rm_bench_item(origin, rec, source, prompt_key, chosen_key, rejected_key))
        elif fmt == "rewardbench2":
            if str(rec.get("subset", "")).lower() == V2_TIES:
                ties_at = ties_at or origin
                skipped["RewardBench 2 Ties rows"] = skipped.get("RewardBench 2 Ties rows", 0) + 1
                continue
            items.append(_rewardbench2_item(origin, rec, prompt_key, chosen_key, rejected_key))
        else:  # rewardbench (v1): one chosen and one rejected string per row, plus its subset
            pair = normalize_record(rec, origin, prompt_key=prompt_key, chosen_key=chosen_key,
                                    rejected_key=rejected_key)
            items.append({"prompt": pair["prompt"], "chosen": [pair["chosen"]], "rejected": [pair["rejected"]],
                          "subset": _subset(rec, origin), "domain": None, "origin": origin})
    if ties_at is not None and not skip_ties:
        raise DataError(f"{ties_at}: RewardBench 2's Ties subset ({skipped['RewardBench 2 Ties rows']} rows) is "
                        "scored by v2's own rule (several correct answers, a margin term), which eval_rm does not "
                        "implement; pass --skip_ties to score the other subsets without it, or remove those rows")
    for reason, n in skipped.items():
        log.warning("%s: %d %s left out (--skip_ties)", path, n, reason)
    if not items:
        raise DataError(f"{path}: zero usable items (skipped: {skipped or 'none'})")
    return Benchmark(path, fmt, items, skipped)
