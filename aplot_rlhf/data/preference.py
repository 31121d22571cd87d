"""Preference pairs: load (jsonl/json/parquet/arrow or a hub name), normalize, template, tokenize, collate.

A normalized pair is a dict: prompt (str or list of chat messages), chosen, rejected (str or one
assistant message list), strength (float or None), origin ("file:line" for error messages).
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError, InputNotFoundError, UserError

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass
class SkipCounter:
    """Counts pairs dropped or altered during loading, by reason, so no skip is silent."""
    counts: dict = field(default_factory=dict)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def report(self, what: str) -> None:
        for reason, n in sorted(self.counts.items()):
            log.warning("%s: %d %s", what, n, reason)


# ----------------------------------------------------------------------------------------- loading

def _read_records(path: str, hub_split: str = "train"):
    """Yield (origin, record) from a local file or a hub dataset name."""
    if os.path.isdir(path):
        import datasets  # a folder written by datasets.save_to_disk
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[hub_split]
        for i, rec in enumerate(ds):
            yield f"{path}:row {i}", rec
        return
    if not os.path.exists(path):
        if path.endswith((".jsonl", ".json", ".parquet", ".arrow")) or os.sep in path and not _looks_like_hub(path):
            raise InputNotFoundError(f"data file not found: {path}")
        import datasets  # a hub name; works only with network access
        try:
            ds = datasets.load_dataset(path, split=hub_split)
        except Exception as exc:
            raise DataError(f"{path}: not a local file and could not be loaded from the hub ({exc})") from exc
        for i, rec in enumerate(ds):
            yield f"{path}[{hub_split}]:row {i}", rec
        return
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno}); "
                                    "fix or delete that line") from exc
                if not isinstance(rec, dict):
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield f"{path}:{lineno}", rec
    elif path.endswith(".json"):
        with open(path, encoding="utf-8") as fh:
            try:
                obj = json.load(fh)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
        if isinstance(obj, dict):
            obj = obj.get("data", obj.get("train"))
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a list of pair objects (or {{'data': [...]}})")
        for i, rec in enumerate(obj):
            yield f"{path}:item {i}", rec
    elif path.endswith(".parquet"):
        import pyarrow.parquet as pq
        for i, rec in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path}:row {i}", rec
    elif path.endswith(".arrow"):
        import pyarrow as pa
        with open(path, "rb") as fh:
            try:
                table = pa.ipc.open_stream(fh).read_all()
            except pa.ArrowInvalid:
                fh.seek(0)
                table = pa.ipc.open_file(fh).read_all()
        for i, rec in enumerate(table.to_pylist()):
            yield f"{path}:row {i}", rec
    else:
        raise DataError(f"{path}: unknown file type; use .jsonl, .json, .parquet, .arrow or a datasets folder")


def _looks_like_hub(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/"))


def _is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def _check_text(value, origin: str, key: str):
    if _is_messages(value):
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
    chosen = _check_text(rec[chosen_key], origin, chosen_key)
    rejected = _check_text(rec[rejected_key], origin, rejected_key)
    prompt = rec.get(prompt_key, None)
    if prompt is None:
        if _is_messages(chosen) and _is_messages(rejected):
            # full conversations (TRL/HH chat style): the shared prefix is the prompt
            n = 0
            while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
                n += 1
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        else:
            raise DataError(f"{origin}: missing field {prompt_key!r}; set --prompt_key, or give chosen/rejected as "
                            "full chat-message conversations")
    else:
        prompt = _check_text(prompt, origin, prompt_key)
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
        for origin, rec in _read_records(path, hub_split):
            pair = normalize_record(rec, origin, prompt_key=prompt_key, chosen_key=chosen_key,
                                    rejected_key=rejected_key, strength_key=strength_key, skips=skips)
            if pair is not None:
                pairs.append(pair)
    skips.report(what)
    if not pairs:
        raise DataError(f"{what}: zero usable pairs in {', '.join(paths)} "
                        f"(skipped: {skips.counts or 'none'}); check the file and the --*_key options")
    return pairs


def split_pairs(pairs: list, fraction: float, seed: int):
    """Deterministic (train, validation) split: the same seed gives the same split on every machine."""
    if fraction <= 0:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(round(len(pairs) * fraction)))
    val_idx = set(order[:n_val])
    return ([p for i, p in enumerate(pairs) if i not in val_idx], [p for i, p in enumerate(pairs) if i in val_idx])


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


# ---------------------------------------------------------------------------------- tokenization

class PairTokenizer:
    """Turns normalized pairs into token ids that end with the response, prompt cut from the left.

    The reward is read at the last token of each sequence, so the response end must stay inside the
    window: a too-long prompt loses its oldest tokens (counted); a response that alone does not fit
    keeps its end (long_response='keep_end') or drops the pair ('skip'), counted either way.
    """

    def __init__(self, tokenizer, max_length: int, chat_template: str = "auto", separator: str = " ",
                 long_response: str = "keep_end"):
        self.tok = tokenizer
        self.long_response = long_response
        self.max_length = max_length
        self.chat_template = chat_template
        self.separator = separator
        ensure_pad_token(tokenizer)
        # the special tokens the tokenizer puts around plain text (e.g. [CLS] x [SEP], or <s> x)
        plain = tokenizer.encode("a", add_special_tokens=False)
        full = tokenizer.encode("a", add_special_tokens=True)
        at = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
        self.prefix_ids, self.suffix_ids = full[:at], full[at + len(plain):]
        self.n_special = len(self.prefix_ids) + len(self.suffix_ids)

    def _texts(self, prompt, response) -> tuple[str, str, bool]:
        """(prompt_text, full_text, templated): full_text = prompt_text + response part."""
        use_template = self.chat_template == "always" or (
            self.chat_template == "auto" and (_is_messages(prompt) or _is_messages(response)))
        if use_template:
            if getattr(self.tok, "chat_template", None) is None:
                raise DataError("chat-message data needs a tokenizer with a chat template; "
                                "pass --chat_template never to join messages as plain text")
            prompt_msgs = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
            resp_msgs = response if _is_messages(response) else [{"role": "assistant", "content": response}]
            prompt_text = self.tok.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
            full_text = self.tok.apply_chat_template(prompt_msgs + resp_msgs, tokenize=False)
            if not full_text.startswith(prompt_text):
                prompt_text = self.tok.apply_chat_template(prompt_msgs, tokenize=False)
            return prompt_text, full_text, True
        p = prompt if isinstance(prompt, str) else "".join(f"\n\n{m['role']}: {m['content']}" for m in prompt)
        r = response if isinstance(response, str) else " ".join(m["content"] for m in response)
        return p, p + self.separator + r, False

    def encode(self, prompt, response, skips: SkipCounter) -> tuple[list[int], int] | None:
        """-> (token ids, index of the first response token), or None if the pair must be dropped."""
        prompt_text, full_text, templated = self._texts(prompt, response)
        n_special = 0 if templated else self.n_special  # a chat template writes its own special tokens
        prompt_ids = self.tok.encode(prompt_text, add_special_tokens=False)
        full_ids = self.tok.encode(full_text, add_special_tokens=False)
        # split at the prompt boundary in token space; BPE may merge across it, so trust the common prefix
        n = 0
        while n < min(len(prompt_ids), len(full_ids)) and prompt_ids[n] == full_ids[n]:
            n += 1
        head, tail = full_ids[:n], full_ids[n:]
        budget = self.max_length - n_special
        if len(tail) > budget:
            if self.long_response == "skip":
                skips.add(f"pair(s) skipped: a response is longer than max_length={self.max_length}")
                return None
            skips.add(f"sequence(s) whose response alone exceeds max_length={self.max_length}: "
                      "prompt dropped, response cut from the left")
            head, tail = [], tail[len(tail) - budget:]
        if len(head) + len(tail) > budget:
            skips.add(f"sequence(s) with the prompt cut from the left to fit max_length={self.max_length}")
            head = head[len(head) + len(tail) - budget:]
        ids = head + tail
        if n_special:
            return self.prefix_ids + ids + self.suffix_ids, len(self.prefix_ids) + len(head)
        return ids, len(head)

    def encode_pairs(self, pairs: list[dict], what: str = "data", skips: SkipCounter | None = None) -> list[dict]:
        """-> list of {chosen_ids, rejected_ids, strength, origin}; raises if no pair survives.

        skips: a counter to fill (the dry run reports it); one is made if not given."""
        skips = SkipCounter() if skips is None else skips
        out = []
        for p in pairs:
            c = self.encode(p["prompt"], p["chosen"], skips)
            r = self.encode(p["prompt"], p["rejected"], skips) if c is not None else None
            if c is None or r is None:
                continue
            out.append({"chosen_ids": c[0], "chosen_start": c[1], "rejected_ids": r[0], "rejected_start": r[1],
                        "strength": p.get("strength"), "origin": p.get("origin")})
        # both sequences count once each; report per pair
        skips.report(what)
        if not out:
            raise DataError(f"{what}: zero usable pairs after tokenization (max_length={self.max_length}; "
                            f"{skips.counts})")
        return out


def ensure_pad_token(tokenizer) -> None:
    """Give tokenizers without a pad token one (eos), as Llama-style tokenizers need.

    Padding is on the right and the reward is read at the rightmost non-pad token (the rule
    transformers' sequence-classification heads use), so pad == eos is safe: a response's own
    trailing eos is skipped identically in training, evaluation and the exported model.
    """
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise DataError("tokenizer has neither a pad nor an eos token; set one in its tokenizer_config.json")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"


def pair_length(pair: dict) -> int:
    """Tokens a pair pads to in a micro-batch: its longer sequence (chosen and rejected share the batch)."""
    return max(len(pair["chosen_ids"]), len(pair["rejected_ids"]))


def collate_pairs(batch: list[dict], pad_id: int) -> dict:
    """Pairs -> one padded batch of 2B sequences: rows [0, B) chosen, rows [B, 2B) rejected.

    Returns input_ids, attention_mask [2B, L] (L = longest in the batch), response_start [2B],
    strength [B] (NaN where absent).
    """
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, :len(s)] = 1
    response_start = torch.tensor([b["chosen_start"] for b in batch] + [b["rejected_start"] for b in batch])
    strength = torch.tensor([float("nan") if b["strength"] is None else b["strength"] for b in batch])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_start": response_start,
            "strength": strength}


def last_non_pad(seq: list[int], pad_id: int) -> int:
    """Offset of the rightmost non-pad token (0 if none): the token transformers' decoder heads read."""
    for k in range(len(seq) - 1, -1, -1):
        if seq[k] != pad_id:
            return k
    return 0


def collate_pairs_packed(batch: list[dict], pad_id: int, capacity: int | None, reads_last_token: bool) -> dict:
    """Pairs -> one packed batch of the same 2B sequences as collate_pairs (chosen, then rejected).

    Returns packed (models.packing.pack's layout plus reward_index [2B], the flat index of each
    sequence's reward token: the rightmost non-pad token for decoders, as with padding, or the first
    ([CLS]) for encoders; pool_weight [R*L], 1 on response tokens), response_start [2B], strength [B]."""
    from ..models.packing import pack
    seqs = [b["chosen_ids"] for b in batch] + [b["rejected_ids"] for b in batch]
    starts = [b["chosen_start"] for b in batch] + [b["rejected_start"] for b in batch]
    layout = pack(seqs, pad_id, capacity)
    at = layout["start"].tolist()
    offset = [last_non_pad(s, pad_id) for s in seqs] if reads_last_token else [0] * len(seqs)
    weight = torch.zeros(layout["n_slots"])
    for a, s, r in zip(at, seqs, starts):
        weight[a + r:a + len(s)] = 1.0
    layout["reward_index"] = torch.tensor([a + o for a, o in zip(at, offset)], dtype=torch.long)
    layout["pool_weight"] = weight
    strength = torch.tensor([float("nan") if b["strength"] is None else b["strength"] for b in batch])
    return {"packed": layout, "response_start": torch.tensor(starts), "strength": strength}


class PairSampler:
    """Deterministic, resumable, rank-sharded order of pair indices.

    Epoch e uses permutation Random(seed + e); rank r takes every world-th micro-batch. Drops the
    ragged tail so every rank runs the same number of micro-steps (collectives stay matched).

    lengths (optional, one per pair: the longer of its two sequences) turns on length grouping: the
    epoch's kept pairs (the same set as without grouping) are cut, in permutation order, into windows of
    GROUP_WINDOW global micro-batches; each window is sorted by length and cut into global micro-batches,
    whose order within the window is shuffled again with the epoch's seed. A micro-batch then pads to
    about its own pairs' length instead of the longest of a random draw, and the order stays a pure
    function of (seed, epoch), so resuming at a micro-step reproduces it.
    """

    GROUP_WINDOW = 64  # global micro-batches sorted together; larger groups tighter but mixes less

    def __init__(self, n_pairs: int, micro_batch_size: int, world_size: int, rank: int, seed: int,
                 lengths: list[int] | None = None):
        self.n, self.mbs, self.world, self.rank, self.seed = n_pairs, micro_batch_size, world_size, rank, seed
        if lengths is not None and len(lengths) != n_pairs:
            raise ValueError(f"lengths has {len(lengths)} entries for {n_pairs} pairs")
        self.lengths = lengths
        self._epoch_cache = None  # (epoch, its batches): one shuffle per epoch, not one per batch
        self.batches_per_rank = n_pairs // (micro_batch_size * world_size)
        if self.batches_per_rank == 0:
            raise DataError(f"{n_pairs} training pairs are fewer than one global micro-batch "
                            f"({micro_batch_size} x {world_size} ranks)")

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        order = list(range(self.n))
        rng = random.Random(self.seed + epoch)
        rng.shuffle(order)
        per_step = self.mbs * self.world
        order = order[:self.batches_per_rank * per_step]  # the ragged tail is dropped before any grouping
        if self.lengths is not None:
            grouped, span = [], self.GROUP_WINDOW * per_step
            for w in range(0, len(order), span):
                window = sorted(order[w:w + span], key=lambda i: self.lengths[i])  # stable: ties keep the draw
                chunks = [window[c:c + per_step] for c in range(0, len(window), per_step)]
                rng.shuffle(chunks)
                grouped += [i for chunk in chunks for i in chunk]
            order = grouped
        out = []
        for b in range(self.batches_per_rank):
            start = b * per_step + self.rank * self.mbs
            out.append(order[start:start + self.mbs])
        return out

    def batch(self, position: int) -> list[int]:
        """The indices of this rank's `position`-th batch of the run, counted across epochs."""
        epoch, b = divmod(position, self.batches_per_rank)
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            self._epoch_cache = (epoch, self.epoch_batches(epoch))
        return self._epoch_cache[1][b]


# ------------------------------------------------------------------ the reward model's input contract

EXPORT_PREFIX = "aplot_rlhf_"


def input_format_of(pairs: list[dict], chat_template: str) -> str:
    """'chat' if PairTokenizer applies the chat template to these pairs, else 'text'."""
    if chat_template == "always":
        return "chat"
    if chat_template == "never":
        return "text"
    return "chat" if any(_is_messages(p["prompt"]) or _is_messages(p["chosen"]) for p in pairs) else "text"


def rm_export_fields(cfg, input_format: str, reward_mean: float, reward_std: float) -> dict:
    """The keys train_rm writes into its export's config.json: the reward statistics PPO normalizes scores
    with (`export_reward_statistics` reads them) and how the pairs were tokenized (`encoder_from_export`)."""
    return {"reward_mean": reward_mean, "reward_std": reward_std,
            f"{EXPORT_PREFIX}max_length": cfg.max_length, f"{EXPORT_PREFIX}loss": cfg.loss,
            f"{EXPORT_PREFIX}chat_template": cfg.chat_template,
            f"{EXPORT_PREFIX}response_separator": cfg.response_separator,
            f"{EXPORT_PREFIX}long_response": cfg.long_response,
            f"{EXPORT_PREFIX}input_format": input_format}


def export_reward_statistics(hf_config) -> tuple[float | None, float | None]:
    """(mean, std) of the exported model's rewards (`rm_export_fields`); None where the export lacks them."""
    return getattr(hf_config, "reward_mean", None), getattr(hf_config, "reward_std", None)


def encoder_from_export(tokenizer, hf_config, max_length: int = 0,
                        long_response: str = "") -> tuple["PairTokenizer", str | None]:
    """(PairTokenizer built as train_rm built it, the training data's input format or None if unrecorded).

    long_response: override the recorded policy (PPO must score every response, so it keeps the end of
    one too long for the window instead of skipping it)."""
    get = lambda k, d: getattr(hf_config, EXPORT_PREFIX + k, d)  # noqa: E731
    encoder = PairTokenizer(tokenizer, max_length or get("max_length", 512), get("chat_template", "auto"),
                            get("response_separator", " "), long_response or get("long_response", "keep_end"))
    return encoder, get("input_format", None)

