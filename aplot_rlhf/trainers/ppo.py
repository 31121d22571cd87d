"""PPO alignment under DeepSpeed with in-process generation: setup, rollout, experience, train, sync, save.

One PPO iteration, top to bottom: prompts -> (wake vLLM) generate -> (sleep vLLM) actor/reference/critic
forwards and reward-model scores -> KL-penalized token rewards -> GAE -> PPO epochs over mini-batches
(actor and critic engines step) -> actor weights synced into the generation engine -> metrics.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import os
import time

import torch

from .. import engine as eng
from ..config import PPOConfig, save_config, to_dict
from ..data.preference import PairSampler, SkipCounter, collate_pairs, encoder_from_export, ensure_pad_token
from ..data.prompts import PromptFormatter, load_prompts, reward_model_prompt
from ..metrics import MetricsLogger, MetricsWindow
from ..models.dropout import disable_dropout
from ..models.packing import attention_kwargs, capacity_for, check_packing_support, pack_prompt_response, to_device
from ..models.lora import apply_lora, is_lora, iter_merged_named_params, trainable_summary
from ..models.policy import load_actor, load_critic
from ..errors import ModelError
from ..models.reward import RewardModel, check_max_length, load_model_config, load_scoring_model, load_tokenizer
from ..rollout.base import sample_seeds
from .ppo_math import (AdaptiveKLController, FixedKLController, aggregate, critic_free_advantages,
                       entropy_from_logits, gae, group_statistics, kl_per_token, logprobs_of, masked_mean,
                       masked_moments, moments_to_mean_var, normalize_scores, policy_loss, tempered, token_rewards,
                       value_loss, whiten)

log = logging.getLogger(__name__)


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
        return torch.tensor([self.fn(r) for r in response_texts], dtype=torch.float32, device=eng.device())


class ModelReward:
    """A reward model saved by train_rm, with its own tokenizer: decode, re-tokenize, score."""

    def __init__(self, path: str, ds_cfg: dict, dtype, batch_size: int, allow_untrained_head: bool = False):
        from transformers import AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        hf = load_scoring_model(path, allow_untrained_head=allow_untrained_head, dtype=dtype)
        cfg = hf.config
        # the same PairTokenizer, built from the same export fields, that train_rm tokenized its pairs with
        # (every response gets a score: one longer than the window keeps its end, as it always did here)
        self.encoder, self.input_format = encoder_from_export(self.tok, cfg, long_response="keep_end")
        disable_dropout(hf)
        if hf.config.pad_token_id is None:
            hf.config.pad_token_id = self.tok.pad_token_id
        self.mean, self.std = getattr(cfg, "reward_mean", None), getattr(cfg, "reward_std", None)
        self.model = eng.initialize_frozen(RewardModel(hf), ds_cfg)
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
        scores, dev = [], eng.device()
        for i in range(0, len(encoded), self.batch_size):
            batch = collate_pairs(encoded[i:i + self.batch_size], self.tok.pad_token_id)
            n = len(encoded[i:i + self.batch_size])
            rewards, _ = self.model(batch["input_ids"][:n].to(dev), batch["attention_mask"][:n].to(dev))
            scores.append(rewards.float())
        return torch.cat(scores)


def trim_left_padding(ids, attn, position_ids, first: int | None = None):
    """Drop the leading columns that are padding in every row of this (micro-)batch.

    first: that column, when the caller knows it from the host-side prompt lengths (`first_column`):
    reading it from `attn` waits for the device."""
    if first is None:
        first = int(attn.any(0).nonzero()[0]) if attn.any() else 0
    return ids[:, first:], attn[:, first:], position_ids[:, first:]


def first_column(prompts: list[list[int]], rows, width: int) -> int:
    """First non-padding column of `rows` of a `PPOTrainer.pack`ed batch whose prompts are left-padded to
    `width` (the rollout's longest prompt), from the token lists alone."""
    return width - max(len(prompts[r]) for r in rows)


def _accepts_logits_to_keep(model) -> bool:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    module = module.get_base_model() if is_lora(module) else module  # peft forwards the keyword
    flag = getattr(module, "_aplot_logits_to_keep", None)
    if flag is None:
        flag = "logits_to_keep" in inspect.signature(module.forward).parameters
        module._aplot_logits_to_keep = flag
    return flag


def response_logprobs(model, ids, attn, position_ids, tokens, with_entropy: bool = False, temperature: float = 1.0):
    """Log-probs [B, T] (and entropies) of the response tokens of a `PPOTrainer.pack`ed batch, under the
    policy that sampled them: logits divided by the sampling temperature.

    Responses occupy the last T columns, so the logits that predict them are columns -T-1 .. -2; models
    that take `logits_to_keep` project only those T+1 hidden states onto the vocabulary.
    """
    T = tokens.shape[1]
    kwargs = {"logits_to_keep": T + 1} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                   **kwargs).logits[:, -T - 1:-1]
    logits = tempered(logits, temperature)
    lp = logprobs_of(logits, tokens)
    return (lp, entropy_from_logits(logits)) if with_entropy else lp


