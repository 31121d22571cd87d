"""Policy-side models for PPO: the actor (a causal LM) and the critic (a backbone with a value head)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ModelError
from .loader import load_model, load_tokenizer


class Critic(nn.Module):
    """Per-token values: value_head(last hidden state). forward(ids, mask[, position_ids]) [B, L] -> [B, L] fp32."""

    def __init__(self, backbone: nn.Module, value_head: nn.Linear):
        super().__init__()
        self.backbone, self.value_head = backbone, value_head

    def forward(self, input_ids, attention_mask, position_ids=None, **attn_kwargs):
        extra = {} if position_ids is None else {"position_ids": position_ids}  # left-padded rows need them
        # attn_kwargs: flash attention's varlen boundaries for packed rows (models.packing)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                               **extra, **attn_kwargs).last_hidden_state
        return self.value_head(hidden).squeeze(-1).float()


def normalized_head(head: nn.Linear, mean: float, std: float, gather) -> nn.Linear:
    """A value head giving (head(h) - mean) / std: a reward-model head rescaled to the normalized rewards
    PPO regresses values to, so the critic's first values are on the rewards' scale.

    gather(params): the engine's ZeRO-3 gather (engine.deepspeed.gathered_params), to read a partitioned
    head; the new head is an ordinary module that DeepSpeed partitions at initialize."""
    with gather(list(head.parameters())):
        weight = head.weight.data.detach().clone().float()
        bias = head.bias.data.detach().clone().float() if head.bias is not None else torch.zeros(head.out_features)
    out = nn.Linear(head.in_features, head.out_features, bias=True, dtype=head.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight / std)
        out.bias.copy_((bias - mean) / std)
    return out


def load_critic(init: str, *, reward_path: str, actor_path: str, actor_gguf_file: str = "", dtype=torch.float32,
                gradient_checkpointing: bool = False, attn_implementation: str = "sdpa",
                actor_backbone: nn.Module | None = None, allow_untrained_head: bool = False,
                reward_mean: float | None = None, reward_std: float | None = None, gather=None) -> Critic:
    """Critic from the reward model (backbone + its scalar head) or from the actor (backbone + a zero head).

    The critic reads the actor's tokens, so initializing from the reward model needs the same vocabulary
    and a decoder reward model (a head applied per token); the caller checks that. `actor_backbone`, a
    copy of the loaded actor's backbone, saves reading (and de-quantizing) the actor checkpoint again.
    reward_mean / reward_std: the statistics PPO normalizes the reward model's scores with; given, the
    reward model's head is folded into (score - mean) / std, read through `gather` (the engine's ZeRO-3
    gather, engine.deepspeed.gathered_params; None: the head is not partitioned).
    Both come through models.loader (roles 'critic_from_reward' and 'critic_from_actor').
    """
    if init == "reward":
        rm = load_model("critic_from_reward", reward_path, dtype=dtype, attn_implementation=attn_implementation,
                        allow_untrained_head=allow_untrained_head)
        if not hasattr(rm, "score"):
            raise ValueError(f"{reward_path}: critic_init 'reward' needs a decoder reward model with a per-token "
                             "`score` head; use --critic_init actor")
        backbone, head = getattr(rm, rm.base_model_prefix), rm.score
        if reward_mean is not None and reward_std is not None and reward_std > 0:
            head = normalized_head(head, reward_mean, reward_std, gather or not_partitioned)
    elif actor_backbone is not None:
        backbone = actor_backbone
        head = nn.Linear(backbone.config.hidden_size, 1, bias=False, dtype=dtype)
        nn.init.zeros_(head.weight)
    else:
        backbone = load_model("critic_from_actor", actor_path, gguf_file=actor_gguf_file, dtype=dtype,
                              attn_implementation=attn_implementation)
        head = nn.Linear(backbone.config.hidden_size, 1, bias=False, dtype=dtype)
        nn.init.zeros_(head.weight)  # start from V = 0 so early advantages are the rewards themselves
    if gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return Critic(backbone, head)


def check_same_vocabulary(actor_tok, reference_tok, actor_config, reference_config) -> None:
    """The per-token KL compares log-probs of the same token ids: the tokenizers must map every token to
    the same id. Embedding matrices may be padded beyond the tokenizer (vocab_size > len(tokenizer))."""
    if actor_tok is not reference_tok:
        a, r = actor_tok.get_vocab(), reference_tok.get_vocab()
        if a != r:
            differ = sorted(t for t in set(a) | set(r) if a.get(t) != r.get(t))
            shown = ", ".join(f"{t!r}: {a.get(t)} vs {r.get(t)}" for t in differ[:5])
            # counted over the union of both vocabularies: a token one side lacks counts too
            raise ModelError(f"the reference model's tokenizer is not the actor's (actor {len(a)} tokens, reference "
                             f"{len(r)}; {len(differ)} token strings have a different id or exist in only one, e.g. "
                             f"{shown}): the KL penalty compares the same token ids; pass a --reference_model that "
                             "shares the actor's tokenizer")
    n = len(actor_tok)
    for who, config in (("actor", actor_config), ("reference", reference_config)):
        if config.vocab_size < n:
            raise ModelError(f"the {who}'s embedding has {config.vocab_size} rows but its tokenizer has {n} "
                             "tokens: some token ids have no logits")


def reference_tokenizer(cfg, actor_tok):
    """The reference's own tokenizer when it has its own folder (the actor's when it is the actor)."""
    if cfg.reference_model in ("", cfg.actor_model):
        return actor_tok
    return load_tokenizer("reference", cfg.reference_model)


@contextlib.contextmanager
def not_partitioned(params):
    """The gather for modules nothing partitioned; a ZeRO-3 parameter here means the caller forgot the engine's."""
    if any(hasattr(p, "ds_id") for p in params):
        raise RuntimeError("a ZeRO-3 partitioned parameter needs the engine's gather "
                           "(engine.deepspeed.gathered_params)")
    yield
