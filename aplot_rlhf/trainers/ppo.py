"""PPO alignment under DeepSpeed with in-process generation: setup, rollout, experience, train, sync, save.

One PPO iteration, top to bottom: prompts -> (wake vLLM) generate -> (sleep vLLM) actor/reference/critic
forwards and reward-model scores -> KL-penalized token rewards -> advantages (GAE, or a critic-free
estimator) -> PPO epochs over mini-batches (actor and critic engines step) -> actor weights synced into the
generation engine -> metrics. Starting, logging, checkpointing and resuming are the run scaffold's
(trainers/run.py); the batch layouts are trainers/ppo_layout.py's; the rewards come from rewards.py.
"""
from __future__ import annotations

import copy
import logging
import os
import time

import torch

from ..config import PPOConfig
from ..data.pair_tokenizer import ensure_pad_token
from ..data.prompts import PromptFormatter, check_prompt_count, load_prompts
from ..data.sampler import PairSampler
from ..engine import deepspeed as ds_api
from ..engine import distributed as comm
from ..engine import export as hf_export
from ..models.dropout import disable_dropout
from ..models.loader import check_max_length, load_config, load_model, load_tokenizer
from ..models.lora import apply_lora, trainable_summary
from ..models.packing import capacity_for, check_packing_support, shared_attention_support
from ..models.policy import check_same_vocabulary, load_critic, reference_tokenizer
from ..rewards import FunctionReward, RewardError, build_rewards
from ..rollout.base import sample_seeds
from .ppo_layout import Layout, logprobs_on, pad_prompt_response, values_on
from .ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    aggregation_counts,
    critic_free_advantages,
    gae,
    group_statistics,
    kl_per_token,
    masked_mean,
    masked_moments,
    mismatch_metrics,
    moments_to_mean_var,
    policy_loss,
    rollout_is_weights,
    rollout_mismatch,
    token_rewards,
    value_loss,
    whiten,
)
from .run import Run

log = logging.getLogger(__name__)

# the mini-batch order of PPO epoch passes is drawn from seed * this + iteration: a prime larger than any
# run's iteration count, so two (seed, iteration) pairs of one run never share a shuffle
MINIBATCH_SEED_STRIDE = 1_000_003


# what a PPO mini-batch reads from the experience (its layout is built from the token lists `prompts` and
# `responses`; the rest are per-sequence statistics for the log);
# the critic's keys exist only with a critic (gae), the reference log-probs only with the KL as a loss
TRAIN_KEYS = ("tokens", "mask", "loss_mask", "old_lp", "adv")
CRITIC_KEYS = ("old_values", "ret")


def experience_on(device: torch.device, **tensors) -> dict:
    """The experience of one rollout, every tensor on `device` (the trainer's), checked.

    A mini-batch indexes these tensors with an index on the trainer's device: one tensor left on the
    CPU (a reward adapter's scores, say) crashes the first mini-batch on a GPU and never on a CPU run,
    so the invariant is asserted here, where the experience is built, naming the tensors that break it."""
    want = torch.device(device)
    wrong = {k: str(v.device) for k, v in tensors.items()
             if torch.is_tensor(v) and (v.device.type != want.type
                                        or (want.index is not None and v.device.index != want.index))}
    if wrong:
        raise RuntimeError(f"experience tensors off the trainer's device {want}: {wrong}")
    return tensors