def response_values(critic, ids, attn, position_ids, T: int):
    """Critic values [B, T] at the positions that predict each response token (columns -T-1 .. -2)."""
    return critic(ids, attn, position_ids)[:, -T - 1:-1]


def _packed_inputs(model, layout: dict, config=None) -> dict:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    config = config if config is not None else module.config
    return {"input_ids": layout["input_ids"],
            **attention_kwargs(layout, config, causal=True, dtype=next(module.parameters()).dtype)}


def packed_response_logprobs(model, layout, tokens, with_entropy: bool = False, temperature: float = 1.0):
    """response_logprobs on a `pack_prompt_response` layout: the same [B, T] log-probs (and entropies),
    with only the kept columns (`logits_to_keep` as indices) projected onto the vocabulary."""
    if _accepts_logits_to_keep(model):
        logits = model(use_cache=False, logits_to_keep=layout["keep_cols"], **_packed_inputs(model, layout)).logits
        index = layout["resp_keep"]
    else:
        logits, index = model(use_cache=False, **_packed_inputs(model, layout)).logits, layout["resp_pos"]
    logits = tempered(logits.reshape(-1, logits.shape[-1])[index], temperature)
    lp = logprobs_of(logits, tokens)
    return (lp, entropy_from_logits(logits)) if with_entropy else lp


def packed_response_values(critic, layout):
    """response_values on a `pack_prompt_response` layout: [B, T] values at the positions predicting each token."""
    module = getattr(critic, "module", critic)
    kwargs = _packed_inputs(critic, layout, module.backbone.config)
    values = critic(kwargs.pop("input_ids"), kwargs.pop("attention_mask"), kwargs.pop("position_ids"), **kwargs)
    return values.reshape(-1)[layout["resp_pos"]]


def iter_gathered_named_params(module: torch.nn.Module, zero3: bool):
    """(HF name, full tensor) for every parameter, gathered one decoder layer at a time under ZeRO-3.

    LoRA: merged weights (W + scale * B @ A) under the plain names. vLLM gets merged weights rather than
    its own LoRA path: the engine keeps serving an ordinary model (same kernels, CUDA graphs, tensor
    parallel layout and weight loader as without LoRA), and merging costs one layer's matmuls per sync."""
    if is_lora(module):
        yield from iter_merged_named_params(module, zero3)
        return
    groups: dict[str, list] = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:3]) if "layers" in parts[:3] else parts[0]  # model.layers.N, or a top-level module
        groups.setdefault(key, []).append((name, p))
    for members in groups.values():
        with eng.gathered_params([p for _, p in members], enabled=zero3):
            for name, p in members:
                yield name, p.data


def check_same_vocabulary(actor_tok, reference_tok, actor_config, reference_config) -> None:
    """The per-token KL compares log-probs of the same token ids: the tokenizers must map every token to
    the same id. Embedding matrices may be padded beyond the tokenizer (vocab_size > len(tokenizer))."""
    if actor_tok is not reference_tok:
        a, r = actor_tok.get_vocab(), reference_tok.get_vocab()
        if a != r:
            differ = sorted(t for t in set(a) | set(r) if a.get(t) != r.get(t))
            shown = ", ".join(f"{t!r}: {a.get(t)} vs {r.get(t)}" for t in differ[:5])
            raise ModelError(f"the reference model's tokenizer is not the actor's ({len(differ)} of "
                             f"{max(len(a), len(r))} tokens map to different ids, e.g. {shown}): the KL penalty "
                             "compares the same token ids; pass a --reference_model that shares the actor's tokenizer")
    n = len(actor_tok)
    for who, config in (("actor", actor_config), ("reference", reference_config)):
        if config.vocab_size < n:
            raise ModelError(f"the {who}'s embedding has {config.vocab_size} rows but its tokenizer has {n} "
                             "tokens: some token ids have no logits")


def reference_tokenizer(cfg, actor_tok):
    """The reference's own tokenizer when it has its own folder (the actor's when it is the actor)."""
    if cfg.reference_model in ("", cfg.actor_model):
        return actor_tok
    return load_tokenizer(cfg.reference_model)


# what a PPO mini-batch reads from the experience (the rest are per-sequence statistics for the log);
# the critic's keys exist only with a critic (gae), the reference log-probs only with the KL as a loss
TRAIN_KEYS = ("ids", "attn", "posids", "tokens", "mask", "loss_mask", "old_lp", "adv")
CRITIC_KEYS = ("old_values", "ret")


