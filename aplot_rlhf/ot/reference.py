"""Batched log-domain Sinkhorn margin in PyTorch: the reference every faster path is checked against.

Shapes: G independent problems of B chosen/rejected pairs, embedding width d.
"""
from __future__ import annotations

import math

import torch


def cost_matrix(rc: torch.Tensor, rr: torch.Tensor, hc: torch.Tensor, hr: torch.Tensor, *,
                lam: float = 0.1, signed: bool = False) -> torch.Tensor:
    """APLOT cost C[g, i, j] between chosen i and rejected j, in fp32 (or fp64 if given fp64).

    rc, rr: [G, B] rewards; hc, hr: [G, B, d] embeddings. Returns [G, B, B].
    C = (1 - lam) * D + lam * S with D = 1 - sigmoid(|rc_i - rr_j|) (or signed: 1 - sigmoid(rc_i - rr_j))
    and S = cosine(hc_i, hr_j); a zero embedding has cosine 0 with everything.
    """
    dtype = torch.float64 if rc.dtype == torch.float64 else torch.float32
    rc, rr = rc.to(dtype), rr.to(dtype)
    diff = rc[:, :, None] - rr[:, None, :]
    reward_term = 1.0 - torch.sigmoid(diff if signed else diff.abs())
    hc = torch.nn.functional.normalize(hc.to(dtype), dim=-1, eps=1e-12)
    hr = torch.nn.functional.normalize(hr.to(dtype), dim=-1, eps=1e-12)
    semantic_term = torch.bmm(hc, hr.transpose(1, 2))
    return (1.0 - lam) * reward_term + lam * semantic_term


def sinkhorn_log(cost: torch.Tensor, *, eps: float = 0.1, iters: int = 50) -> torch.Tensor:
    """Entropic OT plan with uniform marginals for a batch of square costs [G, B, B] -> plan [G, B, B].

    Log-domain iterations, column potential first then row potential (POT's order), so after the last
    update every row of the plan sums to exactly 1/B.
    """
    G, B, B2 = cost.shape
    if B != B2:
        raise ValueError(f"cost must be square per problem, got {tuple(cost.shape)}")
    log_marginal = -math.log(B)
    kernel = -cost / eps                                   # log K
    log_u = torch.zeros(G, B, 1, dtype=cost.dtype, device=cost.device)
    log_v = torch.zeros(G, 1, B, dtype=cost.dtype, device=cost.device)
    for _ in range(iters):
        log_v = log_marginal - torch.logsumexp(kernel + log_u, dim=1, keepdim=True)
        log_u = log_marginal - torch.logsumexp(kernel + log_v, dim=2, keepdim=True)
    return torch.exp(kernel + log_u + log_v)


def sinkhorn_margin_reference(rc: torch.Tensor, rr: torch.Tensor, hc: torch.Tensor, hr: torch.Tensor, *,
                              lam: float = 0.1, eps: float = 0.1, iters: int = 50, gamma: float = 1.0,
                              signed: bool = False, return_plan: bool = False):
    """Margins m[g, i] = gamma * B * sum_j T[g, i, j] * C[g, i, j] for batched inputs ([G, B], [G, B, d]).

    Computed without grad in fp32 (fp64 if rc is fp64). Returns m [G, B], or (m, plan) if return_plan.
    """
    with torch.no_grad():
        cost = cost_matrix(rc, rr, hc, hr, lam=lam, signed=signed)
        plan = sinkhorn_log(cost, eps=eps, iters=iters)
        B = cost.shape[-1]
        margin = gamma * B * (plan * cost).sum(dim=-1)
    return (margin, plan) if return_plan else margin
