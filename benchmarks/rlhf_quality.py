"""The RLHF half of "does APLOT beat Bradley-Terry?" (issue 21 item 3): the same RLHF run against an APLOT and a
BT reward model of the same seed, the two policies judged by a reward model neither was trained against.

For every policy seed and every reward model (`--rm NAME=PATH`, two of them; "{seed}" in PATH becomes the policy
seed, so seed N trains against the study's reward models of seed N) this runs the PPO demo's settings
(`aplot_rlhf.cli.demo_ppo.demo_flags`: SmolLM2-135M-Instruct, RLOO, 8 prompts x 4 samples x 24 new tokens,
kl_coef 0.05, lr 5e-5; `--iterations` of them) through `python -m aplot_rlhf.cli.train_ppo` with only the reward
model and the seed changed: the same prompts, the same budget. Each exported policy then answers the held-out
prompts greedily (the trainer's own `--eval_prompts` split: never trained on, the same for every run), and the
judge (`--judge PATH`, a train_rm export) scores every answer. Per seed, the two policies' answers to a prompt are
one comparison: a win for the one the judge scores higher, a tie when the answers are identical.

Report (`tables.md`, `summary.json` under --out): per seed the win rate of the first reward model's policy
(wins + ties / 2 over the held-out prompts) and its mean over seeds with a 95% t-interval, a sign test on the
pooled untied comparisons, the answers' mean length and distinct-2 (distinct word bigrams per answer: a policy that
repeats a phrase its reward model pays for shows here whatever the judge thinks) per policy, and the judge's own
length bias: how often it prefers the longer of the two answers, and, on labelled pairs (`--judge_pairs`, default
the quality study's id_val), its accuracy when the chosen answer is the longer and when it is the shorter one. A
judge that mostly measures length turns a length difference between the policies into a win rate: read the two
together.

Several judges (`--judge` more than once, NAME=PATH or PATH): each scores the same answers and gets its own table
and win rate, so a user sees whether the verdict depends on the judge (a BT judge may favour the BT-trained
policy, an APLOT one the other). A judge is known by a fingerprint of its weights, not its path: its scores and
length bias are cached under that fingerprint, so judging again with another judge, or with a model retrained at
the same path, never reuses the wrong scores.

Resumable: a finished training run leaves its policy and `states/train_<rm>_s<seed>.json`; answers are saved per
run (`answers/<rm>_s<seed>.json`); the command skips what is done and redoes a partial run. A state file trained
against another reward model than the one now given under its name is refused, naming the file.

Across machines: the reward models are not committed, and each run needs only its own, so a session trains the runs
whose reward model it has (the study's own run folders, or `quality.py --rebuild METHOD:SEED`, which checks the
copy is the study's training bit for bit) and names the others (exit status 1). Without `--judge` it only trains
and answers; judging comes when the judges exist, from the saved answers. Each state records the fingerprint of
the reward model it trained against and whether that was a rebuild, and the report prints both.

  python benchmarks/rlhf_quality.py --rm 'aplot=runs/quality/smollm2/aplot_s{seed}/model' \\
      --rm 'bt=runs/quality/smollm2/bt_s{seed}/model' --judge runs/quality/smollm2/bt_s5/model \\
      --judge runs/quality/smollm2/aplot_sel_s5/model --seeds 1,2,3 --out benchmarks/results/rlhf_quality/smollm2
  python benchmarks/rlhf_quality.py ... --report          # only rebuild the tables from the state files
  python benchmarks/rlhf_quality.py ... --iterations 1 --eval_prompts 4 --out /tmp/rq   # an end-to-end smoke run
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from quality import (  # noqa: E402
    id_val_file,
    machine,
    mcnemar_exact,
    model_fingerprint,
    run_child,
    stop_children_on_signals,
    t_ci95,
    write_json,
)


def say(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def parse_rms(specs: list[str]) -> dict[str, str]:
    rms = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--rm {spec!r}: expected NAME=PATH (e.g. aplot=runs/quality/smollm2/aplot_s1/model)")
        if name in rms:
            raise SystemExit(f"--rm {name} given twice")
        rms[name] = path
    if len(rms) != 2:
        raise SystemExit(f"--rm: exactly two reward models to compare, got {len(rms)}")
    return rms


def rm_path(template: str, seed: int) -> str:
    """An --rm path for one policy seed: "{seed}" in it becomes the seed, so each policy seed trains against the
    reward models of the same study seed (aplot_s{seed} against bt_s{seed}). Checked for a model only where a
    run still has to train against it (train()): a finished run's reward model may be gone with its machine."""
    return template.replace("{seed}", str(seed))