def experience_on(device: torch.device, **tensors) -> dict:
    """The experience of one rollout, every tensor on `device` (the trainer's), checked.

    A mini-batch indexes these tensors with an index on the trainer's device: one tensor left on the
    CPU (a reward adapter's scores, say) crashes the first mini-batch on a GPU and never on a CPU run,
    so the invariant is asserted here, where the experience is built, naming the tensors that break it."""
    want = torch.device(device)
    wrong = {k: str(v.device) for k, v in tensors.items()
             if torch.is_tensor(v) and (v.device.type != want.type or (want.index is not None and v.device.index != want.index))}
    if wrong:
        raise RuntimeError(f"experience tensors off the trainer's device {want}: {wrong}")
    return tensors


class PPOTrainer:
    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.iteration = 0
        self.critic = None  # only the gae estimator has one

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> "PPOTrainer":
        cfg = self.cfg
        self.rank, self.world, self.local_rank = eng.init_distributed(cfg.dist_backend, cfg.timeout_s)
        eng.seed_everything(cfg.seed)
        os.makedirs(cfg.output_dir, exist_ok=True)
        eng.prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir)
        self.tok = load_tokenizer(cfg.actor_model, "", cfg.actor_gguf_file)
        # start-up checks on configs and tokenizers, before any weights load
        actor_config = load_model_config(cfg.actor_model, cfg.actor_gguf_file)
        check_max_length(cfg.max_prompt_length + cfg.max_new_tokens, actor_config, self.tok,
                         flag="--max_prompt_length + --max_new_tokens", what=f"actor {cfg.actor_model}")
        ref_config = (actor_config if cfg.reference_model in ("", cfg.actor_model)
                      else load_model_config(cfg.reference_model))
        check_same_vocabulary(self.tok, reference_tokenizer(cfg, self.tok), actor_config, ref_config)
        ensure_pad_token(self.tok)
        prompts = load_prompts(cfg.prompt_data)
        if cfg.max_prompts:
            prompts = prompts[:cfg.max_prompts]
        formatter = PromptFormatter(self.tok, cfg.max_prompt_length, cfg.prompt_format)
        encoded = [(*formatter(p["prompt"]), p["origin"]) for p in prompts]
        formatter.skips.report("prompt_data")
        n_eval = min(cfg.eval_prompts, len(encoded) // 2)
        self.prompts, self.eval_prompts = encoded[:len(encoded) - n_eval], encoded[len(encoded) - n_eval:]
        self.sampler = PairSampler(len(self.prompts), cfg.rollout_batch_size, self.world, self.rank, cfg.seed)

        ga = cfg.ppo_mini_batch_size // cfg.micro_batch_size
        cfg.gradient_accumulation_steps = ga
        self.ds_cfg = eng.build_ds_config(cfg, self.world)
        critic_ds_cfg = eng.role_ds_config(cfg, self.world, cfg.critic_ds_config, "critic", self.ds_cfg)
        frozen_ds_cfg = eng.role_ds_config(cfg, self.world, cfg.reference_ds_config, "reference", self.ds_cfg)
        self.zero3 = cfg.zero_stage == 3
        self.precision = eng.effective_precision(cfg.precision)
        dtype = eng.torch_dtype(self.precision)
        self._hf_ds_config = eng.zero3_context(self.ds_cfg)
        with eng.Phase.of("load_models"):
            actor = load_actor(cfg.actor_model, gguf_file=cfg.actor_gguf_file, dtype=dtype,
                               gradient_checkpointing=cfg.gradient_checkpointing, attn_implementation=cfg.attn_implementation)
            if cfg.disable_dropout:  # rollout log-probs (eval mode) and training log-probs (train mode) must agree
                disable_dropout(actor)
            # without ZeRO-3 partitioning the loaded actor can be copied: one read (and one GGUF de-quantization)
            # of the actor checkpoint serves the reference and the critic's backbone too
            copy_actor = not self.zero3
            if frozen_ds_cfg is not self.ds_cfg:  # ZeRO-3 partitions the frozen models by their own file
                self._hf_ds_config = eng.zero3_context(frozen_ds_cfg)
            # LoRA: the reference is the actor itself with its adapters disabled (no second copy of the weights)
            if cfg.lora_rank and cfg.reference_model in ("", cfg.actor_model):
                reference = None
            elif copy_actor and cfg.reference_model in ("", cfg.actor_model):
                reference = copy.deepcopy(actor)
            else:
                reference = load_actor(cfg.reference_model or cfg.actor_model,
                                       gguf_file="" if cfg.reference_model else cfg.actor_gguf_file, dtype=dtype,
                                       attn_implementation=cfg.attn_implementation)
            if cfg.disable_dropout and reference is not None:
                disable_dropout(reference)
            if cfg.reward_model.startswith("rule:"):
                self.reward = RuleReward(cfg.reward_model)
            else:
                self.reward = ModelReward(cfg.reward_model, frozen_ds_cfg, dtype, cfg.reward_batch_size,
                                          allow_untrained_head=cfg.allow_untrained_reward_head)
            critic = self._load_critic(actor, critic_ds_cfg, frozen_ds_cfg, dtype, copy_actor) if self.uses_critic else None
            if cfg.lora_rank:  # after the critic copied the actor's backbone: each gets its own adapters
                actor = self._lora(actor, "actor")
                if critic is not None:  # its own backbone copy (two engines cannot share parameters); value head trains
                    critic.backbone = self._lora(critic.backbone, "critic backbone")
            if not (critic_ds_cfg is frozen_ds_cfg is self.ds_cfg):
                self._hf_ds_config = eng.zero3_context(self.ds_cfg)  # the actor's again, for the rest of the run
        steps_per_iter = cfg.ppo_epochs * (cfg.rollout_batch_size * cfg.samples_per_prompt // cfg.ppo_mini_batch_size)
        total = cfg.ppo_iterations * steps_per_iter
        self.actor, self.actor_sched = eng.initialize(actor, self.ds_cfg, cfg, total)
        if critic is not None:
            self.critic, _ = eng.initialize(critic, critic_ds_cfg, cfg, total, learning_rate=cfg.critic_learning_rate)
        self.reference = None if reference is None else eng.initialize_frozen(reference, frozen_ds_cfg)
        # from_pretrained returns eval mode; gradient checkpointing only runs on modules in train mode
        for e in self.trained_engines.values():
            e.train()
        self.pack_capacity = None
        if cfg.packing:  # every model that runs a packed forward must keep attention inside sequences
            for model in [m for m in (actor, reference, critic.backbone if critic is not None else None) if m is not None]:
                check_packing_support(model.config, cfg.attn_implementation)
            self.pack_capacity = capacity_for(actor.config, cfg.max_prompt_length + cfg.max_new_tokens)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))

        self.logger = MetricsLogger(cfg.output_dir, eng.is_rank0(), cfg.tensorboard, cfg.wandb_project,
                                    run_config=vars(cfg), resume=cfg.resume)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        # after gradient_accumulation_steps is derived above, so saved and current configs compare alike
        self.checkpoints = eng.Checkpointer(self.ckpt_root, to_dict(cfg), self.world, cfg.save_total_limit,
                                            cfg.resume_allow_config_change)
        if cfg.resume:
            state = self.checkpoints.load(self.trained_engines)
            if state is None:
                log.warning("--resume: no checkpoint in %s, starting from scratch", self.ckpt_root)
            else:
                self.iteration = state["iteration"]
                self.logger.resume_at(self.iteration)
                self.kl_ctl.load_state_dict(state["kl"])
                log.info("resumed at PPO iteration %d", self.iteration)
        if eng.is_rank0():  # only now: a refused resume or a refused folder keeps the earlier run's file
            save_config(cfg, os.path.join(cfg.output_dir, "config.json"))
        self.backend = self._make_backend()
        log.info("rollout backend %s; torch uses %d CPU threads", cfg.rollout_backend, torch.get_num_threads())
        if cfg.rollout_backend == "vllm":
            self.sync_weights()  # the engine starts from the files on disk; a resumed actor differs
        # last: the rollout engine may install signal handlers of its own while it starts
        self.preempt, self.preempted = eng.Preemption(cfg.output_dir, cfg.preempt_signals), False
        return self

    def _lora(self, model, what: str):
        cfg = self.cfg
        model = apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=cfg.lora_target_modules, gradient_checkpointing=cfg.gradient_checkpointing)
        if eng.is_rank0():
            log.info("LoRA rank %d on the %s: %d of %d parameters train", cfg.lora_rank, what, *trainable_summary(model))
        return model

    def reference_logprobs(self, logprobs_under):
        """logprobs_under(model) under the KL reference: its own model, or (LoRA) the actor with its
        adapters disabled (padded and packed layouts alike)."""
        if self.reference is not None:
            return logprobs_under(self.reference)
        with self.actor.module.disable_adapter():
            return logprobs_under(self.actor)

    @property
    def uses_critic(self) -> bool:
        return self.cfg.advantage_estimator == "gae"

    @property
    def trained_engines(self) -> dict:
        """The engines that train and are checkpointed: the actor, and the critic where there is one."""
        return {"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})}

    def _load_critic(self, actor, critic_ds_cfg: dict, frozen_ds_cfg: dict, dtype, copy_actor: bool):
        cfg = self.cfg
        critic_init = "actor" if isinstance(self.reward, RuleReward) else cfg.critic_init
        if critic_init == "reward" and self.reward.tok.get_vocab() != self.tok.get_vocab():
            log.warning("reward model's tokenizer differs from the actor's: critic initialized from the actor")
            critic_init = "actor"
        if critic_ds_cfg is not frozen_ds_cfg:
            self._hf_ds_config = eng.zero3_context(critic_ds_cfg)
        critic = load_critic(critic_init, reward_path=cfg.reward_model, actor_path=cfg.actor_model,
                             actor_gguf_file=cfg.actor_gguf_file, dtype=dtype,
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             attn_implementation=cfg.attn_implementation,
                             allow_untrained_head=cfg.allow_untrained_reward_head,
                             actor_backbone=copy.deepcopy(actor.base_model) if copy_actor and critic_init == "actor" else None,
                             # values regress to the normalized rewards: start the head on their scale
                             reward_mean=self.reward.mean if cfg.normalize_reward else None,
                             reward_std=self.reward.std if cfg.normalize_reward else None)
        if cfg.disable_dropout:
            disable_dropout(critic)
        return critic

    def _make_backend(self):
        cfg = self.cfg
        if cfg.rollout_backend == "hf":
            from ..rollout.hf import HFRollout
            return HFRollout(self.actor.module, self.tok, zero3=self.zero3)
        from ..rollout.vllm_engine import VLLMRollout
        path = cfg.actor_model
        if cfg.actor_gguf_file or path.endswith(".gguf"):  # vLLM starts from an HF folder of the actor
            path = os.path.join(cfg.output_dir, "actor_hf")
            eng.export_pretrained(self.actor.module, self.tok, path)
        return VLLMRollout(path, dtype=self.precision,
                           gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                           tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                           max_model_len=cfg.max_prompt_length + cfg.max_new_tokens, seed=cfg.seed,
                           enforce_eager=cfg.vllm_enforce_eager, eos_token_id=self.tok.eos_token_id,
                           sleep=cfg.vllm_sleep)

    # ------------------------------------------------------------------------------------- phases
    def sync_weights(self) -> float:
        t0 = time.perf_counter()
        with eng.Phase.of("weight_sync"):
            self.backend.sync_weights(iter_gathered_named_params(self.actor.module, self.zero3))
        return time.perf_counter() - t0

    def generate(self, prompt_ids: list[list[int]], temperature: float | None = None, seeds: list[int] | None = None):
        cfg = self.cfg
        with eng.Phase.of("generate"):
            handoff = cfg.vllm_sleep and cfg.rollout_backend == "vllm" and torch.cuda.is_available()
            if handoff:  # optimizer states and partitions leave the GPU while vLLM holds it
                eng.offload_states(*self.trained_engines.values())
            self.backend.wake()
            out = self.backend.generate(prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature if temperature is None else temperature,
                                        top_p=cfg.top_p, seeds=seeds if seeds is not None else [0] * len(prompt_ids))
            self.backend.sleep()
            if handoff:
                eng.reload_states(*self.trained_engines.values())
        return out

    def score(self, rm_prompts: list, responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw RM scores [B], normalized and clipped scores [B]) on the trainer's device; NaN/inf is an
        error naming the prompts. rm_prompts: the prompts as given (str or chat messages)."""
        texts = [self.tok.decode(r, skip_special_tokens=True) for r in responses]
        with eng.Phase.of("reward"):
            raw = self.reward(rm_prompts, texts).to(eng.device())
        if not torch.isfinite(raw).all():  # one host sync per rollout
            bad = [i for i in range(len(raw)) if not math.isfinite(raw[i].item())]
            raise FloatingPointError(f"[rank {self.rank}] reward model returned NaN/inf for {len(bad)} response(s) "
                                     f"(iteration {self.iteration}, batch rows {bad}): check the reward model")
        norm = normalize_scores(raw, self.reward.mean, self.reward.std) if self.cfg.normalize_reward else raw
        return raw, norm.clamp(-self.cfg.reward_clip, self.cfg.reward_clip)

    @staticmethod
    def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int):
        """One batch of prompt+response rows, prompts left-padded and responses right-padded.

        Every response starts at the same column P (the longest prompt), so the logits predicting
        response token t sit at column P-1+t in every row and the model only needs the last T+1 columns
        of logits (`logits_to_keep`): the vocabulary projection skips the prompts. Position ids count
        from 0 at each row's first real token, as in generation.
        -> input_ids, attention_mask, position_ids [B, P+T], response tokens [B, T], response mask [B, T].
        """
        B, T = len(prompts), max(1, max(len(r) for r in responses))
        P = max(len(p) for p in prompts)
        ids = torch.full((B, P + T), pad_id, dtype=torch.long)
        attn = torch.zeros((B, P + T), dtype=torch.long)
        tokens = torch.full((B, T), pad_id, dtype=torch.long)
        mask = torch.zeros((B, T))
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids[i, P - len(p):P + len(r)] = torch.tensor(p + r)
            attn[i, P - len(p):P + len(r)] = 1
            if r:
                tokens[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = 1.0
        position_ids = (attn.cumsum(1) - 1).clamp(min=0)
        return ids, attn, position_ids, tokens, mask

    def packed_layout(self, prompts, responses, width: int) -> dict:
        """--packing: prompt+response sequences packed (models.packing), on the trainer's device, with
        `width` response columns (the rollout's)."""
        return to_device(pack_prompt_response(prompts, responses, self.tok.pad_token_id, self.pack_capacity, width),
                         eng.device())

    @torch.no_grad()
    def make_experience(self, prompts, rm_prompts, responses) -> dict:
        """Rollout -> the tensors training reads: log-probs, advantages (and, with a critic, values and
        returns), on the trainer's device. With samples_per_prompt K the K samples of a prompt are
        consecutive rows, and group baselines (grpo, rloo) compare them."""
        cfg, dev = self.cfg, eng.device()
        ids, attn, posids, tokens, mask = self.pack(prompts, responses, self.tok.pad_token_id)
        ids, attn, posids, tokens, mask = (t.to(dev) for t in (ids, attn, posids, tokens, mask))
        old_lp, ref_lp, values = [], [], []
        temperature = cfg.temperature  # the log-probs of the policy that sampled: tempered, as vLLM/HF sampled
        with eng.Phase.of("experience"):
            for e in self.trained_engines.values():
                e.eval()
            for i in range(0, ids.shape[0], cfg.micro_batch_size):  # vocab-sized logits: one micro-batch at a time
                sl = slice(i, i + cfg.micro_batch_size)
                if cfg.packing:
                    layout = self.packed_layout(prompts[sl], responses[sl], tokens.shape[1])
                    old_lp.append(packed_response_logprobs(self.actor, layout, tokens[sl], temperature=temperature))
                    ref_lp.append(self.reference_logprobs(
                        lambda m: packed_response_logprobs(m, layout, tokens[sl], temperature=temperature)))
                    if self.critic is not None:
                        values.append(packed_response_values(self.critic, layout))
                    continue
                P = ids.shape[1] - tokens.shape[1]  # the rollout's longest prompt
                seqs = trim_left_padding(ids[sl], attn[sl], posids[sl],
                                         first_column(prompts, range(i, min(i + cfg.micro_batch_size, len(prompts))), P))
                old_lp.append(response_logprobs(self.actor, *seqs, tokens[sl], temperature=temperature))
                ref_lp.append(self.reference_logprobs(
                    lambda m: response_logprobs(m, *seqs, tokens[sl], temperature=temperature)))
                if self.critic is not None:
                    values.append(response_values(self.critic, *seqs, tokens.shape[1]))
            for e in self.trained_engines.values():
                e.train()
        old_lp, ref_lp = torch.cat(old_lp), torch.cat(ref_lp)
        raw, scores = self.score(rm_prompts, responses)
        kl = kl_per_token(old_lp, ref_lp, cfg.kl_estimator) * mask
        beta = self.kl_ctl.beta if cfg.kl_mode == "reward" else 0.0  # else the KL is a loss term in train_on
        out = dict(ids=ids, attn=attn, posids=posids, tokens=tokens, mask=mask, old_lp=old_lp, raw_scores=raw,
                   scores=scores, kl_seq=kl.sum(1), loss_mask=mask, prompts=prompts, responses=responses)
        if cfg.kl_mode == "loss":
            out["ref_lp"] = ref_lp
        K = cfg.samples_per_prompt
        if K > 1:
            group_std, uniform_frac, uniform = group_statistics(scores, K)
            out.update(group_std=group_std.reshape(1), uniform_frac=uniform_frac.reshape(1))
            if cfg.drop_uniform_groups:  # no signal in them: out of the loss (and of its token counts)
                out["loss_mask"] = mask * (~uniform).to(mask.dtype)[:, None]
        estimator = cfg.advantage_estimator
        if estimator == "gae":
            values = torch.cat(values) * mask
            adv, ret = gae(token_rewards(scores, kl, mask, beta), values, mask, cfg.gamma, cfg.lam)
            if cfg.whiten_advantages:  # over the global batch: every rank's tokens, one all-reduce
                adv = whiten(adv, mask, moments=eng.all_reduce_sum(masked_moments(adv, mask)))
            out.update(old_values=values, ret=ret)
        else:  # grpo, rloo, reinforce_pp: no critic, the baseline comes from the rollout itself
            adv = critic_free_advantages(estimator, scores, kl, mask, K, beta, cfg.gamma, cfg.grpo_std_normalize,
                                         reduce_sum=eng.all_reduce_sum)
        out["adv"] = adv
        return experience_on(dev, **out)

    def train_on(self, exp: dict) -> dict:
        cfg = self.cfg
        n = exp["ids"].shape[0]
        stats = []
        keys = TRAIN_KEYS + (CRITIC_KEYS if self.critic is not None else ()) + (("ref_lp",) if "ref_lp" in exp else ())
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + self.iteration)
        zero = torch.zeros((), device=exp["ids"].device)
        with eng.Phase.of("train"):
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, cfg.micro_batch_size):
                    # rows in experience order within a micro-batch: same set, and the same padding layout
                    # as the experience forward when a micro-batch spans the rollout
                    rows = order[start:start + cfg.micro_batch_size].sort().values
                    idx = rows.to(exp["ids"].device)
                    mb = {k: exp[k][idx] for k in keys}
                    if cfg.packing:  # the micro-batch's token lists, on the host: no device sync
                        rows = rows.tolist()
                        layout = self.packed_layout([exp["prompts"][r] for r in rows], [exp["responses"][r] for r in rows],
                                                    mb["tokens"].shape[1])
                        lp, ent = packed_response_logprobs(self.actor, layout, mb["tokens"], with_entropy=True,
                                                           temperature=cfg.temperature)
                    else:
                        P = exp["ids"].shape[1] - exp["tokens"].shape[1]
                        seqs = trim_left_padding(mb["ids"], mb["attn"], mb["posids"],
                                                 first_column(exp["prompts"], rows.tolist(), P))
                        lp, ent = response_logprobs(self.actor, *seqs, mb["tokens"], with_entropy=True,
                                                    temperature=cfg.temperature)
                    pl, clip_frac, approx_kl = policy_loss(lp, mb["old_lp"], mb["adv"], mb["loss_mask"], cfg.clip_ratio,
                                                           cfg.loss_aggregation)
                    entropy = masked_mean(ent, mb["mask"])
                    loss = pl - cfg.entropy_coef * entropy
                    kl_loss = zero
                    if "ref_lp" in mb:  # kl_mode 'loss': the KL to the reference as a penalty term
                        kl_loss = aggregate(kl_per_token(lp, mb["ref_lp"], cfg.kl_loss_estimator), mb["loss_mask"],
                                            cfg.loss_aggregation)
                        loss = loss + self.kl_ctl.beta * kl_loss
                    self.actor.backward(loss)
                    self.actor.step()
                    vl = vclip = zero
                    if self.critic is not None:
                        values = (packed_response_values(self.critic, layout) if cfg.packing
                                  else response_values(self.critic, *seqs, mb["tokens"].shape[1]))
                        vl, vclip = value_loss(values, mb["old_values"], mb["ret"], mb["mask"], cfg.value_clip)
                        self.critic.backward(vl)
                        self.critic.step()
                    # kept on the device: one host sync after the epochs, not one per micro-batch
                    stats.append(torch.stack([pl.detach(), vl.detach(), clip_frac, vclip, approx_kl, entropy.detach(),
                                              kl_loss.detach()]))
        names = ["policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "entropy", "kl_loss"]
        if self.critic is None:
            names[1] = names[3] = None  # no critic: no value statistics to report
        stacked = torch.stack(stats)
        first, mean = torch.stack([stacked[0], stacked.mean(0)]).tolist()  # one host sync per iteration
        self.first_micro_batch_stats = {k: v for k, v in zip(names, first) if k}  # ratio check: 0 clip, 0 KL
        return {k: v for k, v in zip(names, mean) if k}

    # ------------------------------------------------------------------------------------- loop
    def batch_for(self, iteration: int):
        per_epoch = self.sampler.batches_per_rank
        idxs = self.sampler.epoch_batches(iteration // per_epoch)[iteration % per_epoch]
        return [self.prompts[i] for i in idxs]

    def step(self) -> dict:
        K = self.cfg.samples_per_prompt  # each prompt K times, its samples consecutive (one group per prompt)
        batch = [b for b in self.batch_for(self.iteration) for _ in range(K)]
        prompts, rm_prompts = [b[0] for b in batch], [b[1] for b in batch]
        t0 = time.perf_counter()
        responses = self.generate(prompts, seeds=sample_seeds(self.cfg.seed, self.iteration, self.rank, self.world,
                                                              len(prompts)))
        gen_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        exp = self.make_experience(prompts, rm_prompts, responses)
        exp_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        train_stats = self.train_on(exp)
        train_s = time.perf_counter() - t2
        sync_s = self.sync_weights() if self.cfg.rollout_backend == "vllm" else 0.0
        gen_tokens = sum(len(r) for r in responses)
        # the reward's mean and std over the global batch (every rank samples the same number of prompts)
        raw_mean, raw_var = moments_to_mean_var(eng.all_reduce_sum(masked_moments(exp["raw_scores"],
                                                                                  torch.ones_like(exp["raw_scores"]))))
        local = {
            "reward/normalized_mean": exp["scores"].mean(), "kl": exp["kl_seq"].mean(),
            "response_length": gen_tokens / len(responses), **train_stats,
            "gen_tokens_per_s": gen_tokens / max(gen_s, 1e-9), "gen_s": gen_s, "experience_s": exp_s,
            "train_s": train_s, "sync_s": sync_s,
        }
        if K > 1:  # how much signal the groups carry: their reward spread, and the share with none at all
            local.update({"reward/group_std": exp["group_std"][0], "reward/uniform_group_frac": exp["uniform_frac"][0]})
        keys = sorted(local)
        values = torch.stack([torch.as_tensor(local[k], dtype=torch.float64).to(eng.device()) for k in keys])
        metrics = dict(zip(keys, eng.all_reduce_finite_mean(values).cpu().tolist()))
        metrics["reward/raw_mean"], metrics["reward/raw_std"] = raw_mean.item(), raw_var.sqrt().item()
        metrics["gen_tokens_per_s"] *= self.world  # throughput adds up over ranks
        metrics["kl_coef"] = self.kl_ctl.beta
        metrics["lr"] = self.actor_sched.get_last_lr()[0]
        self.kl_ctl.update(metrics["kl"], len(responses) * self.world)
        self.iteration += 1
        return metrics

    @torch.no_grad()
    def evaluate_reward(self, prompts) -> float:
        """Mean raw RM score of greedy responses to `prompts` (list of (ids, prompt, origin)), over ranks.

        Every rank runs the same number of forwards (ZeRO-3 gathers are collective): shards are padded
        with the last prompt, whose extra scores do not count."""
        per_rank = math.ceil(len(prompts) / self.world)
        own = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        shard = [prompts[min(i, len(prompts) - 1)] for i in own]
        counted = torch.tensor([float(i < len(prompts)) for i in own], device=eng.device())
        responses = self.generate([p[0] for p in shard], temperature=0.0)  # greedy: seeds unused
        raw, _ = self.score([p[1] for p in shard], responses)
        total = eng.all_reduce_sum(torch.stack([(raw * counted).sum(), counted.sum()]))
        return (total[0] / total[1]).item()

    def train(self) -> dict:
        cfg = self.cfg
        progress = None
        if cfg.progress and eng.is_rank0():
            from tqdm import tqdm
            progress = tqdm(total=cfg.ppo_iterations, initial=self.iteration, desc="ppo", dynamic_ncols=True)
        metrics, window = {}, MetricsWindow()
        while self.iteration < cfg.ppo_iterations:
            metrics = self.step()
            window.add(metrics)
            if self.iteration % cfg.log_steps == 0 or self.iteration == cfg.ppo_iterations:
                # one row per log interval: the mean over its iterations (metrics are already global)
                keys = window.keys()
                self.logger.log(self.iteration, dict(zip(keys, window.local_means(keys).tolist())), prefix="ppo/")
                window.clear()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward/raw_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
            saved = cfg.save_steps and self.iteration % cfg.save_steps == 0 and self.iteration < cfg.ppo_iterations
            if saved:
                self.save()
            if self.preempt.requested():  # all ranks agree, after the same iteration
                if not saved:
                    self.save()
                self.preempt.finish(self.iteration)
                self.preempted = True
                break
        if progress is not None:
            progress.close()
        if self.preempted:
            return metrics
        self.save()
        if cfg.export:
            eng.export_pretrained(self.actor.module, self.tok, os.path.join(cfg.output_dir, "policy"))
        return metrics

    def save(self) -> None:
        self.checkpoints.save(self.trained_engines, self.iteration,
                              {"iteration": self.iteration, "kl": self.kl_ctl.state_dict()})

    def close(self) -> None:
        if not self.preempted:  # a preempted run ignores further signals until it has exited (Preemption.finish)
            self.preempt.restore()
        self.logger.close()
        if hasattr(self.backend, "close"):
            self.backend.close()
        eng.shutdown()
