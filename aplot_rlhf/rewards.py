"""Where PPO's rewards come from, and how several are combined.

A source is named by one `--reward_model` entry, optionally `NAME=SPEC`:
  FOLDER                      a reward model saved by train_rm, loaded on every rank (ModelReward)
  python:FILE.py:FUNC         a Python function (python:package.module:FUNC works too) (FunctionReward)
  http://HOST:PORT            a reward model behind `aplot_rlhf.cli.serve_rm` (remote_reward.RemoteReward)
  rule:neg_length, rule:char_frac:C   built-in text rules for tests and debugging (RuleReward)

Every source is called as source(prompts, responses, rows) -> raw scores [B] fp32 on the trainer's device,
where rows[i] = {"origin": "file:line", "fields": the prompt row's other fields}, and carries `name`,
`mean` / `std` (a train_rm export's statistics, None where the source has none) and `in_process` (it holds
model weights in this process: the planner counts only those). `Rewards` calls each source on every rank
with that rank's own responses (no broadcast: a function or a server sees each response once) and
combines them: each normalized by its own statistics where it has them, weighted, summed.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import numbers
import os
import threading

import torch

from .config import parse_reward_spec, reward_specs, reward_weights
from .data.collate import collate_pairs, collate_shared
from .data.export_contract import encoder_from_export, export_reward_statistics
from .data.prompts import reward_model_prompt
from .data.reading import SkipCounter
from .engine import deepspeed as ds_api
from .engine import distributed as comm
from .errors import ConfigError, InputNotFoundError, RewardError
from .models.dropout import disable_dropout
from .models.loader import load_model, load_tokenizer
from .models.packing import to_device
from .models.reward import RewardModel

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- sources
class RuleReward:
    """Rewards computed from the response text, for tests and debugging (`--reward_model rule:NAME`).

    rule:char_frac:C   share of the response's characters equal to C
    rule:neg_length    minus the response length in characters / 100
    """

    in_process = False

    def __init__(self, spec: str, name: str = ""):
        parts = spec.split(":")
        if parts[1] == "char_frac" and len(parts) == 3 and len(parts[2]) == 1:
            self.fn = lambda text, c=parts[2]: text.count(c) / max(1, len(text.replace(" ", "")))
        elif parts[1] == "neg_length":
            self.fn = lambda text: -len(text) / 100.0
        else:
            raise ConfigError(f"unknown rule reward {spec!r}: use rule:char_frac:C or rule:neg_length")
        self.name = name or parts[1]
        self.mean = self.std = None

    def __call__(self, prompts, response_texts, rows=None) -> torch.Tensor:
        return torch.tensor([self.fn(r) for r in response_texts], dtype=torch.float32, device=comm.device())


def load_reward_function(target: str, flag: str = "--reward_model"):
    """'FILE.py:NAME' or 'package.module:NAME' -> the callable (the file is imported as a module)."""
    where, name = target.rsplit(":", 1)
    if where.endswith(".py"):
        if not os.path.isfile(where):
            raise InputNotFoundError(f"{flag} python:{target}: no such file {where}")
        spec = importlib.util.spec_from_file_location(f"aplot_reward_{os.path.basename(where)[:-3]}", where)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise ConfigError(f"{flag} python:{target}: importing {where} raised {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(f"{flag} python:{target}: cannot import module {where!r} ({exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise ConfigError(f"{flag} python:{target}: {where} has no function {name!r} "
                          f"(functions defined there: {', '.join(found) or 'none'})")
    return fn


def check_reward_functions(cfg) -> None:
    """Every python: source of the run imports and names a function (train_ppo and --dry_run, before any
    model loads)."""
    for _, kind, target in reward_specs(cfg):
        if kind == "python":
            load_reward_function(target)


class FunctionReward:
    """A user's Python function as a reward (`--reward_model python:FILE.py:NAME`), for verifiable rewards.

    Called once per batch as fn(prompts, responses, **columns) -> one number per response, where prompts
    are the prompts as given (str or chat messages), responses the decoded response texts, and every other
    field of the prompt rows arrives as a keyword argument holding one value per response (None where a
    row lacks it): a prompt file with an `answer` column gives fn(prompts, responses, answer=[...]). A
    function with **kwargs gets every field; one without gets only the fields it names.
    Every rank calls it on its own responses. An exception, a wrong count, a non-number, a NaN/inf or a call
    longer than `timeout_s` (0: unbounded) is a RewardError naming the function and the prompt row.
    """

    in_process = False

    def __init__(self, target: str, name: str = "", timeout_s: float = 0.0):
        self.fn = load_reward_function(target)
        params = list(inspect.signature(self.fn).parameters.values())
        self.takes_all = any(p.kind is p.VAR_KEYWORD for p in params)
        self.named = [p.name for p in params[2:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        self.label = f"reward function {target.rsplit(':', 1)[1]} ({target.rsplit(':', 1)[0]})"
        self.name = name or target.rsplit(":", 1)[1]
        self.timeout_s = timeout_s
        self.mean = self.std = None

    def _columns(self, rows) -> list[str]:
        """The row fields the function takes: all of them with **kwargs, else the ones it names."""
        if self.takes_all:
            return sorted({k for r in rows for k in r["fields"]})
        return self.named

    def _call(self, prompts, texts, rows):
        columns = self._columns(rows)
        kwargs = {k: [r["fields"].get(k) for r in rows] for k in columns}
        if not self.timeout_s:
            return self.fn(prompts, texts, **kwargs)
        box = {}

        def target():
            try:
                box["out"] = self.fn(prompts, texts, **kwargs)
            except BaseException as exc:  # handed to the caller's thread
                box["exc"] = exc
        # a daemon thread: a function that never returns cannot keep the process alive after the error
        worker = threading.Thread(target=target, daemon=True, name=f"reward:{self.name}")
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise TimeoutError(f"no answer within --reward_timeout_s {self.timeout_s:g}")
        if "exc" in box:
            raise box["exc"]
        return box["out"]

    def _rows(self, rows, idx) -> str:
        shown = ", ".join(rows[i]["origin"] for i in idx[:3])
        return f"prompt row {shown}" if len(idx) == 1 else f"prompt rows {shown}{' ...' if len(idx) > 3 else ''}"

    def __call__(self, prompts, response_texts, rows) -> torch.Tensor:
        n = len(response_texts)
        try:
            out = self._call(prompts, response_texts, rows)
        except TimeoutError as exc:
            raise RewardError(f"{self.label}: {exc} on a batch of {n} responses from "
                              f"{self._rows(rows, list(range(n)))}") from None
        except Exception as exc:
            # find the row that fails alone (one call each: only after a failure), else name the batch
            for i in range(n):
                try:
                    self._call(prompts[i:i + 1], response_texts[i:i + 1], rows[i:i + 1])
                except Exception as one:
                    raise RewardError(f"{self.label} raised {type(one).__name__}: {one} on "
                                      f"{self._rows(rows, [i])} (response {i} of the batch)") from one
            raise RewardError(f"{self.label} raised {type(exc).__name__}: {exc} on a batch of {n} responses from "
                              f"{self._rows(rows, list(range(n)))} (each row alone passes)") from exc
        if torch.is_tensor(out) or hasattr(out, "tolist") and not isinstance(out, (list, tuple)):
            out = out.tolist()
        if not isinstance(out, (list, tuple)) or len(out) != n:
            got = f"{len(out)} values" if isinstance(out, (list, tuple)) else type(out).__name__
            raise RewardError(f"{self.label} returned {got} for a batch of {n} responses from "
                              f"{self._rows(rows, list(range(n)))}: return one number per response")
        values = []
        for i, v in enumerate(out):
            if isinstance(v, bool) or not isinstance(v, numbers.Real):
                raise RewardError(f"{self.label} returned {v!r} ({type(v).__name__}) for {self._rows(rows, [i])} "
                                  f"(response {i} of the batch): return a number for every response (a penalty "
                                  "such as 0.0 for an answer it cannot check)")
            if not math.isfinite(float(v)):
                raise RewardError(f"{self.label} returned {float(v)} for {self._rows(rows, [i])} "
                                  f"(response {i} of the batch): rewards must be finite")
            values.append(float(v))
        return torch.tensor(values, dtype=torch.float32, device=comm.device())


def encode_for_reward_model(encoder, input_format, prompts, response_texts) -> list[tuple[list[int], int]]:
    """(token ids, response start) per (prompt, response), exactly as train_rm builds a pair's side: the
    prompt in the reward model's training format, then its PairTokenizer (`encoder_from_export`). An empty
    response is scored as one space (train_rm never sees an empty side; its tokenizer needs a token)."""
    skips = SkipCounter()
    return [encoder.encode(reward_model_prompt(p, input_format), r if r.strip() else " ", skips)
            for p, r in zip(prompts, response_texts)]


class ModelReward:
    """A reward model saved by train_rm, with its own tokenizer: decode, re-tokenize, score."""

    in_process = True

    def __init__(self, path: str, ds_cfg: dict, dtype, batch_size: int, allow_untrained_head: bool = False,
                 name: str = "", share_prompt: bool = False):
        self.path, self.name = path, name or parse_reward_spec(path)[0]
        self.tok = load_tokenizer("reward_scorer", path)
        hf = load_model("reward_scorer", path, dtype=dtype, allow_untrained_head=allow_untrained_head)
        cfg = hf.config
        # the same PairTokenizer, built from the same export fields, that train_rm tokenized its pairs with
        # (every response gets a score: one longer than the window keeps its end, as it always did here)
        self.encoder, self.input_format = encoder_from_export(self.tok, cfg, long_response="keep_end")
        disable_dropout(hf)
        if hf.config.pad_token_id is None:
            hf.config.pad_token_id = self.tok.pad_token_id
        self.mean, self.std = export_reward_statistics(cfg)
        model = RewardModel(hf)
        # --share_prompt: a decoder scores a group's K responses with one forward of their prompt (exact);
        # an encoder (bidirectional) or attention without a per-token mask keeps the padded batches
        self.shared = share_prompt and model.reads_last_token and model.shared_prompt_support() is None
        if share_prompt and not self.shared:
            log.info("--share_prompt: the reward model %s scores unshared (%s)", path,
                     "an encoder" if not model.reads_last_token else model.shared_prompt_support())
        self.capacity = None if hf.config._attn_implementation == "flex_attention" else self.encoder.max_length
        self.model = ds_api.initialize_frozen(model, ds_cfg)
        self.batch_size = batch_size

    def encode(self, prompts, response_texts) -> list[tuple[list[int], int]]:
        return encode_for_reward_model(self.encoder, self.input_format, prompts, response_texts)

    @torch.no_grad()
    def __call__(self, prompts, response_texts, rows=None) -> torch.Tensor:
        """Scores [B] fp32 on the trainer's device."""
        dev = comm.device()
        if self.shared:  # prompt-shared rows: a prompt's consecutive responses share one forward of it
            encoded, scores = self.encode(prompts, response_texts), []
            for i in range(0, len(encoded), self.batch_size):
                ids, starts = zip(*encoded[i:i + self.batch_size])
                layout = collate_shared(list(ids), list(starts), self.tok.pad_token_id, self.capacity)
                scores.append(self.model(packed=to_device(layout, dev))[0].float())
            return torch.cat(scores)
        encoded = [{"chosen_ids": ids, "chosen_start": start, "rejected_ids": ids, "rejected_start": start,
                    "strength": None} for ids, start in self.encode(prompts, response_texts)]
        scores = []
        for i in range(0, len(encoded), self.batch_size):
            batch = collate_pairs(encoded[i:i + self.batch_size], self.tok.pad_token_id)
            n = len(encoded[i:i + self.batch_size])
            rewards, _ = self.model(batch["input_ids"][:n].to(dev), batch["attention_mask"][:n].to(dev))
            scores.append(rewards.float())
        return torch.cat(scores)


