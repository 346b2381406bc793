"""AdaPM (``optim/adapm.py``) on one tensor in Triton kernels: every momentum kind with the Adam or the factored second
moment, in few passes. A matrix, or a 0-D/1-D tensor seen as one row.

A matrix is updated chunk by chunk (one chunk, or the equal chunks of a ``SplitMomentum``), each chunk with its own
momentum kind; the second moment, the finite test and RMS(u) belong to the whole matrix. Passes (bytes per element
for a bf16 gradient and parameter, fp32 state):

* ``stats``: reads g (and p for the relative step): the partial sums of g (the finite test) and, for the factored
  second moment, the row and column sums of g^2 (and of p^2). 2 bytes (4 with ``relative_lr``).
* ``finalize`` and ``factors`` (small data, one program per block of rows or columns): factored: the row and column
  EMAs and the preconditioner's factors, the state committed where the whole matrix is finite; the finite flags.
* low-rank chunks (``products``: cuBLAS GEMMs on bfloat16 pieces, fp32-accurate): pg = P^T g (or g P) from one read
  of g in its own dtype (2 bytes); ``momentum``, on the r x b (or a x r) data: M <- beta1 M + (1 - beta1) pg and
  C = M / (1 - beta1^t) - pg; then the lift L = P C (or C P^T), an fp32 temporary of the chunk's size (4 bytes
  written), so that m_hat = g + L in the later passes (4 bytes read by each). Forming the rank-r product inside
  those passes' tiles instead kept them far from the memory bound.
* ``usq`` (factored with clipping: RMS(u) is needed before any write): u = m_hat * rsqrt(v_hat), partial sums of
  u^2. Full momentum writes m_new here (the finite test is known), so that the write pass reads m instead of g
  and m: reads g (+ m or L), writes m. none: 2 bytes, low-rank: 6, full: 10.
* ``write``: p <- p (1 - step wd) - step clip u. Adam: also m and v (one pass reads g, p, m, v and writes p, m, v:
  22 bytes for full momentum, 14 without, 18 low-rank). Factored: reads g (or m for full momentum) and p (and L),
  writes p: 6 bytes, low-rank 10.

Totals per element (bf16 p and g): Adam v: full 24, low-rank 26, none 16; factored v: full 20, low-rank 24, none 10.
The scalars that depend on the data (finite flags, clip factor, relative step) stay on the device: the kernels read
them through pointers, so nothing waits for the device. A basis refresh (``momentum.orthonormal_basis``) runs in
torch on an fp32 copy of the chunk's gradient, QR factorisations only (no host synchronisation).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import functional as F
from .. import momentum as Mom
from . import products
from .common import a16, and_flag, round_to_bf16, strides_known, sum_parts
from .config import cdiv, on_change, tiling
from .launch import LaunchContext, Launcher, keyed_launch, on_tensor_device, seed_arg
from .products import store_pieces

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


_INTS = ["M", "N", "TM", "TN", "rows_per_prog", "sg_m", "sg_n", "sp_m", "sp_n", "sm_m", "sv_m", "n_fin", "off_psq",
         "off_row", "off_col", "off_r", "off_c", "off_usq", "n_usq", "n_psq", "off_out", "row0", "col0", "n_total",
         "seed", "n_rp", "n_blk", "off_blk", "row_len", "row_stride", "part_stride"]


def _jit(fn):
    """``triton.jit`` without specialising any integer argument (see ``launch.Launcher``: a compiled variant then
    depends on the constexprs and the pointers alone, and is called directly after its first launch)."""
    names = fn.__code__.co_varnames[:fn.__code__.co_argcount]
    return triton.jit(do_not_specialize=[n for n in names if n in _INTS])(fn)


@_jit
def adapm_stats_kernel(g_ptr, p_ptr, scale_ptr, ws_ptr, M, N, TN, rows_per_prog, sg_m, sg_n, sp_m, sp_n, off_psq,
                       off_row, off_col, HAS_SCALE: tl.constexpr, FACTORED: tl.constexpr, PSQ: tl.constexpr,
                       ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Per program (a row group of one column tile): sum g at ws[pid], sum p^2 at ws[off_psq + pid]; FACTORED: the
    row sums of g^2 of its column tile at ws[off_row + tile * M + row], its column sums at ws[off_col + group * N +
    col]. The gradient is scaled first (the torch path squares the scaled gradient)."""
    N, _, sg_m, sg_n = strides_known(N, 0, sg_m, sg_n, ALIGN, G_UNIT)
    _, _, sp_m, sp_n = strides_known(N, 0, sp_m, sp_n, ALIGN, P_UNIT)
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
def _sum_partials(ws_ptr, off, stride, n_parts, idx, msk, BLOCK: tl.constexpr, PB: tl.constexpr = 8):
    """Entries ``idx`` summed over ``n_parts`` partial rows (``stride`` apart) at ``ws_ptr + off``, PB rows per load
    (loads in flight: a single program reads them all)."""
    parts = tl.arange(0, PB)
    acc = tl.zeros([PB, BLOCK], dtype=tl.float32)
    for k0 in range(0, n_parts, PB):
        kk = k0 + parts
        acc += tl.load(ws_ptr + off + kk[:, None] * stride + idx[None, :], mask=(kk < n_parts)[:, None] & msk[None, :],
                       other=0.0)
    return tl.sum(acc, axis=0)


