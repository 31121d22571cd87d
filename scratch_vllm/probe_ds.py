"""Probe: DeepSpeed ZeRO engine + in-process vLLM engine per rank (external_launcher).

  torchrun --nproc_per_node 2 probe_ds.py --zero 3 --tp 1
Flow per PPO iteration: vLLM generate -> (sleep) -> DS train step -> (wake) ->
gather full params -> worker.reload_weights(iter) -> reset_prefix_cache -> generate.
"""
import argparse
import copy
import os
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import torch
import deepspeed

from probe import build_tiny_model, compare, hf_greedy, log, vllm_greedy


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zero", type=int, default=3)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--iters", type=int, default=2)
    args = ap.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")  # the trainer owns the default PG
    rank = torch.distributed.get_rank()

    tmp = [tempfile.mkdtemp(prefix="tinyllama_ds_") if rank == 0 else None]
    torch.distributed.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    hf, tok = build_tiny_model(tmp, save=(rank == 0))
    torch.distributed.barrier()
    ref = copy.deepcopy(hf)  # plain (unpartitioned) reference model for checking

    ds_cfg = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": args.zero},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
        "fp16": {"enabled": False}, "bf16": {"enabled": False},
        "steps_per_print": 1000,
    }
    engine, *_ = deepspeed.initialize(model=hf, model_parameters=hf.parameters(), config=ds_cfg)
    log(f"deepspeed ZeRO-{args.zero} engine ready")

    from vllm import LLM
    t0 = time.perf_counter()
    llm = LLM(model=tmp, dtype="float32", enforce_eager=True, max_model_len=512,
              gpu_memory_utilization=0.1, seed=0,
              distributed_executor_backend="external_launcher", tensor_parallel_size=args.tp)
    worker = llm.llm_engine.model_executor.driver_worker.worker
    log(f"vLLM in-process init {time.perf_counter()-t0:.1f}s")

    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
             "PPO clips the ratio"]
    if args.tp == 1:  # external DP: ranks may generate different prompts/counts
        texts = texts[rank::2] + [f"rank {rank} says"]
    prompts = [tok(t)["input_ids"] for t in texts]
    ok = compare("initial", hf_greedy(ref, prompts, args.n), vllm_greedy(llm, prompts, args.n))

    for it in range(args.iters):
        out = vllm_greedy(llm, prompts, args.n)[0]
        llm.sleep(level=1)  # no-op on CPU (warning); frees weights+KV on CUDA
        # --- a DeepSpeed train step on the generated sequences ---
        engine.train()
        for p, o in zip(prompts, out):
            x = torch.tensor([p + o])
            loss = engine(x, labels=x).loss
            engine.backward(loss)
            engine.step()
        llm.wake_up()
        # --- gather full weights and push them into vLLM in memory ---
        t0 = time.perf_counter()
        params = list(engine.module.named_parameters())
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None,
                                               enabled=args.zero == 3):
            t1 = time.perf_counter()
            worker.reload_weights(weights_iterator=((n, p.detach()) for n, p in params))
            t2 = time.perf_counter()
            ref.load_state_dict({n: p.detach().clone() for n, p in params})
        llm.reset_prefix_cache()
        log(f"iter {it}: loss={loss.item():.3f} gather {1e3*(t1-t0):.1f} ms, "
            f"reload_weights {1e3*(t2-t1):.1f} ms")
        ok &= compare(f"iter {it} after push", hf_greedy(ref, prompts, args.n),
                      vllm_greedy(llm, prompts, args.n))

    if args.tp == 1 and rank == 0:  # uneven generate calls across ranks
        vllm_greedy(llm, prompts[:1], 4)
    t = torch.tensor([float(ok)])
    torch.distributed.all_reduce(t)
    log(f"RESULT {'PASS' if ok else 'FAIL'} (ranks passing: {t.item():.0f})")


if __name__ == "__main__":
    main()
