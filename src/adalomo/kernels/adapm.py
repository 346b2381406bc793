"""AdaPM (``optim/adapm.py``) on a matrix in Triton kernels: every momentum kind with the Adam or the factored second
moment, in few passes and without a full-size temporary.

A matrix is updated chunk by chunk (one chunk, or the equal chunks of a ``SplitMomentum``), each chunk with its own
momentum kind; the second moment, the finite test and RMS(u) belong to the whole matrix. Passes (bytes per element
for a bf16 gradient and parameter, fp32 state):

* ``stats``: reads g (and p for the relative step): the partial sums of g (the finite test) and, for the factored
  second moment, the row and column sums of g^2 (and of p^2). 2 bytes (4 with ``relative_lr``).
* low-rank chunks: pg = P^T g (or g P) as a torch matmul over row blocks (a bounded upcast temporary), the small
  momentum M <- beta1 M + (1 - beta1) pg and C = M / (1 - beta1^t) - pg in torch; the estimate
  m_hat = g + lift(C) is never stored: each tile of the later passes adds its rank-r product (``tl.dot``, K = r).
  2 bytes.
* ``usq`` (factored only; the update clipping needs RMS(u) before any write): u = m_hat * rsqrt(v_hat), partial sums
  of u^2. Full momentum writes m_new here (the finite test is known), so that the write pass reads m instead of g
  and m: reads g (+ m), writes m. none/low-rank: 2 bytes, full: 10.
* ``write``: p <- p (1 - step wd) - step clip u. Adam: also m and v (one pass reads g, p, m, v and writes p, m, v:
  22 bytes for full momentum, 14 without). Factored: reads g (or m for full momentum) and p, writes p: 6 bytes.

Totals per element (bf16 p and g): Adam v: full 24, low-rank 18, none 16; factored v: full 20, low-rank 12, none 10.
The scalars that depend on the data (finite flags, clip factor, relative step) stay on the device: the kernels read
them through pointers, so nothing waits for the device.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .. import _compat
from .. import functional as F
from .. import momentum as Mom
from .common import and_flag, round_to_bf16
from .config import next_pow2, tiling
from .launch import seed_arg

__all__ = ["adapm_update_"]

NONE, FULL, LOW_RANK = 0, 1, 2
_KIND_CODES = {"none": NONE, "full": FULL, "low_rank": LOW_RANK}
WARPS = 8


@triton.jit
def _tile_setup(pid, TN, rows_per_prog, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    j = pid % TN
    r0 = (pid // TN) * rows_per_prog
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    return r0, cols, cols < N, tl.arange(0, BLOCK_M)


@triton.jit
def _lerp(start, end, w):
    """torch.lerp's formula (two branches on the weight), so that the state matches the torch path's bit for bit
    where the compiler does not contract."""
    if w < 0.5:
        out = start + w * (end - start)
    else:
        out = end - (end - start) * (1.0 - w)
    return out


@triton.jit
def _lift_rhs(b_ptr, cols, cmask, sb_k, sb_n, R, RP: tl.constexpr):
    """The [RP, BLOCK_N] tile of B in lift = A @ B (zero beyond rank R), loaded once per program."""
    ks = tl.arange(0, RP)
    return tl.load(b_ptr + ks[:, None] * sb_k + cols[None, :] * sb_n, mask=(ks < R)[:, None] & cmask[None, :],
                   other=0.0)


@triton.jit
def _lift(a_ptr, b, rows, rmask, sa_m, sa_k, R, RP: tl.constexpr):
    """Rows ``rows`` of A @ B: the low-rank part of the estimate, in full fp32 (no TF32)."""
    ks = tl.arange(0, RP)
    a = tl.load(a_ptr + rows.to(tl.int64)[:, None] * sa_m + ks[None, :] * sa_k,
                mask=rmask[:, None] & (ks < R)[None, :], other=0.0)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def adapm_stats_kernel(g_ptr, p_ptr, scale_ptr, ws_ptr, M, N, TN, rows_per_prog, sg_m, sg_n, sp_m, sp_n, off_psq,
                       off_row, off_col, HAS_SCALE: tl.constexpr, FACTORED: tl.constexpr, PSQ: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per program (a row group of one column tile): sum g at ws[pid], sum p^2 at ws[off_psq + pid]; FACTORED: the
    row sums of g^2 of its column tile at ws[off_row + tile * M + row], its column sums at ws[off_col + group * N +
    col]. The gradient is scaled first (the torch path squares the scaled gradient)."""
    pid = tl.program_id(0)
    r0, cols, cmask, lrows = _tile_setup(pid, TN, rows_per_prog, N, BLOCK_M, BLOCK_N)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    col_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    psq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, rows_per_prog, BLOCK_M):
        rows = r0 + m0 + lrows
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        g = tl.load(g_ptr + r64 * sg_m + cols[None, :] * sg_n, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * scale
        acc += g
        if FACTORED:
            sq = g * g
            col_acc += sq
            tl.store(ws_ptr + off_row + (pid % TN) * M + rows, tl.sum(sq, axis=1), mask=rmask)
        if PSQ:
            p = tl.load(p_ptr + r64 * sp_m + cols[None, :] * sp_n, mask=mask, other=0.0).to(tl.float32)
            psq += p * p
    tl.store(ws_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
    if FACTORED:
        tl.store(ws_ptr + off_col + (pid // TN) * N + cols, tl.sum(col_acc, axis=0), mask=cmask)
    if PSQ:
        tl.store(ws_ptr + off_psq + pid, tl.sum(tl.sum(psq, axis=1), axis=0))


@triton.jit
def adapm_usq_kernel(g_ptr, m_ptr, r_ptr, c_ptr, a_ptr, b_ptr, scale_ptr, okm_ptr, ws_ptr, M, N, TN, rows_per_prog,
                     sg_m, sg_n, sm_m, sa_m, sa_k, sb_k, sb_n, R, beta1, bc1, sbc2, HAS_SCALE: tl.constexpr,
                     MOM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP: tl.constexpr):
    """Factored second moment: partial sums of u^2 (u = m_hat * r * c * sqrt(bc2)) at ws[pid]. Full momentum: the
    new m is stored here (where the momentum's finite flag ``okm`` holds)."""
    pid = tl.program_id(0)
    r0, cols, cmask, lrows = _tile_setup(pid, TN, rows_per_prog, N, BLOCK_M, BLOCK_N)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    okm = tl.load(okm_ptr).to(tl.int8)
    c = tl.load(c_ptr + cols, mask=cmask, other=0.0)
    if MOM == 2:
        b = _lift_rhs(b_ptr, cols, cmask, sb_k, sb_n, R, RP)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for m0 in range(0, rows_per_prog, BLOCK_M):
        rows = r0 + m0 + lrows
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        g = tl.load(g_ptr + r64 * sg_m + cols[None, :] * sg_n, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            g = g * scale
        if MOM == 0:
            mh = g
        elif MOM == 1:
            m_ptrs = m_ptr + r64 * sm_m + cols[None, :]
            m = _lerp(g, tl.load(m_ptrs, mask=mask, other=0.0), beta1)
            tl.store(m_ptrs, m, mask=and_flag(mask, okm))
            mh = tl.div_rn(m, bc1)
        else:
            mh = g + _lift(a_ptr, b, rows, rmask, sa_m, sa_k, R, RP)
        r = tl.load(r_ptr + rows, mask=rmask, other=0.0)
        u = mh * r[:, None] * c[None, :] * sbc2
        acc += tl.where(mask, u * u, 0.0)
    tl.store(ws_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def adapm_write_kernel(g_ptr, p_ptr, m_ptr, v_ptr, r_ptr, c_ptr, a_ptr, b_ptr, scale_ptr, okm_ptr, okp_ptr, sc_ptr,
                       seed, M, N, TN, rows_per_prog, sg_m, sg_n, sp_m, sp_n, sm_m, sv_m, sa_m, sa_k, sb_k, sb_n, R,
                       row0, col0, n_total, beta1, bc1, beta2, bc2, eps, sbc2, decay, coef,
                       HAS_SCALE: tl.constexpr, MOM: tl.constexpr, ADAM: tl.constexpr, M_STORED: tl.constexpr,
                       HAS_WD: tl.constexpr, SC_DEV: tl.constexpr, SR: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, RP: tl.constexpr):
    """p <- p * decay + coef * u where ``okp`` holds. ADAM: v (and full momentum's m) are updated here too, where
    ``okm`` holds; factored: u = m_hat * r * c * sqrt(bc2), the clip factor folded into ``coef``. SC_DEV: decay and
    coef are the device scalars at ``sc_ptr`` (relative step, clip factor), else the host floats."""
    pid = tl.program_id(0)
    r0, cols, cmask, lrows = _tile_setup(pid, TN, rows_per_prog, N, BLOCK_M, BLOCK_N)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    okm = tl.load(okm_ptr).to(tl.int8)
    okp = tl.load(okp_ptr).to(tl.int8)
    if SC_DEV:
        decay = tl.load(sc_ptr)
        coef = tl.load(sc_ptr + 1)
    if not ADAM:
        c = tl.load(c_ptr + cols, mask=cmask, other=0.0)
    if MOM == 2:
        b = _lift_rhs(b_ptr, cols, cmask, sb_k, sb_n, R, RP)
    for m0 in range(0, rows_per_prog, BLOCK_M):
        rows = r0 + m0 + lrows
        rmask = rows < M
        mask = rmask[:, None] & cmask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        p_ptrs = p_ptr + r64 * sp_m + cols[None, :] * sp_n
        if MOM != 1 or not M_STORED or ADAM:
            g = tl.load(g_ptr + r64 * sg_m + cols[None, :] * sg_n, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                g = g * scale
        p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
        if MOM == 0:
            mh = g
        elif MOM == 1:
            m_ptrs = m_ptr + r64 * sm_m + cols[None, :]
            m = tl.load(m_ptrs, mask=mask, other=0.0)
            if not M_STORED:
                m = _lerp(g, m, beta1)
                tl.store(m_ptrs, m, mask=and_flag(mask, okm))
            mh = tl.div_rn(m, bc1)
        else:
            mh = g + _lift(a_ptr, b, rows, rmask, sa_m, sa_k, R, RP)
        if ADAM:
            v_ptrs = v_ptr + r64 * sv_m + cols[None, :]
            v = _lerp(g * g, tl.load(v_ptrs, mask=mask, other=0.0), beta2)
            tl.store(v_ptrs, v, mask=and_flag(mask, okm))
            u = tl.div_rn(mh, tl.sqrt_rn(tl.div_rn(v, bc2)) + eps)
        else:
            r = tl.load(r_ptr + rows, mask=rmask, other=0.0)
            u = mh * r[:, None] * c[None, :] * sbc2
        if HAS_WD:
            new = p * decay
        else:
            new = p
        new = new + u * coef
        if SR:
            lin = (row0 + rows)[:, None] * n_total + (col0 + cols)[None, :]
            new = round_to_bf16(new, lin, seed)
        tl.store(p_ptrs, new.to(p_ptr.dtype.element_ty), mask=and_flag(mask, okp))


# ------------------------------------------------------------------------------------------------ host side
def _project(g: torch.Tensor, P: torch.Tensor, side: str, scale) -> torch.Tensor:
    """proj(g * scale) in fp32; a gradient of another dtype (or scaled) is upcast a row block at a time."""
    if g.dtype == torch.float32 and scale is None:
        return Mom.project(g, P, side)
    blocks = list(F.row_blocks(g))
    if len(blocks) == 1:
        return Mom.project(F.upcast(g, scale), P, side)
    if side == "right":
        return torch.cat([F.upcast(g[b], scale) @ P for b in blocks])
    out = None
    for b in blocks:
        part = P[b].mT @ F.upcast(g[b], scale)
        out = part if out is None else out.add_(part)
    return out


def _low_rank(gc, state, ch, beta1: float, t: float, ok, refresh: bool, fill: bool, scale):
    """The small part of a low-rank chunk in torch (``momentum.momentum_estimate_``'s, without forming m_hat):
    refresh the basis if due, update M, and return (A, B) with lift(M / bc - pg) = A @ B."""
    P, Mst = state[ch.prefix + "proj"], state[ch.prefix + "exp_avg_lr"]
    side = "left" if gc.shape[0] <= gc.shape[1] else "right"
    if refresh:  # every update_proj_gap steps: a full fp32 copy of the chunk's gradient for the factorisation
        g32 = F.upcast(gc, scale)
        safe = torch.where(ok, g32, torch.zeros((), dtype=g32.dtype, device=g32.device))
        P_new = ch.basis(safe, P.shape[1], side)
        Mom.refresh_basis_(P, Mst, P_new, safe, side, carry_weight=1.0 - beta1 ** (t - 1), ok=ok, fill=fill)
        pg = Mom.project(g32, P, side)
        del g32, safe
    else:
        pg = _project(gc, P, side, scale)
    Mst.copy_(torch.where(ok, torch.lerp(pg, Mst, beta1) if beta1 != 0 else pg, Mst))
    C = Mst / (1.0 - beta1 ** t) - pg
    return (P, C) if side == "left" else (C, P.mT)


def adapm_update_(p, g, state, chunks: list, *, t: float, lr: float, beta1: float, beta2: float, bc2: float,
                  eps: float, weight_decay: float, second_moment: str, clip_threshold, relative_lr: bool,
                  refresh: bool, fill: bool, grad_scale, stochastic_rounding: bool, seed: int) -> torch.Tensor:
    """One AdaPM step on the 2-D ``p`` (``optim.adapm.AdaPM._update``'s maths; ``state['step']`` already at ``t``).
    Returns the 0-d bool "the gradient was finite" (when not, p and the state are left as they were)."""
    dev = p.device
    Mrows, N = p.shape
    factored = second_moment == "factored"
    has_scale = grad_scale is not None
    scale = grad_scale if has_scale else p
    if has_scale and not isinstance(scale, torch.Tensor):
        scale = torch.full((), float(scale), dtype=torch.float32, device=dev)
    geo = tiling(Mrows, N)
    bm, bn, TN, rpp = geo["BLOCK_M"], geo["BLOCK_N"], geo["TN"], geo["rows_per_prog"]
    n_prog = geo["TM"] * TN
    psq = factored and relative_lr
    off_psq, off_row = n_prog, 2 * n_prog
    off_col = off_row + (TN * Mrows if factored else 0)
    ws = torch.empty(off_col + (geo["TM"] * N if factored else 0), dtype=torch.float32, device=dev)
    adapm_stats_kernel[(n_prog,)](g, p, scale, ws, Mrows, N, TN, rpp, g.stride(0), g.stride(1), p.stride(0),
                                  p.stride(1), off_psq, off_row, off_col, HAS_SCALE=has_scale, FACTORED=factored,
                                  PSQ=psq, BLOCK_M=bm, BLOCK_N=bn, num_warps=WARPS)
    ok = torch.isfinite(ws[:n_prog].sum())  # the momentum's flag: the torch path's isfinite(g.sum())
    okp = ok
    r_fac = c_fac = None
    if factored:
        eps1 = eps * eps
        row_mean = ws[off_row:off_col].view(TN, Mrows).sum(0).div_(N).add_(eps1)
        col_mean = ws[off_col:].view(geo["TM"], N).sum(0).add_(eps1 * Mrows).div_(Mrows)
        ok2 = torch.isfinite(row_mean.sum() + col_mean.sum())
        F.masked_ema_(state["exp_avg_sq_row"], row_mean, beta2, ok2)
        F.masked_ema_(state["exp_avg_sq_col"], col_mean, beta2, ok2)
        okp = ok & ok2
        r_fac, c_fac = (f.reshape(-1) for f in F.preconditioner(state))
    okm_i, okp_i = ok.to(torch.int32), okp.to(torch.int32)
    b1 = float(beta1)
    bc1 = 1.0 - b1 ** t
    sbc2 = math.sqrt(bc2)
    plans = []
    for ch in chunks:
        gc = g[ch.rows, ch.cols]
        code = _KIND_CODES[ch.kind]
        a_t = b_t = None
        if code == LOW_RANK:
            a_t, b_t = _low_rank(gc, state, ch, b1, t, ok, refresh, fill, grad_scale)
        plans.append((ch, gc, code, a_t, b_t))

    def lift_args(a_t, b_t):
        if a_t is None:
            return (ws, ws, 0, 0, 0, 0, 0, 16)
        R = a_t.shape[1]
        return (a_t, b_t, a_t.stride(0), a_t.stride(1), b_t.stride(0), b_t.stride(1), R, max(16, next_pow2(R)))

    def chunk_geo(gc):
        cg = tiling(gc.shape[0], gc.shape[1])
        return cg["TM"] * cg["TN"], cg["TN"], cg["rows_per_prog"]

    sc = ws
    if factored:
        coef_scale = None
        if clip_threshold is not None:
            parts = []
            for ch, gc, code, a_t, b_t in plans:
                n_c, tn_c, rpp_c = chunk_geo(gc)
                usq = torch.empty(n_c, dtype=torch.float32, device=dev)
                m = state[ch.prefix + "exp_avg"] if code == FULL else ws
                a_p, b_p, sa_m, sa_k, sb_k, sb_n, R, RP = lift_args(a_t, b_t)
                adapm_usq_kernel[(n_c,)](gc, m, r_fac[ch.rows], c_fac[ch.cols], a_p, b_p, scale, okm_i, usq,
                                         gc.shape[0], gc.shape[1], tn_c, rpp_c, gc.stride(0), gc.stride(1),
                                         m.stride(0) if code == FULL else 0, sa_m, sa_k, sb_k, sb_n, R, b1, bc1, sbc2,
                                         HAS_SCALE=has_scale, MOM=code, BLOCK_M=bm, BLOCK_N=bn, RP=RP,
                                         num_warps=WARPS)
                parts.append(usq)
            usum = parts[0].sum() if len(parts) == 1 else torch.cat(parts).sum()
            coef_scale = F.clip_by_rms(usum, p.numel(), clip_threshold)
        if psq:
            step_size = (ws[off_psq:off_psq + n_prog].sum().sqrt() / math.sqrt(p.numel())).clamp_min(
                1e-3) * lr
        else:
            step_size = torch.full((), lr, dtype=torch.float32, device=dev)
        coef = -step_size if coef_scale is None else -(step_size * coef_scale)
        sc = torch.stack([1.0 - step_size * weight_decay, coef]).float()
    sr = bool(stochastic_rounding) and p.dtype == torch.bfloat16
    seed_i = seed_arg(sr, seed)
    v = state.get("exp_avg_sq") if not factored else None
    for ch, gc, code, a_t, b_t in plans:
        n_c, tn_c, rpp_c = chunk_geo(gc)
        pc = p[ch.rows, ch.cols]
        m = state[ch.prefix + "exp_avg"] if code == FULL else ws
        vc = v[ch.rows, ch.cols] if v is not None else ws
        a_p, b_p, sa_m, sa_k, sb_k, sb_n, R, RP = lift_args(a_t, b_t)
        m_stored = factored and clip_threshold is not None
        adapm_write_kernel[(n_c,)](
            gc, pc, m, vc, r_fac[ch.rows] if factored else ws, c_fac[ch.cols] if factored else ws, a_p, b_p, scale,
            okm_i, okp_i, sc, seed_i, gc.shape[0], gc.shape[1], tn_c, rpp_c, gc.stride(0), gc.stride(1), pc.stride(0),
            pc.stride(1), m.stride(0) if code == FULL else 0, vc.stride(0) if v is not None else 0, sa_m, sa_k, sb_k,
            sb_n, R, ch.rows.start or 0, ch.cols.start or 0, N, b1, bc1, float(beta2), float(bc2), float(eps), sbc2,
            1.0 - lr * weight_decay, -lr, HAS_SCALE=has_scale, MOM=code, ADAM=not factored, M_STORED=m_stored,
            HAS_WD=weight_decay != 0, SC_DEV=factored, SR=sr, BLOCK_M=bm, BLOCK_N=bn, RP=RP, num_warps=WARPS)
    _compat.bump_versions([p])
    return okp