@_jit
def adapm_finalize_kernel(ws_ptr, row_ptr, col_ptr, M, N, TM, TN, n_rp, off_row, off_col, off_r, off_c, off_blk,
                          beta2, eps1, ROW_STATE: tl.constexpr, BLOCK: tl.constexpr):
    """Factored second moment, one program per block of BLOCK rows (the first ``n_rp``) or columns: the means of
    g^2 + eps1 from the stats pass's partial sums and their EMAs, into ws[off_r + i] / ws[off_c + j] (the state is
    committed by ``adapm_factors_kernel`` once the whole matrix is known finite). Per program at ws[off_blk + 2 pid]
    the sum of its means (the finite test) and at ws[off_blk + 2 pid + 1] the sum of its new rows (mean(row)).
    Without ROW_STATE (a 0-D/1-D tensor as one row: its second moment is the full v, stored as the column state)
    the row's statistic is its mean."""
    pid = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    if pid < n_rp:
        idx = pid * BLOCK + offs
        msk = idx < M
        mean = tl.div_rn(_sum_partials(ws_ptr, off_row, M, TN, idx, msk, BLOCK), N * 1.0) + eps1
        if ROW_STATE:
            new = tl.load(row_ptr + idx, mask=msk, other=0.0) * beta2 + mean * (1.0 - beta2)
        else:
            new = mean
        tl.store(ws_ptr + off_r + idx, new, mask=msk)
        row_sum = tl.sum(tl.where(msk, new, 0.0), axis=0)
    else:
        idx = (pid - n_rp) * BLOCK + offs
        msk = idx < N
        mean = tl.div_rn(_sum_partials(ws_ptr, off_col, N, TM, idx, msk, BLOCK) + eps1 * M, M * 1.0)
        new = tl.load(col_ptr + idx, mask=msk, other=1.0) * beta2 + mean * (1.0 - beta2)
        tl.store(ws_ptr + off_c + idx, new, mask=msk)
        row_sum = 0.0
    tl.store(ws_ptr + off_blk + 2 * pid, tl.sum(tl.where(msk, mean, 0.0), axis=0))
    tl.store(ws_ptr + off_blk + 2 * pid + 1, row_sum)


