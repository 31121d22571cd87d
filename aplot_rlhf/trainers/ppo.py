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
from ..data.preference import PairSampler, PairTokenizer, ensure_pad_token
from ..data.prompts import PromptFormatter, load_prompts
from ..metrics import MetricsLogger
from ..models.policy import load_actor, load_critic
from ..models.reward import RewardModel, load_tokenizer
from .ppo_math import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae, kl_per_token,
                       logprobs_of, masked_mean, normalize_scores, policy_loss, token_rewards, value_loss, whiten)

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

    def __call__(self, prompt_texts, response_texts) -> torch.Tensor:
        return torch.tensor([self.fn(r) for r in response_texts], dtype=torch.float32)


class ModelReward:
    """A reward model saved by train_rm, with its own tokenizer: decode, re-tokenize, score."""

    def __init__(self, path: str, ds_cfg: dict, dtype, batch_size: int):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        self.tok = AutoTokenizer.from_pretrained(path)
        hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype)
        cfg = hf.config
        self.encoder = PairTokenizer(self.tok, getattr(cfg, "aplot_rlhf_max_length", 512),
                                     getattr(cfg, "aplot_rlhf_chat_template", "auto"),
                                     getattr(cfg, "aplot_rlhf_response_separator", " "), "keep_end")
        if hf.config.pad_token_id is None:
            hf.config.pad_token_id = self.tok.pad_token_id
        self.mean, self.std = getattr(cfg, "reward_mean", None), getattr(cfg, "reward_std", None)
        self.model = eng.initialize_frozen(RewardModel(hf), ds_cfg)
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompt_texts, response_texts) -> torch.Tensor:
        from ..data.preference import SkipCounter, collate_pairs
        skips = SkipCounter()
        encoded = []
        for p, r in zip(prompt_texts, response_texts):
            ids, start = self.encoder.encode(p, r if r.strip() else " ", skips)
            encoded.append({"chosen_ids": ids, "chosen_start": start, "rejected_ids": ids, "rejected_start": start,
                            "strength": None})
        scores = []
        for i in range(0, len(encoded), self.batch_size):
            batch = collate_pairs(encoded[i:i + self.batch_size], self.tok.pad_token_id)
            n = len(encoded[i:i + self.batch_size])
            rewards, _ = self.model(batch["input_ids"][:n].to(eng.device()), batch["attention_mask"][:n].to(eng.device()))
            scores.append(rewards.float().cpu())
        return torch.cat(scores)


def trim_left_padding(ids, attn, position_ids):
    """Drop the leading columns that are padding in every row of this (micro-)batch."""
    first = int(attn.any(0).nonzero()[0]) if attn.any() else 0
    return ids[:, first:], attn[:, first:], position_ids[:, first:]


def _accepts_logits_to_keep(model) -> bool:
    module = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    flag = getattr(module, "_aplot_logits_to_keep", None)
    if flag is None:
        flag = "logits_to_keep" in inspect.signature(module.forward).parameters
        module._aplot_logits_to_keep = flag
    return flag


def response_logprobs(model, ids, attn, position_ids, tokens, with_entropy: bool = False):
    """Log-probs [B, T] (and entropies) of the response tokens of a `PPOTrainer.pack`ed batch.

    Responses occupy the last T columns, so the logits that predict them are columns -T-1 .. -2; models
    that take `logits_to_keep` project only those T+1 hidden states onto the vocabulary.
    """
    T = tokens.shape[1]
    kwargs = {"logits_to_keep": T + 1} if _accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids, attention_mask=attn, position_ids=position_ids, use_cache=False,
                   **kwargs).logits[:, -T - 1:-1]
    lp = logprobs_of(logits, tokens)
    return (lp, entropy_from_logits(logits)) if with_entropy else lp


def response_values(critic, ids, attn, position_ids, T: int):
    """Critic values [B, T] at the positions that predict each response token (columns -T-1 .. -2)."""
    return critic(ids, attn, position_ids)[:, -T - 1:-1]


def iter_gathered_named_params(module: torch.nn.Module, zero3: bool):
    """(HF name, full tensor) for every parameter, gathered one decoder layer at a time under ZeRO-3."""
    groups: dict[str, list] = {}
    for name, p in module.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:3]) if "layers" in parts[:3] else parts[0]  # model.layers.N, or a top-level module
        groups.setdefault(key, []).append((name, p))
    for members in groups.values():
        with eng.gathered_params([p for _, p in members], enabled=zero3):
            for name, p in members:
                yield name, p.data


