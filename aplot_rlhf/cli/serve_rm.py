"""Serve a reward model over HTTP: `python -m aplot_rlhf.cli.serve_rm --model runs/rm/model --port 8000`.

POST /score {"prompts": [...], "responses": [...]} answers {"rewards": [...]}, scored exactly as train_ppo
scores with the folder in-process (the tokenization train_rm's export records; an empty response is scored as
one space). GET /info: the model, its input format and reward mean/std, tokenizer, dtype, device, limits.
GET /health: {"status": "ok"}. train_ppo uses it with `--reward_model http://HOST:PORT`.

The server binds to 127.0.0.1 unless --host says otherwise. With a token (--api_key, or $APLOT_RM_API_KEY,
which keeps it out of the process list) /score and /info need `Authorization: Bearer TOKEN`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from . import HelpFormatter


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="folder written by train_rm (its export: model and tokenizer)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; 0.0.0.0 opens it to the network (set a token then)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api_key", default=None,
                   help="bearer token /score and /info require (default: $APLOT_RM_API_KEY; none: open)")
    p.add_argument("--device", default="auto",
                   help="auto (CUDA when torch sees one, else CPU), cpu, cuda or cuda:N; a requested CUDA device "
                        "that is missing is an error, never a CPU fallback")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weights' precision; auto: bf16 on a GPU that supports it, else fp32")
    p.add_argument("--packing", default="auto", choices=["auto", "on", "off"],
                   help="packed forwards (no padding) where the model supports them (auto), always (on) or never "
                        "(off); the scores are the same")
    p.add_argument("--max_batch_tokens", type=int, default=16384,
                   help="tokens per forward: concurrent requests are merged into one forward up to this many")
    p.add_argument("--max_batch_requests", type=int, default=0,
                   help="requests per forward at most (0: as many as the token budget allows; 1: no merging)")
    p.add_argument("--max_body_mb", type=float, default=16.0,
                   help="largest request body accepted; a larger one is refused with 413")
    p.add_argument("--allow_untrained_reward_head", action="store_true",
                   help="serve a model whose head is not in its checkpoint (random scores: debugging only)")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    args = p.parse_args(argv)
    if not 0 <= args.port < 65536:
        p.error("--port must be in 0..65535")
    if args.max_batch_tokens < 1 or args.max_body_mb <= 0 or args.max_batch_requests < 0:
        p.error("--max_batch_tokens and --max_body_mb must be positive, --max_batch_requests >= 0")

    from ..errors import InputNotFoundError
    from ..serve_rm import Scorer, serve
    if not os.path.isdir(args.model):
        raise InputNotFoundError(f"--model {args.model}: not a folder")
    api_key = args.api_key if args.api_key is not None else os.environ.get("APLOT_RM_API_KEY", "")
    scorer = Scorer(args.model, device=args.device, dtype=args.dtype, packing=args.packing,
                    max_batch_tokens=args.max_batch_tokens, allow_untrained_head=args.allow_untrained_reward_head)
    serve(scorer, args.host, args.port, args.max_batch_tokens, int(args.max_body_mb * 2 ** 20), api_key,
          args.max_batch_requests, log_level=args.log_level)


if __name__ == "__main__":
    from ..errors import run_cli
    run_cli(main, sys.argv[1:])
