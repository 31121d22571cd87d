"""Fused Triton kernel for the batched APLOT Sinkhorn margin.

Entry point: `sinkhorn_margin_triton(rc, rr, hc, hr, ...)` with rc, rr [G, B] and hc, hr [G, B, d]
(bf16, fp16 or fp32) -> (m [G, B] fp32, path) where path names what ran:

- "triton-fused": one launch, one program per problem. The program accumulates the cosine matmul over
  d in tiles, builds the cost, runs every log-domain Sinkhorn iteration and the row reduction with the
  B_pad x B_pad matrix held in registers. Used while B_pad <= FUSED_MAX_B = 128 for bf16/fp16 embeddings
  and <= FUSED_MAX_B_FP32 = 64 for fp32 ones: a 128 x 128 fp32 tile is 64 registers per thread at 8
  warps, and fp32 embeddings take the FMA dot, whose operand tiles live in registers too, so at 128 that
  spills on sm_90 (`python -m aplot_rlhf.ot.check_compile` measures it); 256 x 256 would be the whole
  register file of an H100/H200 SM (64 Ki x 32 bit). `fused_config` picks warps and the d tile per
  B_pad so that no configuration spills on sm_80 or sm_90.
- "triton-tiled": two launches. The first computes the cost in TILE_B x TILE_B tiles on a
  (G, n_tiles, n_tiles) grid into an fp32 scratch [G, B_pad, B_pad] (L2-resident for moderate B); the
  second runs Sinkhorn and the row reduction per problem, streaming tiles with an online logsumexp.
  Used while B_pad <= TILED_MAX_B = 2048 (scratch 16 MiB per problem).
- "torch-fallback": the PyTorch reference, for larger B or when Triton cannot run (a CPU tensor
  without TRITON_INTERPRET=1 set before this module was imported).

`plan_launches` is the one place that decides what runs (kernels, grids, arguments, constexprs, warps):
the launcher executes its list and `check_compile` compiles the same list ahead of time for sm_80/sm_90.

Numerics match `reference.sinkhorn_log`: uniform marginals, column potential v first, then row
potential u, `iters` rounds, no early stop. Everything runs in base 2 (exp2/log2 are the native GPU
instructions): K2 = -C * log2(e) / eps, and every logsumexp subtracts its max. The last row update is
folded into the margin: with u_i = log(1/B) - LSE_j(K_ij + v_j), B * T_ij is exactly softmax_j(K_ij + v_j),
so m_i = gamma * sum_j softmax_j(K_ij + v_j) * C_ij, which never depends on the rounding of u_i.
Padded rows and columns hold K2 = -1e30 (finite, so no inf - inf) and their potentials are pinned to 0,
so they contribute exp2(-1e30) = 0 to every sum over valid indices.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .reference import sinkhorn_margin_reference

FUSED_MAX_B = 128
FUSED_MAX_B_FP32 = 64
TILED_MAX_B = 2048
TILE_B = 64
_LOG2E = 1.4426950408889634

__all__ = ["sinkhorn_margin_triton", "select_path", "path_for_size", "plan_launches", "fused_config", "Launch",
           "embedding_dtype", "is_interpreted", "FUSED_MAX_B", "FUSED_MAX_B_FP32", "TILED_MAX_B", "TILE_B"]


@triton.jit
def _cost_tile(rc_ptr, rr_ptr, hc_ptr, hr_ptr, g, offs_i, offs_j, B, D, lam, k2_scale,
               SIGNED: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """K2[i, j] = C[i, j] * k2_scale for rows offs_i x cols offs_j of problem g; -1e30 outside B x B."""
    valid_i = offs_i < B
    valid_j = offs_j < B
    offs_d = tl.arange(0, BLOCK_D)
    row_c = hc_ptr + (g * B + offs_i.to(tl.int64)) * D
    row_r = hr_ptr + (g * B + offs_j.to(tl.int64)) * D
    dots = tl.zeros((offs_i.shape[0], offs_j.shape[0]), dtype=tl.float32)
    sq_c = tl.zeros((offs_i.shape[0],), dtype=tl.float32)
    sq_r = tl.zeros((offs_j.shape[0],), dtype=tl.float32)
    for k in range(0, D, BLOCK_D):
        d_ok = (k + offs_d) < D
        a = tl.load(row_c[:, None] + (k + offs_d)[None, :], mask=valid_i[:, None] & d_ok[None, :], other=0.0)
        b = tl.load(row_r[:, None] + (k + offs_d)[None, :], mask=valid_j[:, None] & d_ok[None, :], other=0.0)
        a32 = a.to(tl.float32)
        b32 = b.to(tl.float32)
        sq_c += tl.sum(a32 * a32, axis=1)
        sq_r += tl.sum(b32 * b32, axis=1)
        if UPCAST_DOT:
            # fp32 inputs, or the CPU interpreter (whose dot misreads bf16 storage): full-precision FMA dot
            dots = tl.dot(a32, tl.trans(b32), dots, input_precision=DOT_PREC)
        else:
            # bf16/fp16 products are exact in fp32, so tensor cores lose nothing before accumulation
            dots = tl.dot(a, tl.trans(b), dots)
    # F.normalize semantics: x / max(|x|, 1e-12), so a zero vector has cosine 0 with everything
    inv_c = 1.0 / tl.maximum(tl.sqrt(sq_c), 1e-12)
    inv_r = 1.0 / tl.maximum(tl.sqrt(sq_r), 1e-12)
    cos = dots * inv_c[:, None] * inv_r[None, :]
    rc = tl.load(rc_ptr + g * B + offs_i, mask=valid_i, other=0.0)
    rr = tl.load(rr_ptr + g * B + offs_j, mask=valid_j, other=0.0)
    diff = rc[:, None] - rr[None, :]
    if not SIGNED:
        diff = tl.abs(diff)
    # 1 - sigmoid(x) = 1 / (1 + e^x): no cancellation for large x; clamping at 80 (term < 2e-35) keeps e^x finite
    reward_term = 1.0 / (1.0 + tl.exp(tl.minimum(diff, 80.0)))
    cost = (1.0 - lam) * reward_term + lam * cos
    valid = valid_i[:, None] & valid_j[None, :]
    return tl.where(valid, cost * k2_scale, -1.0e30)


@triton.jit
def _fused_kernel(rc_ptr, rr_ptr, hc_ptr, hr_ptr, m_ptr, plan_ptr, B, D, iters, lam, k2_scale, c_scale, gamma,
                  log2_b, SIGNED: tl.constexpr, RETURN_PLAN: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """One program per problem g: cost, `iters` Sinkhorn rounds and m[g, :B], all on chip."""
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_B)
    valid = offs < B
    k2 = _cost_tile(rc_ptr, rr_ptr, hc_ptr, hr_ptr, g, offs, offs, B, D, lam, k2_scale,
                    SIGNED, BLOCK_D, UPCAST_DOT, DOT_PREC)
    u = tl.zeros((BLOCK_B,), dtype=tl.float32)
    v = tl.zeros((BLOCK_B,), dtype=tl.float32)
    # updates are written inline: each nested jit call costs milliseconds under the CPU interpreter
    for it in range(iters):
        # v_j = log2(1/B) - LSE2_i(K2_ij + u_i); padded v pinned to 0
        x = k2 + u[:, None]
        mx = tl.max(x, axis=0)
        v = tl.where(valid, -log2_b - mx - tl.log2(tl.sum(tl.exp2(x - mx[None, :]), axis=0)), 0.0)
        if it < iters - 1:
            # u_i = log2(1/B) - LSE2_j(K2_ij + v_j); the last one is folded into the margin below
            x = k2 + v[None, :]
            mx = tl.max(x, axis=1)
            u = tl.where(valid, -log2_b - mx - tl.log2(tl.sum(tl.exp2(x - mx[:, None]), axis=1)), 0.0)
    # the last row update, folded in: B * T_ij = softmax_j(K2_ij + v_j)
    x = k2 + v[None, :]
    mx = tl.max(x, axis=1)
    p = tl.exp2(x - mx[:, None])
    s = tl.sum(p, axis=1)
    # C = K2 * c_scale; padded columns give p = 0 against a finite K2 = -1e30, so p * K2 = 0 needs no mask
    # (one B x B tensor fewer live: at B_pad 128 the masked cost tensor made the kernel spill)
    margin = (gamma * c_scale) * tl.sum(p * k2, axis=1) / s
    tl.store(m_ptr + g * B + offs, margin, mask=valid)
    if RETURN_PLAN:
        plan = p / (s[:, None] * B)
        tl.store(plan_ptr + (g * B + offs[:, None]) * B + offs[None, :], plan, mask=valid[:, None] & valid[None, :])


@triton.jit
def _cost_tiles_kernel(rc_ptr, rr_ptr, hc_ptr, hr_ptr, k2_ptr, B, D, BP, lam, k2_scale, SIGNED: tl.constexpr,
                       TILE: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PREC: tl.constexpr):
    """Grid (G, n_tiles, n_tiles): writes one TILE x TILE block of K2 into scratch [G, BP, BP]."""
    g = tl.program_id(0).to(tl.int64)
    offs_i = tl.program_id(1) * TILE + tl.arange(0, TILE)
    offs_j = tl.program_id(2) * TILE + tl.arange(0, TILE)
    k2 = _cost_tile(rc_ptr, rr_ptr, hc_ptr, hr_ptr, g, offs_i, offs_j, B, D, lam, k2_scale,
                    SIGNED, BLOCK_D, UPCAST_DOT, DOT_PREC)
    tl.store(k2_ptr + (g * BP + offs_i[:, None]) * BP + offs_j[None, :], k2)


@triton.jit
def _tiled_update_cols(k2_base, u_base, v_base, B, BP, n_tiles, log2_b, TILE: tl.constexpr):
    """v = log2(1/B) - LSE2 over rows of (K2 + u), one column block at a time, online over row blocks."""
    ar = tl.arange(0, TILE)
    for tj in range(n_tiles):
        offs_j = tj * TILE + ar
        mx = tl.full((TILE,), -1.0e30, tl.float32)
        s = tl.zeros((TILE,), dtype=tl.float32)
        for ti in range(n_tiles):
            offs_i = ti * TILE + ar
            x = tl.load(k2_base + offs_i[:, None] * BP + offs_j[None, :]) + tl.load(u_base + offs_i)[:, None]
            new = tl.maximum(mx, tl.max(x, axis=0))
            s = s * tl.exp2(mx - new) + tl.sum(tl.exp2(x - new[None, :]), axis=0)
            mx = new
        tl.store(v_base + offs_j, tl.where(offs_j < B, -log2_b - mx - tl.log2(s), 0.0))


@triton.jit
def _tiled_update_rows(k2_base, u_base, v_base, B, BP, n_tiles, log2_b, TILE: tl.constexpr):
    """u = log2(1/B) - LSE2 over columns of (K2 + v), one row block at a time, online over column blocks."""
    ar = tl.arange(0, TILE)
    for ti in range(n_tiles):
        offs_i = ti * TILE + ar
        mx = tl.full((TILE,), -1.0e30, tl.float32)
        s = tl.zeros((TILE,), dtype=tl.float32)
        for tj in range(n_tiles):
            offs_j = tj * TILE + ar
            x = tl.load(k2_base + offs_i[:, None] * BP + offs_j[None, :]) + tl.load(v_base + offs_j)[None, :]
            new = tl.maximum(mx, tl.max(x, axis=1))
            s = s * tl.exp2(mx - new) + tl.sum(tl.exp2(x - new[:, None]), axis=1)
            mx = new
        tl.store(u_base + offs_i, tl.where(offs_i < B, -log2_b - mx - tl.log2(s), 0.0))


@triton.jit
def _tiled_sinkhorn_kernel(k2_ptr, u_ptr, v_ptr, m_ptr, plan_ptr, B, BP, n_tiles, iters, c_scale, gamma, log2_b,
                           RETURN_PLAN: tl.constexpr, TILE: tl.constexpr):
    """One program per problem over scratch K2 [G, BP, BP] and potentials u, v [G, BP] (zero-initialised)."""
    g = tl.program_id(0).to(tl.int64)
    k2_base = k2_ptr + g * BP * BP
    u_base = u_ptr + g * BP
    v_base = v_ptr + g * BP
    # the barriers make one phase's potential stores visible to every thread of the next phase
    for _ in range(iters - 1):
        _tiled_update_cols(k2_base, u_base, v_base, B, BP, n_tiles, log2_b, TILE)
        tl.debug_barrier()
        _tiled_update_rows(k2_base, u_base, v_base, B, BP, n_tiles, log2_b, TILE)
        tl.debug_barrier()
    _tiled_update_cols(k2_base, u_base, v_base, B, BP, n_tiles, log2_b, TILE)
    tl.debug_barrier()
    ar = tl.arange(0, TILE)
    for ti in range(n_tiles):
        offs_i = ti * TILE + ar
        mx = tl.full((TILE,), -1.0e30, tl.float32)
        s = tl.zeros((TILE,), dtype=tl.float32)
        acc = tl.zeros((TILE,), dtype=tl.float32)
        for tj in range(n_tiles):
            offs_j = tj * TILE + ar
            k2 = tl.load(k2_base + offs_i[:, None] * BP + offs_j[None, :])
            x = k2 + tl.load(v_base + offs_j)[None, :]
            new = tl.maximum(mx, tl.max(x, axis=1))
            p = tl.exp2(x - new[:, None])
            scale = tl.exp2(mx - new)
            valid2 = (offs_i[:, None] < B) & (offs_j[None, :] < B)
            s = s * scale + tl.sum(p, axis=1)
            acc = acc * scale + tl.sum(p * tl.where(valid2, k2 * c_scale, 0.0), axis=1)
            mx = new
        valid_i = offs_i < B
        tl.store(m_ptr + g * B + offs_i, gamma * acc / s, mask=valid_i)
        if RETURN_PLAN:
            for tj in range(n_tiles):
                offs_j = tj * TILE + ar
                x = tl.load(k2_base + offs_i[:, None] * BP + offs_j[None, :]) + tl.load(v_base + offs_j)[None, :]
                plan = tl.exp2(x - mx[:, None]) / (s[:, None] * B)
                tl.store(plan_ptr + (g * B + offs_i[:, None]) * B + offs_j[None, :], plan,
                         mask=valid_i[:, None] & (offs_j[None, :] < B))


def is_interpreted() -> bool:
    """True when this module's kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU)."""
    return type(_fused_kernel).__name__ == "InterpretedFunction"