@_jit
def adapm_factors_kernel(ws_ptr, row_ptr, col_ptr, flags_ptr, n_fin, M, N, n_rp, n_blk, off_r, off_c, off_blk,
                         FACTORED: tl.constexpr, ROW_STATE: tl.constexpr, BLOCK: tl.constexpr, FB: tl.constexpr):
    """Program 0: the finite flags into ``flags`` (int32: [momentum: sum g finite, parameter: that and the factored
    statistics finite]). FACTORED, one program per block as in ``adapm_finalize_kernel``: the new row/column
    statistics committed to the state where all are finite, and the preconditioner's factors rsqrt(row / mean(row))
    at ws[off_r + i] and rsqrt(col) at ws[off_c + j] (1 for the one row without ROW_STATE). Every program sums the
    per-block partials itself, in the same order."""
    pid = tl.program_id(0)
    if FACTORED:
        blk = tl.arange(0, FB)
        fsum = tl.zeros([FB], dtype=tl.float32)
        rsum = tl.zeros([FB], dtype=tl.float32)
        for b0 in range(0, n_blk, FB):
            bm = b0 + blk < n_blk
            fsum += tl.load(ws_ptr + off_blk + 2 * (b0 + blk), mask=bm, other=0.0)
            rsum += tl.load(ws_ptr + off_blk + 2 * (b0 + blk) + 1, mask=bm, other=0.0)
        ok2 = (tl.abs(tl.sum(fsum, axis=0)) <= 3.4028234663852886e38).to(tl.int8)  # 0 for NaN and +-inf
        row_mean = tl.div_rn(tl.sum(rsum, axis=0), M * 1.0)
        offs = tl.arange(0, BLOCK)
        if pid < n_rp:
            idx = pid * BLOCK + offs
            msk = idx < M
            new = tl.load(ws_ptr + off_r + idx, mask=msk, other=1.0)
            if ROW_STATE:
                tl.store(row_ptr + idx, new, mask=and_flag(msk, ok2))
                r = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(new, row_mean)))
            else:
                r = tl.full([BLOCK], 1.0, tl.float32)
            tl.store(ws_ptr + off_r + idx, r, mask=msk)
        else:
            idx = (pid - n_rp) * BLOCK + offs
            msk = idx < N
            new = tl.load(ws_ptr + off_c + idx, mask=msk, other=1.0)
            tl.store(col_ptr + idx, new, mask=and_flag(msk, ok2))
            tl.store(ws_ptr + off_c + idx, tl.div_rn(1.0, tl.sqrt_rn(new)), mask=msk)
    if pid == 0:
        ok1 = (tl.abs(sum_parts(ws_ptr, 0, n_fin, 1024)) <= 3.4028234663852886e38).to(tl.int32)
        tl.store(flags_ptr, ok1)
        if FACTORED:
            ok1 = ok1 & ok2.to(tl.int32)
        tl.store(flags_ptr + 1, ok1)