def check_same_vocabulary(actor_config, reference_config) -> None:
    """The per-token KL compares log-probs of the same token ids: the vocabularies must match."""
    if actor_config.vocab_size != reference_config.vocab_size:
        raise ValueError(f"actor vocabulary ({actor_config.vocab_size} tokens) != reference vocabulary "
                         f"({reference_config.vocab_size} tokens): the KL penalty needs the same tokenizer; "
                         "pass a --reference_model that shares the actor's tokenizer")


class PPOTrainer:
    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.iteration = 0

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> "PPOTrainer":
        cfg = self.cfg
        self.rank, self.world, self.local_rank = eng.init_distributed(cfg.dist_backend, cfg.timeout_s)
        eng.seed_everything(cfg.seed)
        os.makedirs(cfg.output_dir, exist_ok=True)
        eng.prepare_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite_output_dir)
        self.tok = load_tokenizer(cfg.actor_model, "", cfg.actor_gguf_file)
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
            # without ZeRO-3 partitioning the loaded actor can be copied: one read (and one GGUF de-quantization)
            # of the actor checkpoint serves the reference and the critic's backbone too
            copy_actor = not self.zero3
            if frozen_ds_cfg is not self.ds_cfg:  # ZeRO-3 partitions the frozen models by their own file
                self._hf_ds_config = eng.zero3_context(frozen_ds_cfg)
            if copy_actor and cfg.reference_model in ("", cfg.actor_model):
                reference = copy.deepcopy(actor)
            else:
                reference = load_actor(cfg.reference_model or cfg.actor_model,
                                       gguf_file="" if cfg.reference_model else cfg.actor_gguf_file, dtype=dtype,
                                       attn_implementation=cfg.attn_implementation)
            check_same_vocabulary(actor.config, reference.config)
            if cfg.reward_model.startswith("rule:"):
                self.reward = RuleReward(cfg.reward_model)
                critic_init = "actor"
            else:
                self.reward = ModelReward(cfg.reward_model, frozen_ds_cfg, dtype, cfg.reward_batch_size)
                critic_init = cfg.critic_init
                if critic_init == "reward" and self.reward.tok.get_vocab() != self.tok.get_vocab():
                    log.warning("reward model's tokenizer differs from the actor's: critic initialized from the actor")
                    critic_init = "actor"
            if critic_ds_cfg is not frozen_ds_cfg:
                self._hf_ds_config = eng.zero3_context(critic_ds_cfg)
            critic = load_critic(critic_init, reward_path=cfg.reward_model, actor_path=cfg.actor_model,
                                 actor_gguf_file=cfg.actor_gguf_file, dtype=dtype,
                                 gradient_checkpointing=cfg.gradient_checkpointing,
                                 attn_implementation=cfg.attn_implementation,
                                 actor_backbone=copy.deepcopy(actor.base_model) if copy_actor and critic_init == "actor" else None)
            if not (critic_ds_cfg is frozen_ds_cfg is self.ds_cfg):
                self._hf_ds_config = eng.zero3_context(self.ds_cfg)  # the actor's again, for the rest of the run
        steps_per_iter = cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.ppo_mini_batch_size)
        total = cfg.ppo_iterations * steps_per_iter
        self.actor, self.actor_sched = eng.initialize(actor, self.ds_cfg, cfg, total)
        self.critic, _ = eng.initialize(critic, critic_ds_cfg, cfg, total, learning_rate=cfg.critic_learning_rate)
        self.reference = eng.initialize_frozen(reference, frozen_ds_cfg)
        self.kl_ctl = (AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.kl_coef))

        self.logger = MetricsLogger(cfg.output_dir, eng.is_rank0(), cfg.tensorboard, cfg.wandb_project,
                                    run_config=vars(cfg), resume=cfg.resume)
        self.ckpt_root = os.path.join(cfg.output_dir, "checkpoints")
        # after gradient_accumulation_steps is derived above, so saved and current configs compare alike
        self.checkpoints = eng.Checkpointer(self.ckpt_root, to_dict(cfg), self.world, cfg.save_total_limit,
                                            cfg.resume_allow_config_change)
        if cfg.resume:
            state = self.checkpoints.load({"actor": self.actor, "critic": self.critic})
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
        return self

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

    def generate(self, prompt_ids: list[list[int]], temperature: float | None = None, seed: int = 0):
        cfg = self.cfg
        with eng.Phase.of("generate"):
            handoff = cfg.vllm_sleep and cfg.rollout_backend == "vllm" and torch.cuda.is_available()
            if handoff:  # optimizer states and partitions leave the GPU while vLLM holds it
                eng.offload_states(self.actor, self.critic)
            self.backend.wake()
            out = self.backend.generate(prompt_ids, max_new_tokens=cfg.max_new_tokens,
                                        temperature=cfg.temperature if temperature is None else temperature,
                                        top_p=cfg.top_p, seed=seed)
            self.backend.sleep()
            if handoff:
                eng.reload_states(self.actor, self.critic)
        return out

    def score(self, rm_prompts: list[str], responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw RM scores [B], normalized and clipped scores [B]); NaN/inf is an error naming the prompts."""
        texts = [self.tok.decode(r, skip_special_tokens=True) for r in responses]
        with eng.Phase.of("reward"):
            raw = self.reward(rm_prompts, texts)
        if not torch.isfinite(raw).all():
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

    @torch.no_grad()
    def make_experience(self, prompts, rm_prompts, responses) -> dict:
        cfg, dev = self.cfg, eng.device()
        ids, attn, posids, tokens, mask = self.pack(prompts, responses, self.tok.pad_token_id)
        ids, attn, posids, tokens, mask = (t.to(dev) for t in (ids, attn, posids, tokens, mask))
        old_lp, ref_lp, values = [], [], []
        with eng.Phase.of("experience"):
            self.actor.module.eval()
            for i in range(0, ids.shape[0], cfg.micro_batch_size):  # vocab-sized logits: one micro-batch at a time
                sl = slice(i, i + cfg.micro_batch_size)
                seqs = trim_left_padding(ids[sl], attn[sl], posids[sl])
                old_lp.append(response_logprobs(self.actor, *seqs, tokens[sl]))
                ref_lp.append(response_logprobs(self.reference, *seqs, tokens[sl]))
                values.append(response_values(self.critic, *seqs, tokens.shape[1]))
            self.actor.module.train()
        old_lp, ref_lp, values = torch.cat(old_lp), torch.cat(ref_lp), torch.cat(values)
        raw, scores = self.score(rm_prompts, responses)
        kl = kl_per_token(old_lp, ref_lp, cfg.kl_estimator) * mask
        rewards = token_rewards(scores.to(dev), kl, mask, self.kl_ctl.beta)
        adv, ret = gae(rewards, values * mask, mask, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            adv = whiten(adv, mask)
        return {"ids": ids, "attn": attn, "posids": posids, "tokens": tokens, "mask": mask, "old_lp": old_lp,
                "old_values": values * mask, "adv": adv, "ret": ret, "raw_scores": raw, "scores": scores,
                "kl_seq": kl.sum(1)}

    def train_on(self, exp: dict) -> dict:
        cfg = self.cfg
        n = exp["ids"].shape[0]
        stats = []
        gen = torch.Generator().manual_seed(cfg.seed * 1000003 + self.iteration)
        with eng.Phase.of("train"):
            for _ in range(cfg.ppo_epochs):
                order = torch.randperm(n, generator=gen)
                for start in range(0, n, cfg.micro_batch_size):
                    idx = order[start:start + cfg.micro_batch_size].to(exp["ids"].device)
                    mb = {k: v[idx] for k, v in exp.items() if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n}
                    seqs = trim_left_padding(mb["ids"], mb["attn"], mb["posids"])
                    lp, ent = response_logprobs(self.actor, *seqs, mb["tokens"], with_entropy=True)
                    pl, clip_frac, approx_kl = policy_loss(lp, mb["old_lp"], mb["adv"], mb["mask"], cfg.clip_ratio)
                    entropy = masked_mean(ent, mb["mask"])
                    self.actor.backward(pl - cfg.entropy_coef * entropy)
                    self.actor.step()
                    values = response_values(self.critic, *seqs, mb["tokens"].shape[1])
                    vl, vclip = value_loss(values, mb["old_values"], mb["ret"], mb["mask"], cfg.value_clip)
                    self.critic.backward(vl)
                    self.critic.step()
                    stats.append([pl.item(), vl.item(), clip_frac.item(), vclip.item(), approx_kl.item(), entropy.item()])
        keys = ["policy_loss", "value_loss", "clip_frac", "value_clip_frac", "approx_kl", "entropy"]
        return dict(zip(keys, torch.tensor(stats).mean(0).tolist()))

    # ------------------------------------------------------------------------------------- loop
    def batch_for(self, iteration: int):
        per_epoch = self.sampler.batches_per_rank
        idxs = self.sampler.epoch_batches(iteration // per_epoch)[iteration % per_epoch]
        return [self.prompts[i] for i in idxs]

    def step(self) -> dict:
        batch = self.batch_for(self.iteration)
        prompts, rm_prompts = [b[0] for b in batch], [b[1] for b in batch]
        t0 = time.perf_counter()
        responses = self.generate(prompts, seed=self.cfg.seed * 7919 + self.iteration * self.world + self.rank)
        gen_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        exp = self.make_experience(prompts, rm_prompts, responses)
        exp_s = time.perf_counter() - t1
        t2 = time.perf_counter()
        train_stats = self.train_on(exp)
        train_s = time.perf_counter() - t2
        sync_s = self.sync_weights() if self.cfg.rollout_backend == "vllm" else 0.0
        gen_tokens = sum(len(r) for r in responses)
        local = {
            "reward/raw_mean": exp["raw_scores"].mean().item(), "reward/raw_std": exp["raw_scores"].std().item() if len(responses) > 1 else 0.0,
            "reward/normalized_mean": exp["scores"].mean().item(), "kl": exp["kl_seq"].mean().item(),
            "response_length": gen_tokens / len(responses), **train_stats,
            "gen_tokens_per_s": gen_tokens / max(gen_s, 1e-9), "gen_s": gen_s, "experience_s": exp_s,
            "train_s": train_s, "sync_s": sync_s,
        }
        keys = sorted(local)
        total = eng.all_reduce_sum(torch.tensor([local[k] for k in keys], device=eng.device())).cpu() / self.world
        metrics = dict(zip(keys, total.tolist()))
        metrics["gen_tokens_per_s"] *= self.world  # throughput adds up over ranks
        metrics["kl_coef"] = self.kl_ctl.beta
        metrics["lr"] = self.actor_sched.get_last_lr()[0]
        self.kl_ctl.update(metrics["kl"], len(responses) * self.world)
        self.iteration += 1
        return metrics

    @torch.no_grad()
    def evaluate_reward(self, prompts) -> float:
        """Mean raw RM score of greedy responses to `prompts` (list of (ids, rm_text, origin)), over ranks."""
        shard = prompts[self.rank::self.world] or prompts[:1]
        responses = self.generate([p[0] for p in shard], temperature=0.0)
        raw, _ = self.score([p[1] for p in shard], responses)
        total = eng.all_reduce_sum(torch.tensor([raw.sum().item(), float(len(raw))], device=eng.device())).cpu()
        return (total[0] / total[1]).item()

    def train(self) -> dict:
        cfg = self.cfg
        progress = None
        if cfg.progress and eng.is_rank0():
            from tqdm import tqdm
            progress = tqdm(total=cfg.ppo_iterations, initial=self.iteration, desc="ppo", dynamic_ncols=True)
        metrics = {}
        while self.iteration < cfg.ppo_iterations:
            metrics = self.step()
            if self.iteration % cfg.log_steps == 0 or self.iteration == cfg.ppo_iterations:
                self.logger.log(self.iteration, metrics, prefix="ppo/")
            if progress is not None:
                progress.update(1)
                progress.set_postfix(reward=f"{metrics['reward/raw_mean']:.3f}", kl=f"{metrics['kl']:.3f}")
            if cfg.save_steps and self.iteration % cfg.save_steps == 0 and self.iteration < cfg.ppo_iterations:
                self.save()
        if progress is not None:
            progress.close()
        self.save()
        if cfg.export:
            eng.export_pretrained(self.actor.module, self.tok, os.path.join(cfg.output_dir, "policy"))
        return metrics

    def save(self) -> None:
        self.checkpoints.save({"actor": self.actor, "critic": self.critic}, self.iteration,
                              {"iteration": self.iteration, "kl": self.kl_ctl.state_dict()})

    def close(self) -> None:
        self.logger.close()
        if hasattr(self.backend, "close"):
            self.backend.close()
        eng.shutdown()