def _pad(B: int) -> int:
    # tl.dot needs every dimension >= 16, and tl.arange needs a power of two
    return max(16, triton.next_power_of_2(B))


def embedding_dtype(hc: torch.Tensor, hr: torch.Tensor) -> torch.dtype:
    """The dtype the kernels read embeddings in: bf16/fp16 kept when both agree, anything else as fp32."""
    return hc.dtype if hc.dtype == hr.dtype and hc.dtype in (torch.bfloat16, torch.float16) else torch.float32


def path_for_size(B: int, emb_dtype: torch.dtype = torch.bfloat16, *, fused_max_b: int | None = None,
                  tiled_max_b: int = TILED_MAX_B) -> str:
    """The path for B pairs per problem with embeddings of `emb_dtype`, on a device Triton can run on."""
    if fused_max_b is None:
        fused_max_b = FUSED_MAX_B_FP32 if emb_dtype == torch.float32 else FUSED_MAX_B
    bp = _pad(B)
    if bp <= fused_max_b:
        return "triton-fused"
    if bp <= tiled_max_b:
        return "triton-tiled"
    return "torch-fallback"


def select_path(B: int, device: torch.device, emb_dtype: torch.dtype = torch.bfloat16, *,
                fused_max_b: int | None = None, tiled_max_b: int = TILED_MAX_B) -> str:
    """Which path `sinkhorn_margin_triton` runs for B pairs per problem on `device`."""
    if not (device.type == "cuda" or is_interpreted()):
        return "torch-fallback"
    return path_for_size(B, emb_dtype, fused_max_b=fused_max_b, tiled_max_b=tiled_max_b)


