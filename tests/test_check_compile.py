"""The margin kernels compiled ahead of time for sm_80 and sm_90 on this CPU machine: no configuration the
launcher can choose spills registers (`python -m aplot_rlhf.ot.check_compile`), and the check itself
sees a spill when there is one.

These run Triton in compiled mode, so they use a fresh process without TRITON_INTERPRET (test_ot.py
imports Triton interpreted into this one).
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUOBJDUMP_MISSING = None
try:
    import triton
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        CUOBJDUMP_MISSING = "this Triton wheel ships no cuobjdump"
except ImportError:
    CUOBJDUMP_MISSING = "triton is not installed"

pytestmark = pytest.mark.skipif(CUOBJDUMP_MISSING is not None, reason=str(CUOBJDUMP_MISSING))


def _run(code_or_args, *, module=False, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "aplot_rlhf.ot.check_compile", *code_or_args] if module \
        else [sys.executable, "-c", code_or_args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_no_configuration_spills_on_sm80_sm90():
    proc = _run(["--arch", "80", "90"], module=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| sm_")]
    # 2 archs x 2 specialisations x (3 dtypes x 3 fused B_pad + bf16/fp16 fused 128 + fp32 tiled 128
    # x 2 kernels + 3 dtypes x 4 tiled B_pad x 2 kernels)
    assert len(rows) == 2 * 2 * (9 + 2 + 2 + 24), proc.stdout[-3000:]
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        regs, spill = int(cells[-3]), int(cells[-2])
        assert 0 < regs <= 255 and spill == 0, line
    assert {line.strip("|").split("|")[4].strip() for line in rows} == {"16", "32", "64", "128", "256", "512", "1024",
                                                                          "2048"}
    assert "OK: no configuration spills" in proc.stdout


def test_check_sees_a_spill():
    # the launcher's fused launch at B_pad 64 with fp32 embeddings, forced back to the d tile and warps
    # it shipped with (64-wide, 4 warps): that spilled kilobytes, so the check must report stack bytes
    code = r"""
import dataclasses, warnings, torch
warnings.filterwarnings("ignore")
from aplot_rlhf.ot import kernel
from aplot_rlhf.ot.check_compile import compile_launch, resource_usage
meta = torch.device("meta")
rc = torch.empty(1, 64, device=meta); hc = torch.empty(1, 64, 4096, device=meta)
(launch,) = kernel.plan_launches("triton-fused", rc, rc, hc, hc, rc, rc, lam=0.1, eps=0.1, iters=50, gamma=1.0,
                                 signed=False, return_plan=False)
shipped = dataclasses.replace(launch, constexprs=dict(launch.constexprs, BLOCK_D=64), num_warps=4)
for name, l in (("now", launch), ("shipped", shipped)):
    u = resource_usage(compile_launch(l, 90).asm["cubin"])
    print(name, u["registers"], u["stack"] + u["local"])
"""
    proc = _run(code)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = dict((m[1], (int(m[2]), int(m[3]))) for m in re.finditer(r"^(now|shipped) (\d+) (\d+)$", proc.stdout, re.M))
    assert got["now"][1] == 0, got
    assert got["shipped"][1] > 0, got
