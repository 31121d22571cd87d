"""APLOT optimal-transport margin: the torch reference against POT, detachment, and the Triton kernel
run on CPU by the Triton interpreter against a float64 reference.

The kernel runs on CPU only if Triton was imported with TRITON_INTERPRET=1 already set: Triton's own
library functions (tl.sum, tl.max, ...) and our kernels pick compiled or interpreted mode when they are
decorated, and Triton checks the variable again while a kernel runs. So this module sets the variable
before importing Triton, a module-scoped fixture keeps it set while these tests run, and the caller's
value is restored outside them so other test modules (and the processes they spawn) see an unchanged
environment. If another module imported Triton first in compiled mode, the interpreted tests cannot run
in this process; `test_interpreted_tests_in_fresh_process` then runs them in a new one.
"""
import os
import subprocess
import sys

_caller_interpret = os.environ.get("TRITON_INTERPRET")
TRITON_COMPILED_MODE = "triton" in sys.modules and _caller_interpret != "1"
os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import ot  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import aplot_rlhf.ot.kernel as kernel  # noqa: E402
from aplot_rlhf.ot import last_backend, sinkhorn_margin  # noqa: E402
from aplot_rlhf.ot.reference import cost_matrix, sinkhorn_margin_reference  # noqa: E402

if not kernel.is_interpreted() and not TRITON_COMPILED_MODE:
    # imported earlier without the variable, but Triton's library is interpreted: redecorate our kernels
    kernel = importlib.reload(kernel)


def _restore_interpret():
    if _caller_interpret is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _caller_interpret


_restore_interpret()


@pytest.fixture(autouse=True, scope="module")
def triton_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    yield
    _restore_interpret()


interpreted = pytest.mark.skipif(TRITON_COMPILED_MODE, reason="Triton was imported in compiled mode before this "
                                 "module; test_interpreted_tests_in_fresh_process runs this test instead")


def test_interpreted_tests_in_fresh_process():
    if not TRITON_COMPILED_MODE:
        pytest.skip("the interpreted kernel tests run in this process")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider",
                           "-k", "kernel or detached or seam"], env=env, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


RTOL = 1e-5


def rel_err(got, want) -> float:
    """Max elementwise relative error; magnitudes below 1e-3 count as 1e-3 (margins are O(0.01-1))."""
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    return ((got - want).abs() / want.abs().clamp_min(1e-3)).max().item()


def make_inputs(G, B, d, *, case="random", dtype=torch.float32, seed=0):
    """rc, rr [G, B] fp32 and hc, hr [G, B, d] of `dtype` for a named case."""
    gen = torch.Generator().manual_seed(seed)
    rc = 2.0 * torch.randn(G, B, generator=gen)
    rr = 2.0 * torch.randn(G, B, generator=gen)
    # a shared direction spreads the cosines over a useful range instead of all near 0
    shared = torch.randn(G, 1, d, generator=gen)
    hc = shared + torch.randn(G, B, d, generator=gen)
    hr = shared + torch.randn(G, B, d, generator=gen)
    if case == "identical":
        rc = rc[:, :1].expand(G, B).clone()
        rr = rc.clone()
        hc = hc[:, :1].expand(G, B, d).clone()
        hr = hc.clone()
    elif case == "huge_rewards":
        rc = 1e4 * torch.sign(rc)
        rr = -1e4 * torch.sign(rr)
    elif case == "zero_embeddings":
        hc.zero_()
        hr.zero_()
    elif case == "some_zero_rows":
        hc[:, ::2] = 0.0
        hr[:, 1::3] = 0.0
    elif case != "random":
        raise ValueError(case)
    return rc, rr, hc.to(dtype), hr.to(dtype)


# ----------------------------------------------------------------------------- reference vs POT

def numpy_cost(rc, rr, hc, hr, lam, signed):
    """The APLOT cost in float64 numpy, written independently of reference.cost_matrix."""
    rc, rr, hc, hr = (np.asarray(t, dtype=np.float64) for t in (rc, rr, hc, hr))
    diff = rc[:, :, None] - rr[:, None, :]
    with np.errstate(over="ignore"):
        reward_term = 1.0 / (1.0 + np.exp(diff if signed else np.abs(diff)))
    hc = hc / np.maximum(np.linalg.norm(hc, axis=-1, keepdims=True), 1e-12)
    hr = hr / np.maximum(np.linalg.norm(hr, axis=-1, keepdims=True), 1e-12)
    return (1.0 - lam) * reward_term + lam * np.einsum("gid,gjd->gij", hc, hr)