def fused_config(bp: int, emb_dtype: torch.dtype) -> tuple[int, int]:
    """(num_warps, d-tile cap) of the fused kernel at B_pad `bp`, chosen from check_compile's register counts.

    The d tiles, not the B x B matrix, set the pressure at small B_pad: 64-wide tiles spilled at B_pad 32-64
    on sm_90. A 32-wide tile (64 bytes per bf16 row) and 8 warps from B_pad 64 keep every B_pad <= 64 under
    about 130 registers; B_pad 128 (bf16/fp16 only) needs the 16-wide tile to stay below 255.
    """
    if bp <= 32:
        return 4, 32
    if bp <= 64:
        return 8, 16 if emb_dtype == torch.float32 else 32
    return 8, 16


@dataclass(frozen=True)
class Launch:
    """One kernel launch: `fn[grid](*args, **constexprs, num_warps=num_warps)`."""
    fn: Any
    grid: tuple
    args: tuple
    constexprs: dict
    num_warps: int

    def __call__(self) -> None:
        self.fn[self.grid](*self.args, **self.constexprs, num_warps=self.num_warps)


def plan_launches(path: str, rc: torch.Tensor, rr: torch.Tensor, hc: torch.Tensor, hr: torch.Tensor,
                  margin: torch.Tensor, plan: torch.Tensor, *, lam: float, eps: float, iters: int, gamma: float,
                  signed: bool, return_plan: bool, tile_b: int = TILE_B, upcast: bool | None = None) -> list[Launch]:
    """The launches that compute `path` for prepared inputs (rc, rr fp32 [G, B]; hc, hr contiguous [G, B, d]).

    Allocates the tiled path's scratch on the inputs' device (a "meta" device allocates nothing, which is
    how check_compile builds the same list without a GPU). upcast defaults to what the launcher uses.
    """
    G, B = rc.shape
    D = hc.shape[-1]
    emb_dtype = hc.dtype
    if upcast is None:
        upcast = emb_dtype == torch.float32 or is_interpreted()
    k2_scale = -_LOG2E / eps
    c_scale = 1.0 / k2_scale
    log2_b = math.log2(B)
    bp = _pad(B)
    if path == "triton-fused":
        warps, d_cap = fused_config(bp, emb_dtype)
        block_d = max(16, min(triton.next_power_of_2(max(D, 1)), d_cap))
        return [Launch(_fused_kernel, (G,),
                       (rc, rr, hc, hr, margin, plan, B, D, iters, float(lam), k2_scale, c_scale, float(gamma),
                        log2_b),
                       dict(SIGNED=bool(signed), RETURN_PLAN=bool(return_plan), BLOCK_B=bp, BLOCK_D=block_d,
                            UPCAST_DOT=bool(upcast), DOT_PREC="ieee"), warps)]
    if path == "triton-tiled":
        tile = max(16, min(tile_b, bp))
        n_tiles = bp // tile
        # 64 x 64 tiles at 8 warps (4 spilled fp32, and left bf16 at ~250 registers, for unaligned inputs);
        # fp32 embeddings take the FMA dot, whose operand tiles live in registers, so a 16-wide d tile
        fp32 = emb_dtype == torch.float32
        block_d = max(16, min(triton.next_power_of_2(max(D, 1)), 16 if fp32 else 32))
        k2 = torch.empty(G, bp, bp, dtype=torch.float32, device=rc.device)
        u = torch.zeros(G, bp, dtype=torch.float32, device=rc.device)
        v = torch.zeros(G, bp, dtype=torch.float32, device=rc.device)
        return [Launch(_cost_tiles_kernel, (G, n_tiles, n_tiles),
                       (rc, rr, hc, hr, k2, B, D, bp, float(lam), k2_scale),
                       dict(SIGNED=bool(signed), TILE=tile, BLOCK_D=block_d, UPCAST_DOT=bool(upcast),
                            DOT_PREC="ieee"), 8),
                Launch(_tiled_sinkhorn_kernel, (G,),
                       (k2, u, v, margin, plan, B, bp, n_tiles, iters, c_scale, float(gamma), log2_b),
                       dict(RETURN_PLAN=bool(return_plan), TILE=tile), 8)]
    raise ValueError(f"no kernel launches for path {path!r}")


