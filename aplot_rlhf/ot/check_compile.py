"""Compile every Triton configuration the margin launcher can choose for real GPU targets, on any machine.

    python -m aplot_rlhf.ot.check_compile --arch 80 90

For each target, embedding dtype and B_pad the launcher can reach, this asks `kernel.plan_launches` (the
function the launcher itself runs) for its launches, built on the "meta" device so nothing is allocated,
compiles each one ahead of time with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
and reads the cubin's registers, stack (spill) bytes and shared memory with the `cuobjdump` that ships
in Triton's wheel. Arguments are specialised the way Triton's JIT does for a real launch, twice: "aligned"
(pointers 16-byte aligned, as torch's allocations are, and ints divisible by 16 marked so) and
"unaligned" (no divisibility known: a tensor view at an odd offset, or d not a multiple of 16), the
variant with the most register pressure. Ints equal to 1 become constants, as in the JIT.
Prints one row per launch and exits 1 if any spills, 2 if something cannot be compiled. No GPU needed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import warnings

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities (80, 90, ...)")
    p.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES), help="embedding dtypes")
    p.add_argument("--dim", type=int, default=4096,
                   help="embedding width d; the d tile grows with d up to its cap, so a large d is the worst case")
    p.add_argument("--signed", action="store_true", help="also compile the signed-cost variants")
    p.add_argument("--return-plan", action="store_true", help="also compile the variants that write the plan")
    p.add_argument("--max-b-pad", type=int, default=None, help="stop at this B_pad (default: the tiled limit)")
    p.add_argument("--specialization", nargs="+", default=["aligned", "unaligned"], choices=["aligned", "unaligned"],
                   help="argument specialisations to compile (see above)")
    return p.parse_args(argv)


def _arg_type(value) -> tuple[str, bool, object]:
    """(Triton signature type, divisible-by-16, constant value or None) for one runtime argument."""
    if isinstance(value, torch.Tensor):
        return "*" + _TRITON_TYPES[value.dtype], True, None
    if isinstance(value, bool):
        return "u1", False, None
    if isinstance(value, int):
        if value == 1:  # the JIT turns an int equal to 1 into a constant
            return "constexpr", False, 1
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), value % 16 == 0, None
    if isinstance(value, float):
        return "fp32", False, None
    raise TypeError(f"unsupported kernel argument {type(value).__name__}")


def compile_launch(launch, arch: int, aligned: bool = True):
    """AOT-compile one `kernel.Launch` for sm_<arch>; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.fn
    names = list(fn.arg_names)
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for i, (name, value) in enumerate(zip(names, launch.args)):
        ty, div16, const = _arg_type(value)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = const
        elif div16 and aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    for name in names[len(launch.args):]:
        signature[name] = "constexpr"
    missing = [n for n in names if signature[n] == "constexpr" and n not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": launch.num_warps})


def resource_usage(cubin: bytes) -> dict:
    """registers, stack, static shared and local bytes of a cubin's one kernel, from the wheel's cuobjdump."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        raise FileNotFoundError(f"{tool} not found: this Triton wheel ships no cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        proc = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True)
    m = _USAGE.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"cuobjdump failed ({proc.returncode}): {proc.stdout[-500:]}{proc.stderr[-500:]}")
    return {"registers": int(m[1]), "stack": int(m[2]), "static_shared": int(m[3]), "local": int(m[4])}


def configurations(dtypes, dim, *, signed_variants=(False,), plan_variants=(False,), max_b_pad=None):
    """(label fields, Launch) for every launch the launcher can make, from kernel.path_for_size/plan_launches."""
    from . import kernel

    meta = torch.device("meta")
    bp = 16
    limit = max_b_pad or kernel.TILED_MAX_B
    while bp <= limit:
        for dname in dtypes:
            dtype = DTYPES[dname]
            path = kernel.path_for_size(bp, dtype)
            if path == "torch-fallback":
                continue
            G = 1
            rc = torch.empty(G, bp, dtype=torch.float32, device=meta)
            hc = torch.empty(G, bp, dim, dtype=dtype, device=meta)
            margin = torch.empty(G, bp, dtype=torch.float32, device=meta)
            for signed in signed_variants:
                for plan in plan_variants:
                    plan_t = torch.empty(G, bp, bp, dtype=torch.float32, device=meta) if plan else margin
                    launches = kernel.plan_launches(path, rc, rc, hc, hc, margin, plan_t, lam=0.1, eps=0.1,
                                                    iters=50, gamma=1.0, signed=signed, return_plan=plan)
                    for launch in launches:
                        yield {"path": path, "B_pad": bp, "dtype": dname, "signed": signed, "plan": plan}, launch
        bp *= 2


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
    from . import kernel
    if kernel.is_interpreted():
        sys.exit("check_compile: TRITON_INTERPRET=1 is set, so Triton cannot compile for a GPU target; unset it")
    import triton
    print(f"Triton {triton.__version__}, torch {torch.__version__}, d={args.dim}")
    header = (f"| {'arch':<5} | {'spec':<9} | {'path':<5} | {'kernel':<22} | {'B_pad':>5} | {'dtype':<5} | "
              f"{'sgn':<3} | {'plan':<4} | {'warps':>5} | {'regs':>4} | {'spill B':>7} | {'smem B':>7} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    spills, failures = [], []
    signed = (False, True) if args.signed else (False,)
    plans = (False, True) if args.return_plan else (False,)
    configs = [(a, sp, c) for a in args.arch for sp in args.specialization
               for c in configurations(args.dtype, args.dim, signed_variants=signed, plan_variants=plans,
                                       max_b_pad=args.max_b_pad)]
    for arch, spec, (label, launch) in configs:
        name = launch.fn.__name__
        row = (f"| sm_{arch:<2} | {spec:<9} | {label['path'].removeprefix('triton-'):<5} | {name:<22} | "
               f"{label['B_pad']:>5} | "
               f"{label['dtype']:<5} | {'y' if label['signed'] else 'n':<3} | {'y' if label['plan'] else 'n':<4} | "
               f"{launch.num_warps:>5} |")
        try:
            compiled = compile_launch(launch, arch, aligned=spec == "aligned")
            usage = resource_usage(compiled.asm["cubin"])
        except Exception as exc:  # report every configuration, then fail
            failures.append((arch, spec, label, name))
            print(f"{row} compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                  flush=True)
            continue
        # shared: the launch's dynamic shared memory (Triton's metadata) plus the cubin's static part
        smem = int(compiled.metadata.shared) + usage["static_shared"]
        spill = usage["stack"] + usage["local"]
        print(f"{row} {usage['registers']:>4} | {spill:>7} | {smem:>7} |", flush=True)
        if spill:
            spills.append((arch, spec, label, name, spill))
    if failures:
        print(f"FAIL: {len(failures)} configuration(s) did not compile")
        return 2
    if spills:
        print(f"FAIL: {len(spills)} configuration(s) spill registers to the stack")
        return 1
    print("OK: no configuration spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
