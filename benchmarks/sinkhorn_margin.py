"""Benchmark the batched APLOT Sinkhorn margin: fused Triton kernel vs torch (eager, compiled) vs POT.

Every method computes the full margin m [G, B] from rc, rr [G, B] and hc, hr [G, B, d] (cost matrix,
`iters` log-domain Sinkhorn rounds with no early stop, row reduction), on one device. Before timing,
each method's output is checked against a float64 reference (max relative error column). The memory
floor is the bytes that must cross memory at least once (rc, rr, hc, hr read, m written) over the
measured device copy bandwidth.

GPU:        python benchmarks/sinkhorn_margin.py --out benchmarks/results/sinkhorn_margin_gpu.jsonl
CPU smoke:  python benchmarks/sinkhorn_margin.py --cpu-smoke
            (small sizes; torch eager, torch.compile and POT; the kernel only if TRITON_INTERPRET=1)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aplot_rlhf.ot.reference import cost_matrix, sinkhorn_margin_reference  # noqa: E402

GPU_SIZES = [(1, 64, 4096), (64, 64, 4096), (512, 64, 4096), (16, 512, 4096), (1, 1024, 4096)]
CPU_SIZES = [(2, 16, 128), (16, 16, 128), (8, 64, 256)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="run on CPU with small sizes")
    p.add_argument("--sizes", default=None, help="G,B,d triples separated by ';' (default: by device)")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="embedding dtype")
    p.add_argument("--lam", type=float, default=0.1)
    p.add_argument("--eps", type=float, default=0.1)
    p.add_argument("--iters", type=int, default=50, help="Sinkhorn iterations")
    p.add_argument("--methods", default="kernel,eager,compile,pot_batch,pot_loop",
                   help="comma list of kernel, eager, compile, pot_batch, pot_loop")
    p.add_argument("--budget-s", type=float, default=1.0, help="CPU: timing budget per method and size")
    p.add_argument("--out", default=None, help="append one JSON line per size to this file")
    return p.parse_args(argv)


def make_inputs(G, B, d, dtype, device, seed=0):
    """Rewards [G, B] fp32 and embeddings [G, B, d] with a shared direction, like a real batch."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rc = 2.0 * torch.randn(G, B, generator=gen)
    rr = 2.0 * torch.randn(G, B, generator=gen)
    shared = torch.randn(G, 1, d, generator=gen)
    hc = (shared + torch.randn(G, B, d, generator=gen)).to(dtype)
    hr = (shared + torch.randn(G, B, d, generator=gen)).to(dtype)
    return [t.to(device) for t in (rc, rr, hc, hr)]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, budget_s, min_reps=3):
    """Median milliseconds of fn() after warm-up: do_bench (L2 flushed between runs) on CUDA, wall clock on CPU."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    first_s = time.perf_counter() - t0
    if device.type == "cuda" and first_s < 0.2:
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))
    reps = max(min_reps, min(100, int(budget_s / max(first_s, 1e-6))))
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def copy_bandwidth_gbps(device):
    """Device memory copy bandwidth, counting bytes read plus bytes written."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, budget_s=1.0)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def rel_err(got, want):
    """Max elementwise relative error (magnitudes below 1e-3 count as 1e-3)."""
    got = got.double()
    return ((got - want).abs() / want.abs().clamp_min(1e-3)).max().item()


def pot_margins_batch(rc, rr, hc, hr, lam, eps, iters):
    import ot
    cost = cost_matrix(rc, rr, hc, hr, lam=lam)
    # solve_batch updates the row potential first; on the transposed cost that is our column-first order
    res = ot.solve_batch(cost.transpose(1, 2).contiguous(), reg=eps, max_iter=iters, tol=0.0,
                         method="log_sinkhorn", grad="detach")
    return cost.shape[-1] * (res.plan.transpose(1, 2) * cost).sum(-1)


