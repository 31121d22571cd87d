"""Preference pairs as records: normalize (prompt, chosen, rejected, strength), read pair files, split, name eval sets.

A normalized pair is a dict: prompt (str or list of chat messages), chosen, rejected (str or one
assistant message list), strength (float or None), origin ("file:line" for error messages).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random

from ..errors import ConfigError
from .reading import DataError, SkipCounter, check_chat_messages, is_messages, read_records

log = logging.getLogger(__name__)


def check_text(value, origin: str, key: str):
    check_chat_messages(value, origin, key)
    if is_messages(value):
        if not value or any(not isinstance(m["content"], str) for m in value):
            raise DataError(f"{origin}: field {key!r} has a message without string content")
        return value
    if not isinstance(value, str):
        raise DataError(f"{origin}: field {key!r} must be a string or a list of chat messages, "
                        f"got {type(value).__name__}")
    return value


def normalize_record(rec: dict, origin: str, *, prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                     strength_key="strength", skips: SkipCounter | None = None):
    """One raw record -> normalized pair, or None (counted in `skips`) for an empty response."""
    for key in (chosen_key, rejected_key):
        if key not in rec:
            raise DataError(f"{origin}: missing field {key!r} (fields present: {sorted(rec)}); "
                            f"set --{'chosen' if key == chosen_key else 'rejected'}_key to the right name")
    chosen = check_text(rec[chosen_key], origin, chosen_key)
    rejected = check_text(rec[rejected_key], origin, rejected_key)
    prompt = rec.get(prompt_key, None)
    if prompt is None:
        if is_messages(chosen) and is_messages(rejected):
            # full conversations (TRL/HH chat style): the shared prefix is the prompt
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            raise DataError(f"{origin}: missing field {prompt_key!r}; set --prompt_key, or give chosen/rejected as "
                            "full chat-message conversations")
    else:
        prompt = check_text(prompt, origin, prompt_key)
    for key, resp in ((chosen_key, chosen), (rejected_key, rejected)):
        text = resp if isinstance(resp, str) else "".join(m["content"] for m in resp)
        if not text.strip():
            if skips is not None:
                skips.add(f"pair(s) skipped: empty {key!r} response")
                log.debug("%s: empty %s response, skipped", origin, key)
                return None
            raise DataError(f"{origin}: field {key!r} is empty")
    strength = rec.get(strength_key)
    if strength is not None:
        try:
            strength = float(strength)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{origin}: field {strength_key!r} must be a number or null, got {strength!r}") from exc
        if not math.isfinite(strength):
            raise DataError(f"{origin}: field {strength_key!r} is not finite ({strength})")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "strength": strength, "origin": origin}


def load_pairs(paths, *, prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
               strength_key="strength", hub_split="train", what="data", skips: SkipCounter | None = None) -> list[dict]:
    """Load and normalize pairs from one or more sources; raise if none are usable.

    skips: a counter to fill (the dry run reports it); one is made if not given."""
    if isinstance(paths, str):
        paths = [paths]
    skips = SkipCounter() if skips is None else skips
    pairs = []
    for path in paths:
        for origin, rec in read_records(path, hub_split):
            pair = normalize_record(rec, origin, prompt_key=prompt_key, chosen_key=chosen_key,
                                    rejected_key=rejected_key, strength_key=strength_key, skips=skips)
            if pair is not None:
                pairs.append(pair)
    skips.report(what)
    if not pairs:
        raise DataError(f"{what}: zero usable pairs in {', '.join(paths)} "
                        f"(skipped: {skips.counts or 'none'}); check the file and the --*_key options")
    return pairs


def pair_key(pair: dict) -> str:
    """What makes two normalized pairs the same pair: prompt, chosen and rejected (not strength or origin)."""
    return json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], sort_keys=True, ensure_ascii=False)


def handle_duplicates(pairs: list, mode: str, skips: SkipCounter) -> list:
    """Exact duplicate pairs (`pair_key`): 'drop' keeps each pair's first occurrence, 'keep' keeps them all;
    either way the copies are counted in `skips` (split_pairs keeps copies on one side of the split)."""
    seen, out = set(), []
    for pair in pairs:
        key = pair_key(pair)
        if key in seen:
            if mode == "drop":
                skips.add("duplicate pair(s) dropped (same prompt, chosen and rejected as an earlier pair; "
                          "--duplicate_pairs keep keeps them)")
                log.debug("%s: duplicate pair, dropped", pair["origin"])
                continue
            skips.add("duplicate pair(s) kept (--duplicate_pairs keep), each on its first copy's side of the split")
        seen.add(key)
        out.append(pair)
    return out


def split_pairs(pairs: list, fraction: float, seed: int):
    """Deterministic (train, validation) split: the same seed gives the same split on every machine.

    Copies of one pair (`pair_key`) are one unit of the split, so no pair is in both halves (a copy in
    train would make its validation twin a memorized answer). The units are shuffled as the pairs were
    before, so a file without duplicates splits exactly as it always did."""
    if fraction <= 0:
        return pairs, []
    unit_of, units = {}, []
    for pair in pairs:
        unit_of.setdefault(pair_key(pair), len(unit_of))
        units.append(unit_of[pair_key(pair)])
    order = list(range(len(unit_of)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(unit_of) * fraction)))
    val_units = set(order[:n_val])
    return ([p for p, u in zip(pairs, units) if u not in val_units],
            [p for p, u in zip(pairs, units) if u in val_units])


def parse_eval_specs(specs, reserved=()) -> list[tuple[str, str]]:
    """'NAME=FILE' or 'FILE' -> [(name, file)], one unique name per input.

    The name defaults to the file stem. Results are keyed by name, so two inputs must never share one:
    an explicit NAME given twice (or equal to a `reserved` name such as 'id_val') is an error; derived
    names that collide take their parent folder ('folder_stem'; no '/', metric keys split on it), then a
    '-2', '-3', ... suffix.
    """
    explicit, entries = {}, []
    for spec in specs:
        if "=" in spec and not os.path.exists(spec):
            name, path = spec.split("=", 1)
            if not name or not path:
                raise ConfigError(f"eval_data {spec!r}: expected NAME=FILE or FILE")
            if name in reserved:
                raise ConfigError(f"eval_data {spec!r}: the name {name!r} is taken by the held-out split; "
                                  "pick another NAME")
            if name in explicit:
                raise ConfigError(f"eval_data: the name {name!r} is given twice ({explicit[name]} and {path}); "
                                  "each eval set needs its own NAME")
            explicit[name] = path
            entries.append([name, path, True])
        else:
            entries.append([os.path.basename(spec.rstrip("/")).split(".")[0], spec, False])
    taken = set(explicit) | set(reserved)
    derived = [e for e in entries if not e[2]]
    stems = [e[0] for e in derived]
    for e in derived:  # a shared stem: every input with it says where it comes from, not only the later ones
        if stems.count(e[0]) > 1 or e[0] in taken:
            parent = os.path.basename(os.path.dirname(os.path.abspath(e[1].rstrip("/"))))
            e[0] = f"{parent}_{e[0]}" if parent else e[0]
    used = set(taken)
    for e in derived:
        name, k = e[0], 2
        while name in used:
            name, k = f"{e[0]}-{k}", k + 1
        if name != os.path.basename(e[1].rstrip("/")).split(".")[0]:
            log.warning("eval_data %s: reported as %r (its file name is shared with another eval set)", e[1], name)
        e[0] = name
        used.add(name)
    return [(name, path) for name, path, _ in entries]
