"""The reward model's input contract: what train_rm writes into its export's config.json, and how PPO,
eval_rm and the reward server rebuild the exact tokenization from it (one writer, one reader per key)."""
from __future__ import annotations

from .pair_tokenizer import PairTokenizer

EXPORT_PREFIX = "aplot_rlhf_"


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