# ----------------------------------------------------------------------------------------- combination
class Rewards:
    """The run's reward sources and weights: per-source raw scores, and their normalized weighted sum."""

    def __init__(self, sources: list, weights: list[float]):
        self.sources, self.weights = sources, weights
        self.names = [s.name for s in sources]

    @property
    def model(self):
        """The one in-process reward model when it is the only source (the critic may start from it)."""
        return self.sources[0] if len(self.sources) == 1 and isinstance(self.sources[0], ModelReward) else None

    def __call__(self, prompts, response_texts, rows) -> torch.Tensor:
        """-> raw scores [S, B] fp32 on the trainer's device, one row per source. A NaN/inf from a model or
        server is a RewardError naming the source and the prompt rows."""
        per = []
        for s in self.sources:
            raw = s(prompts, response_texts, rows).to(comm.device(), torch.float32).reshape(-1)
            if raw.numel() != len(response_texts):
                raise RewardError(f"reward {s.name}: {raw.numel()} scores for {len(response_texts)} responses")
            per.append(raw)
        per = torch.stack(per)
        if not torch.isfinite(per).all():  # one host sync per rollout
            bad = (~torch.isfinite(per)).nonzero().tolist()
            s, i = bad[0]
            raise RewardError(f"reward {self.names[s]} returned {per[s, i].item()} for prompt row {rows[i]['origin']} "
                              f"({len(bad)} non-finite score(s) in this batch): check that reward source")
        return per

    def combine(self, per: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """[S, B] raw -> (weighted sum of raw [B], weighted sum of each source normalized by its own
        statistics where it has them [B]). One source of weight 1 gives (raw, normalized) unchanged."""
        w = torch.tensor(self.weights, dtype=per.dtype, device=per.device)[:, None]
        normed = torch.stack([normalize_scores(per[i], s.mean, s.std) if normalize else per[i]
                              for i, s in enumerate(self.sources)])
        return (w * per).sum(0), (w * normed).sum(0)


def normalize_scores(scores: torch.Tensor, mean: float | None, std: float | None) -> torch.Tensor:
    """Scores standardized with a source's own statistics (a train_rm export's eval-set mean/std); a source
    without them is left as it is."""
    if mean is None or std is None or not math.isfinite(std) or std <= 0:
        return scores
    return (scores - mean) / std


def build_rewards(cfg, frozen_ds_cfg: dict, dtype) -> Rewards:
    """Every --reward_model source of the run, loaded on this rank."""
    sources = []
    for name, kind, target in reward_specs(cfg):
        if kind == "rule":
            sources.append(RuleReward(target, name))
        elif kind == "python":
            sources.append(FunctionReward(target, name, cfg.reward_timeout_s))
        elif kind == "http":
            from .remote_reward import RemoteReward  # the client: HTTP only where a run asks for it
            sources.append(RemoteReward(target, name=name, timeout_s=cfg.reward_timeout_s,
                                        wait_s=cfg.reward_server_wait_s))
        else:
            sources.append(ModelReward(target, frozen_ds_cfg, dtype, cfg.reward_batch_size,
                                       allow_untrained_head=cfg.allow_untrained_reward_head, name=name,
                                       share_prompt=cfg.share_prompt))
    return Rewards(sources, reward_weights(cfg))