def pot_margins_loop(rc, rr, hc, hr, lam, eps, iters):
    import ot
    cost = cost_matrix(rc, rr, hc, hr, lam=lam)
    G, B, _ = cost.shape
    uniform = torch.full((B,), 1.0 / B, dtype=cost.dtype, device=cost.device)
    out = torch.empty(G, B, dtype=cost.dtype, device=cost.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for g in range(G):
            plan = ot.sinkhorn(uniform, uniform, cost[g], reg=eps, method="sinkhorn_log", numItermax=iters,
                               stopThr=0, warn=False)
            out[g] = B * (plan * cost[g]).sum(-1)
    return out


def build_methods(names, device, args):
    """name -> (callable(rc, rr, hc, hr) -> m, label) for the methods that can run here, plus skip notes."""
    lam, eps, iters = args.lam, args.eps, args.iters
    methods, skipped = {}, {}

    def eager(rc, rr, hc, hr):
        return sinkhorn_margin_reference(rc, rr, hc, hr, lam=lam, eps=eps, iters=iters)

    for name in names:
        if name == "kernel":
            if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                skipped[name] = "no GPU and TRITON_INTERPRET unset"
                continue
            from aplot_rlhf.ot.kernel import sinkhorn_margin_triton

            def kernel(rc, rr, hc, hr):
                return sinkhorn_margin_triton(rc, rr, hc, hr, lam=lam, eps=eps, iters=iters)[0]
            methods[name] = kernel
        elif name == "eager":
            methods[name] = eager
        elif name == "compile":
            # dynamic shapes: one compile serves every size (the 50 unrolled rounds take minutes to compile)
            methods[name] = torch.compile(eager, dynamic=True)
        elif name == "pot_batch":
            methods[name] = lambda rc, rr, hc, hr: pot_margins_batch(rc, rr, hc, hr, lam, eps, iters)
        elif name == "pot_loop":
            methods[name] = lambda rc, rr, hc, hr: pot_margins_loop(rc, rr, hc, hr, lam, eps, iters)
        else:
            raise ValueError(f"unknown method {name!r}")
    return methods, skipped


LABELS = {"kernel": "triton kernel", "eager": "torch eager", "compile": "torch.compile",
          "pot_batch": "POT solve_batch", "pot_loop": "POT sinkhorn loop"}


def run_size(G, B, d, methods, device, args, bw_gbps):
    """Check and time every method at one size; returns the JSON record."""
    dtype = DTYPES[args.dtype]
    rc, rr, hc, hr = make_inputs(G, B, d, dtype, device)
    elem = torch.finfo(dtype).bits // 8
    nbytes = 2 * G * B * 4 + 2 * G * B * d * elem + G * B * 4
    floor_ms = nbytes / (bw_gbps * 1e9) * 1e3
    want = sinkhorn_margin_reference(rc.double(), rr.double(), hc.double(), hr.double(), lam=args.lam,
                                     eps=args.eps, iters=args.iters)
    record = {"G": G, "B": B, "d": d, "dtype": args.dtype, "device": device_name(device), "iters": args.iters,
              "eps": args.eps, "bytes": nbytes, "copy_GBps": round(bw_gbps, 1), "floor_ms": floor_ms, "methods": {}}
    for name, fn in methods.items():
        entry = {}
        try:
            t0 = time.perf_counter()
            got = fn(rc, rr, hc, hr)
            sync(device)
            entry["first_call_s"] = round(time.perf_counter() - t0, 3)
            entry["max_rel_err"] = rel_err(got, want)
            entry["finite"] = bool(torch.isfinite(got).all())
            if name == "kernel":
                from aplot_rlhf.ot.kernel import select_path
                entry["path"] = select_path(B, device, dtype)
            # the CPU interpreter runs the kernel as numpy: one timed call says enough
            interpreted = name == "kernel" and device.type != "cuda"
            entry["ms"] = time_ms(lambda: fn(rc, rr, hc, hr), device, 0.0 if interpreted else args.budget_s,
                                  min_reps=1 if interpreted else 3)
        except Exception as exc:  # a failing baseline is reported, not fatal
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        record["methods"][name] = entry
    return record


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def print_record(rec):
    print(f"\n## G={rec['G']} B={rec['B']} d={rec['d']} ({rec['dtype']} embeddings, {rec['iters']} iters, "
          f"eps={rec['eps']})  bytes={rec['bytes'] / 1e6:.3f} MB  floor={rec['floor_ms']:.4f} ms")
    kernel_ms = rec["methods"].get("kernel", {}).get("ms")
    print(f"| {'method':<30} | {'ms':>10} | {'x floor':>9} | {'kernel speedup':>14} | {'max rel err':>11} |")
    print(f"|{'-' * 32}|{'-' * 12}|{'-' * 11}|{'-' * 16}|{'-' * 13}|")
    for name, e in rec["methods"].items():
        label = LABELS[name] + (f" ({e['path']})" if "path" in e else "")
        if "error" in e:
            print(f"| {label:<30} | failed: {e['error']}")
            continue
        speedup = f"{e['ms'] / kernel_ms:.2f}x" if kernel_ms and name != "kernel" else "-"
        err = f"{e['max_rel_err']:.2e}" + ("" if e["finite"] else " NaN!")
        print(f"| {label:<30} | {e['ms']:>10.3f} | {e['ms'] / rec['floor_ms']:>9.1f} | {speedup:>14} | {err:>11} |")


def check_targets(records):
    """The GPU targets at G=64, B=64, d=4096: kernel within 3x of the floor and >= 20x faster than torch.compile."""
    for rec in records:
        if (rec["G"], rec["B"], rec["d"]) != (64, 64, 4096):
            continue
        k = rec["methods"].get("kernel", {}).get("ms")
        c = rec["methods"].get("compile", {}).get("ms")
        if k is None:
            print("\ntargets: kernel not timed")
            return
        floor_ok = "PASS" if k <= 3 * rec["floor_ms"] else "FAIL"
        print(f"\ntarget kernel <= 3x floor: {k / rec['floor_ms']:.2f}x -> {floor_ok}")
        if c is not None:
            compile_ok = "PASS" if c >= 20 * k else "FAIL"
            print(f"target kernel >= 20x faster than torch.compile: {c / k:.1f}x -> {compile_ok}")


def main(argv=None):
    args = parse_args(argv)
    from machine import print_machine_header  # benchmarks/machine.py
    print_machine_header()
    if args.cpu_smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("no CUDA device: pass --cpu-smoke to run the small CPU version")
    if args.sizes:
        sizes = [tuple(int(x) for x in s.split(",")) for s in args.sizes.split(";")]
    else:
        sizes = CPU_SIZES if device.type == "cpu" else GPU_SIZES
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    methods, skipped = build_methods(names, device, args)
    bw = copy_bandwidth_gbps(device)
    print(f"device: {device_name(device)}; torch {torch.__version__}; copy bandwidth {bw:.1f} GB/s "
          f"(read + write)")
    for name, why in skipped.items():
        print(f"skipped {LABELS[name]}: {why}")
    records = []
    for G, B, d in sizes:
        rec = run_size(G, B, d, methods, device, args, bw)
        print_record(rec)
        records.append(rec)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(rec) + "\n")
    if device.type == "cuda":
        check_targets(records)


if __name__ == "__main__":
    main()
