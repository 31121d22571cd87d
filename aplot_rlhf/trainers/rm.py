"""Reward-model training (bt, bt_smooth, margin, aplot) under DeepSpeed: setup, train, evaluate, save.

One RM step, top to bottom: pairs -> one forward over chosen+rejected -> rewards and embeddings ->
(APLOT: gather across ranks without grad -> cost -> Sinkhorn -> margin) -> BT loss with margin ->
backward -> step -> metrics. Starting, logging, checkpointing and resuming are the run scaffold's
(trainers/run.py); this file is the job itself.
"""
from __future__ import annotations

import logging
import math
import os

import torch

from ..config import RMConfig
from ..data.collate import collate_pairs, collate_pairs_packed, collate_pairs_shared
from ..data.export_contract import rm_export_fields
from ..data.pair_tokenizer import PairTokenizer, pair_length
from ..data.reading import DataError
from ..data.sampler import PairSampler
from ..data.sets import load_rm_data
from ..engine import deepspeed as ds_api
from ..engine import distributed as comm
from ..engine import export as hf_export
from ..eval import score_pairs, summarize
from ..losses import bt_loss, fixed_margin, gamma_at, margin_diagnostics, pair_metrics
from ..models.dropout import disable_dropout
from ..models.loader import check_max_length, load_config, load_tokenizer
from ..models.lora import HEAD_NAMES, apply_lora, trainable_summary
from ..models.packing import capacity_for, to_device
from ..models.reward import load_reward_model
from ..ot import sinkhorn_margin
from .run import Run

log = logging.getLogger(__name__)