def pot_margins(cost, eps, iters, gamma):
    """Margins from POT's plans: ot.sinkhorn per problem and ot.solve_batch, both float64 -> ([G, B], [G, B])."""
    G, B, _ = cost.shape
    uniform = np.full(B, 1.0 / B)
    looped = []
    for g in range(G):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = ot.sinkhorn(uniform, uniform, cost[g], reg=eps, method="sinkhorn_log", numItermax=iters,
                               stopThr=0, warn=False)
        looped.append(gamma * B * (plan * cost[g]).sum(-1))
    # solve_batch updates the row potential first; on the transposed cost that is our column-first order
    res = ot.solve_batch(np.ascontiguousarray(cost.transpose(0, 2, 1)), reg=eps, max_iter=iters, tol=0.0,
                         method="log_sinkhorn", grad="detach")
    batched = gamma * B * (res.plan.transpose(0, 2, 1) * cost).sum(-1)
    return np.stack(looped), batched


POT_CASES = [
    # (name, G, B, d, case, eps, signed)
    ("random", 3, 8, 16, "random", 0.1, False),
    ("B1", 2, 1, 8, "random", 0.1, False),
    ("B7", 2, 7, 12, "random", 0.1, False),
    ("identical", 2, 6, 8, "identical", 0.1, False),
    ("huge_rewards", 2, 9, 8, "huge_rewards", 0.1, False),
    ("zero_embeddings", 2, 5, 8, "zero_embeddings", 0.1, False),
    ("small_eps", 2, 7, 16, "random", 0.01, False),
    ("small_eps_huge", 2, 8, 16, "huge_rewards", 0.01, True),
    ("signed", 2, 8, 16, "random", 0.1, True),
]


@pytest.mark.parametrize("name,G,B,d,case,eps,signed", POT_CASES, ids=[c[0] for c in POT_CASES])
def test_reference_matches_pot(name, G, B, d, case, eps, signed):
    lam, gamma, iters = 0.1, 1.5, 50
    rc, rr, hc, hr = make_inputs(G, B, d, case=case)
    cost = numpy_cost(rc, rr, hc, hr, lam, signed)
    torch_cost = cost_matrix(rc.double(), rr.double(), hc.double(), hr.double(), lam=lam, signed=signed)
    assert np.abs(torch_cost.numpy() - cost).max() < 1e-12
    looped, batched = pot_margins(cost, eps, iters, gamma)
    assert rel_err(looped, batched) < 1e-10
    m64 = sinkhorn_margin_reference(rc.double(), rr.double(), hc.double(), hr.double(), lam=lam, eps=eps,
                                    iters=iters, gamma=gamma, signed=signed)
    m32 = sinkhorn_margin_reference(rc, rr, hc, hr, lam=lam, eps=eps, iters=iters, gamma=gamma, signed=signed)
    assert m32.dtype == torch.float32 and m32.shape == (G, B)
    assert torch.isfinite(m32).all() and torch.isfinite(m64).all()
    assert rel_err(m64, looped) < 1e-10
    assert rel_err(m32, looped) <= RTOL


def test_reference_plan_marginals():
    rc, rr, hc, hr = make_inputs(3, 7, 16)
    _, plan = sinkhorn_margin_reference(rc.double(), rr.double(), hc.double(), hr.double(), return_plan=True)
    # the row potential is updated last, so rows are exact and columns converged
    assert torch.allclose(plan.sum(-1), torch.full((3, 7), 1 / 7, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(plan.sum(-2), torch.full((3, 7), 1 / 7, dtype=torch.float64), atol=1e-6)


# ----------------------------------------------------------------------------- detached margin

@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=interpreted)])
def test_margin_is_detached(backend):
    rc, rr, hc, hr = make_inputs(1, 6, 8)
    rc, rr, hc, hr = (t[0].clone().requires_grad_(True) for t in (rc, rr, hc, hr))
    m = sinkhorn_margin(rc, rr, hc, hr, backend=backend)
    assert m.shape == (6,) and not m.requires_grad and m.grad_fn is None
    loss = -torch.nn.functional.logsigmoid(rc - rr - m).mean()
    loss.backward()
    # gradient flows only through rc_i - rr_i in the loss, never through the margin
    assert hc.grad is None and hr.grad is None
    sig = torch.sigmoid(-(rc - rr - m)).detach() / 6
    assert torch.allclose(rc.grad, -sig) and torch.allclose(rr.grad, sig)


# ----------------------------------------------------------------------------- Triton kernel (interpreted)

