"""Optimal-transport margin for APLOT. `sinkhorn_margin` is the one public entry point.

backend: "torch" (the reference, any device), "triton" (the fused kernel, CUDA, or CPU under
TRITON_INTERPRET=1; any failure is raised), "auto" (the kernel on CUDA tensors, the reference otherwise).

"auto" never stops a training run over the kernel: if Triton cannot be imported, or the kernel fails to
compile or launch, it logs one warning saying why and uses the reference for the rest of the process.
The first call that runs each kernel path (fused, tiled) is also checked against the reference, at gamma 1
whatever the call's gamma (a warm-up from 0 gives zero margins on both sides); beyond AUTO_CHECK_RTOL the
same loud fallback happens. `kernel_status()` says what auto decided.
"""
from __future__ import annotations

import logging

import torch

from .reference import cost_matrix, sinkhorn_log, sinkhorn_margin_reference

__all__ = ["sinkhorn_margin", "cost_matrix", "sinkhorn_log", "sinkhorn_margin_reference", "last_backend",
           "kernel_status", "AUTO_KERNEL_DEVICES", "AUTO_CHECK_RTOL"]

log = logging.getLogger(__name__)

# Device types on which backend="auto" tries the kernel. Only CUDA in real use; tests add "cpu" together
# with TRITON_INTERPRET=1 so the auto path (fallback and first-call check) runs for real without a GPU.
AUTO_KERNEL_DEVICES = ("cuda",)
# relative error (magnitudes below 1e-3 count as 1e-3) beyond which auto's first-call check rejects the kernel
AUTO_CHECK_RTOL = 1e-4

_last_backend = {"name": None}
# fallback: None, or why auto stopped using the kernel; checked: kernel paths that passed the first-call check
_auto = {"fallback": None, "checked": set()}


def last_backend() -> str | None:
    """Name of the path the most recent `sinkhorn_margin` call ran (for logs and benchmarks)."""
    return _last_backend["name"]


def kernel_status() -> dict:
    """What backend="auto" decided in this process: {"fallback": reason or None, "checked": [paths]}."""
    return {"fallback": _auto["fallback"], "checked": sorted(_auto["checked"])}


def _reset_auto() -> None:
    """Forget auto's decisions (tests only: a real process decides once)."""
    _auto["fallback"] = None
    _auto["checked"] = set()


def _fall_back(reason: str) -> None:
    if _auto["fallback"] is None:
        _auto["fallback"] = reason
        log.warning("APLOT margin: backend='auto' falls back to the PyTorch reference for the rest of this "
                    "process: %s (backend='triton' raises instead)", reason)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).abs() / want.abs().clamp_min(1e-3)).max().item()


def _as_batched(rc, rr, hc, hr):
    if rc.dim() != rr.dim() or hc.dim() != hr.dim():
        raise ValueError("rc/rr and hc/hr must have matching ranks")
    if rc.dim() == 1:
        if hc.dim() != 2:
            raise ValueError(f"with rewards [B], embeddings must be [B, d]; got {tuple(hc.shape)}")
        return rc[None], rr[None], hc[None], hr[None], True
    if rc.dim() == 2 and hc.dim() == 3:
        return rc, rr, hc, hr, False
    raise ValueError(f"expected rewards [G, B] and embeddings [G, B, d]; got {tuple(rc.shape)}, {tuple(hc.shape)}")


def sinkhorn_margin(rc: torch.Tensor, rr: torch.Tensor, hc: torch.Tensor, hr: torch.Tensor, *,
                    lam: float = 0.1, eps: float = 0.1, iters: int = 50, gamma: float = 1.0,
                    signed: bool = False, backend: str = "auto") -> torch.Tensor:
    """APLOT adaptive margins, detached, fp32.

    rc, rr: [G, B] (or [B]) chosen / rejected rewards; hc, hr: [G, B, d] (or [B, d]) embeddings.
    Returns m: [G, B] (or [B] for unbatched input).
    """
    rc, rr, hc, hr, squeeze = _as_batched(rc.detach(), rr.detach(), hc.detach(), hr.detach())
    if rc.shape != rr.shape or hc.shape != hr.shape or hc.shape[:2] != rc.shape:
        raise ValueError(f"shape mismatch: rc {tuple(rc.shape)}, rr {tuple(rr.shape)}, "
                         f"hc {tuple(hc.shape)}, hr {tuple(hr.shape)}")
    if eps <= 0 or iters < 1:
        raise ValueError(f"need eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    kw = dict(lam=lam, eps=eps, iters=iters, gamma=gamma, signed=signed)
    margin = None
    if backend == "triton":
        from .kernel import sinkhorn_margin_triton
        margin, path = sinkhorn_margin_triton(rc, rr, hc, hr, **kw)
        _last_backend["name"] = path
    elif backend == "auto" and rc.device.type in AUTO_KERNEL_DEVICES and _auto["fallback"] is None:
        margin = _auto_kernel(rc, rr, hc, hr, kw)
    if margin is None:
        margin = sinkhorn_margin_reference(rc.float(), rr.float(), hc, hr, **kw)
        _last_backend["name"] = "torch"
    return margin[0] if squeeze else margin


def _auto_kernel(rc, rr, hc, hr, kw) -> torch.Tensor | None:
    """The kernel's margins, or None (after one warning) when it cannot be trusted in this process."""
    try:
        from .kernel import sinkhorn_margin_triton
        margin, path = sinkhorn_margin_triton(rc, rr, hc, hr, **kw)
    except Exception as exc:  # auto's contract: any kernel failure degrades to the reference, loudly
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        _fall_back(f"the Triton kernel failed on {rc.device} (B={rc.shape[-1]}, d={hc.shape[-1]}, "
                   f"{hc.dtype}): {type(exc).__name__}: {first}")
        return None
    if path != "torch-fallback" and path not in _auto["checked"]:
        # once per kernel path and process: one reference solve and one host sync, never per step. The check
        # runs at gamma 1: margins scale with gamma, so under a gamma warm-up (0 or tiny at first) both sides
        # are 0 or below the error's magnitude floor and would agree whatever the kernel computes
        check_kw = {**kw, "gamma": 1.0}
        got = margin
        if kw["gamma"] != 1.0:
            try:
                got, _ = sinkhorn_margin_triton(rc, rr, hc, hr, **check_kw)
            except Exception as exc:
                _fall_back(f"the Triton kernel failed on {rc.device} (B={rc.shape[-1]}, d={hc.shape[-1]}, "
                           f"{hc.dtype}) at gamma 1: {type(exc).__name__}: {str(exc).strip()[:300]}")
                return None
        want = sinkhorn_margin_reference(rc.float(), rr.float(), hc, hr, **check_kw)
        finite = bool(torch.isfinite(got).all())
        err = _rel_err(got, want) if finite else float("inf")
        if err > AUTO_CHECK_RTOL:
            _fall_back(f"the Triton kernel ({path}) disagrees with the reference on its first call on {rc.device}: "
                       f"max relative error {err:.3g} > {AUTO_CHECK_RTOL:g}" + ("" if finite else " (non-finite)"))
            return None
        _auto["checked"].add(path)
        log.info("APLOT margin: Triton kernel (%s) checked against the reference on %s: max relative error %.2g",
                 path, rc.device, err)
    _last_backend["name"] = path
    return margin
