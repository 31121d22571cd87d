"""Optimal-transport margin for APLOT. `sinkhorn_margin` is the one public entry point.

backend: "torch" (the reference, any device), "triton" (the fused kernel, CUDA, or CPU under
TRITON_INTERPRET=1), "auto" (triton on CUDA tensors when Triton is importable, torch otherwise).
"""
from __future__ import annotations

import torch

from .reference import cost_matrix, sinkhorn_log, sinkhorn_margin_reference

__all__ = ["sinkhorn_margin", "cost_matrix", "sinkhorn_log", "sinkhorn_margin_reference", "last_backend"]

_last_backend = {"name": None}


def last_backend() -> str | None:
    """Name of the path the most recent `sinkhorn_margin` call ran (for logs and benchmarks)."""
    return _last_backend["name"]


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
    use_triton = backend == "triton" or (backend == "auto" and rc.is_cuda and _triton_available())
    if use_triton:
        from .kernel import sinkhorn_margin_triton
        margin, path = sinkhorn_margin_triton(rc, rr, hc, hr, lam=lam, eps=eps, iters=iters, gamma=gamma,
                                              signed=signed)
        _last_backend["name"] = path
    else:
        margin = sinkhorn_margin_reference(rc.float(), rr.float(), hc, hr, lam=lam, eps=eps, iters=iters,
                                           gamma=gamma, signed=signed)
        _last_backend["name"] = "torch"
    return margin[0] if squeeze else margin


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
        return True
    except Exception:
        return False