def kernel_vs_float64(G, B, d, *, dtype=torch.float32, case="random", eps=0.1, iters=50, signed=False,
                      lam=0.1, gamma=1.0, seed=0, want_path="triton-fused", **path_kw):
    """Run the kernel into NaN-poisoned buffers and compare margin and plan with the float64 reference."""
    rc, rr, hc, hr = make_inputs(G, B, d, case=case, dtype=dtype, seed=seed)
    out = torch.full((G, B), float("nan"))
    plan_out = torch.full((G, B, B), float("nan"))
    m, path, plan = kernel.sinkhorn_margin_triton(rc, rr, hc, hr, lam=lam, eps=eps, iters=iters, gamma=gamma,
                                                  signed=signed, return_plan=True, out=out, plan_out=plan_out,
                                                  **path_kw)
    assert path == want_path
    assert m.data_ptr() == out.data_ptr() and plan.data_ptr() == plan_out.data_ptr()
    assert torch.isfinite(m).all(), m
    assert torch.isfinite(plan).all()
    # the float64 reference sees the same (bf16/fp16-rounded) embeddings, so only kernel error remains
    m64, plan64 = sinkhorn_margin_reference(rc.double(), rr.double(), hc.double(), hr.double(), lam=lam, eps=eps,
                                            iters=iters, gamma=gamma, signed=signed, return_plan=True)
    assert rel_err(m, m64) <= RTOL, (rel_err(m, m64), m, m64)
    assert (plan.double() - plan64).abs().max().item() <= RTOL * plan64.max().item()
    assert torch.allclose(plan.double().sum(-1), torch.full((G, B), 1.0 / B, dtype=torch.float64), rtol=1e-5)
    return m, plan