def sinkhorn_margin_triton(rc: torch.Tensor, rr: torch.Tensor, hc: torch.Tensor, hr: torch.Tensor, *,
                           lam: float = 0.1, eps: float = 0.1, iters: int = 50, gamma: float = 1.0,
                           signed: bool = False, return_plan: bool = False, fused_max_b: int | None = None,
                           tiled_max_b: int = TILED_MAX_B, tile_b: int = TILE_B,
                           out: torch.Tensor | None = None, plan_out: torch.Tensor | None = None):
    """APLOT margins for G problems with the fused (or tiled) Triton kernel; no grad.

    rc, rr: [G, B] rewards (any float dtype; read as fp32); hc, hr: [G, B, d] embeddings, bf16/fp16/fp32
    (fp64 is cast to fp32). Returns (m [G, B] fp32, path), or (m, path, plan [G, B, B] fp32) if return_plan.
    fused_max_b, tiled_max_b, tile_b override the path thresholds (tests use them to reach the tiled path).
    out [G, B] and plan_out [G, B, B] (fp32, contiguous, on the inputs' device) receive the results if given.
    """
    if rc.dim() != 2 or rc.shape != rr.shape or hc.dim() != 3 or hc.shape != hr.shape or hc.shape[:2] != rc.shape:
        raise ValueError(f"expected rc, rr [G, B] and hc, hr [G, B, d]; got {tuple(rc.shape)}, {tuple(rr.shape)}, "
                         f"{tuple(hc.shape)}, {tuple(hr.shape)}")
    if eps <= 0 or iters < 1:
        raise ValueError(f"need eps > 0 and iters >= 1, got eps={eps}, iters={iters}")
    G, B = rc.shape
    emb_dtype = embedding_dtype(hc, hr)
    path = select_path(B, rc.device, emb_dtype, fused_max_b=fused_max_b, tiled_max_b=tiled_max_b)
    if path == "torch-fallback" or G == 0 or B == 0:
        res = sinkhorn_margin_reference(rc.detach().float(), rr.detach().float(), hc.detach(), hr.detach(),
                                        lam=lam, eps=eps, iters=iters, gamma=gamma, signed=signed,
                                        return_plan=return_plan)
        margin, plan = res if return_plan else (res, None)
        margin = _into(margin, out)
        if return_plan:
            return margin, "torch-fallback", _into(plan, plan_out)
        return margin, "torch-fallback"

    rc = rc.detach().to(torch.float32).contiguous()
    rr = rr.detach().to(torch.float32).contiguous()
    hc = hc.detach().to(emb_dtype).contiguous()
    hr = hr.detach().to(emb_dtype).contiguous()
    margin = _output(out, (G, B), rc.device)
    # without return_plan the kernel never touches plan_ptr, so any fp32 tensor can stand in for it
    plan = _output(plan_out, (G, B, B), rc.device) if return_plan else margin
    launches = plan_launches(path, rc, rr, hc, hr, margin, plan, lam=lam, eps=eps, iters=iters, gamma=gamma,
                             signed=signed, return_plan=return_plan, tile_b=tile_b)
    # Triton launches on the current CUDA device, so make it the inputs' device
    with torch.cuda.device(rc.device) if rc.is_cuda else contextlib.nullcontext():
        for launch in launches:
            launch()
    if return_plan:
        return margin, path, plan
    return margin, path


def _output(buf: torch.Tensor | None, shape: tuple, device: torch.device) -> torch.Tensor:
    """A caller's output buffer after checking it, or a fresh fp32 one of `shape`."""
    if buf is None:
        return torch.empty(shape, dtype=torch.float32, device=device)
    if tuple(buf.shape) != tuple(shape) or buf.dtype != torch.float32 or not buf.is_contiguous() \
            or buf.device != device:
        raise ValueError(f"output buffer must be contiguous fp32 {tuple(shape)} on {device}, got "
                         f"{buf.dtype} {tuple(buf.shape)} on {buf.device}")
    return buf


def _into(result: torch.Tensor, buf: torch.Tensor | None) -> torch.Tensor:
    """Copy a torch-fallback result into the caller's buffer when one was given."""
    if buf is None:
        return result
    _output(buf, tuple(result.shape), result.device).copy_(result)
    return buf
