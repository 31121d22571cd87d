"""Pairs to token ids: chat template or plain text, the prompt cut from the left so the response end (the
token the reward is read at) stays in the window; every truncation and skip counted."""
from __future__ import annotations

from .reading import DataError, SkipCounter, is_messages


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
            self.chat_template == "auto" and (is_messages(prompt) or is_messages(response)))
        if use_template:
            if getattr(self.tok, "chat_template", None) is None:
                raise DataError("chat-message data needs a tokenizer with a chat template; "
                                "pass --chat_template never to join messages as plain text")
            prompt_msgs = prompt if is_messages(prompt) else [{"role": "user", "content": prompt}]
            resp_msgs = response if is_messages(response) else [{"role": "assistant", "content": response}]
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


def input_format_of(pairs: list[dict], chat_template: str) -> str:
    """'chat' if PairTokenizer applies the chat template to these pairs, else 'text'."""
    if chat_template == "always":
        return "chat"
    if chat_template == "never":
        return "text"
    return "chat" if any(is_messages(p["prompt"]) or is_messages(p["chosen"]) for p in pairs) else "text"
