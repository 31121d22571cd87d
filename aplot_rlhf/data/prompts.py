"""Prompt sets for PPO: load, validate, format (plain text or the actor's chat template), tokenize."""
from __future__ import annotations

import logging
import re

from .reading import DataError, SkipCounter, check_chat_messages, is_messages, read_records

log = logging.getLogger(__name__)

_HH_TURN = re.compile(r"\n\n(Human|Assistant):", re.S)


def hh_to_messages(transcript: str) -> list[dict] | None:
    """'\\n\\nHuman: a\\n\\nAssistant: b\\n\\nHuman: c\\n\\nAssistant:' -> chat messages (None if not HH)."""
    parts = _HH_TURN.split(transcript)
    if len(parts) < 3 or parts[0].strip():
        return None
    messages = []
    for role, text in zip(parts[1::2], parts[2::2]):
        text = text.strip()
        if text:
            messages.append({"role": "user" if role == "Human" else "assistant", "content": text})
    if not messages or messages[-1]["role"] != "user":
        return None
    return messages


def load_prompts(paths, prompt_key: str = "prompt", what: str = "prompt_data",
                 skips: SkipCounter | None = None) -> list[dict]:
    """-> [{"prompt": str | messages, "origin": "file:line", "fields": the row's other fields}]; empty
    prompts are counted skips (in `skips` when given: the dry run reports them). The other fields (an
    `answer` column, say) reach reward functions (rewards.FunctionReward)."""
    skips = SkipCounter() if skips is None else skips
    out = []
    for path in paths:
        for origin, rec in read_records(path):
            if prompt_key not in rec:
                raise DataError(f"{origin}: missing field {prompt_key!r} (fields present: {sorted(rec)}); "
                                "set --prompt_key")
            prompt = rec[prompt_key]
            check_chat_messages(prompt, origin, prompt_key)
            if not (isinstance(prompt, str) or is_messages(prompt)):
                raise DataError(f"{origin}: field {prompt_key!r} must be a string or chat messages")
            text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
            if not text.strip():
                skips.add("empty prompt(s) skipped")
                continue
            fields = {k: v for k, v in rec.items() if k != prompt_key}
            out.append({"prompt": prompt, "origin": origin, "fields": fields})
    skips.report(what)
    if not out:
        raise DataError(f"{what}: zero usable prompts in {', '.join(paths)}")
    return out


def check_prompt_count(n_prompts: int, n_eval: int, rollout_batch_size: int, world: int) -> None:
    """Enough training prompts (after `n_eval` held out by --eval_prompts) for one rollout on every rank."""
    n_train = n_prompts - n_eval
    if n_train < rollout_batch_size * world:
        raise DataError(f"{n_train} training prompts ({n_prompts} read, {n_eval} held out by --eval_prompts) are fewer "
                        f"than one rollout (--rollout_batch_size {rollout_batch_size} x {world} ranks = "
                        f"{rollout_batch_size * world}): add prompts, or lower --rollout_batch_size or --eval_prompts")


def hh_transcript(messages: list[dict]) -> str:
    """Chat messages -> the HH transcript form, ending with the assistant's turn marker."""
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}"
                   for m in messages) + "\n\nAssistant:"


def reward_model_prompt(prompt, input_format: str | None):
    """A PPO prompt in the form the reward model was trained on (its export's `input_format`):
    'chat' gets chat messages (an HH transcript is split into its turns), 'text' or unrecorded gets text."""
    if input_format == "chat":
        if is_messages(prompt):
            return prompt
        return hh_to_messages(prompt) or [{"role": "user", "content": prompt}]
    return prompt if isinstance(prompt, str) else hh_transcript(prompt)


class PromptFormatter:
    """Prompt -> (actor token ids, the prompt as given: str or chat messages).

    The actor may see the prompt through its chat template; the reward model gets the original prompt
    and formats it as its own training data was (`reward_model_prompt`, then its PairTokenizer).
    Prompts over max_prompt_length keep their newest tokens (counted).
    """

    def __init__(self, tokenizer, max_prompt_length: int, prompt_format: str = "auto"):
        self.tok = tokenizer
        self.max_len = max_prompt_length
        self.use_chat = prompt_format == "chat" or (prompt_format == "auto"
                                                    and getattr(tokenizer, "chat_template", None))
        if prompt_format == "chat" and not getattr(tokenizer, "chat_template", None):
            raise DataError("prompt_format 'chat' needs an actor tokenizer with a chat template")
        self.skips = SkipCounter()

    def __call__(self, prompt) -> tuple[list[int], str | list[dict]]:
        rm_text = prompt if isinstance(prompt, str) else hh_transcript(prompt)
        if self.use_chat:
            messages = (prompt if is_messages(prompt)
                        else (hh_to_messages(prompt) or [{"role": "user", "content": prompt}]))
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = self.tok.encode(text, add_special_tokens=False)
        else:
            ids = self.tok.encode(rm_text, add_special_tokens=True)
        if len(ids) > self.max_len:
            self.skips.add(f"prompt(s) cut from the left to max_prompt_length={self.max_len}")
            ids = ids[-self.max_len:]
        return ids, prompt
