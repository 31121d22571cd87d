"""Reward model: any transformers backbone with a scalar head, returning rewards and APLOT embeddings.

The model *is* a transformers `AutoModelForSequenceClassification` with `num_labels=1`, so the folder
we export loads in plain transformers and gives the same rewards. We only add a way to read, from the
same forward pass, the final hidden state at the token the head reads (the embedding APLOT needs).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import ConfigError

log = logging.getLogger(__name__)


class RewardModel(nn.Module):
    """Wraps an HF sequence-classification model (num_labels=1).

    forward(input_ids [N, L], attention_mask [N, L], response_start [N] optional)
      -> rewards [N] (fp32), embeddings [N, d] (detached, fp32).
    The embedding is the last layer's hidden state at the token the head reads ('token'), or its mean
    over the response tokens ('mean').
    """

    def __init__(self, hf_model: nn.Module, pooling: str = "token"):
        super().__init__()
        self.hf = hf_model
        self.pooling = pooling
        # decoder heads (`score`) read the rightmost non-pad token; encoder heads read the first ([CLS])
        self.reads_last_token = hasattr(hf_model, "score")

    @property
    def config(self):
        return self.hf.config

    def reward_token_index(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index of the token the head reads, per row: transformers' own rule, so rewards match exports."""
        if not self.reads_last_token:
            return torch.zeros(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
        pad_id = self.hf.config.pad_token_id
        non_pad = (input_ids != pad_id).long()
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return (positions * non_pad).argmax(-1)

    def forward(self, input_ids=None, attention_mask=None, response_start=None, packed=None):
        if packed is not None:
            return self.forward_packed(packed)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                      use_cache=False)
        rewards = out.logits[:, 0].float()
        hidden = out.hidden_states[-1].detach()
        if self.pooling == "mean":
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            start = response_start[:, None] if response_start is not None else 0
            mask = (attention_mask.bool() & (positions >= start)).to(hidden.dtype)[..., None]
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        else:
            idx = self.reward_token_index(input_ids)
            emb = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]
        return rewards, emb.float()

    def prepare_packing(self, requested_attn: str = "") -> None:
        """--packing: a model running sdpa switches to varlen_sdpa (models.packing: one packed row, attention
        padded per sequence; padded forwards unchanged), then check_packable."""
        from .packing import use_varlen_sdpa
        use_varlen_sdpa(self._transformers_model())
        self.check_packable(requested_attn)

    def check_packable(self, requested_attn: str = "") -> None:
        """ConfigError unless forward_packed reproduces this model's own head (see _packed_head)."""
        from .packing import check_packing_support
        check_packing_support(self.hf.config, requested_attn)
        if not self.reads_last_token and self.hf.config.model_type not in PACKABLE_ENCODERS:
            raise ConfigError(f"--packing: encoder reward models of type {self.hf.config.model_type!r} are not "
                              f"supported (their head or position ids differ from BERT's); supported encoders: "
                              f"{', '.join(PACKABLE_ENCODERS)}, and decoders with a `score` head")

    def shared_prompt_support(self) -> str | None:
        """--share_prompt: None when a pair's chosen and rejected can share one forward of their prompt, else why
        not (attention that takes no per-token mask: the caller falls back). Encoders are refused (ConfigError):
        their attention is bidirectional, so a prompt's hidden states depend on the response after it."""
        from .packing import shared_attention_support
        if not self.reads_last_token:
            raise ConfigError(f"--share_prompt: the reward model {self.hf.config.model_type!r} is an encoder "
                              "(bidirectional attention: a prompt's states depend on its response, so it cannot be "
                              "shared); encoders keep the unshared layout: drop --share_prompt")
        return shared_attention_support(self.hf.config)

    def _transformers_model(self):
        """The sequence-classification model itself (under LoRA, the one peft wraps: attribute lookups on
        a PeftModel would reach its LoraModel, whose `.model` is the whole classifier, not the backbone)."""
        return self.hf.get_base_model() if hasattr(self.hf, "get_base_model") else self.hf

    def _packed_head(self, h: torch.Tensor) -> torch.Tensor:
        """The sequence-classification head on each sequence's reward-token hidden state [S, d] -> [S]:
        transformers' heads read one token per row, so in a packed row we apply them ourselves."""
        hf = self._transformers_model()
        if self.reads_last_token:
            return hf.score(h)[:, 0]
        base = getattr(hf, hf.base_model_prefix)
        pooled = base.pooler(h[:, None]) if getattr(base, "pooler", None) is not None else h  # BERT: [CLS] pooler
        return hf.classifier(hf.dropout(pooled))[:, 0]

    def forward_packed(self, layout: dict):
        """A packed batch (data.collate.collate_pairs_packed, on the device) -> rewards [S], embeddings [S, d],
        S sequences in batch order, equal to forward() on the same sequences padded."""
        from .packing import attention_kwargs, trims_bert_last_layer
        hf = self._transformers_model()
        base = getattr(hf, hf.base_model_prefix)
        dtype = next(self.hf.parameters()).dtype
        kwargs = attention_kwargs(layout, self.hf.config, causal=self.reads_last_token, dtype=dtype)
        if self.pooling == "token" and trims_bert_last_layer(base):  # nothing but the [CLS] rows is read
            at = self._bert_read_tokens(base, layout, kwargs)
            return self._packed_head(at).float(), at.detach().float()
        hidden = base(input_ids=layout["input_ids"], use_cache=False, **kwargs).last_hidden_state
        flat = hidden.reshape(-1, hidden.shape[-1])
        at = flat[layout["reward_index"]]
        rewards = self._packed_head(at).float()
        flat = flat.detach()
        if self.pooling == "mean":  # per sequence, over its response tokens
            # sums in fp32: a bf16 count stops at 256 and bf16 atomic adds drift with their order
            w = layout["pool_weight"].float()
            # prompt-shared rows name each response token's sequence in pool_segment (segment is the pair)
            seg = layout.get("pool_segment", layout["segment"]).reshape(-1).clamp_min(0)
            S = layout["reward_index"].shape[0]
            total = torch.zeros(S, flat.shape[-1], dtype=torch.float32, device=flat.device).index_add_(
                0, seg, flat.float() * w[:, None])
            count = torch.zeros(S, dtype=torch.float32, device=flat.device).index_add_(0, seg, w)
            emb = total / count.clamp_min(1.0)[:, None]
        else:
            emb = at.detach()
        return rewards, emb.float()

    @staticmethod
    def _bert_read_tokens(base, layout: dict, kwargs: dict) -> torch.Tensor:
        """BertModel's forward on a varlen layout, its last layer at the read ([CLS]) tokens only
        (packing.bert_last_layer_at) -> [S, d]: a 6-layer MiniLM skips ~1/6 of its work per step."""
        from .packing import bert_last_layer_at
        kw = {k: v for k, v in kwargs.items() if k != "attention_mask"}  # varlen: no mask (as BertModel gets None)
        h = base.embeddings(input_ids=layout["input_ids"], position_ids=layout["position_ids"])
        layers = base.encoder.layer
        for layer in layers[:-1]:
            h = layer(h, None, **kw)  # positional hidden states: transformers' gradient checkpointing needs them
        return bert_last_layer_at(layers[-1], h, layout["reward_index"], kw["cu_seq_lens_q"], kw["max_length_q"])


PACKABLE_ENCODERS = ("bert",)  # absolute positions from 0 and a pooler + classifier head over [CLS]


def load_reward_model(model_name_or_path: str, *, tokenizer, dtype: torch.dtype = torch.float32,
                      gguf_file: str = "", pooling: str = "token", gradient_checkpointing: bool = False,
                      attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> RewardModel:
    """The reward model train_rm trains: any backbone (folder, hub name or GGUF) with a fresh scalar head,
    loaded through models.loader (role 'reward'), wrapped to return rewards and APLOT embeddings."""
    from .loader import load_model
    hf = load_model("reward", model_name_or_path, gguf_file=gguf_file, dtype=dtype,
                    attn_implementation=attn_implementation, gradient_checkpointing=gradient_checkpointing,
                    trust_remote_code=trust_remote_code)
    hf.config.pad_token_id = tokenizer.pad_token_id  # batched pooling needs it; Llama configs often lack it
    hf.config.problem_type = "regression"
    return RewardModel(hf, pooling=pooling)