class MissingRewardModel(Exception):
    """A run still to train whose reward model is not on this machine; main() trains the others and names it."""


def rm_provenance(rm: str) -> dict:
    """Where a reward model came from: the quality study's `--rebuild` leaves rebuilt.json beside a model it
    trained again, saying whether that was the study's training bit for bit; any other folder is taken as is."""
    record = Path(rm).parent / "rebuilt.json"
    if record.exists():
        r = json.loads(record.read_text())
        return {"rebuilt": True, "same_training": r["same_training"], "final_id_val": r.get("final_id_val"),
                "final_id_val_study": r.get("final_id_val_study")}
    return {"rebuilt": False}


def parse_judges(specs: list[str], rms: dict[str, str], seeds: list[int]) -> dict[str, str]:
    """--judge NAME=PATH or PATH (named after its folder, or the folder above a `model` folder); each must be a
    train_rm export and none may be a compared reward model at any of the seeds."""
    compared = {os.path.realpath(t.replace("{seed}", str(s))) for t in rms.values() for s in seeds}
    judges = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            folder = Path(spec.rstrip("/"))
            name = folder.parent.name if folder.name == "model" else folder.name
        if not name or not path:
            raise SystemExit(f"--judge {spec!r}: expected NAME=PATH or PATH")
        if not (Path(path) / "config.json").exists():
            raise SystemExit(f"--judge {path}: no config.json (a train_rm export folder)")
        if os.path.realpath(path) in compared:
            raise SystemExit(f"--judge {path} is one of the compared reward models: a judge must be one neither "
                             "policy was trained against")
        if name in judges:
            raise SystemExit(f"--judge {name} given twice (name them: --judge NAME=PATH)")
        judges[name] = path
    return judges


fingerprint = model_fingerprint  # a model's identity for the score caches and the run states


def train_flags(rm: str, seed: int, out: Path, iterations: int, eval_prompts: int) -> list[str]:
    """The PPO demo's flags with this run's reward model, seed, budget and held-out split."""
    from aplot_rlhf.cli.demo_ppo import demo_flags
    _, flags = demo_flags(Path(rm), out)
    return [*flags, "--seed", str(seed), "--ppo_iterations", str(iterations), "--eval_prompts", str(eval_prompts),
            "--output_dir", str(out), "--no-tensorboard", "--no-progress"]


