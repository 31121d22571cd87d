"""Reading data files: jsonl / json / parquet / arrow, a datasets folder, or a hub name; the data errors.

`read_records` yields (origin, record) with origin "file:line" (or "file:row N"), so every later error
names its place; `SkipCounter` counts what loading drops or alters, so no skip is silent.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from ..errors import InputNotFoundError, UserError

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """Bad input data; the message names the file, line and field."""


@dataclass
class SkipCounter:
    """Counts pairs dropped or altered during loading, by reason, so no skip is silent."""
    counts: dict = field(default_factory=dict)
    _reported: dict = field(default_factory=dict, repr=False, compare=False)

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n

    def report(self, what: str) -> None:
        """Warn each reason once: a counter reported again (loading, then tokenizing) warns only what changed."""
        for reason, n in sorted(self.counts.items()):
            if self._reported.get(reason) != n:
                log.warning("%s: %d %s", what, n, reason)
                self._reported[reason] = n


def read_records(path: str, hub_split: str = "train"):
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
        if path.endswith((".jsonl", ".json", ".parquet", ".arrow")) or os.sep in path and not looks_like_hub(path):
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


def looks_like_hub(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/"))


def is_messages(x) -> bool:
    return isinstance(x, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in x)


def check_chat_messages(value, origin: str, key: str) -> None:
    """A list holding dicts is meant as chat messages: each must be a dict with 'role' and 'content', else a
    DataError naming the place, the field, the message and what it lacks (not a vague 'not a string')."""
    if not (isinstance(value, list) and any(isinstance(m, dict) for m in value)):
        return
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise DataError(f"{origin}: field {key!r}: message {i} is a {type(m).__name__}, not a chat message "
                            "(a dict with 'role' and 'content')")
        for name in ("role", "content"):
            if name not in m:
                raise DataError(f"{origin}: field {key!r}: message {i} has no {name!r} (its keys: {sorted(m)}); "
                                "every chat message needs 'role' and 'content'")
        if not isinstance(m["content"], str):  # prompts join the contents; pairs tokenize them
            raise DataError(f"{origin}: field {key!r}: message {i} has {type(m['content']).__name__} content; "
                            "a string is needed")
