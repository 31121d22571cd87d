"""Where PPO's rewards come from: a reward model saved by train_rm, or a rule over the response text.

Both are called as reward(prompts, response_texts) -> scores [B] fp32 on the trainer's device, and carry
`mean` / `std` (the reward model's export statistics, None for a rule) for normalizing the scores.
"""
from __future__ import annotations

import torch

from .data.collate import collate_pairs
from .data.export_contract import encoder_from_export, export_reward_statistics
from .data.prompts import reward_model_prompt
from .data.reading import SkipCounter
from .engine import deepspeed as ds_api
from .engine import distributed as comm
from .models.dropout import disable_dropout
from .models.loader import load_model, load_tokenizer
from .models.reward import RewardModel


class RuleReward:
    """Rewards computed from the response text, for tests and debugging (`--reward_model rule:NAME`).

    rule:char_frac:C   share of the response's characters equal to C
    rule:neg_length    minus the response length in characters / 100
    """

    def __init__(self, spec: str):
        parts = spec.split(":")
        if parts[1] == "char_frac" and len(parts) == 3 and len(parts[2]) == 1:
            self.fn = lambda text, c=parts[2]: text.count(c) / max(1, len(text.replace(" ", "")))
        elif parts[1] == "neg_length":
            self.fn = lambda text: -len(text) / 100.0
        else:
            raise ValueError(f"unknown rule reward {spec!r}: use rule:char_frac:C or rule:neg_length")
        self.mean = self.std = None

    def __call__(self, prompts, response_texts) -> torch.Tensor:
        return torch.tensor([self.fn(r) for r in response_texts], dtype=torch.float32, device=comm.device())


class ModelReward:
    """A reward model saved by train_rm, with its own tokenizer: decode, re-tokenize, score."""

    def __init__(self, path: str, ds_cfg: dict, dtype, batch_size: int, allow_untrained_head: bool = False):
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
        self.model = ds_api.initialize_frozen(RewardModel(hf), ds_cfg)
        self.batch_size = batch_size

    def encode(self, prompts, response_texts) -> list[tuple[list[int], int]]:
        """(token ids, response start) per (prompt, response), exactly as train_rm builds a pair's side:
        the prompt in the reward model's training format, then its PairTokenizer."""
        skips = SkipCounter()
        out = []
        for p, r in zip(prompts, response_texts):
            out.append(self.encoder.encode(reward_model_prompt(p, self.input_format), r if r.strip() else " ", skips))
        return out

    @torch.no_grad()
    def __call__(self, prompts, response_texts) -> torch.Tensor:
        """Scores [B] fp32 on the trainer's device."""
        encoded = [{"chosen_ids": ids, "chosen_start": start, "rejected_ids": ids, "rejected_start": start,
                    "strength": None} for ids, start in self.encode(prompts, response_texts)]
        scores, dev = [], comm.device()
        for i in range(0, len(encoded), self.batch_size):
            batch = collate_pairs(encoded[i:i + self.batch_size], self.tok.pad_token_id)
            n = len(encoded[i:i + self.batch_size])
            rewards, _ = self.model(batch["input_ids"][:n].to(dev), batch["attention_mask"][:n].to(dev))
            scores.append(rewards.float())
        return torch.cat(scores)