# iters=10 keeps the interpreter fast on the full grid; the degenerate cases below run the default 50
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("B", [1, 5, 8, 16])
@pytest.mark.parametrize("d", [4, 40, 64])
@interpreted
def test_kernel_grid_fp32(G, B, d):
    kernel_vs_float64(G, B, d, iters=10, seed=G * 100 + B * 10 + d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("G,B,d", [(1, 1, 4), (3, 5, 40), (1, 8, 64), (3, 16, 40)])
@interpreted
def test_kernel_grid_half(dtype, G, B, d):
    kernel_vs_float64(G, B, d, dtype=dtype, iters=10, seed=B + d)


@pytest.mark.parametrize("case,G,B,d,eps,signed,dtype", [
    ("random", 3, 16, 64, 0.1, False, torch.float32),
    ("random", 1, 1, 40, 0.1, False, torch.bfloat16),
    ("identical", 3, 5, 40, 0.1, False, torch.float32),
    ("identical", 1, 16, 64, 0.1, False, torch.bfloat16),
    ("huge_rewards", 3, 8, 40, 0.1, False, torch.float32),
    ("huge_rewards", 1, 8, 40, 0.01, True, torch.float32),
    ("zero_embeddings", 3, 5, 4, 0.1, False, torch.float32),
    ("some_zero_rows", 1, 16, 40, 0.1, False, torch.float16),
    ("random", 3, 7, 40, 0.01, False, torch.float32),
    ("random", 1, 16, 64, 0.01, True, torch.bfloat16),
])
@interpreted
def test_kernel_degenerate(case, G, B, d, eps, signed, dtype):
    m, plan = kernel_vs_float64(G, B, d, case=case, eps=eps, signed=signed, dtype=dtype, lam=0.3, gamma=2.0)
    if case == "identical":
        # every cost equal: the plan is uniform and the margin is gamma times that cost
        assert torch.allclose(plan, torch.full_like(plan, 1.0 / B ** 2), rtol=1e-5)
        assert torch.allclose(m, m[:, :1].expand_as(m), rtol=1e-6)
    if case == "zero_embeddings":
        # cosine 0 everywhere, so the semantic term vanishes
        rc, rr, _, _ = make_inputs(G, B, d, case=case)
        m_no_sem = sinkhorn_margin_reference(rc.double(), rr.double(), torch.zeros(G, B, 1, dtype=torch.float64),
                                             torch.zeros(G, B, 1, dtype=torch.float64), lam=0.3, gamma=2.0)
        assert rel_err(m, m_no_sem) <= RTOL


@pytest.mark.parametrize("G,B,d,dtype,case", [
    (2, 20, 40, torch.float32, "random"),
    (1, 17, 24, torch.bfloat16, "huge_rewards"),
    (1, 33, 8, torch.float32, "zero_embeddings"),
])
@interpreted
def test_kernel_tiled_path(G, B, d, dtype, case):
    # thresholds lowered so small problems take the tiled path: B_pad 32/64 in 16 x 16 tiles
    kernel_vs_float64(G, B, d, dtype=dtype, case=case, iters=4, want_path="triton-tiled", fused_max_b=16,
                      tile_b=16)


@interpreted
def test_kernel_fp32_b128_takes_tiled_path():
    # default thresholds: fp32 embeddings at B_pad 128 run the tiled path in 64 x 64 tiles; bf16 stays fused
    kernel_vs_float64(1, 70, 24, dtype=torch.float32, iters=4, want_path="triton-tiled")
    kernel_vs_float64(1, 70, 24, dtype=torch.bfloat16, iters=4, want_path="triton-fused")


def test_path_selection():
    cuda = torch.device("cuda")
    assert kernel.select_path(1, cuda) == "triton-fused"
    assert kernel.select_path(kernel.FUSED_MAX_B, cuda) == "triton-fused"
    assert kernel.select_path(kernel.FUSED_MAX_B + 1, cuda) == "triton-tiled"
    assert kernel.select_path(kernel.TILED_MAX_B, cuda) == "triton-tiled"
    assert kernel.select_path(kernel.TILED_MAX_B + 1, cuda) == "torch-fallback"
    # fp32 embeddings leave the fused path earlier (its FMA dot spilled at B_pad 128)
    assert kernel.select_path(kernel.FUSED_MAX_B_FP32, cuda, torch.float32) == "triton-fused"
    assert kernel.select_path(kernel.FUSED_MAX_B_FP32 + 1, cuda, torch.float32) == "triton-tiled"
    assert kernel.select_path(kernel.FUSED_MAX_B_FP32 + 1, cuda, torch.float16) == "triton-fused"
    rc, rr, hc, hr = make_inputs(1, 6, 8)
    m, path = kernel.sinkhorn_margin_triton(rc, rr, hc, hr, tiled_max_b=4, fused_max_b=4)
    assert path == "torch-fallback"
    assert rel_err(m, sinkhorn_margin_reference(rc, rr, hc, hr)) < 1e-6


@interpreted
def test_public_seam_runs_kernel():
    rc, rr, hc, hr = make_inputs(2, 6, 8, dtype=torch.bfloat16)
    m = sinkhorn_margin(rc, rr, hc, hr, backend="triton", iters=20)
    assert last_backend() == "triton-fused" and m.shape == (2, 6) and m.dtype == torch.float32
    ref = sinkhorn_margin(rc, rr, hc, hr, backend="torch", iters=20)
    assert last_backend() == "torch"
    assert rel_err(m, ref) <= RTOL
    m1 = sinkhorn_margin(rc[0], rr[0], hc[0], hr[0], backend="triton", iters=20)
    assert m1.shape == (6,) and torch.equal(m1, m[0])


# ----------------------------------------------------------------------------- backend="auto" never crashes

import logging  # noqa: E402

import aplot_rlhf.ot as ot_api  # noqa: E402


@pytest.fixture
def auto_on_cpu(monkeypatch):
    """Let backend="auto" try the kernel on CPU tensors (the seam tests use instead of a GPU); fresh decisions."""
    monkeypatch.setattr(ot_api, "AUTO_KERNEL_DEVICES", ("cuda", "cpu"), raising=False)
    getattr(ot_api, "_reset_auto", lambda: None)()
    calls = {"reference": 0}
    real_reference = ot_api.sinkhorn_margin_reference

    def counting_reference(*a, **k):
        calls["reference"] += 1
        return real_reference(*a, **k)
    monkeypatch.setattr(ot_api, "sinkhorn_margin_reference", counting_reference)
    yield calls
    getattr(ot_api, "_reset_auto", lambda: None)()


def _auto_warnings(caplog):
    return [r for r in caplog.records if r.name.startswith("aplot_rlhf.ot") and r.levelno >= logging.WARNING]


@interpreted
def test_auto_checks_the_kernel_once_then_trusts_it(auto_on_cpu, caplog):
    caplog.set_level(logging.INFO, logger="aplot_rlhf.ot")
    rc, rr, hc, hr = make_inputs(2, 6, 8, dtype=torch.bfloat16)
    m1 = sinkhorn_margin(rc, rr, hc, hr, backend="auto", iters=20)
    assert last_backend() == "triton-fused"
    assert auto_on_cpu["reference"] == 1  # the first-call check
    m2 = sinkhorn_margin(rc, rr, hc, hr, backend="auto", iters=20)
    assert last_backend() == "triton-fused" and auto_on_cpu["reference"] == 1  # not re-checked
    assert torch.equal(m1, m2)
    assert ot_api.kernel_status() == {"fallback": None, "checked": ["triton-fused"]}
    assert not _auto_warnings(caplog)
    assert rel_err(m1, sinkhorn_margin(rc, rr, hc, hr, backend="torch", iters=20)) <= RTOL


def test_auto_falls_back_once_when_the_kernel_fails(auto_on_cpu, caplog, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("PTX assembly aborted (simulated compile failure)")
    monkeypatch.setattr(kernel, "sinkhorn_margin_triton", broken)
    rc, rr, hc, hr = make_inputs(2, 6, 8)
    want = sinkhorn_margin_reference(rc, rr, hc, hr, iters=20)
    for _ in range(3):
        m = sinkhorn_margin(rc, rr, hc, hr, backend="auto", iters=20)
        assert last_backend() == "torch" and torch.equal(m, want)
    warns = _auto_warnings(caplog)
    assert len(warns) == 1, [w.getMessage() for w in warns]
    assert "RuntimeError: PTX assembly aborted" in warns[0].getMessage() and "reference" in warns[0].getMessage()
    assert "RuntimeError" in ot_api.kernel_status()["fallback"]
    # backend="triton" is for people who want to know: it raises
    with pytest.raises(RuntimeError, match="simulated compile failure"):
        sinkhorn_margin(rc, rr, hc, hr, backend="triton", iters=20)


@interpreted
def test_auto_falls_back_loudly_when_the_kernel_is_wrong(auto_on_cpu, caplog, monkeypatch):
    real_kernel = kernel.sinkhorn_margin_triton
    runs = {"kernel": 0}

    def off_by_1e3(*a, **k):
        runs["kernel"] += 1
        m, path = real_kernel(*a, **k)
        return m * (1 + 1e-3), path
    monkeypatch.setattr(kernel, "sinkhorn_margin_triton", off_by_1e3)
    rc, rr, hc, hr = make_inputs(2, 6, 8)
    want = sinkhorn_margin_reference(rc, rr, hc, hr, iters=20)
    m = sinkhorn_margin(rc, rr, hc, hr, backend="auto", iters=20)
    assert last_backend() == "torch" and torch.equal(m, want)
    m = sinkhorn_margin(rc, rr, hc, hr, backend="auto", iters=20)
    assert torch.equal(m, want) and runs["kernel"] == 1  # the rejected kernel is not run again
    warns = _auto_warnings(caplog)
    assert len(warns) == 1 and "disagrees with the reference" in warns[0].getMessage()


@interpreted
def test_auto_accepts_a_kernel_within_tolerance(auto_on_cpu, caplog, monkeypatch):
    real_kernel = kernel.sinkhorn_margin_triton
    monkeypatch.setattr(kernel, "sinkhorn_margin_triton", lambda *a, **k: (lambda m, p: (m * (1 + 2e-5), p))(
        *real_kernel(*a, **k)))
    rc, rr, hc, hr = make_inputs(2, 6, 8)
    sinkhorn_margin(rc, rr, hc, hr, backend="auto", iters=20)
    assert last_backend() == "triton-fused" and not _auto_warnings(caplog)


@pytest.mark.parametrize("gammas", [(0.0, 0.5, 1.0), (1e-4, 1.0), (1.0, 0.0, 1.0)])
def test_auto_rejects_a_kernel_0_1_percent_off_even_when_gamma_warms_up_from_0(auto_on_cpu, caplog, monkeypatch,
                                                                                 gammas):
    """gamma warm-up starts at 0 (or tiny): margins gamma * B * <T, C> are then 0 (or below the check's
    1e-3 magnitude floor) for the kernel and the reference alike, and a check on that call proves nothing.
    The fake kernel is the reference times 1.001: auto must refuse it, with one warning, whatever the first
    gamma, and never return its margins."""
    runs = {"kernel": 0}

    def off_by_1e3(rc, rr, hc, hr, **kw):  # a kernel 0.1% off (plain torch: no Triton needed)
        runs["kernel"] += 1
        return sinkhorn_margin_reference(rc.float(), rr.float(), hc, hr, **kw) * 1.001, "triton-fused"
    monkeypatch.setattr(kernel, "sinkhorn_margin_triton", off_by_1e3)
    rc, rr, hc, hr = make_inputs(2, 6, 8)
    for gamma in gammas:
        m = sinkhorn_margin(rc, rr, hc, hr, backend="auto", iters=20, gamma=gamma)
        want = sinkhorn_margin_reference(rc, rr, hc, hr, iters=20, gamma=gamma)
        assert torch.equal(m, want), (gamma, last_backend(), rel_err(m, want))
    warns = _auto_warnings(caplog)
    assert len(warns) == 1 and "disagrees with the reference" in warns[0].getMessage(), [w.getMessage() for w in warns]
    assert ot_api.kernel_status()["fallback"] is not None and runs["kernel"] <= 2