@_jit
def adapm_usq_kernel(g_ptr, m_ptr, scale_ptr, flags_ptr, ws_ptr, M, N, TN, rows_per_prog, sg_m, sg_n, sm_m, off_r,
                     off_c, off_out, beta1, bc1, sbc2,
                     HAS_SCALE: tl.constexpr, MOM: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Factored second moment: partial sums of u^2 (u = m_hat * r * c * sqrt(bc2)) at ws[off_out + pid]. Full
    momentum (MOM 1): the new m is stored here (where the momentum's finite flag holds). Low rank (MOM 2): ``m_ptr``
    is the lift, m_hat = g + lift."""
    N, _, sg_m, sg_n = strides_known(N, 0, sg_m, sg_n, ALIGN, G_UNIT)
    if ALIGN:
        sm_m = a16(sm_m)
    pid = tl.program_id(0)
    r0, cols, cmask, lrows = _tile_setup(pid, TN, rows_per_prog, N, BLOCK_M, BLOCK_N)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    okm = tl.load(flags_ptr).to(tl.int8)
    c = tl.load(ws_ptr + off_c + cols, mask=cmask, other=0.0)
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
            mh = g + tl.load(m_ptr + r64 * sm_m + cols[None, :], mask=mask, other=0.0)
        r = tl.load(ws_ptr + off_r + rows, mask=rmask, other=0.0)
        u = mh * r[:, None] * c[None, :] * sbc2
        acc += tl.where(mask, u * u, 0.0)
    tl.store(ws_ptr + off_out + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@_jit
def adapm_write_kernel(g_ptr, p_ptr, m_ptr, v_ptr, scale_ptr, flags_ptr, ws_ptr, seed, M, N, TN, rows_per_prog,
                       sg_m, sg_n, sp_m, sp_n, sm_m, sv_m, off_r, off_c, off_usq, n_usq, off_psq, n_psq, row0, col0,
                       n_total, lr, weight_decay, beta1, bc1, beta2, bc2, eps, sbc2, numel_f, sqrt_numel,
                       clip_threshold, HAS_SCALE: tl.constexpr, MOM: tl.constexpr,
                       ADAM: tl.constexpr, M_STORED: tl.constexpr, HAS_WD: tl.constexpr, HAS_USQ: tl.constexpr,
                       PSQ: tl.constexpr, SR: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                       P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """p <- p (1 - step wd) - step clip u where the parameter's finite flag holds. ADAM: v (and full momentum's m)
    are updated here too, where the momentum's flag holds, step = lr. Factored: u = m_hat * r * c * sqrt(bc2), the
    clip factor 1/max(1, RMS(u)/d) and the relative step lr * max(1e-3, RMS(p)) from the partial sums, which every
    program reduces itself (a few, L2-resident) in the same order."""
    N, _, sg_m, sg_n = strides_known(N, 0, sg_m, sg_n, ALIGN, G_UNIT)
    _, _, sp_m, sp_n = strides_known(N, 0, sp_m, sp_n, ALIGN, P_UNIT)
    if ALIGN:
        sm_m, sv_m = a16(sm_m), a16(sv_m)
    pid = tl.program_id(0)
    r0, cols, cmask, lrows = _tile_setup(pid, TN, rows_per_prog, N, BLOCK_M, BLOCK_N)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    okm = tl.load(flags_ptr).to(tl.int8)
    okp = tl.load(flags_ptr + 1).to(tl.int8)
    step = lr
    if PSQ:
        step = tl.maximum(tl.sqrt_rn(sum_parts(ws_ptr, off_psq, n_psq, 1024)) / sqrt_numel, 1e-3) * lr
    coef = -step
    if HAS_USQ:
        usq = sum_parts(ws_ptr, off_usq, n_usq, 1024)
        coef = -(step * (1.0 / tl.maximum(tl.sqrt_rn(usq / numel_f) / clip_threshold, 1.0)))
    decay = 1.0 - step * weight_decay
    if not ADAM:
        c = tl.load(ws_ptr + off_c + cols, mask=cmask, other=0.0)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=1):
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
            mh = g + tl.load(m_ptr + r64 * sm_m + cols[None, :], mask=mask, other=0.0)
        if ADAM:
            v_ptrs = v_ptr + r64 * sv_m + cols[None, :]
            v = _lerp(g * g, tl.load(v_ptrs, mask=mask, other=0.0), beta2)
            tl.store(v_ptrs, v, mask=and_flag(mask, okm))
            u = tl.div_rn(mh, tl.sqrt_rn(tl.div_rn(v, bc2)) + eps)
        else:
            r = tl.load(ws_ptr + off_r + rows, mask=rmask, other=0.0)
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


@_jit
def adapm_momentum_kernel(parts_ptr, m_ptr, c_ptr, scale_ptr, flags_ptr, n_total, row_len, row_stride, part_stride,
                          beta1, bc1, N_PARTS: tl.constexpr, HAS_SCALE: tl.constexpr, C_PATTERN: tl.constexpr,
                          BLOCK: tl.constexpr):
    """A low-rank chunk's small momentum, elementwise over the n_total entries of M (r x b or a x r, rows of
    ``row_len``): pg = the sum of the projection's N_PARTS blocks (entry e of block j at parts[(e // row_len) *
    row_stride + e % row_len + j * part_stride]) times the gradient's scale, M <- lerp(pg, M, beta1) where the
    momentum's finite flag holds, and C = M / bc1 - pg, the low-rank estimate's coefficients (m_hat = g + lift(C)),
    stored as the 6 bfloat16 pieces of the lift's operand in the order C_PATTERN (``products.pack``), rows of 6
    ``row_len``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_total
    row = (offs // row_len).to(tl.int64)
    col = offs % row_len
    at = row * row_stride + col
    pg = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(N_PARTS):
        pg += tl.load(parts_ptr + at + j * part_stride, mask=mask, other=0.0)
    if HAS_SCALE:  # the projection is linear in g: scaled here, once
        pg = pg * tl.load(scale_ptr).to(tl.float32)
    okm = tl.load(flags_ptr).to(tl.int8)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    m = tl.where(okm != 0, _lerp(pg, m, beta1), m)
    tl.store(m_ptr + offs, m, mask=mask)
    store_pieces(c_ptr + row * (6 * row_len) + col, tl.div_rn(m, bc1) - pg, mask, row_len, C_PATTERN, 6)


stats = Launcher(adapm_stats_kernel, "HAS_SCALE", "FACTORED", "PSQ", "ALIGN", "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N")
finalize = Launcher(adapm_finalize_kernel, "ROW_STATE", "BLOCK")
factors = Launcher(adapm_factors_kernel, "FACTORED", "ROW_STATE", "BLOCK", "FB")
momentum = Launcher(adapm_momentum_kernel, "N_PARTS", "HAS_SCALE", "C_PATTERN", "BLOCK")
usq = Launcher(adapm_usq_kernel, "HAS_SCALE", "MOM", "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N")
write = Launcher(adapm_write_kernel, "HAS_SCALE", "MOM", "ADAM", "M_STORED", "HAS_WD", "HAS_USQ", "PSQ", "SR", "ALIGN",
                 "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N")


# ------------------------------------------------------------------------------------------------ host side
_MOMENTUM_BLOCK = 1024
#: rows or columns per program of the second-moment statistics' finalize and factors passes
_FINISH_BLOCK = 256


def _low_rank(gc, state, ch, beta1: float, t: float, flags, basis, fill: bool, scale, run, keys: list,
              slot: int) -> torch.Tensor:
    """The small part of a low-rank chunk (``momentum.momentum_estimate_``'s, without forming m_hat): refresh the
    basis with the basis function ``basis`` if given (in torch), update M where the momentum's finite flag holds
    (``adapm_momentum_kernel``), and return the lift L = lift(M / bc - pg) (fp32, the chunk's shape): m_hat = g + L.
    ``keys``, ``slot``: the plan's launch keys, the chunk's first slot (pieces; momentum at slot + 3, at a refresh
    slot + 4)."""
    P, Mst = state[ch.prefix + "proj"], state[ch.prefix + "exp_avg_lr"]
    left = gc.shape[0] <= gc.shape[1]
    side = "left" if left else "right"
    r = P.shape[1]
    refresh = basis is not None
    if refresh:  # every update_proj_gap steps: a full fp32 copy of the chunk's gradient for the factorisation
        ok = flags[0] != 0
        g32 = F.upcast(gc, scale)
        safe = torch.where(ok, g32, torch.zeros((), dtype=g32.dtype, device=g32.device))
        P_new = basis(safe, r, side)
        Mom.refresh_basis_(P, Mst, P_new, safe, side, carry_weight=1.0 - beta1 ** (t - 1), ok=ok, fill=fill)
        parts, scale = Mom.project(g32, P, side), None  # already scaled
        del g32, safe
        Pp = products.pieces(P, _P_LIFT[left], run, keys, slot)
        n_parts, layout = 1, ((Mst.numel(), 0, 0) if left else (r, r, 0))  # row_len, row_stride, part_stride
    else:
        # P's pieces for the projection and, beside them, for the lift (P is the lift's A on the left, its B^T on the
        # right)
        Pp = products.pieces(P, _P_BOTH[left], run, keys, slot)
        parts = products.project(gc, Pp[:, :3 * r], side, run)
        Pp = Pp[:, 3 * r:]
        n_parts = 3
        layout = (Mst.numel(), 0, Mst.numel()) if left else (r, 3 * r, r)
    Cp = torch.empty((Mst.shape[0], 6 * Mst.shape[1]), dtype=torch.bfloat16, device=Mst.device)
    n = Mst.numel()
    keyed_launch(momentum, keys, slot + (4 if refresh else 3), cdiv(n, _MOMENTUM_BLOCK),
                 (parts, Mst, Cp, flags if scale is None else scale, flags, n, *layout, beta1, 1.0 - beta1 ** t),
                 (n_parts, scale is not None, _C_LIFT[left], _MOMENTUM_BLOCK), 4, run[0], run[1])
    if left:  # C (r x b): its pieces are the row blocks of B (6r x b)
        return products.lift(Pp, Cp.view(6 * r, -1))
    return products.lift(Cp, Pp.mT)


#: by side (True: left): P's pieces for the lift alone, for the projection and the lift, and C's for the lift
_P_LIFT = {True: products.LIFT_A, False: products.LIFT_B}
_P_BOTH = {k: products.PROJECT + v for k, v in _P_LIFT.items()}
_C_LIFT = {True: products.pack(products.LIFT_B), False: products.pack(products.LIFT_A)}

_WHOLE = slice(None)


def _part(t: torch.Tensor, ch) -> torch.Tensor:
    """The chunk's rows and columns of the matrix ``t`` (``t`` itself for a whole-matrix chunk: no view to make)."""
    return t if ch.rows == _WHOLE and ch.cols == _WHOLE else t[ch.rows, ch.cols]


def _bounds(s: slice, n: int) -> tuple[int, int]:
    return s.start or 0, n if s.stop is None else s.stop


def _aligned(N: int, *strides: int) -> bool:
    return N % 16 == 0 and all(x % 16 == 0 for x in strides)


class _ChunkPlan(NamedTuple):
    kind: str
    whole: bool  # the chunk is the whole matrix: g, p, m and v themselves, no views
    state_m: str | None  # the state key of full momentum's m
    n_prog: int  # programs of its usq and write passes
    usq_ints: tuple  # the usq pass's integer arguments
    usq_consts: tuple
    write_ints: tuple  # the write pass's integer arguments before its floats
    write_consts: tuple


class _Plan(NamedTuple):
    """Everything about one matrix update that does not change from step to step (shapes, strides, settings,
    workspace layout, the kernels' integer arguments and constexprs): built once per matrix and layout and cached,
    as fused mode updates the same tensors every step."""
    n_prog: int
    ws_numel: int
    stats_ints: tuple
    stats_consts: tuple
    n_blk: int
    finalize_ints: tuple
    factors_ints: tuple
    factors_consts: tuple
    row_state: bool
    chunks: tuple  # _ChunkPlan per chunk
    keys: list  # per launch slot, the launch-cache key of its pointer arguments (``launch.Launcher``), set at first use


_PLANS: dict = {}
_MAX_PLANS = 4096  # above every model's matrix count
on_change(_PLANS.clear)


def _build_plan(p, g, state, chunks, factored: bool, has_usq: bool, psq: bool, has_scale: bool, adam: bool,
                has_wd: bool, sr: bool) -> _Plan:
    Mrows, N = p.shape
    geo = tiling(Mrows, N)
    bm, bn, TM, TN, rpp = geo["BLOCK_M"], geo["BLOCK_N"], geo["TM"], geo["TN"], geo["rows_per_prog"]
    n_prog = TM * TN
    bounds = [(_bounds(ch.rows, Mrows), _bounds(ch.cols, N)) for ch in chunks]
    per_chunk = []
    for (r0, r1), (c0, c1) in bounds:
        rows, tn = r1 - r0, cdiv(c1 - c0, bn)
        rpp_c = tiling(rows, c1 - c0)["rows_per_prog"]
        per_chunk.append((cdiv(rows, rpp_c) * tn, tn, rpp_c))
    n_rp = cdiv(Mrows, _FINISH_BLOCK) if factored else 0
    n_blk = n_rp + cdiv(N, _FINISH_BLOCK) if factored else 1
    # workspace (fp32): partial sums of g and p^2, of the row and column sums of g^2, of u^2 per chunk; then r and c,
    # and the finalize programs' two sums each
    off_psq, off_row = n_prog, 2 * n_prog
    off_col = off_row + (TN * Mrows if factored else 0)
    off_usq = off_col + (TM * N if factored else 0)
    n_usq = sum(c[0] for c in per_chunk) if has_usq else 0
    off_r = off_usq + n_usq
    off_c = off_r + (Mrows if factored else 0)
    off_blk = off_c + (N if factored else 0)
    ws_numel = off_blk + (2 * n_blk if factored else 0)
    sg, sp = g.stride(), p.stride()
    align = _aligned(N, sg[0], sp[0]) and sg[1] == 1 and sp[1] == 1
    v = None if factored else state["exp_avg_sq"]
    out, off_out = [], off_usq
    for ch, ((r0, r1), (c0, c1)), (n_c, tn_c, rpp_c) in zip(chunks, bounds, per_chunk):
        rows, cols = r1 - r0, c1 - c0
        gc, pc = _part(g, ch), _part(p, ch)
        # the momentum operand's row stride: full momentum's m, the low-rank lift (a fresh chunk-shaped tensor)
        # (a chunk's momentum state has the chunk's shape; the Adam v is the whole matrix's)
        sm = (state[ch.prefix + "exp_avg"].stride(0) if ch.kind == "full" else cols if ch.kind == "low_rank" else 0)
        sv = _part(v, ch).stride(0) if v is not None else 0
        code = _KIND_CODES[ch.kind]
        g_unit = gc.stride(1) == 1
        al_u = _aligned(cols, gc.stride(0), sm) and g_unit
        al_w = _aligned(cols, gc.stride(0), pc.stride(0), sm, sv) and g_unit and pc.stride(1) == 1
        out.append(_ChunkPlan(
            ch.kind, ch.rows == _WHOLE and ch.cols == _WHOLE, ch.prefix + "exp_avg" if ch.kind == "full" else None,
            n_c,
            (rows, cols, tn_c, rpp_c, gc.stride(0), gc.stride(1), sm, off_r + r0, off_c + c0, off_out),
            (has_scale, code, al_u, g_unit, bm, bn),
            (rows, cols, tn_c, rpp_c, gc.stride(0), gc.stride(1), pc.stride(0), pc.stride(1), sm, sv, off_r + r0,
             off_c + c0, off_usq, n_usq, off_psq, n_prog, r0, c0, N),
            (has_scale, code, adam, has_usq, has_wd, has_usq, psq, sr, al_w, g_unit, pc.stride(1) == 1, bm, bn)))
        if has_usq:
            off_out += n_c
    row_state = factored and "exp_avg_sq_row" in state
    # launch slots: stats, finalize, factors, then per chunk pieces, usq, write, momentum, momentum at a refresh
    # (whose scale argument is the flags: its projection is scaled already)
    return _Plan(n_prog, ws_numel, (Mrows, N, TN, rpp, sg[0], sg[1], sp[0], sp[1], off_psq, off_row, off_col),
                 (has_scale, factored, psq, align, sg[1] == 1, sp[1] == 1, bm, bn), n_blk,
                 (Mrows, N, TM, TN, n_rp, off_row, off_col, off_r, off_c, off_blk),
                 (n_prog, Mrows, N, n_rp, n_blk, off_r, off_c, off_blk), (factored, row_state, _FINISH_BLOCK, 64),
                 row_state, tuple(out), [None] * (3 + 5 * len(chunks)))


@on_tensor_device
def adapm_update_(p, g, state, chunks: tuple, *, flags: torch.Tensor, t: float, lr: float, beta1: float, beta2: float,
                  bc2: float, eps: float, weight_decay: float, second_moment: str, clip_threshold, relative_lr: bool,
                  basis, fill: bool, grad_scale, stochastic_rounding: bool, seed: int) -> None:
    """One AdaPM step on ``p`` (``optim.adapm.AdaPM._update``'s maths; ``state['step']`` already at ``t``): a matrix,
    or a 0-D/1-D tensor seen as one row, in ``chunks`` (a tuple of ``kernels.AdaPMChunk``, the same objects at every
    step of ``p``: the launch plan is keyed on them).
    ``basis``: None, or at a basis refresh a function chunk index -> that chunk's basis function. ``flags`` (int32
    [2], on the device) receives the finite flags [gradient finite, that and the factored statistics finite]; when
    not, p and the state are left as they were. The caller bumps p's version counter (``_compat.bump_versions``)."""
    whole = p
    if p.dim() < 2:  # one row; its full second moment (factored: exp_avg_sq) is the column state of that row
        p, g = p.view(1, -1), g.view(1, -1)
        state = {k: v if k == "step" else v.view(1, -1) for k, v in state.items()}
    dev = p.device
    ctx = LaunchContext(p)
    stream, device = ctx.stream, ctx.device
    factored = second_moment == "factored"
    has_scale = grad_scale is not None
    scale = grad_scale if has_scale else p
    if has_scale and not isinstance(scale, torch.Tensor):
        scale = torch.full((), float(scale), dtype=torch.float32, device=dev)
    psq = factored and relative_lr
    has_usq = factored and clip_threshold is not None
    sr = bool(stochastic_rounding) and p.dtype == torch.bfloat16
    # what the plan depends on: the matrix (identity, storage, layout), its chunks (immutable objects, held by the
    # key: their identity is not reused while the plan is cached), its state buffers, g's dtype, strides and
    # alignment, the pointer arguments' dtypes and alignment (scale, flags), the settings that select kernels
    key = (id(whole), p.data_ptr(), p.shape, p.stride(), p.dtype, g.dtype, g.stride(), g.data_ptr() % 16,
           flags.data_ptr() % 16, scale.dtype, scale.data_ptr() % 16, has_scale, factored, psq, has_usq,
           weight_decay != 0, sr, chunks, tuple(v.data_ptr() for k, v in state.items() if k != "step"))
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = _build_plan(p, g, state, chunks, factored, has_usq, psq, has_scale, not factored,
                                         weight_decay != 0, sr)
    ws = torch.empty(plan.ws_numel, dtype=torch.float32, device=dev)
    keyed_launch(stats, plan.keys, 0, plan.n_prog, (g, p, scale, ws) + plan.stats_ints, plan.stats_consts, WARPS,
                 stream, device)
    row_st = state["exp_avg_sq_row"] if plan.row_state else ws
    col_st = (state["exp_avg_sq_col"] if plan.row_state else state["exp_avg_sq"]) if factored else ws
    if factored:
        keyed_launch(finalize, plan.keys, 1, plan.n_blk, (ws, row_st, col_st) + plan.finalize_ints
                     + (float(beta2), float(eps) ** 2), (plan.row_state, _FINISH_BLOCK), 4, stream, device)
    keyed_launch(factors, plan.keys, 2, plan.n_blk, (ws, row_st, col_st, flags) + plan.factors_ints,
                 plan.factors_consts, 4, stream, device)
    b1 = float(beta1)
    bc1 = 1.0 - b1 ** t
    sbc2 = math.sqrt(bc2)
    v = None if factored else state["exp_avg_sq"]
    gcs, moments = [], []
    for i, (ch, cp) in enumerate(zip(chunks, plan.chunks)):
        gc = g if cp.whole else g[ch.rows, ch.cols]
        gcs.append(gc)
        if cp.kind == "low_rank":
            m = _low_rank(gc, state, ch, b1, t, flags, None if basis is None else basis(i), fill,
                          scale if has_scale else None, (stream, device, None), plan.keys, 3 + 5 * i)
        elif cp.kind == "full":
            m = state[cp.state_m]
        else:
            m = ws
        moments.append(m)
    if has_usq:
        for i, (cp, gc, m) in enumerate(zip(plan.chunks, gcs, moments)):
            keyed_launch(usq, plan.keys, 4 + 5 * i, cp.n_prog,
                         (gc, m, scale, flags, ws) + cp.usq_ints + (b1, bc1, sbc2), cp.usq_consts, WARPS, stream,
                         device)
    seed_i = seed_arg(sr, seed)
    numel = p.numel()
    floats = (float(lr), float(weight_decay), b1, bc1, float(beta2), float(bc2), float(eps), sbc2, float(numel),
              math.sqrt(numel), float(clip_threshold or 1.0))
    for i, (ch, cp, gc, m) in enumerate(zip(chunks, plan.chunks, gcs, moments)):
        pc = p if cp.whole else p[ch.rows, ch.cols]
        vc = ws if v is None else v if cp.whole else v[ch.rows, ch.cols]
        keyed_launch(write, plan.keys, 5 + 5 * i, cp.n_prog,
                     (gc, pc, m, vc, scale, flags, ws, seed_i) + cp.write_ints + floats, cp.write_consts, WARPS,
                     stream, device)