class PPOTrainer:
    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.iteration = 0
        self.critic = None  # only the gae estimator has one
        self.group_signal = [0, 0]  # this process's iterations of a group baseline: [run, with a non-uniform group]

    # the run scaffold's view of this trainer (trainers/run.py)
    position = property(lambda self: self.iteration)
    logger = property(lambda self: self.run.logger)
    preempt = property(lambda self: self.run.preempt)
    preempted = property(lambda self: self.run.preempted)

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> "PPOTrainer":
        self.cfg.validate()  # again: it derives gradient_accumulation_steps from the PPO batch sizes
        self.run = Run(self.cfg, "ppo")
        self.rank, self.world = self.run.rank, self.run.world
        self._setup_data()
        self._setup_models()
        self._setup_engines()
        self._resume()
        self._setup_rollout()
        self.run.watch_preemption()  # last: the rollout engine may install signal handlers while it starts
        return self

    def _setup_data(self) -> None:
        """Tokenizer and start-up checks on configs (before any weights load), prompts, the sampler."""
        cfg = self.cfg
        self.tok = load_tokenizer("actor", cfg.actor_model, cfg.actor_gguf_file)
        actor_config = load_config("actor", cfg.actor_model, cfg.actor_gguf_file)
        check_max_length(cfg.max_prompt_length + cfg.max_new_tokens, actor_config, self.tok,
                         flag="--max_prompt_length + --max_new_tokens", what=f"actor {cfg.actor_model}")
        ref_config = (actor_config if cfg.reference_model in ("", cfg.actor_model)
                      else load_config("reference", cfg.reference_model))
        check_same_vocabulary(self.tok, reference_tokenizer(cfg, self.tok), actor_config, ref_config)
        ensure_pad_token(self.tok)
        # embedding rows past the tokenizer (padded to a multiple of 64/128) are never sampled nor in a log-prob
        self.vocab_size = len(self.tok)
        self.padded_ids = list(range(self.vocab_size, actor_config.vocab_size))
        prompts = load_prompts(cfg.prompt_data)
        if cfg.max_prompts:
            prompts = prompts[:cfg.max_prompts]
        formatter = PromptFormatter(self.tok, cfg.max_prompt_length, cfg.prompt_format)
        # (actor ids, the prompt as given, its file:line, the row's other fields for reward functions)
        encoded = [(*formatter(p["prompt"]), p["origin"], p["fields"]) for p in prompts]
        formatter.skips.report("prompt_data")
        n_eval = min(cfg.eval_prompts, len(encoded) // 2)
        check_prompt_count(len(encoded), n_eval, cfg.rollout_batch_size, self.world)
        self.prompts, self.eval_prompts = encoded[:len(encoded) - n_eval], encoded[len(encoded) - n_eval:]
        self.sampler = PairSampler(len(self.prompts), cfg.rollout_batch_size, self.world, self.rank, cfg.seed)

    def _setup_models(self) -> None:
        """Actor, reference, reward and critic, each partitioned at load (ZeRO-3) by its own DeepSpeed config."""
        cfg = self.cfg
        self.ds_cfg = ds_api.build_ds_config(cfg, self.world)
        self.critic_ds_cfg = ds_api.role_ds_config(cfg, self.world, cfg.critic_ds_config, "critic", self.ds_cfg)
        self.frozen_ds_cfg = ds_api.role_ds_config(cfg, self.world, cfg.reference_ds_config, "reference", self.ds_cfg)
        self.zero3 = cfg.zero_stage == 3
        self.precision = ds_api.effective_precision(cfg.precision)
        dtype = ds_api.torch_dtype(self.precision)
        self.run.use_ds_config(self.ds_cfg)
        same_reference = cfg.reference_model in ("", cfg.actor_model)
        # without ZeRO-3 partitioning the loaded actor can be copied: one read (and one GGUF de-quantization)
        # of the actor checkpoint serves the reference and the critic's backbone too
        copy_actor = not self.zero3
        with comm.Phase.of("load_models"):
            actor = load_model("actor", cfg.actor_model, gguf_file=cfg.actor_gguf_file, dtype=dtype,
                               gradient_checkpointing=cfg.gradient_checkpointing,
                               attn_implementation=cfg.attn_implementation)
            if cfg.disable_dropout:  # rollout log-probs (eval mode) and training log-probs (train mode) must agree
                disable_dropout(actor)
            with self.run.loading(self.frozen_ds_cfg):
                # LoRA: the reference is the actor itself with its adapters disabled (no second copy of the weights)
                if cfg.lora_rank and same_reference:
                    reference = None
                elif copy_actor and same_reference:
                    reference = copy.deepcopy(actor)
                else:
                    role, path, gguf = (("reference", cfg.reference_model, "") if cfg.reference_model
                                        else ("actor", cfg.actor_model, cfg.actor_gguf_file))
                    reference = load_model(role, path, gguf_file=gguf, dtype=dtype,
                                           attn_implementation=cfg.attn_implementation)
                if cfg.disable_dropout and reference is not None:
                    disable_dropout(reference)
                self.rewards = build_rewards(cfg, self.frozen_ds_cfg, dtype)
            critic = None
            if self.uses_critic:
                with self.run.loading(self.critic_ds_cfg):
                    critic = self._load_critic(actor, dtype, copy_actor)
            if cfg.lora_rank:  # after the critic copied the actor's backbone: each gets its own adapters
                actor = self._lora(actor, "actor")
                if critic is not None:  # its own backbone copy (two engines cannot share parameters); value head trains
                    critic.backbone = self._lora(critic.backbone, "critic backbone")
        self._models = actor, reference, critic

    def _setup_engines(self) -> None:
        """DeepSpeed engines (actor and critic train, the reference only runs forwards), packing, KL control."""
        cfg = self.cfg
        actor, reference, critic = self._models
        del self._models
        steps_per_iter = cfg.ppo_epochs * (cfg.rollout_batch_size * cfg.samples_per_prompt // cfg.ppo_mini_batch_size)
        total = cfg.ppo_iterations * steps_per_iter
        self.actor, self.actor_sched = ds_api.initialize(actor, self.ds_cfg, cfg, total)
        if critic is not None:
            self.critic, _ = ds_api.initialize(critic, self.critic_ds_cfg, cfg, total,
                                            learning_rate=cfg.critic_learning_rate)
        self.reference = None if reference is None else ds_api.initialize_frozen(reference, self.frozen_ds_cfg)
        # from_pretrained returns eval mode; gradient checkpointing only runs on modules in train mode
        for e in self.trained_engines.values():
            e.train()
        self.layout_kind, self.pack_capacity = self._layout_kind(
            [m for m in (actor, reference, critic.backbone if critic is not None else None) if m is not None])
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))
        self.unmoved = self.old_logprobs_from_training()
        self.reuse_old_lp = self.unmoved == "all"
        if self.unmoved and self.run.is_rank0:
            log.info("%s: the old log-probs of its rows are the training forward's, detached (no experience forward "
                     "of the actor for them; --no-skip_unmoved_old_logprobs runs it)",
                     "one PPO epoch over one mini-batch" if self.reuse_old_lp else "the first mini-batch of each "
                     "iteration's first epoch")

    def old_logprobs_from_training(self) -> str | None:
        """Which rows' old log-probs the training forward gives, detached: 'all', 'first' (the first mini-batch
        of the first epoch) or None. The actor does not move between the rollout and the first mini-batch's
        forwards (its optimizer steps after them), so their log-probs are the old ones (ratio exactly 1); with
        one PPO epoch over one mini-batch that is every row (TRL skips that forward too). Not when anything
        reads the old log-probs before training: the KL in the reward (advantages, GAE returns) or --rollout_is
        (its weights and mask enter the loss and its token counts)."""
        cfg = self.cfg
        if not (cfg.skip_unmoved_old_logprobs and cfg.rollout_is == "off"
                and (cfg.kl_mode == "loss" or cfg.kl_coef == 0)):
            return None
        one_step = (cfg.ppo_epochs == 1
                    and cfg.rollout_batch_size * cfg.samples_per_prompt == cfg.ppo_mini_batch_size)
        return "all" if one_step else "first"

    def epoch_order(self, n: int, epochs: int | None = None):
        """The row order of each PPO epoch of this iteration (one generator per iteration, so make_experience
        knows which rows the first mini-batch will take before train_on draws the same order)."""
        gen = torch.Generator().manual_seed(self.cfg.seed * MINIBATCH_SEED_STRIDE + self.iteration)
        for _ in range(self.cfg.ppo_epochs if epochs is None else epochs):
            yield torch.randperm(n, generator=gen)

    def unmoved_count(self, n: int) -> int:
        """How many of n rows take their old log-probs from the training forward: all, the first mini-batch's, or
        none (`self.unmoved`)."""
        if self.unmoved == "all":
            return n
        return min(self.cfg.ppo_mini_batch_size, n) if self.unmoved else 0

    def unmoved_rows(self, n: int) -> list[int]:
        """The rows whose old log-probs the training forward gives (`old_logprobs_from_training`), sorted. Host
        only: the epoch order is drawn by a CPU generator, so nothing here waits for the device."""
        if self.unmoved == "all":
            return list(range(n))
        if self.unmoved == "first":
            return sorted(next(self.epoch_order(n, 1))[:self.unmoved_count(n)].tolist())
        return []

    def _layout_kind(self, models) -> tuple[str, int | None]:
        """(the layout every experience and training forward uses, its packed rows' capacity): 'shared'
        (--share_prompt, where every model's attention can mask it), 'packed' (--packing), else 'padded'."""
        cfg = self.cfg
        row_tokens = cfg.max_prompt_length + cfg.max_new_tokens
        if cfg.share_prompt:
            why = next((w for w in (shared_attention_support(m.config) for m in models) if w), None)
            if why is None:  # a dense mask costs rows x L^2: rows of row_tokens; a block mask takes one row
                return "shared", None if models[0].config._attn_implementation == "flex_attention" else row_tokens
            if self.run.is_rank0:
                log.warning("--share_prompt: %s; falling back to the %s layout", why,
                            "packed" if cfg.packing else "padded")
        if cfg.packing:  # every model that runs a packed forward must keep attention inside sequences
            for model in models:
                check_packing_support(model.config, cfg.attn_implementation)
            return "packed", capacity_for(models[0].config, row_tokens)
        return "padded", None

    def _resume(self) -> None:
        state = self.run.resume(self.trained_engines)
        if state is not None:
            self.iteration = state["iteration"]
            self.kl_ctl.load_state_dict(state["kl"])
            self.run.resumed_at(self.iteration, f"PPO iteration {self.iteration}")

    def _setup_rollout(self) -> None:
        self.backend = self._make_backend()
        log.info("rollout backend %s; precision %s; torch uses %d CPU threads", self.cfg.rollout_backend,
                 self.precision, torch.get_num_threads())
        if self.cfg.rollout_backend == "vllm":
            self.sync_weights()  # the engine starts from the files on disk; a resumed actor differs

    def checkpoint_state(self) -> tuple[dict, dict]:
        return self.trained_engines, {"iteration": self.iteration, "kl": self.kl_ctl.state_dict()}

    def _lora(self, model, what: str):
        cfg = self.cfg
        model = apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                           targets=cfg.lora_target_modules, gradient_checkpointing=cfg.gradient_checkpointing)
        if self.run.is_rank0:
            log.info("LoRA rank %d on the %s: %d of %d parameters train", cfg.lora_rank, what,
                     *trainable_summary(model))
        return model

    def reference_logprobs(self, logprobs_under):
        """logprobs_under(model) under the KL reference: its own model, or (LoRA) the actor with its
        adapters disabled (padded and packed layouts alike). Called once per experience pass, so a LoRA
        actor enters disable_adapter() once, not once per micro-batch."""
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

    def _load_critic(self, actor, dtype, copy_actor: bool):
        cfg = self.cfg
        rm = self.rewards.model  # the critic starts from a reward model only where it is the one source
        critic_init = cfg.critic_init if rm is not None else "actor"
        if cfg.critic_init == "reward" and rm is None and self.run.is_rank0:
            log.info("critic initialized from the actor: critic_init 'reward' needs one --reward_model that is a "
                     "reward-model folder (this run has %s)", ", ".join(self.rewards.names))
        if critic_init == "reward" and rm.tok.get_vocab() != self.tok.get_vocab():
            log.warning("reward model's tokenizer differs from the actor's: critic initialized from the actor")
            critic_init = "actor"
        # values regress to the weighted, normalized rewards: start the head on their scale
        w = self.rewards.weights[0]
        head_mean = rm.mean if rm is not None and cfg.normalize_reward and rm.std and w > 0 else None
        head_std = rm.std / w if head_mean is not None else None
        critic = load_critic(critic_init, reward_path=rm.path if rm is not None else "", actor_path=cfg.actor_model,
                             actor_gguf_file=cfg.actor_gguf_file, dtype=dtype,
                             gradient_checkpointing=cfg.gradient_checkpointing,
                             attn_implementation=cfg.attn_implementation,
                             allow_untrained_head=cfg.allow_untrained_reward_head,
                             actor_backbone=(copy.deepcopy(actor.base_model)
                                             if copy_actor and critic_init == "actor" else None),
                             reward_mean=head_mean, reward_std=head_std,
                             gather=ds_api.gathered_params)
        if cfg.disable_dropout:
            disable_dropout(critic)
        return critic

    def _make_backend(self):
        cfg = self.cfg
        if cfg.rollout_backend == "hf":
            from ..rollout.hf import HFRollout
            return HFRollout(self.actor.module, self.tok, zero3=self.zero3, banned_token_ids=self.padded_ids)
        from ..rollout.vllm_engine import VLLMRollout
        path = cfg.actor_model
        if cfg.actor_gguf_file or path.endswith(".gguf"):  # vLLM starts from an HF folder of the actor
            path = os.path.join(cfg.output_dir, "actor_hf")
            hf_export.export_pretrained(self.actor.module, self.tok, path)
        return VLLMRollout(path, dtype=self.precision,
                           gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                           tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                           max_model_len=cfg.max_prompt_length + cfg.max_new_tokens, seed=cfg.seed,
                           enforce_eager=cfg.vllm_enforce_eager, eos_token_id=self.tok.eos_token_id,
                           sleep=cfg.vllm_sleep, banned_token_ids=self.padded_ids)

    # ------------------------------------------------------------------------------------- phases
    def sync_weights(self) -> float:
        t0 = time.perf_counter()
        with comm.Phase.of("weight_sync"):
            self.backend.sync_weights(hf_export.iter_gathered_named_params(self.actor.module, self.zero3))
        return time.perf_counter() - t0

    def generate(self, prompt_ids: list[list[int]], temperature: float | None = None, seeds: list[int] | None = None,
                 return_logprobs: bool = False):
        """-> responses (token lists); with return_logprobs, (responses, the engine's log-prob of each sampled
        token under the distribution it sampled from)."""
        cfg = self.cfg
        extra = {"return_logprobs": True} if return_logprobs else {}
        with comm.Phase.of("generate"):
            handoff = cfg.vllm_sleep and cfg.rollout_backend == "vllm" and torch.cuda.is_available()
            if handoff:  # optimizer states and partitions leave the GPU while vLLM holds it
                ds_api.offload_states(*self.trained_engines.values())
            self.backend.wake()
            out = self.backend.generate(prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature if temperature is None else temperature,
                                        top_p=cfg.top_p, seeds=seeds if seeds is not None else [0] * len(prompt_ids),
                                        **extra)
            self.backend.sleep()
            if handoff:
                ds_api.reload_states(*self.trained_engines.values())
        return out

    def score(self, rm_prompts: list, responses: list[list[int]], rows: list[dict] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(raw scores [B]: the weighted sum of the sources' raw scores, normalized and clipped scores [B],
        each source's raw scores [S, B]) on the trainer's device. rm_prompts: the prompts as given (str or chat
        messages); rows: each prompt row's {"origin", "fields"} (reward functions read the fields).

        A source that fails (raises, NaN/inf, wrong count, timeout) stops the run on every rank with one
        error naming the source and the prompt row: the failing rank says what, the others that it failed."""
        texts = [self.tok.decode(r, skip_special_tokens=True) for r in responses]
        if rows is None:  # a reward function reads the rows' fields: scoring it without them is a silent 0
            if any(isinstance(s, FunctionReward) for s in self.rewards.sources):
                raise ValueError("score() needs the prompt rows ({'origin', 'fields'} each) when a reward function "
                                 "is a source: it reads their fields")
            rows = [{"origin": "?", "fields": {}} for _ in responses]
        failure = None
        with comm.Phase.of("reward"):
            try:
                per = self.rewards(rm_prompts, texts, rows)
            except RewardError as exc:
                failure, per = exc, None
        # every rank learns of a failure on any rank (else the others wait in the next collective forever)
        failed = comm.all_reduce_sum(torch.tensor([float(failure is not None)], device=comm.device()))
        if failed.item() > 0:  # one host sync per rollout (the finite check above already syncs)
            if failure is not None:
                raise RewardError(f"[rank {self.rank}] iteration {self.iteration}: {failure}") from failure
            raise RewardError(f"[rank {self.rank}] iteration {self.iteration}: a reward source failed on another rank "
                              "(its error line says which and where)")
        raw, norm = self.rewards.combine(per, self.cfg.normalize_reward)
        return raw, norm.clamp(-self.cfg.reward_clip, self.cfg.reward_clip), per

    def layout(self, prompts, responses, width: int) -> Layout:
        """One micro-batch's layout (padded, packed or prompt-shared: self.layout_kind), on the trainer's
        device, with `width` response columns (the rollout's): every forward of the micro-batch reads it."""
        return Layout.build(self.layout_kind, prompts, responses, self.tok.pad_token_id, width, comm.device(),
                            self.pack_capacity)

    # ------------------------------------------------------------------------------------- experience and training
    @torch.no_grad()
    def make_experience(self, prompts, rm_prompts, responses, rollout_lp: list[list[float]] | None = None,
                        rows: list[dict] | None = None) -> dict:
        """Rollout -> the tensors training reads: log-probs, advantages (and, with a critic, values and
        returns), on the trainer's device. With samples_per_prompt K the K samples of a prompt are
        consecutive rows, and group baselines (grpo, rloo) compare them.

        rollout_lp: the generation engine's log-prob of each sampled token: the mismatch with the trainer's
        is measured (`rollout_mismatch`) and, with --rollout_is, corrected (`rollout_is_weights`).
        rows: each prompt row's {"origin", "fields"} for the reward sources (score)."""
        cfg, dev = self.cfg, comm.device()
        ids, attn, posids, tokens, mask = pad_prompt_response(prompts, responses, self.tok.pad_token_id)
        ids, attn, posids, tokens, mask = (t.to(dev) for t in (ids, attn, posids, tokens, mask))
        old_lp, values, micro_lp = [], [], []  # micro_lp: per micro-batch, its response log-probs under a model
        # the log-probs of the policy that sampled: tempered, as vLLM/HF sampled, over the tokenizer's tokens
        lp_kw = dict(temperature=cfg.temperature, vocab_size=self.vocab_size)
        with comm.Phase.of("experience"):
            for e in self.trained_engines.values():
                e.eval()
            for i in range(0, ids.shape[0], cfg.micro_batch_size):  # vocab-sized logits: one micro-batch at a time
                sl = slice(i, i + cfg.micro_batch_size)
                layout = self.layout(prompts[sl], responses[sl], tokens.shape[1])
                micro_lp.append(lambda m, layout=layout, tok=tokens[sl]: logprobs_on(m, layout, tok, **lp_kw))
                if self.critic is not None:
                    values.append(values_on(self.critic, layout))
                if self.unmoved is None:
                    old_lp.append(micro_lp[-1](self.actor))
            # the reference over every micro-batch in one pass: a LoRA actor disables its adapters once
            ref_lp = self.reference_logprobs(lambda m: [lp_under(m) for lp_under in micro_lp])
            if self.unmoved is not None:  # train_on fills the unmoved rows; the actor runs over the others only
                old_lp = self.moved_rows_logprobs(prompts, responses, tokens, ids.shape[0], **lp_kw)
            for e in self.trained_engines.values():
                e.train()
        ref_lp = torch.cat(ref_lp)
        # unmoved rows stay NaN until train_on fills them; nothing before it reads them (the KL is 0 in the reward)
        old_lp = old_lp if self.unmoved is not None else torch.cat(old_lp)
        raw, scores, per_source = self.score(rm_prompts, responses, rows)
        kl = (torch.zeros_like(ref_lp) if self.unmoved else kl_per_token(old_lp, ref_lp, cfg.kl_estimator)) * mask
        beta = self.kl_ctl.beta if cfg.kl_mode == "reward" else 0.0  # else the KL is a loss term in train_on
        out = dict(ids=ids, attn=attn, posids=posids, tokens=tokens, mask=mask, old_lp=old_lp, raw_scores=raw,
                   scores=scores, source_scores=per_source.T, kl_seq=kl.sum(1), loss_mask=mask, prompts=prompts,
                   responses=responses)
        if cfg.kl_mode == "loss":
            out["ref_lp"] = ref_lp
        if self.unmoved:  # the KL metric is computed once train_on has the old log-probs
            out["kl_ref_lp"] = ref_lp
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
                adv = whiten(adv, mask, moments=comm.all_reduce_sum(masked_moments(adv, mask)))
            out.update(old_values=values, ret=ret)
        else:  # grpo, rloo, reinforce_pp: no critic, the baseline comes from the rollout itself
            adv = critic_free_advantages(estimator, scores, kl, mask, K, beta, cfg.gamma, cfg.grpo_std_normalize,
                                         reduce_sum=comm.all_reduce_sum)
        out["adv"] = adv
        if rollout_lp is not None:
            engine_lp = torch.zeros(old_lp.shape, dtype=old_lp.dtype)  # filled on the host, one copy to the device
            for i, row in enumerate(rollout_lp):
                engine_lp[i, :len(row)] = torch.tensor(row, dtype=old_lp.dtype)
            engine_lp = engine_lp.to(old_lp.device)
            out["rollout_lp"] = engine_lp
            out["rollout_mismatch"] = rollout_mismatch(old_lp, engine_lp, mask, cfg.rollout_is_cap)
            weights, out["loss_mask"] = rollout_is_weights(old_lp, engine_lp, out["loss_mask"], cfg.rollout_is,
                                                           cfg.rollout_is_cap)
            if weights is not None:
                out["is_w"] = weights
        elif cfg.rollout_is != "off":
            raise ValueError("--rollout_is needs the rollout engine's log-probs (make_experience's rollout_lp)")
        return experience_on(dev, **out)

    def moved_rows_logprobs(self, prompts, responses, tokens: torch.Tensor, n: int, **lp_kw) -> torch.Tensor:
        """The actor's log-probs [n, T] of the rows outside `unmoved_rows` (their own micro-batches, in row
        order), NaN on the unmoved rows that train_on fills."""
        skip = set(self.unmoved_rows(n))
        rows = [r for r in range(n) if r not in skip]
        out = torch.full(tokens.shape, float("nan"), dtype=torch.float32, device=tokens.device)
        for i in range(0, len(rows), self.cfg.micro_batch_size):
            chunk = rows[i:i + self.cfg.micro_batch_size]
            idx = torch.tensor(chunk, device=tokens.device)
            layout = self.layout([prompts[r] for r in chunk], [responses[r] for r in chunk], tokens.shape[1])
            out[idx] = logprobs_on(self.actor, layout, tokens[idx], **lp_kw).to(out.dtype)
        return out

    def train_on(self, exp: dict) -> dict:
        cfg = self.cfg
        n = exp["ids"].shape[0]
        stats = []
        keys = TRAIN_KEYS + (CRITIC_KEYS if self.critic is not None else ()) + tuple(k for k in ("ref_lp", "is_w")
                                                                                   if k in exp)
        zero = torch.zeros((), device=exp["ids"].device)
        # DeepSpeed divides each micro-batch's loss by the accumulation steps and averages gradients over ranks;
        # the losses below are each micro-batch's share of its mini-batch's aggregate, so undo both
        undo_ds_mean = cfg.gradient_accumulation_steps * self.world
        # rows whose old log-probs this pass's first forwards give (the policy has not moved before them)
        unmoved_until = self.unmoved_count(n)
        with comm.Phase.of("train"):
            for epoch, order in enumerate(self.epoch_order(n)):
                counts = self.minibatch_counts(exp, order)
                for start in range(0, n, cfg.micro_batch_size):
                    policy_counts, response_counts = counts[start // cfg.ppo_mini_batch_size]
                    # rows in experience order within a micro-batch: same set, and the same padding layout
                    # as the experience forward when a micro-batch spans the rollout
                    rows = order[start:start + cfg.micro_batch_size].sort().values
                    idx = rows.to(exp["ids"].device)
                    mb = {k: exp[k][idx] for k in keys}
                    rows = rows.tolist()  # the micro-batch's token lists, on the host: no device sync
                    layout = self.layout([exp["prompts"][r] for r in rows], [exp["responses"][r] for r in rows],
                                         mb["tokens"].shape[1])
                    lp, ent = logprobs_on(self.actor, layout, mb["tokens"], with_entropy=True,
                                          temperature=cfg.temperature, vocab_size=self.vocab_size)
                    if epoch == 0 and start < unmoved_until:  # not moved since the rollout: the old ones
                        mb["old_lp"] = exp["old_lp"][idx] = lp.detach()
                    pl, clip_frac, approx_kl = policy_loss(lp, mb["old_lp"], mb["adv"], mb["loss_mask"], cfg.clip_ratio,
                                                           cfg.loss_aggregation, policy_counts, cfg.max_new_tokens,
                                                           is_weights=mb.get("is_w"))
                    entropy = masked_mean(ent, mb["mask"])  # logged; the bonus weighs every token of the mini-batch
                    loss = pl - cfg.entropy_coef * aggregate(ent, mb["mask"], "token_mean", response_counts)
                    kl_loss = zero
                    if "ref_lp" in mb:  # kl_mode 'loss': the KL to the reference as a penalty term
                        kl_loss = aggregate(kl_per_token(lp, mb["ref_lp"], cfg.kl_loss_estimator), mb["loss_mask"],
                                            cfg.loss_aggregation, policy_counts, cfg.max_new_tokens)
                        loss = loss + self.kl_ctl.beta * kl_loss
                    self.actor.backward(loss * undo_ds_mean)
                    self.actor.step()
                    vl = vclip = zero
                    if self.critic is not None:
                        values = values_on(self.critic, layout)
                        vl, vclip = value_loss(values, mb["old_values"], mb["ret"], mb["mask"], cfg.value_clip,
                                               response_counts)
                        self.critic.backward(vl * undo_ds_mean)
                        self.critic.step()
                    # kept on the device: one host sync after the epochs, not one per micro-batch. The losses are
                    # logged at the scale of a whole mini-batch's (their sum over its micro-batches and ranks)
                    stats.append(torch.stack([pl.detach() * undo_ds_mean, vl.detach() * undo_ds_mean, clip_frac, vclip,
                                              approx_kl, entropy.detach(), kl_loss.detach() * undo_ds_mean]))
        if self.unmoved:  # what make_experience measures from the old log-probs, now that train_on has them
            exp["kl_seq"] = (kl_per_token(exp["old_lp"], exp["kl_ref_lp"], cfg.kl_estimator) * exp["mask"]).sum(1)
            if "rollout_lp" in exp:
                exp["rollout_mismatch"] = rollout_mismatch(exp["old_lp"], exp["rollout_lp"], exp["mask"],
                                                           cfg.rollout_is_cap)
        names = ["policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "entropy", "kl_loss"]
        if self.critic is None:
            names[1] = names[3] = None  # no critic: no value statistics to report
        stacked = torch.stack(stats)
        first, mean = torch.stack([stacked[0], stacked.mean(0)]).tolist()  # one host sync per iteration
        self.first_micro_batch_stats = {k: v for k, v in zip(names, first) if k}  # ratio check: 0 clip, 0 KL
        return {k: v for k, v in zip(names, mean) if k}

    def minibatch_counts(self, exp: dict, order: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per mini-batch of this epoch's `order`: (`aggregation_counts` of its loss mask, of its response
        mask), summed over ranks: what its micro-batches' losses divide by. One all-reduce per epoch (every
        mini-batch's counts in one tensor), before the micro-batch loop; the counts stay on the device."""
        mini = self.cfg.ppo_mini_batch_size
        per_mini = []
        for start in range(0, len(order), mini):
            idx = order[start:start + mini].to(exp["ids"].device)
            per_mini.append(torch.stack([aggregation_counts(exp["loss_mask"][idx]),
                                         aggregation_counts(exp["mask"][idx])]))
        summed = comm.all_reduce_sum(torch.stack(per_mini))
        return [(c[0], c[1]) for c in summed]

    # ------------------------------------------------------------------------------------- loop
    def prompt_batch(self, iteration: int) -> list[tuple]:
        """This rank's rollout prompts of `iteration` ((ids, prompt, origin, fields) each; epochs follow one
        another)."""
        return [self.prompts[i] for i in self.sampler.batch(iteration)]

    def step(self) -> dict:
        K = self.cfg.samples_per_prompt  # each prompt K times, its samples consecutive (one group per prompt)
        batch = [b for b in self.prompt_batch(self.iteration) for _ in range(K)]
        prompts, rm_prompts = [b[0] for b in batch], [b[1] for b in batch]
        rows = [{"origin": b[2], "fields": b[3]} for b in batch]
        t0 = time.perf_counter()
        responses, rollout_lp = self.generate(prompts, seeds=sample_seeds(self.cfg.seed, self.iteration, self.rank,
                                                                          self.world, len(prompts)),
                                              return_logprobs=True)
        gen_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        exp = self.make_experience(prompts, rm_prompts, responses, rollout_lp, rows=rows)
        exp_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        train_stats = self.train_on(exp)
        train_s = time.perf_counter() - t2
        sync_s = self.sync_weights() if self.cfg.rollout_backend == "vllm" else 0.0
        gen_tokens = sum(len(r) for r in responses)
        # the reward's mean and std over the global batch (every rank samples the same number of prompts)
        raw_mean, raw_var = moments_to_mean_var(comm.all_reduce_sum(masked_moments(exp["raw_scores"],
                                                                                  torch.ones_like(exp["raw_scores"]))))
        local = {
            "reward/normalized_mean": exp["scores"].mean(), "kl": exp["kl_seq"].mean(),
            "response_length": gen_tokens / len(responses), **train_stats,
            "gen_tokens_per_s": gen_tokens / max(gen_s, 1e-9), "gen_s": gen_s, "experience_s": exp_s,
            "train_s": train_s, "sync_s": sync_s,
            # the share of rows whose old log-probs came from training
            "old_logprobs_reused": self.unmoved_count(len(responses)) / len(responses),
        }
        # how far the sampler's policy is from the trainer's (kernels, precision, LoRA merged in bf16): global values
        mm = exp["rollout_mismatch"]
        local.update(mismatch_metrics(comm.all_reduce_sum(mm[:3]), comm.all_gather_no_grad(mm[3:]).max()))
        if K > 1:  # how much signal the groups carry: their reward spread, and the share with none at all
            local.update({"reward/group_std": exp["group_std"][0], "reward/uniform_group_frac": exp["uniform_frac"][0]})
        metrics = self.run.reduce(local)
        metrics["reward/raw_mean"], metrics["reward/raw_std"] = raw_mean.item(), raw_var.sqrt().item()
        metrics.update(self.source_metrics(exp["source_scores"]))
        metrics["gen_tokens_per_s"] *= self.world  # throughput adds up over ranks
        metrics["kl_coef"] = self.kl_ctl.beta
        metrics["lr"] = self.actor_sched.get_last_lr()[0]
        self.kl_ctl.update(metrics["kl"], len(responses) * self.world)
        self.iteration += 1
        if K > 1 and self.cfg.advantage_estimator in ("grpo", "rloo"):
            self._note_group_signal(metrics["reward/uniform_group_frac"])
        return metrics

    def source_metrics(self, source_scores: torch.Tensor) -> dict:
        """Each reward source's raw mean and std over the global batch (`reward/<name>/mean`, `/std`):
        source_scores [B, S]; one all-reduce for every source together."""
        ones = torch.ones_like(source_scores[:, 0])
        moments = comm.all_reduce_sum(torch.stack([masked_moments(source_scores[:, i], ones)
                                                   for i in range(source_scores.shape[1])]))
        mean, var = moments_to_mean_var(moments.T)
        values = torch.stack([mean, var.sqrt()], 1).tolist()  # one host sync for every source
        return {f"reward/{name}/{stat}": v for name, row in zip(self.rewards.names, values)
                for stat, v in zip(("mean", "std"), row)}

    def _note_group_signal(self, uniform_frac: float) -> None:
        """GRPO/RLOO learn from reward differences inside a prompt's group: when every group's rewards are
        equal the advantages are zero and the iteration trains nothing, which a flat curve does not say."""
        self.group_signal[0] += 1
        if uniform_frac < 1.0:
            self.group_signal[1] += 1
        elif self.run.is_rank0:
            log.warning("iteration %d: every group's %d rewards are equal (reward/uniform_group_frac = 1): %s has no "
                        "reward difference to learn from in this batch", self.iteration, self.cfg.samples_per_prompt,
                        self.cfg.advantage_estimator)

    def train_step(self) -> list[dict]:
        self.last_metrics = self.step()
        return [self.last_metrics]

    def log_row(self, window, seconds: float) -> dict:
        """A log interval's row: the mean over its iterations (each iteration's metrics are already global)."""
        keys = window.keys()
        return dict(zip(keys, window.local_means(keys).tolist()))

    def after_step(self) -> None:
        pass

    @torch.no_grad()
    def evaluate_reward(self, prompts) -> float:
        """Mean raw reward (the weighted sum over sources) of greedy responses to `prompts` (list of (ids,
        prompt, origin, fields)), over ranks."""
        shard, counts = self.run.shard(prompts)
        counted = torch.tensor([float(c) for c in counts], device=comm.device())
        responses = self.generate([p[0] for p in shard], temperature=0.0)  # greedy: seeds unused
        raw, _, _ = self.score([p[1] for p in shard], responses, [{"origin": p[2], "fields": p[3]} for p in shard])
        total = comm.all_reduce_sum(torch.stack([(raw * counted).sum(), counted.sum()]))
        return (total[0] / total[1]).item()

    def train(self) -> dict:
        cfg = self.cfg
        self.last_metrics = {}
        postfix = lambda row: {"reward": f"{row['reward/raw_mean']:.3f}", "kl": f"{row['kl']:.3f}"}  # noqa: E731
        preempted = self.run.loop(self, cfg.ppo_iterations, "ppo/", postfix)
        ran, with_signal = self.group_signal
        if ran and not with_signal and self.run.is_rank0:
            log.warning("no iteration of this run (%d in this process) had a group with differing rewards: %s "
                        "trained nothing from the reward; check the reward (a rule or reward model that scores "
                        "every response alike), or raise --temperature or --samples_per_prompt", ran,
                        cfg.advantage_estimator)
        if preempted:
            return self.last_metrics  # preempted: checkpointed, the job exits for a requeue
        if cfg.export:
            hf_export.export_pretrained(self.actor.module, self.tok, os.path.join(cfg.output_dir, "policy"))
        return self.last_metrics

    def save(self) -> None:
        self.run.save(self)

    def close(self) -> None:
        if hasattr(self, "backend") and hasattr(self.backend, "close"):
            self.backend.close()
        self.run.close()