class RewardModelTrainer:
    def __init__(self, cfg: RMConfig):
        self.cfg = cfg
        self.step = 0          # optimizer steps done
        self.micro_step = 0    # micro-batches consumed by this rank (the data position)
        self._nonfinite = None       # NaN/inf rewards counted on the device since the last optimizer step
        self._window_origins = []    # the pairs of those micro-batches, for the error message

    # the run scaffold's view of this trainer (trainers/run.py)
    position = property(lambda self: self.step)
    logger = property(lambda self: self.run.logger)
    preempt = property(lambda self: self.run.preempt)
    preempted = property(lambda self: self.run.preempted)

    # ------------------------------------------------------------------------------------- setup
    def setup(self) -> "RewardModelTrainer":
        self.run = Run(self.cfg, "rm")
        self.rank, self.world, self.device = self.run.rank, self.run.world, self.run.device
        self.run.watch_preemption()  # nothing to save yet, but a signal now must not kill a later checkpoint
        self._setup_data()
        self._setup_model()
        self._setup_engine()
        self._resume()
        if self.run.is_rank0:
            log.info("train pairs %d, eval sets %s, world %d, optimizer steps %d, precision %s, ZeRO-%d",
                     len(self.train_pairs), {k: len(v) for k, v in self.eval_sets.items()}, self.world,
                     self.total_steps, self.precision, self.cfg.zero_stage)
        return self

    def _setup_data(self) -> None:
        """Tokenizer, the training pairs and eval sets (read as the dry run reads them), the sampler."""
        cfg = self.cfg
        self.tokenizer = load_tokenizer("reward", cfg.model_name_or_path, cfg.gguf_file, cfg.tokenizer_name_or_path,
                                        cfg.trust_remote_code)
        check_max_length(cfg.max_length,
                         load_config("reward", cfg.model_name_or_path, cfg.gguf_file, cfg.trust_remote_code),
                         self.tokenizer, what=f"model {cfg.model_name_or_path}")  # else export crashes after training
        encoder = PairTokenizer(self.tokenizer, cfg.max_length, cfg.chat_template, cfg.response_separator,
                                cfg.long_response)
        data_report = {}
        self.train_pairs, self.eval_sets = load_rm_data(cfg, encoder, data_report)
        self.input_format = data_report["train_data"]["input_format"]  # recorded in the export for PPO
        lengths = [pair_length(p) for p in self.train_pairs] if cfg.group_by_length else None
        self.sampler = PairSampler(len(self.train_pairs), cfg.micro_batch_size, self.world, self.rank, cfg.seed,
                                   lengths)
        steps_per_epoch = self.sampler.batches_per_rank // cfg.gradient_accumulation_steps
        if steps_per_epoch == 0:
            raise DataError(f"{len(self.train_pairs)} training pairs make no full optimizer step "
                            f"(micro batch {cfg.micro_batch_size} x accumulation {cfg.gradient_accumulation_steps}"
                            f" x {self.world} ranks)")
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))

    def _setup_model(self) -> None:
        """The reward model, partitioned at load under ZeRO-3; dropout off, LoRA adapters, packing."""
        cfg = self.cfg
        self.ds_cfg = ds_api.build_ds_config(cfg, self.world)
        ds_api.check_ds_config(self.ds_cfg, self.world)
        self.run.use_ds_config(self.ds_cfg)
        self.precision = ds_api.effective_precision(cfg.precision)
        model = load_reward_model(cfg.model_name_or_path, tokenizer=self.tokenizer,
                                  dtype=ds_api.torch_dtype(self.precision), gguf_file=cfg.gguf_file,
                                  pooling=cfg.embedding_pooling, gradient_checkpointing=cfg.gradient_checkpointing,
                                  attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code)
        if cfg.disable_dropout:
            disable_dropout(model)
        if cfg.lora_rank:  # after disable_dropout: --lora_dropout is the adapters' own and is kept
            model.hf = apply_lora(model.hf, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                  targets=cfg.lora_target_modules, heads=HEAD_NAMES,
                                  gradient_checkpointing=cfg.gradient_checkpointing)
            if self.run.is_rank0:
                log.info("LoRA rank %d: %d of %d parameters train (adapters + score head)", cfg.lora_rank,
                         *trainable_summary(model))
        self.model, self.hf_model = model, model.hf
        # pairs -> a micro-batch (data.collate): padded; --packing: packed (rows of at most max_length tokens,
        # or one varlen row); --share_prompt: prompt-shared rows (each pair's prompt once, then its two responses)
        self.pack = None
        if cfg.packing:
            model.prepare_packing(cfg.attn_implementation)  # sdpa -> varlen_sdpa (models.packing)
            capacity, reads_last = capacity_for(model.hf.config, cfg.max_length), model.reads_last_token
            self.pack = lambda pairs: collate_pairs_packed(pairs, self.tokenizer.pad_token_id, capacity, reads_last)
        if cfg.share_prompt:  # after --packing's switch to varlen_sdpa: a shared row runs it with a dense mask
            why = model.shared_prompt_support()
            if why is None:  # a dense mask costs rows x L^2: rows of max_length tokens; a block mask takes one row
                capacity = None if model.hf.config._attn_implementation == "flex_attention" else cfg.max_length
                self.pack = lambda pairs: collate_pairs_shared(pairs, self.tokenizer.pad_token_id, capacity)
            elif self.run.is_rank0:
                log.warning("--share_prompt: %s; falling back to the %s layout", why,
                            "packed" if cfg.packing else "padded")
        self.collate = self.pack or (lambda pairs: collate_pairs(pairs, self.tokenizer.pad_token_id))

    def _setup_engine(self) -> None:
        self.engine, self.scheduler = ds_api.initialize(self.model, self.ds_cfg, self.cfg, self.total_steps)

    def _resume(self) -> None:
        state = self.run.resume({"model": self.engine})
        if state is not None:
            self.step, self.micro_step = state["step"], state["micro_step"]
            self.run.resumed_at(self.step, f"optimizer step {self.step} (micro step {self.micro_step})")

    def checkpoint_state(self) -> tuple[dict, dict]:
        return {"model": self.engine}, {"step": self.step, "micro_step": self.micro_step}

    # ------------------------------------------------------------------------------------- margins
    def margin(self, chosen, rejected, chosen_emb, rejected_emb, strength):
        """Per-pair margin [B] for the configured loss (None for bt), detached."""
        cfg = self.cfg
        if cfg.loss == "margin":
            return fixed_margin(strength.to(chosen.device), cfg.margin_scale)
        if cfg.loss != "aplot":
            return None
        gamma = gamma_at(self.step, cfg.aplot_gamma, cfg.aplot_gamma_warmup_steps)
        B = chosen.shape[0]
        with torch.no_grad():
            if cfg.aplot_ot_batch == "global" and self.world > 1:
                rc, rr = comm.all_gather_no_grad(chosen.float()), comm.all_gather_no_grad(rejected.float())
                hc, hr = comm.all_gather_no_grad(chosen_emb), comm.all_gather_no_grad(rejected_emb)
            else:
                rc, rr, hc, hr = chosen, rejected, chosen_emb, rejected_emb
            m = sinkhorn_margin(rc, rr, hc, hr, lam=cfg.aplot_lambda, eps=cfg.aplot_eps, iters=cfg.aplot_iters,
                                gamma=gamma, signed=cfg.aplot_signed, backend=cfg.aplot_backend)
            self.ot_batch_size = rc.shape[0]
            if rc.shape[0] != B:  # every rank solved the same global problem; keep this rank's rows
                m = m[self.rank * B:(self.rank + 1) * B]
        return m

    # ------------------------------------------------------------------------------------- train
    def micro_batch(self, micro_step: int) -> list[dict]:
        """The pairs of this rank's `micro_step`-th micro-batch of the run (epochs follow one another)."""
        return [self.train_pairs[i] for i in self.sampler.batch(micro_step)]

    def forward(self, pairs: list[dict]):
        """(rewards [2B]: chosen then rejected, embeddings [2B, d], the batch, its real token count)."""
        batch = self.collate(pairs)  # whatever the layout: the forward's inputs, and its tokens counted on the host
        with comm.Phase.of("forward"):
            rewards, emb = self.engine(**to_device(batch["inputs"], self.device))
        return rewards, emb, batch, float(batch["n_tokens"])

    def train_micro_step(self, pairs: list[dict], boundary: bool = True) -> dict:
        """Forward, loss, backward and (at an accumulation boundary) the optimizer step of one micro-batch.

        Metrics come back as 0-dim tensors on the device: nothing here waits for the accelerator except
        the non-finite check, once per optimizer step, just before the weights change."""
        cfg = self.cfg
        B = len(pairs)
        rewards, emb, batch, n_tokens = self.forward(pairs)
        nonfinite = (~torch.isfinite(rewards.detach())).sum()
        self._nonfinite = nonfinite if self._nonfinite is None else self._nonfinite + nonfinite
        self._window_origins += [p["origin"] for p in pairs]
        chosen, rejected = rewards[:B], rewards[B:]
        with comm.Phase.of("aplot_margin" if cfg.loss == "aplot" else "loss"):
            margin = self.margin(chosen, rejected, emb[:B], emb[B:], batch["strength"])
        loss = bt_loss(chosen, rejected, margin, cfg.label_smoothing if cfg.loss == "bt_smooth" else 0.0)
        with comm.Phase.of("backward"):
            self.engine.backward(loss)
        if boundary:
            self._check_finite()
        with comm.Phase.of("optimizer_step"):
            self.engine.step()
        metrics = {"loss": loss.detach(), **pair_metrics(chosen, rejected), "tokens": n_tokens}
        if margin is not None:
            metrics.update(margin_diagnostics(margin, chosen, rejected, cfg.aplot_hard_threshold,
                                              cfg.aplot_easy_threshold))
            if cfg.loss == "aplot":
                metrics["aplot/ot_batch_size"] = float(self.ot_batch_size)
                metrics["aplot/gamma"] = gamma_at(self.step, cfg.aplot_gamma, cfg.aplot_gamma_warmup_steps)
        return metrics

    def _check_finite(self) -> None:
        """Stop before an optimizer step that NaN/inf rewards of any rank's micro-batches would poison."""
        bad = comm.all_reduce_sum(self._nonfinite.float().reshape(1)).item()
        origins, self._nonfinite, self._window_origins = self._window_origins, None, []
        if bad > 0:
            raise FloatingPointError(
                f"[rank {self.rank}] optimizer step {self.step + 1}: {int(bad)} NaN/inf reward(s) in this step's "
                f"micro-batches across ranks (this rank's pairs: {origins}); lower the learning rate, use bf16 "
                "instead of fp16, or check the model weights")

    def train_step(self) -> list[dict]:
        """One optimizer step: gradient_accumulation_steps micro-steps; their metrics."""
        ga = self.cfg.gradient_accumulation_steps
        out = []
        for _ in range(ga):
            boundary = (self.micro_step + 1) % ga == 0
            out.append(self.train_micro_step(self.micro_batch(self.micro_step), boundary))
            self.micro_step += 1
        self.step += 1
        return out

    def log_row(self, window, seconds: float) -> dict:
        """A log interval's row: the mean over its micro-steps and over all ranks, with rates."""
        metrics = self.run.reduce(window.means(self.device))
        steps = len(window) / self.cfg.gradient_accumulation_steps
        tokens = metrics.pop("tokens") * len(window) * self.world
        metrics.update({"lr": self.scheduler.get_last_lr()[0], "step_s": seconds / steps,
                        "tokens_per_s": tokens / seconds, "epoch": self.micro_step / self.sampler.batches_per_rank})
        return metrics

    def after_step(self) -> None:
        cfg = self.cfg
        if cfg.eval_steps and self.step % cfg.eval_steps == 0 and self.step < self.total_steps:
            self.log_eval(self.evaluate())

    def train(self) -> dict:
        cfg = self.cfg
        # a stop asked for while the run set up is honoured before the first step (run.loop): skip the step-0
        # evaluation then, which at scale would spend the scheduler's grace period on a number nobody keeps
        if cfg.eval_at_start and self.step == 0 and not self.run.preempt.requested():
            self.log_eval(self.evaluate())
        self.engine.module.train()
        postfix = lambda row: {"loss": f"{row['loss']:.4f}", "acc": f"{row['accuracy']:.2f}"}  # noqa: E731
        if self.run.loop(self, self.total_steps, "train/", postfix):
            return {}  # preempted: checkpointed, the job exits for a requeue
        results = self.evaluate()
        self.log_eval(results)
        self.last_eval = results
        if self.run.is_rank0 and results:  # per-pair rewards, for plots and for checking exports
            torch.save({n: {"chosen": r["_chosen"], "rejected": r["_rejected"]} for n, r in results.items()},
                       os.path.join(cfg.output_dir, "eval_rewards.pt"))
        if cfg.export:
            self.export(results)
        return {name: {k: v for k, v in r.items() if not k.startswith("_")} for name, r in results.items()}

    # ------------------------------------------------------------------------------------- eval
    def forward_rewards(self, *args, **kwargs):
        return self.engine(*args, **kwargs)[0]

    def evaluate(self) -> dict:
        """Every eval set, sharded over ranks (all ranks run the same number of forwards for ZeRO-3)."""
        results = {}
        self.engine.module.eval()
        with comm.Phase.of("evaluate"):
            for name, pairs in self.eval_sets.items():
                shard, _ = self.run.shard(pairs)
                c, r = score_pairs(self.forward_rewards, shard, self.cfg.eval_batch_size,
                                   self.tokenizer.pad_token_id, self.device, pack=self.pack)
                c = comm.all_gather_no_grad(c.to(self.device)).cpu()[:len(pairs)]
                r = comm.all_gather_no_grad(r.to(self.device)).cpu()[:len(pairs)]
                results[name] = {**summarize(c, r), "_chosen": c, "_rejected": r}
        self.engine.module.train()
        return results

    def log_eval(self, results: dict) -> None:
        for name, r in results.items():
            self.logger.log(self.step, {k: v for k, v in r.items() if not k.startswith("_")}, prefix=f"eval/{name}/")
        if self.run.is_rank0 and results:
            log.info("step %d eval: %s", self.step,
                     ", ".join(f"{n} acc {r['accuracy']:.3f} (n={r['n']})" for n, r in results.items()))

    # ------------------------------------------------------------------------------------- save
    def save(self) -> None:
        self.run.save(self)

    def export(self, results: dict) -> str | None:
        """HF folder under output_dir/model with reward mean/std in its config: over the first eval set, or
        without one over the first export_reward_stats_pairs training pairs."""
        if results:
            first = next(iter(results.values()))
            rewards = torch.cat([first["_chosen"], first["_rejected"]])
        else:
            sample = self.train_pairs[:self.cfg.export_reward_stats_pairs]
            c, r = score_pairs(self.forward_rewards, sample, self.cfg.eval_batch_size,
                               self.tokenizer.pad_token_id, self.device, pack=self.pack)
            rewards = torch.cat([c, r])
        extra = rm_export_fields(self.cfg, self.input_format, rewards.mean().item(), rewards.std().item())
        out = hf_export.export_pretrained(self.hf_model, self.tokenizer, os.path.join(self.cfg.output_dir, "model"),
                                          extra)
        if out:
            log.info("exported reward model to %s", out)
        return out

    def close(self) -> None:
        self.run.close()
