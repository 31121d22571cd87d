"""Arithmetic questions with checkable answers, generated from a seed (no download), and the reward
function that checks them: the verifiable-reward example of `train_ppo --reward_model python:...`.

    python examples/arithmetic/tasks.py --kind add --n 512 --seed 0 > prompts.jsonl
    train_ppo ... --prompt_data prompts.jsonl --reward_model python:examples/arithmetic/tasks.py:exact_answer

Each prompt row is {"prompt": [chat messages], "answer": "<integer>", "kind": ...}; train_ppo hands the
`answer` column to the function, one value per response.
"""
from __future__ import annotations

import argparse
import json
import random
import re

KINDS = {
    # kind: (question template, answer) over the drawn operands a, b
    "add": (lambda a, b: f"What is {a} + {b}?", lambda a, b: a + b, (1, 9)),
    "add2": (lambda a, b: f"What is {a} + {b}?", lambda a, b: a + b, (10, 49)),
    "sub": (lambda a, b: f"What is {max(a, b)} - {min(a, b)}?", lambda a, b: abs(a - b), (1, 20)),
    "mul": (lambda a, b: f"What is {a} times {b}?", lambda a, b: a * b, (2, 9)),
    "max": (lambda a, b: f"Which number is larger, {a} or {b}?", lambda a, b: max(a, b), (10, 99)),
}
INSTRUCTION = " Answer with the number only."
_INT = re.compile(r"-?\d+")


def make_rows(kind: str, n: int, seed: int) -> list[dict]:
    """n distinct questions of one kind, in a seeded order."""
    question, answer, (lo, hi) = KINDS[kind]
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if a != b or kind != "max"]
    random.Random(seed).shuffle(pairs)
    if n > len(pairs):
        raise SystemExit(f"--kind {kind} has {len(pairs)} distinct questions, fewer than --n {n}")
    return [{"prompt": [{"role": "user", "content": question(a, b) + INSTRUCTION}], "answer": str(answer(a, b)),
             "kind": kind} for a, b in pairs[:n]]


def first_integer(text: str) -> str | None:
    m = _INT.search(text.replace(",", ""))
    return m.group(0) if m else None


def last_integer(text: str) -> str | None:
    found = _INT.findall(text.replace(",", ""))
    return found[-1] if found else None


def exact_answer(prompts, responses, answer):
    """1.0 when the last integer of the response is the row's answer, else 0.0: a worked answer ("8 + 5 =
    13") counts, one cut off before its result ("we add 8 and") does not. A row without an answer scores 0."""
    return [1.0 if a is not None and last_integer(r) == str(a) else 0.0 for r, a in zip(responses, answer)]


def first_answer(prompts, responses, answer):
    """1.0 when the response's first integer is the row's answer: stricter (the number must come first)."""
    return [1.0 if a is not None and first_integer(r) == str(a) else 0.0 for r, a in zip(responses, answer)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(KINDS), default="add")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for row in make_rows(args.kind, args.n, args.seed):
        print(json.dumps(row))


if __name__ == "__main__":
    main()