def train(name: str, rm: str, seed: int, args, out: Path) -> dict:
    """One RLHF run (skipped when its state file exists): returns its state."""
    state = out / "states" / f"train_{name}_s{seed}.json"
    if state.exists():
        done = json.loads(state.read_text())
        if os.path.realpath(done["rm_path"]) != os.path.realpath(rm):
            raise SystemExit(f"{state}: trained against {done['rm_path']}, not {rm} given as --rm {name}; use "
                             "another --out (or name) for another reward model")
        recorded = done.get("rm_fingerprint")
        if recorded and (Path(rm) / "config.json").exists() and fingerprint(rm) != recorded:
            say(f"note: {rm} now holds other weights than the {done['rm_fingerprint']} run {name} seed {seed} was "
                f"trained against ({state}); the finished run is kept and reported with the weights it used")
        return done
    if not (Path(rm) / "config.json").exists():
        raise MissingRewardModel(f"--rm {name}: {rm} has no config.json (a train_rm export folder) for seed {seed}")
    rm_fp, provenance = fingerprint(rm), rm_provenance(rm)  # what it trains against, read before it does
    if provenance["rebuilt"] and not provenance["same_training"]:
        say(f"warning: {rm} was trained again and is NOT the study's model bit for bit (see its rebuilt.json); "
            f"run {name} seed {seed} trains against a same-recipe copy and its report says so")
    run = Path(args.runs) / f"{name}_s{seed}"
    if run.exists():  # a partial run: metrics.jsonl is append-only, so start it again
        import shutil
        shutil.rmtree(run)
    run.mkdir(parents=True)
    cmd = [sys.executable, "-m", "aplot_rlhf.cli.train_ppo",
           *train_flags(rm, seed, run, args.iterations, args.eval_prompts)]
    say(f"train {name} seed {seed}: {run}")
    t0, start = time.time(), machine()
    with open(run / "train.log", "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        run_child(cmd, log, args.threads)  # never outlives this process (quality.py's stop_children_on_signals)
    if not (run / "policy" / "config.json").exists():
        raise SystemExit(f"{run}: train_ppo finished without an exported policy/ (see {run / 'train.log'})")
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    last = rows[-1]
    result = {"rm": name, "rm_path": rm, "rm_fingerprint": rm_fp, "rm_provenance": provenance,
              "seed": seed, "policy": str(run / "policy"), "iterations": args.iterations,
              "final_reward_raw": last.get("ppo/reward/raw_mean"), "final_kl": last.get("ppo/kl"),
              "reward_curve": [r.get("ppo/reward/raw_mean") for r in rows],
              "kl_curve": [r.get("ppo/kl") for r in rows], "wall_s": round(time.time() - t0, 1),
              "machine_start": start, "machine_end": machine()}
    write_json(state, result)
    return result


def held_out_prompts(policy: str, eval_prompts: int) -> list[tuple]:
    """The trainer's held-out split, encoded as the trainer encodes it: (actor ids, the prompt as given)."""
    from aplot_rlhf.cli.demo_ppo import demo_flags
    from aplot_rlhf.config import PPOConfig, load_config
    from aplot_rlhf.data.prompts import PromptFormatter, load_prompts
    from aplot_rlhf.models.loader import load_tokenizer
    _, flags = demo_flags(Path(policy), Path(policy))
    cfg = load_config(PPOConfig, [*flags, "--eval_prompts", str(eval_prompts)])
    tok = load_tokenizer("actor", policy)
    prompts = load_prompts(cfg.prompt_data)[:cfg.max_prompts]
    formatter = PromptFormatter(tok, cfg.max_prompt_length, cfg.prompt_format)
    encoded = [(*formatter(p["prompt"]),) for p in prompts]
    n_eval = min(eval_prompts, len(encoded) // 2)
    return [(ids, given) for ids, given in encoded[len(encoded) - n_eval:]]


def answer(name: str, seed: int, policy: str, args, out: Path) -> list[dict]:
    """The policy's greedy answers to the held-out prompts (saved; skipped when saved)."""
    path = out / "answers" / f"{name}_s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    if not (Path(policy) / "config.json").exists():
        raise SystemExit(f"{policy}: the trained policy is gone and its answers ({path}) were never saved; delete "
                         f"{out / 'states' / f'train_{name}_s{seed}.json'} to train the run again")
    import torch
    from transformers import AutoModelForCausalLM

    from aplot_rlhf.models.loader import load_tokenizer
    from aplot_rlhf.rollout.hf import HFRollout
    prompts = held_out_prompts(policy, args.eval_prompts)
    tok = load_tokenizer("actor", policy)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    backend = HFRollout(model, tok, zero3=False)
    responses = []
    for i in range(0, len(prompts), 16):
        chunk = prompts[i:i + 16]
        responses += backend.generate([p[0] for p in chunk], max_new_tokens=args.max_new_tokens, temperature=0.0,
                                      top_p=1.0, seeds=[0])
    rows = [{"prompt": given, "answer": tok.decode(r, skip_special_tokens=True), "tokens": len(r)}
            for (_, given), r in zip(prompts, responses)]
    write_json(path, rows)
    return rows


def judge_scores(judge: str, prompts: list, answers: list[str]) -> list[float]:
    from aplot_rlhf.serve_rm import Scorer
    return Scorer(judge, device="cpu").score(prompts, answers)


def length_bias_on_pairs(judge: str, pairs_file: str) -> dict:
    """The judge's accuracy on labelled pairs when the chosen answer is the longer / the shorter one (characters)."""
    from aplot_rlhf.data.pairs import load_pairs
    from aplot_rlhf.serve_rm import Scorer
    pairs = load_pairs(pairs_file)
    scorer = Scorer(judge, device="cpu")
    chosen = scorer.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = scorer.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    right = [c > r for c, r in zip(chosen, rejected)]
    longer = [len(p["chosen"]) > len(p["rejected"]) for p in pairs]
    shorter = [len(p["chosen"]) < len(p["rejected"]) for p in pairs]

    def acc(sel: list[bool]) -> float:
        return sum(r for r, s in zip(right, sel) if s) / max(1, sum(sel))
    return {"file": pairs_file, "pairs": len(pairs), "accuracy": sum(right) / len(pairs),
            "accuracy_chosen_longer": acc(longer), "accuracy_chosen_shorter": acc(shorter),
            "chosen_longer_share": sum(longer) / len(pairs)}


def distinct2(text: str) -> float:
    """Distinct word bigrams over all word bigrams of one answer (1.0: no bigram repeats; fewer than two words:
    1.0). A judge-free sign of a policy that found a repeated phrase its reward model pays for."""
    words = text.split()
    pairs = list(zip(words, words[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def answer_means(rows: list[dict]) -> tuple[float, float]:
    """One run's answers: mean length in characters and mean distinct-2."""
    n = len(rows)
    return sum(len(r["answer"]) for r in rows) / n, sum(distinct2(r["answer"]) for r in rows) / n


def answer_stats(answers: dict, trains: dict) -> list[str]:
    """Judge-free lines per answered run (mean answer chars, distinct-2, final KL), from the saved answers and
    states: what a user can read before any judge exists."""
    lines = []
    for (name, seed), rows in sorted(answers.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        chars, d2 = answer_means(rows)
        lines.append(f"{name}_s{seed}: {len(rows)} answers, mean {chars:.0f} chars, distinct-2 {d2:.2f}, "
                     f"final KL {trains[(name, seed)]['final_kl']:.2f}")
    return lines


def compare(a_rows: list[dict], b_rows: list[dict], a_scores: list[float], b_scores: list[float]) -> dict:
    """One seed's comparison of two policies' answers to the same prompts: wins, ties, losses of A, A's win rate
    (ties count half), and how often the judge preferred the longer answer where the lengths differ."""
    if [r["prompt"] for r in a_rows] != [r["prompt"] for r in b_rows]:
        raise ValueError("the two policies answered different prompts")
    wins = ties = losses = longer_preferred = length_differs = 0
    for ra, rb, sa, sb in zip(a_rows, b_rows, a_scores, b_scores):
        if ra["answer"] == rb["answer"] or sa == sb:
            ties += 1
            continue
        wins += sa > sb
        losses += sa < sb
        la, lb = len(ra["answer"]), len(rb["answer"])
        if la != lb:
            length_differs += 1
            longer_preferred += (sa > sb) == (la > lb)
    n = len(a_rows)
    (chars_a, d2_a), (chars_b, d2_b) = answer_means(a_rows), answer_means(b_rows)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "win_rate": (wins + ties / 2) / n,
            "judge_prefers_longer": longer_preferred / length_differs if length_differs else float("nan"),
            "length_differs": length_differs, "mean_chars_a": chars_a, "mean_chars_b": chars_b,
            "distinct2_a": d2_a, "distinct2_b": d2_b}


def summarize(per_seed: dict[int, dict], names: list[str]) -> dict:
    rates = [c["win_rate"] for c in per_seed.values()]
    mean, hw = t_ci95(rates) if rates else (float("nan"), float("nan"))
    wins, losses = sum(c["wins"] for c in per_seed.values()), sum(c["losses"] for c in per_seed.values())
    return {"a": names[0], "b": names[1], "seeds": sorted(per_seed), "win_rate_mean": mean, "win_rate_ci95": hw,
            "pooled_wins": wins, "pooled_losses": losses,
            "pooled_ties": sum(c["ties"] for c in per_seed.values()),
            "sign_test_p": mcnemar_exact(wins, losses)}


def judge_lines(names: list[str], per_seed: dict[int, dict], s: dict, trains: dict, bias: dict | None, judge: str,
                path: str, fp: str) -> list[str]:
    """One judge's section of the report: per-seed comparisons, the mean win rate (`s`: summarize()) and the
    judge's length bias."""
    a, b = names
    lines = [f"### Judge `{judge}` ({path}, weights {fp})", "",
             f"| seed | prompts | wins / ties / losses of {a} | win rate of {a} | judge prefers the longer answer "
             f"| mean answer chars {a} / {b} | distinct-2 {a} / {b} | final KL {a} / {b} "
             f"| final train reward {a} / {b} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seed, c in sorted(per_seed.items()):
        ta, tb = trains[(a, seed)], trains[(b, seed)]
        lines.append(f"| {seed} | {c['n']} | {c['wins']} / {c['ties']} / {c['losses']} | "
                     f"{100 * c['win_rate']:.1f}% | {100 * c['judge_prefers_longer']:.0f}% of {c['length_differs']} | "
                     f"{c['mean_chars_a']:.0f} / {c['mean_chars_b']:.0f} | "
                     f"{c.get('distinct2_a', float('nan')):.2f} / {c.get('distinct2_b', float('nan')):.2f} | "
                     f"{ta['final_kl']:.2f} / {tb['final_kl']:.2f} | "
                     f"{ta['final_reward_raw']:.3f} / {tb['final_reward_raw']:.3f} |")
    hw = s["win_rate_ci95"]
    interval = "" if math.isnan(hw) else f" ± {100 * hw:.1f}"
    lines += ["", f"Win rate of {a} over {b}, mean over {len(per_seed)} seed(s): "
              f"**{100 * s['win_rate_mean']:.1f}%{interval}** (95% t-interval over seeds; 50% = no difference). "
              f"Pooled over seeds: {s['pooled_wins']} wins, {s['pooled_losses']} losses, {s['pooled_ties']} ties; "
              f"sign test on the untied comparisons p = {s['sign_test_p']:.3g}."]
    if bias:
        lines += ["", f"Judge's length bias on labelled pairs ({bias['file']}, {bias['pairs']} pairs, the chosen "
                  f"answer the longer in {100 * bias['chosen_longer_share']:.0f}%): accuracy "
                  f"{100 * bias['accuracy']:.1f}%; {100 * bias['accuracy_chosen_longer']:.1f}% when the chosen "
                  f"answer is the longer, {100 * bias['accuracy_chosen_shorter']:.1f}% when it is the shorter."]
    return lines + [""]


def report(out: Path, names: list[str], judged: dict[str, dict], trains: dict) -> str:
    """tables.md and summary.json for every judge; `judged[name]`: path, fp (weights fingerprint), per_seed
    (compare() per seed) and bias (length_bias_on_pairs() or None)."""
    a, b = names
    built = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    lines = [f"## RLHF with {a} against {b}: policies judged by reward models neither was trained against", "",
             f"Built by `python benchmarks/rlhf_quality.py --report` at {built}; {len(judged)} judge(s).", ""]
    def origin(t: dict) -> str:
        prov = t.get("rm_provenance")
        if prov is None:
            return "provenance not recorded"
        if not prov.get("rebuilt"):
            return "as given"
        if prov["same_training"]:
            return "trained again, the study's training bit for bit"
        acc = lambda v: "?" if v is None else f"{v:.3f}"  # noqa: E731
        return (f"trained again, NOT bit for bit (final id_val {acc(prov['final_id_val'])}, the study's "
                f"{acc(prov['final_id_val_study'])})")
    lines += ["Reward models trained against: " + "; ".join(
        f"{k[0]} seed {k[1]} `{t.get('rm_path', '?')}` (weights {t.get('rm_fingerprint', '?')}, {origin(t)})"
        for k, t in sorted(trains.items(), key=lambda kv: (kv[0][1], kv[0][0]))) + ".", ""]
    summaries = {}
    for judge, j in judged.items():
        summaries[judge] = summarize(j["per_seed"], names)
        lines += judge_lines(names, j["per_seed"], summaries[judge], trains, j["bias"], judge, j["path"], j["fp"])
    if len(judged) > 1:
        sides = {k: ("above" if v["win_rate_mean"] > 0.5 else "below" if v["win_rate_mean"] < 0.5 else "at")
                 for k, v in summaries.items()}
        agree = len(set(sides.values())) == 1
        lines += [f"The judges {'agree' if agree else 'disagree'} on the side of 50%: " + ", ".join(
            f"{k} {100 * summaries[k]['win_rate_mean']:.1f}%" for k in judged) + ".", ""]
    text = "\n".join(lines)
    (out / "tables.md").write_text(text)
    write_json(out / "summary.json", {
        "judges": {k: {"path": j["path"], "fingerprint": j["fp"], "summary": summaries[k], "per_seed": j["per_seed"],
                       "length_bias": j["bias"]} for k, j in judged.items()},
        "runs": {f"{k[0]}_s{k[1]}": v for k, v in trains.items()}})
    return text


def judge_all(out: Path, judge: str, path: str, names: list[str], seeds: list[int], answers: dict,
              judge_pairs: str) -> dict:
    """One judge's scores of every answered seed and its length bias, cached under the fingerprint of its
    weights in judge_scores.json / judge_length_bias.json."""
    fp = fingerprint(path)
    judged = out / "judge_scores.json"
    cache = json.loads(judged.read_text()) if judged.exists() else {}
    mine = cache.setdefault(fp, {"judge": path, "scores": {}})["scores"]
    per_seed = {}
    for seed in seeds:
        if (names[0], seed) not in answers or (names[1], seed) not in answers:
            continue
        scores = []
        for name in names:
            key = f"{name}_s{seed}"
            if key not in mine:
                rows = answers[(name, seed)]
                mine[key] = judge_scores(path, [r["prompt"] for r in rows], [r["answer"] for r in rows])
                write_json(judged, cache)
            scores.append(mine[key])
        per_seed[seed] = compare(answers[(names[0], seed)], answers[(names[1], seed)], *scores)
    bias = None
    if judge_pairs:
        bias_path = out / "judge_length_bias.json"
        biases = json.loads(bias_path.read_text()) if bias_path.exists() else {}
        pairs = str(id_val_file("full")) if judge_pairs == "id_val" else judge_pairs
        key = f"{fp} {os.path.realpath(pairs)}"  # the same judge on other labelled pairs is measured anew
        if key not in biases:
            biases[key] = length_bias_on_pairs(path, pairs)
            write_json(bias_path, biases)
        bias = biases[key]
    return {"path": path, "fp": fp, "per_seed": per_seed, "bias": bias}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rm", action="append", required=True, help="NAME=PATH of a train_rm export (exactly two)")
    p.add_argument("--judge", action="append", default=[],
                   help="NAME=PATH or PATH of a train_rm export neither policy was trained against; repeat for "
                        "several judges, each reported on its own; none: only train and answer (judge later: the "
                        "answers are saved)")
    p.add_argument("--judge_pairs", default="id_val",
                   help="labelled pairs for the judge's length bias: a pairs file, 'id_val' (the quality study's ID "
                        "validation split, built if missing) or '' to skip")
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--iterations", type=int, default=10, help="PPO iterations per run (the demo's 10)")
    p.add_argument("--eval_prompts", type=int, default=64, help="held-out prompts (never trained on) to judge")
    p.add_argument("--max_new_tokens", type=int, default=24, help="greedy answer length (the training's 24)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True, help="state and report folder (commit it)")
    p.add_argument("--runs", default="", help="run folders (default runs/rlhf_quality/<out's name>)")
    p.add_argument("--report", action="store_true", help="only rebuild the report from finished state")
    args = p.parse_args(argv)
    rms = parse_rms(args.rm)
    seeds = [int(x) for x in args.seeds.split(",") if x]
    judges = parse_judges(args.judge, rms, seeds)
    if args.report and not judges:
        raise SystemExit("--report needs at least one --judge")
    out = Path(args.out)
    args.runs = args.runs or str(REPO / "runs" / "rlhf_quality" / out.name)
    names = list(rms)
    trains, answers, missing = {}, {}, []
    for seed in seeds:
        for name, template in rms.items():
            state = out / "states" / f"train_{name}_s{seed}.json"
            if args.report and not state.exists():
                continue
            try:  # each run needs only its own reward model: train every run whose model is here
                trains[(name, seed)] = train(name, rm_path(template, seed), seed, args, out)
            except MissingRewardModel as exc:
                missing.append(str(exc))
                say(f"skipped: {exc}")
                continue
            answers[(name, seed)] = answer(name, seed, trains[(name, seed)]["policy"], args, out)
    unfinished = ("; ".join(missing) + ". A finished quality-study run's model is trained again by `python "
                  "benchmarks/quality.py --preset PRESET --rebuild METHOD:SEED`") if missing else ""
    if not judges:
        say(f"no --judge: {len(answers)} run(s) trained and answered ({', '.join(f'{n}_s{s}' for n, s in answers)}); "
            "their answers are saved, a later command with --judge scores them")
        for line in answer_stats(answers, trains):
            print(line)
        if unfinished:
            raise SystemExit(f"not trained, their reward models are not here: {unfinished}")
        return
    if not any((names[0], s) in answers and (names[1], s) in answers for s in seeds):
        raise SystemExit("no seed has both policies' answers yet")
    judged = {j: judge_all(out, j, path, names, seeds, answers, args.judge_pairs) for j, path in judges.items()}
    print(report(out, names, judged, trains))
    if unfinished:
        raise SystemExit(f"the report covers the seeds with both runs; not trained, their reward models are not "
                         f"here: {unfinished}")


if __name__ == "__main__":
    stop_children_on_signals()  # here, not in main(): the tests call main() under pytest's own handlers
    main()
