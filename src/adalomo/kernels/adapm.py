"""AdaPM (``optim/adapm.py``) in Triton kernels: every momentum kind with the Adam or the factored second moment, for
all the tensors of a call (a fused bucket, or a param group's classic step) in a few grouped launches. A matrix, or a
0-D/1-D tensor seen as one row.

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
  those passes' tiles instead costs as much (it is formed twice; docs/adapm.md has the measurement).
* ``usq`` (factored with clipping: RMS(u) is needed before any write): u = m_hat * rsqrt(v_hat), partial sums of
  u^2. Full momentum writes m_new here (the finite test is known), so that the write pass reads m instead of g
  and m: reads g (+ m or L), writes m. none: 2 bytes, low-rank: 6, full: 10.
* ``write``: p <- p (1 - step wd) - step clip u. Adam: also m and v (one pass reads g, p, m, v and writes p, m, v:
  22 bytes for full momentum, 14 without, 18 low-rank). Factored: reads g (or m for full momentum) and p (and L),
  writes p: 6 bytes, low-rank 10.

Totals per element (bf16 p and g): Adam v: full 24, low-rank 26, none 16; factored v: full 20, low-rank 24, none 10.

Launches. Every pass runs once per wave for all its tensors (``stats`` once per layout class, ``usq`` and ``write``
once per chunk class: momentum kind and layout), each program finding its matrix's or chunk's geometry, pointers
and workspace offsets in a row of int64 metadata (``MAT_COLUMNS``, ``CHUNK_COLUMNS``), as AdaLomo's grouped
kernels do. Only a low-rank chunk's own small work (its pieces, two GEMMs and the momentum kernel) is launched per
chunk. A wave is a run of consecutive tensors of the call whose lifts, alive together until its write pass in one
buffer with its partial sums (a basis refresh's fp32 gradient copy takes the chunk's lift's place), fit what the
memory planner counts for the call's largest single tensor (``memory._adapm_kernel_update_bytes``). The static
metadata of a call (shapes, strides, state pointers, workspace and lift offsets, the groups and waves, the program
maps) is its launch plan, built once and cached; a call writes the gradient, buffer and flag pointers, the seeds
and the step's floats into the plan's host template and copies it to the device, one copy per wave. The scalars
that depend on the data (finite flags, clip factor, relative step) stay on the device: nothing waits for it. At a
basis refresh the new bases of all the call's low-rank chunks are made first (``_new_bases``): each chunk's range
sketch in torch (QR factorisations only, no host synchronisation), then the small problems of all of them in one
launch (``subspace``).
"""

from __future__ import annotations

import ctypes
import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .. import momentum as Mom
from . import products, subspace
from .common import a16, and_flag, round_to_bf16, strides_known, sum_parts
from .config import cdiv, on_change, tiling
from .grouped import _constexprs, grouped_key, meta_int, meta_pointer, program_map
from .launch import TL_DTYPES, LaunchContext, Launcher, keyed_launch, on_tensor_device, seed_arg
from .products import store_pieces

__all__ = ["adapm_update_many_"]

NONE, FULL, LOW_RANK = 0, 1, 2
_KIND_CODES = {"none": NONE, "full": FULL, "low_rank": LOW_RANK}
WARPS = 8

#: a matrix's int64 metadata row; the first three are written per call (the rest is the plan's)
MAT_COLUMNS = ("grad", "flags", "workspace", "param", "row_state", "col_state", "M", "N", "TM", "TN",
               "rows_per_prog", "g_stride_m", "g_stride_n", "p_stride_m", "p_stride_n", "n_rp", "n_blk",
               "has_row_state", "first_prog", "first_fprog", "off_psq", "off_row", "off_col", "off_r", "off_c",
               "off_blk")
MAT_FLOATS = ("beta2",)
#: a chunk's int64 metadata row; the first five are written per call. ``m``: full momentum's m, a low-rank chunk's
#: lift, or nothing; ``v``: the Adam second moment's rows of the chunk
CHUNK_COLUMNS = ("grad", "m", "flags", "workspace", "seed", "param", "v", "rows", "cols", "col_tiles",
                 "rows_per_prog", "g_stride_m", "g_stride_n", "p_stride_m", "p_stride_n", "m_stride", "v_stride",
                 "off_r", "off_c", "off_out", "off_usq", "n_usq", "off_psq", "n_psq", "row0", "col0", "n_total",
                 "first_usq", "first_write")
CHUNK_FLOATS = ("bc1", "beta2", "bc2", "sbc2", "numel", "sqrt_numel")


def _width(n: int, mult: int) -> int:
    return cdiv(n, mult) * mult


MAT_W, MAT_FW = tl.constexpr(_width(len(MAT_COLUMNS), 2)), tl.constexpr(_width(len(MAT_FLOATS), 4))
CH_W, CH_FW = tl.constexpr(_width(len(CHUNK_COLUMNS), 2)), tl.constexpr(_width(len(CHUNK_FLOATS), 4))
MAT = _constexprs("MAT", MAT_COLUMNS)
MATF = _constexprs("MATF", MAT_FLOATS)
CH = _constexprs("CH", CHUNK_COLUMNS)
CHF = _constexprs("CHF", CHUNK_FLOATS)


@triton.jit
def _rows(meta_ptr, fmeta_ptr, pmap_ptr, W: tl.constexpr, FW: tl.constexpr):
    """(program id, its int64 and fp32 metadata rows) in a grouped launch."""
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    return pid, meta_ptr + t * W, fmeta_ptr + t * FW


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
def adapm_stats_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, HAS_SCALE: tl.constexpr, FACTORED: tl.constexpr,
                       PSQ: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                       G_DT: tl.constexpr, P_DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per program (a row group of one column tile of its matrix): sum g at ws[pid], sum p^2 at ws[off_psq + pid];
    FACTORED: the row sums of g^2 of its column tile at ws[off_row + tile * M + row], its column sums at
    ws[off_col + group * N + col] (``pid`` counted within the matrix, ``ws`` its workspace). The gradient is scaled
    first (the torch path squares the scaled gradient)."""
    pid, row, _ = _rows(meta_ptr, fmeta_ptr, pmap_ptr, MAT_W, MAT_FW)
    pid -= meta_int(row, MAT.first_prog)
    g_ptr = meta_pointer(row, MAT.grad, G_DT, ALIGN)
    p_ptr = meta_pointer(row, MAT.param, P_DT, ALIGN)
    ws_ptr = meta_pointer(row, MAT.workspace, tl.float32, True)
    M, TN, rows_per_prog = meta_int(row, MAT.M), meta_int(row, MAT.TN), meta_int(row, MAT.rows_per_prog)
    off_psq, off_row, off_col = meta_int(row, MAT.off_psq), meta_int(row, MAT.off_row), meta_int(row, MAT.off_col)
    N, _, sg_m, sg_n = strides_known(meta_int(row, MAT.N), 0, meta_int(row, MAT.g_stride_m),
                                     meta_int(row, MAT.g_stride_n), ALIGN, G_UNIT)
    _, _, sp_m, sp_n = strides_known(N, 0, meta_int(row, MAT.p_stride_m), meta_int(row, MAT.p_stride_n), ALIGN,
                                     P_UNIT)
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


@triton.jit
def adapm_finalize_kernel(meta_ptr, fmeta_ptr, pmap_ptr, eps1, BLOCK: tl.constexpr):
    """Factored second moment, one program per block of BLOCK rows (a matrix's first ``n_rp``) or columns: the means
    of g^2 + eps1 from the stats pass's partial sums and their EMAs, into ws[off_r + i] / ws[off_c + j] (the state
    is committed by ``adapm_factors_kernel`` once the whole matrix is known finite). Per program at ws[off_blk + 2 k]
    the sum of its means (the finite test) and at ws[off_blk + 2 k + 1] the sum of its new rows (mean(row)).
    Without a row state (a 0-D/1-D tensor as one row: its second moment is the full v, stored as the column state)
    the row's statistic is its mean."""
    pid, row, frow = _rows(meta_ptr, fmeta_ptr, pmap_ptr, MAT_W, MAT_FW)
    pid -= meta_int(row, MAT.first_fprog)
    ws_ptr = meta_pointer(row, MAT.workspace, tl.float32, True)
    M, N, TM, TN = meta_int(row, MAT.M), meta_int(row, MAT.N), meta_int(row, MAT.TM), meta_int(row, MAT.TN)
    n_rp, off_blk = meta_int(row, MAT.n_rp), meta_int(row, MAT.off_blk)
    beta2 = tl.load(frow + MATF.beta2)
    offs = tl.arange(0, BLOCK)
    if pid < n_rp:
        idx = pid * BLOCK + offs
        msk = idx < M
        mean = tl.div_rn(_sum_partials(ws_ptr, meta_int(row, MAT.off_row), M, TN, idx, msk, BLOCK), N * 1.0) + eps1
        if meta_int(row, MAT.has_row_state) != 0:
            row_ptr = meta_pointer(row, MAT.row_state, tl.float32, False)
            new = tl.load(row_ptr + idx, mask=msk, other=0.0) * beta2 + mean * (1.0 - beta2)
        else:
            new = mean
        tl.store(ws_ptr + meta_int(row, MAT.off_r) + idx, new, mask=msk)
        row_sum = tl.sum(tl.where(msk, new, 0.0), axis=0)
    else:
        col_ptr = meta_pointer(row, MAT.col_state, tl.float32, False)
        idx = (pid - n_rp) * BLOCK + offs
        msk = idx < N
        mean = tl.div_rn(_sum_partials(ws_ptr, meta_int(row, MAT.off_col), N, TM, idx, msk, BLOCK) + eps1 * M,
                         M * 1.0)
        new = tl.load(col_ptr + idx, mask=msk, other=1.0) * beta2 + mean * (1.0 - beta2)
        tl.store(ws_ptr + meta_int(row, MAT.off_c) + idx, new, mask=msk)
        row_sum = 0.0
    tl.store(ws_ptr + off_blk + 2 * pid, tl.sum(tl.where(msk, mean, 0.0), axis=0))
    tl.store(ws_ptr + off_blk + 2 * pid + 1, row_sum)


@triton.jit
def adapm_factors_kernel(meta_ptr, fmeta_ptr, pmap_ptr, FACTORED: tl.constexpr, BLOCK: tl.constexpr,
                         FB: tl.constexpr):
    """A matrix's program 0: its finite flags into ``flags`` (int32: [momentum: sum g finite, parameter: that and
    the factored statistics finite]). FACTORED, one program per block as in ``adapm_finalize_kernel``: the new
    row/column statistics committed to the state where all are finite, and the preconditioner's factors
    rsqrt(row / mean(row)) at ws[off_r + i] and rsqrt(col) at ws[off_c + j] (1 for the one row without a row state).
    Every program sums the per-block partials itself, in the same order."""
    pid, row, _ = _rows(meta_ptr, fmeta_ptr, pmap_ptr, MAT_W, MAT_FW)
    pid -= meta_int(row, MAT.first_fprog)
    ws_ptr = meta_pointer(row, MAT.workspace, tl.float32, True)
    flags_ptr = meta_pointer(row, MAT.flags, tl.int32, False)
    M, N = meta_int(row, MAT.M), meta_int(row, MAT.N)
    if FACTORED:
        n_rp, n_blk, off_blk = meta_int(row, MAT.n_rp), meta_int(row, MAT.n_blk), meta_int(row, MAT.off_blk)
        off_r, off_c = meta_int(row, MAT.off_r), meta_int(row, MAT.off_c)
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
            if meta_int(row, MAT.has_row_state) != 0:
                row_ptr = meta_pointer(row, MAT.row_state, tl.float32, False)
                tl.store(row_ptr + idx, new, mask=and_flag(msk, ok2))
                r = tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(new, row_mean)))
            else:
                r = tl.full([BLOCK], 1.0, tl.float32)
            tl.store(ws_ptr + off_r + idx, r, mask=msk)
        else:
            col_ptr = meta_pointer(row, MAT.col_state, tl.float32, False)
            idx = (pid - n_rp) * BLOCK + offs
            msk = idx < N
            new = tl.load(ws_ptr + off_c + idx, mask=msk, other=1.0)
            tl.store(col_ptr + idx, new, mask=and_flag(msk, ok2))
            tl.store(ws_ptr + off_c + idx, tl.div_rn(1.0, tl.sqrt_rn(new)), mask=msk)
    if pid == 0:
        n_fin = meta_int(row, MAT.TM) * meta_int(row, MAT.TN)
        ok1 = (tl.abs(sum_parts(ws_ptr, 0, n_fin, 1024)) <= 3.4028234663852886e38).to(tl.int32)
        tl.store(flags_ptr, ok1)
        if FACTORED:
            ok1 = ok1 & ok2.to(tl.int32)
        tl.store(flags_ptr + 1, ok1)


@triton.jit
def _chunk_geometry(row, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr):
    """A chunk row's rows, columns, column tiles, rows per program and its g, p, m and v strides (ALIGN, G_UNIT,
    P_UNIT: what the chunk's group vouches for)."""
    N, _, sg_m, sg_n = strides_known(meta_int(row, CH.cols), 0, meta_int(row, CH.g_stride_m),
                                     meta_int(row, CH.g_stride_n), ALIGN, G_UNIT)
    _, _, sp_m, sp_n = strides_known(N, 0, meta_int(row, CH.p_stride_m), meta_int(row, CH.p_stride_n), ALIGN,
                                     P_UNIT)
    sm_m, sv_m = meta_int(row, CH.m_stride), meta_int(row, CH.v_stride)
    if ALIGN:
        sm_m, sv_m = a16(sm_m), a16(sv_m)
    return (meta_int(row, CH.rows), N, meta_int(row, CH.col_tiles), meta_int(row, CH.rows_per_prog), sg_m, sg_n,
            sp_m, sp_n, sm_m, sv_m)


@triton.jit
def adapm_usq_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, beta1, HAS_SCALE: tl.constexpr, MOM: tl.constexpr,
                     ALIGN: tl.constexpr, G_UNIT: tl.constexpr, G_DT: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Factored second moment, per chunk: partial sums of u^2 (u = m_hat * r * c * sqrt(bc2)) at ws[off_out + pid].
    Full momentum (MOM 1): the new m is stored here (where the momentum's finite flag holds). Low rank (MOM 2): ``m``
    is the lift, m_hat = g + lift."""
    pid, row, frow = _rows(meta_ptr, fmeta_ptr, pmap_ptr, CH_W, CH_FW)
    pid -= meta_int(row, CH.first_usq)
    M, N, TN, rows_per_prog, sg_m, sg_n, _, _, sm_m, _ = _chunk_geometry(row, ALIGN, G_UNIT, False)
    g_ptr = meta_pointer(row, CH.grad, G_DT, ALIGN)
    m_ptr = meta_pointer(row, CH.m, tl.float32, ALIGN)
    ws_ptr = meta_pointer(row, CH.workspace, tl.float32, True)
    flags_ptr = meta_pointer(row, CH.flags, tl.int32, False)
    off_r, off_c = meta_int(row, CH.off_r), meta_int(row, CH.off_c)
    bc1, sbc2 = tl.load(frow + CHF.bc1), tl.load(frow + CHF.sbc2)
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
    tl.store(ws_ptr + meta_int(row, CH.off_out) + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def adapm_write_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, lr, weight_decay, beta1, eps, clip_threshold,
                       HAS_SCALE: tl.constexpr, MOM: tl.constexpr, ADAM: tl.constexpr, M_STORED: tl.constexpr,
                       HAS_WD: tl.constexpr, HAS_USQ: tl.constexpr, PSQ: tl.constexpr, SR: tl.constexpr,
                       ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, G_DT: tl.constexpr,
                       P_DT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Per chunk: p <- p (1 - step wd) - step clip u where the parameter's finite flag holds. ADAM: v (and full
    momentum's m) are updated here too, where the momentum's flag holds, step = lr. Factored: u = m_hat * r * c *
    sqrt(bc2), the clip factor 1/max(1, RMS(u)/d) and the relative step lr * max(1e-3, RMS(p)) from the matrix's
    partial sums, which every program reduces itself (a few, L2-resident) in the same order."""
    pid, row, frow = _rows(meta_ptr, fmeta_ptr, pmap_ptr, CH_W, CH_FW)
    pid -= meta_int(row, CH.first_write)
    M, N, TN, rows_per_prog, sg_m, sg_n, sp_m, sp_n, sm_m, sv_m = _chunk_geometry(row, ALIGN, G_UNIT, P_UNIT)
    g_ptr = meta_pointer(row, CH.grad, G_DT, ALIGN)
    p_ptr = meta_pointer(row, CH.param, P_DT, ALIGN)
    m_ptr = meta_pointer(row, CH.m, tl.float32, ALIGN)
    v_ptr = meta_pointer(row, CH.v, tl.float32, ALIGN)
    ws_ptr = meta_pointer(row, CH.workspace, tl.float32, True)
    flags_ptr = meta_pointer(row, CH.flags, tl.int32, False)
    off_r, off_c = meta_int(row, CH.off_r), meta_int(row, CH.off_c)
    bc1, beta2, bc2, sbc2 = tl.load(frow + CHF.bc1), tl.load(frow + CHF.beta2), tl.load(frow + CHF.bc2), \
        tl.load(frow + CHF.sbc2)
    r0, cols, cmask, lrows = _tile_setup(pid, TN, rows_per_prog, N, BLOCK_M, BLOCK_N)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    okm = tl.load(flags_ptr).to(tl.int8)
    okp = tl.load(flags_ptr + 1).to(tl.int8)
    step = lr
    if PSQ:
        step = tl.maximum(tl.sqrt_rn(sum_parts(ws_ptr, meta_int(row, CH.off_psq), meta_int(row, CH.n_psq), 1024))
                          / tl.load(frow + CHF.sqrt_numel), 1e-3) * lr
    coef = -step
    if HAS_USQ:
        usq = sum_parts(ws_ptr, meta_int(row, CH.off_usq), meta_int(row, CH.n_usq), 1024)
        coef = -(step * (1.0 / tl.maximum(tl.sqrt_rn(usq / tl.load(frow + CHF.numel)) / clip_threshold, 1.0)))
    decay = 1.0 - step * weight_decay
    if not ADAM:
        c = tl.load(ws_ptr + off_c + cols, mask=cmask, other=0.0)
    if SR:
        seed = tl.load(row + CH.seed)
        row0, col0, n_total = meta_int(row, CH.row0), meta_int(row, CH.col0), meta_int(row, CH.n_total)
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
        tl.store(p_ptrs, new.to(P_DT), mask=and_flag(mask, okp))


@triton.jit(do_not_specialize=["n_total", "row_len", "row_stride", "part_stride"])
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


stats = Launcher(adapm_stats_kernel, "HAS_SCALE", "FACTORED", "PSQ", "ALIGN", "G_UNIT", "P_UNIT", "G_DT", "P_DT",
                 "BLOCK_M", "BLOCK_N")
finalize = Launcher(adapm_finalize_kernel, "BLOCK")
factors = Launcher(adapm_factors_kernel, "FACTORED", "BLOCK", "FB")
momentum = Launcher(adapm_momentum_kernel, "N_PARTS", "HAS_SCALE", "C_PATTERN", "BLOCK")
usq = Launcher(adapm_usq_kernel, "HAS_SCALE", "MOM", "ALIGN", "G_UNIT", "G_DT", "BLOCK_M", "BLOCK_N")
write = Launcher(adapm_write_kernel, "HAS_SCALE", "MOM", "ADAM", "M_STORED", "HAS_WD", "HAS_USQ", "PSQ", "SR", "ALIGN",
                 "G_UNIT", "P_UNIT", "G_DT", "P_DT", "BLOCK_M", "BLOCK_N")


# ------------------------------------------------------------------------------------------------ host side
_MOMENTUM_BLOCK = 1024
#: rows or columns per program of the second-moment statistics' finalize and factors passes
_FINISH_BLOCK = 256


def _chunk_grad(g: torch.Tensor, ch) -> torch.Tensor:
    """The chunk ``ch``'s part of the (matrix) gradient ``g``."""
    return g if ch.rows == _WHOLE and ch.cols == _WHOLE else g[ch.rows, ch.cols]


def _refresh_gradient(gc, scale, out: torch.Tensor | None = None, not_finite: torch.Tensor | None = None
                      ) -> torch.Tensor:
    """A refreshing chunk's gradient in fp32, scaled, all zero where it is not finite (``not_finite``: a 0-d device
    flag, by default the copy's own sum's; the momentum kernel then skips M, the write skips p and the new basis is
    not taken), in ``out`` or a new tensor (never the gradient itself, which the waves still read)."""
    g32 = gc.to(torch.float32, copy=True) if out is None else out.copy_(gc)
    if scale is not None:
        g32.mul_(scale)
    return g32.masked_fill_(~torch.isfinite(g32.sum()) if not_finite is None else not_finite, 0.0)


def _new_bases(plan, gs, states, bases, scale) -> dict:
    """At a basis refresh, the new basis of every low-rank chunk of the call, {(wave, chunk row): P}, made before any
    wave runs: each chunk's range sketch (``sketch`` of its basis function) from its own fp32 copy of the gradient,
    made and dropped one at a time (``_refresh_gradient``), then the small problems of equal size solved together,
    all of the call's at once (``momentum.leading_subspaces``: one launch of ``subspace.orthogonal_iteration``,
    whose time hardly depends on how many). A basis function without ``sketch`` (svd) runs whole."""
    out: dict = {}
    sketches: dict = {}
    for w, wave in enumerate(plan.waves):
        for c in wave.chunks:
            i, ch = c.tensor, c.ch
            if c.lift < 0 or bases[i] is None:
                continue
            gc = _chunk_grad(gs[i], ch)
            g32 = _refresh_gradient(gc, scale)
            basis, r = bases[i](c.index), states[i][ch.prefix + "proj"].shape[1]
            side = "left" if gc.shape[0] <= gc.shape[1] else "right"
            if hasattr(basis, "sketch"):
                q, s_, z = basis.sketch(g32, r, side)
                sketches.setdefault(tuple(z.shape), []).append(((w, c.row), q, s_, z))
            else:
                out[w, c.row] = basis(g32, r, side)
            del g32
    for group in sketches.values():
        zs = Mom.leading_subspaces(torch.stack([s_ for _, _, s_, _ in group]), torch.stack([z for *_, z in group]),
                                   subspace.orthogonal_iteration)
        for (where, q, _, _), z in zip(group, zs):
            out[where] = (q @ z).contiguous()
    return out


def _low_rank(gc, state, ch, beta1: float, t: float, flags, P_new, fill: bool, scale, run, keys: list, slot: int,
              out: torch.Tensor) -> None:
    """The small part of a low-rank chunk (``momentum.momentum_estimate_``'s, without forming m_hat): at a refresh
    move the momentum to the basis ``P_new`` (in torch; ``out`` then holds the chunk's fp32 gradient from
    ``_refresh_gradient``), update M where the momentum's finite flag holds (``adapm_momentum_kernel``), and write
    the lift L = lift(M / bc - pg) into ``out`` (fp32, the chunk's shape): m_hat = g + L. ``keys``, ``slot``: the
    plan's launch keys, the chunk's first slot (pieces; momentum at slot + 1, at a refresh slot + 2)."""
    P, Mst = state[ch.prefix + "proj"], state[ch.prefix + "exp_avg_lr"]
    left = gc.shape[0] <= gc.shape[1]
    side = "left" if left else "right"
    r = P.shape[1]
    refresh = P_new is not None
    if refresh:  # every update_proj_gap steps
        g32 = out
        Mom.refresh_basis_(P, Mst, P_new, g32, side, carry_weight=1.0 - beta1 ** (t - 1), ok=flags[0] != 0,
                           fill=fill)
        parts, scale = Mom.project(g32, P, side), None  # already scaled
        del g32
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
    keyed_launch(momentum, keys, slot + (2 if refresh else 1), cdiv(n, _MOMENTUM_BLOCK),
                 (parts, Mst, Cp, flags if scale is None else scale, flags, n, *layout, beta1, 1.0 - beta1 ** t),
                 (n_parts, scale is not None, _C_LIFT[left], _MOMENTUM_BLOCK), 4, run[0], run[1])
    if left:  # C (r x b): its pieces are the row blocks of B (6r x b)
        products.lift(Pp, Cp.view(6 * r, -1), out)
    else:
        products.lift(Cp, Pp.mT, out)


#: by side (True: left): P's pieces for the lift alone, for the projection and the lift, and C's for the lift
_P_LIFT = {True: products.LIFT_A, False: products.LIFT_B}
_P_BOTH = {k: products.PROJECT + v for k, v in _P_LIFT.items()}
_C_LIFT = {True: products.pack(products.LIFT_B), False: products.pack(products.LIFT_A)}

_WHOLE = slice(None)


def _bounds(s: slice, n: int) -> tuple[int, int]:
    return s.start or 0, n if s.stop is None else s.stop


def _aligned(N: int, *strides: int) -> bool:
    return N % 16 == 0 and all(x % 16 == 0 for x in strides)


def _as_matrix(p, g, state):
    """A 0-D/1-D tensor as one row (its full second moment, factored or not, is the column state of that row)."""
    if p.dim() >= 2:
        return p, g, state
    return p.view(1, -1), g.view(1, -1), {k: v if k == "step" else v.view(1, -1) for k, v in state.items()}


class _Rows:
    """Metadata rows being laid out: int64 rows of ``columns`` and fp32 rows of ``float_columns``."""

    def __init__(self, columns: tuple, float_columns: tuple, width: int, fwidth: int):
        self.columns, self.float_columns, self.width, self.fwidth = columns, float_columns, width, fwidth
        self.ints: list[int] = []
        self.floats: list[float] = []
        self.n = 0

    def add(self, values: dict, floats: dict | None = None) -> int:
        row = [0] * self.width
        for name, v in values.items():
            row[self.columns.index(name)] = int(v)
        frow = [0.0] * self.fwidth
        for name, v in (floats or {}).items():
            frow[self.float_columns.index(name)] = float(v)
        self.ints += row
        self.floats += frow
        self.n += 1
        return self.n - 1

    def set(self, r: int, name: str, value: int) -> None:
        self.ints[r * self.width + self.columns.index(name)] = int(value)


class _Region:
    """The packed metadata of one upload, at byte ``offset`` of the plan's device buffer: for each of ``rows`` its
    int64 rows, then its fp32 rows (``at``: their byte offsets in the region); and its host template holding the
    static fields."""
    __slots__ = ("offset", "nbytes", "at", "tmpl", "tmpl_c")

    def __init__(self, rows: list, offset: int):
        self.offset, self.at, pos = offset, [], 0
        for r in rows:
            float_at = pos + 8 * r.width * r.n  # a multiple of 16: widths are even
            self.at.append((pos, float_at, float_at + 4 * r.fwidth * r.n))
            pos = _width(float_at + 4 * r.fwidth * r.n, 16)
        self.nbytes = max(pos, 16)
        self.tmpl = bytearray(self.nbytes)
        for r, (int_at, float_at, _) in zip(rows, self.at):
            struct.pack_into(f"<{len(r.ints)}q", self.tmpl, int_at, *r.ints)
            struct.pack_into(f"<{len(r.floats)}f", self.tmpl, float_at, *r.floats)
        self.tmpl_c = (ctypes.c_char * self.nbytes).from_buffer(self.tmpl)


class _Launch(NamedTuple):
    """One grouped launch: its constexprs, its programs (the grid) and its program map."""
    consts: tuple
    grid: int
    pmap: torch.Tensor


class _Chunk(NamedTuple):
    tensor: int  # the call's tensor
    mat: int  # its matrix's row in the wave (and workspace region)
    index: int  # the chunk's index in its tensor
    ch: object  # the ``kernels.AdaPMChunk``
    row: int  # its metadata row in its wave's chunk rows
    goff: int  # byte offset of its gradient from the tensor's
    m: int  # full momentum's m pointer (static), else 0
    lift: int  # a low-rank chunk's lift: its offset (floats) in the wave's buffer, else -1
    slot: int  # a low-rank chunk's first launch-key slot (pieces, momentum, momentum at a refresh)


class _Wave(NamedTuple):
    """Consecutive tensors of a call updated together: every pass once for all of them (their lifts and partial
    sums alive at once, in one fp32 buffer: the workspace, then the lifts)."""
    tensors: list  # the call's tensors, in order (matrix row k is tensors[k])
    numel: int  # the buffer's floats
    ws_offs: list  # per matrix row, its workspace region (floats, 16-float aligned)
    region: _Region  # the matrices' rows, then the chunks'
    stats: list  # _Launch per layout class
    finish_pmap: torch.Tensor  # finalize and factors: program -> matrix row
    finish_grid: int
    chunks: list
    usq: list
    write: list


class _Plan(NamedTuple):
    """Everything about a call that does not change from step to step: built once per list of tensors and layouts
    and cached, as fused mode flushes the same buckets every step."""
    waves: list
    nbytes: int  # the device buffer: the waves' regions
    keys: list  # per launch slot of the low-rank chunks, the launch-cache key of its pointer arguments
    bufs: dict  # stream -> per wave, its region's device bytes and (int64, fp32) views of its two kinds of rows


_PLANS: dict = {}
_MAX_PLANS = 4096  # above every model's tensor count: one-tensor calls keep a plan per tensor
on_change(_PLANS.clear)


#: the partial sums a wave may hold (floats) when no single tensor needs more: they are small next to the lifts
_WAVE_WORKSPACE = 1 << 20


def _waves(lows: list[list[int]], ws: list[int]) -> list[list[int]]:
    """Consecutive tensors in waves whose lifts (fp32, a basis refresh's fp32 gradient copy in its chunk's lift's
    place) fit the update temporaries the memory planner counts for the largest single tensor
    (``memory._adapm_kernel_update_bytes``: a lift per low-rank chunk, and a refresh's two fp32 copies of one chunk
    instead of its lift), so the peak stays under one tensor's as counted; and whose partial sums fit
    ``_WAVE_WORKSPACE`` (or the largest single tensor's)."""
    lift_cap = max(sum(lo) + max(lo, default=0) for lo in lows)
    ws_cap = max(max(ws), _WAVE_WORKSPACE)
    waves, cur, cur_lift, cur_ws = [], [], 0, 0
    for i, (low, w) in enumerate(zip(lows, ws)):
        if cur and (cur_lift + sum(low) > lift_cap or cur_ws + w > ws_cap):
            waves.append(cur)
            cur, cur_lift, cur_ws = [], 0, 0
        cur.append(i)
        cur_lift += sum(low)
        cur_ws += w
    return waves + [cur] if cur else waves


def _launches(groups: dict, rows: _Rows, first: str, dev) -> list[_Launch]:
    """Grouped launches from {constexprs: [(row, programs)]}; each row's first program in its launch goes to column
    ``first`` of ``rows``."""
    out = []
    for consts, members in groups.items():
        n = 0
        for r, k in members:
            rows.set(r, first, n)
            n += k
        out.append(_Launch(consts, n, program_map([k for _, k in members], dev, [r for r, _ in members])))
    return out


def _matrix_layout(p, g, state, chunks, factored: bool, has_usq: bool, bn: int) -> dict:
    """A matrix's geometry, workspace layout (floats) and chunk bounds and tiling."""
    Mrows, N = p.shape
    geo = tiling(Mrows, N)
    TM, TN = geo["TM"], geo["TN"]
    n_prog = TM * TN
    bounds = [(_bounds(ch.rows, Mrows), _bounds(ch.cols, N)) for ch in chunks]
    chunk_geo = []
    for (r0, r1), (c0, c1) in bounds:
        tn = cdiv(c1 - c0, bn)
        rpp_c = tiling(r1 - r0, c1 - c0)["rows_per_prog"]
        chunk_geo.append((cdiv(r1 - r0, rpp_c) * tn, tn, rpp_c))
    n_rp = cdiv(Mrows, _FINISH_BLOCK) if factored else 0
    n_blk = n_rp + cdiv(N, _FINISH_BLOCK) if factored else 1
    # workspace (fp32): partial sums of g and p^2, of the row and column sums of g^2, of u^2 per chunk; then r and c,
    # and the finalize programs' two sums each
    off_psq, off_row = n_prog, 2 * n_prog
    off_col = off_row + (TN * Mrows if factored else 0)
    off_usq = off_col + (TM * N if factored else 0)
    n_usq = sum(c[0] for c in chunk_geo) if has_usq else 0
    off_r = off_usq + n_usq
    off_c = off_r + (Mrows if factored else 0)
    off_blk = off_c + (N if factored else 0)
    return dict(M=Mrows, N=N, TM=TM, TN=TN, rows_per_prog=geo["rows_per_prog"], n_prog=n_prog, n_rp=n_rp,
                n_blk=n_blk, off_psq=off_psq, off_row=off_row, off_col=off_col, off_usq=off_usq, n_usq=n_usq,
                off_r=off_r, off_c=off_c, off_blk=off_blk, bounds=bounds, chunk_geo=chunk_geo,
                ws=_width(off_blk + (2 * n_blk if factored else 0), 16))


def _build_plan(ps, gs, states, chunks_list, *, factored: bool, has_usq: bool, psq: bool, has_scale: bool,
                has_wd: bool, stochastic_rounding: bool, dev) -> _Plan:
    geo0 = tiling(1, 1)
    bm, bn = geo0["BLOCK_M"], geo0["BLOCK_N"]  # the configured tile, the same for every shape
    layouts = [_matrix_layout(p, g, st, chunks, factored, has_usq, bn)
               for p, g, st, chunks in zip(ps, gs, states, chunks_list)]
    lows = [[(r1 - r0) * (c1 - c0) for ch, ((r0, r1), (c0, c1)) in zip(chunks, lay["bounds"])
             if ch.kind == "low_rank"] for chunks, lay in zip(chunks_list, layouts)]
    waves, slot, off = [], 0, 0
    for members in _waves(lows, [lay["ws"] for lay in layouts]):
        wave, slot = _build_wave(members, ps, gs, states, chunks_list, layouts, slot, off, bm, bn, factored=factored,
                                 has_usq=has_usq, psq=psq, has_scale=has_scale, has_wd=has_wd,
                                 stochastic_rounding=stochastic_rounding, dev=dev)
        off += wave.region.nbytes
        waves.append(wave)
    return _Plan(waves, off, [None] * max(slot, 1), {})


def _build_wave(members, ps, gs, states, chunks_list, layouts, slot: int, offset: int, bm: int, bn: int, *,
                factored: bool, has_usq: bool, psq: bool, has_scale: bool, has_wd: bool, stochastic_rounding: bool,
                dev) -> tuple[_Wave, int]:
    mats = _Rows(MAT_COLUMNS, MAT_FLOATS, MAT_W.value, MAT_FW.value)
    rows = _Rows(CHUNK_COLUMNS, CHUNK_FLOATS, CH_W.value, CH_FW.value)
    stats_groups, usq_groups, write_groups = {}, {}, {}
    ws, ws_offs, fin_counts, chunks, lifts = 0, [], [], [], 0  # lifts: offsets from the workspace's end for now
    adam = not factored
    for i in members:
        p, g, state, lay = ps[i], gs[i], states[i], layouts[i]
        N = lay["N"]
        sg, sp = g.stride(), p.stride()
        row_state = factored and "exp_avg_sq_row" in state
        mat = {k: lay[k] for k in ("M", "N", "TM", "TN", "rows_per_prog", "n_rp", "n_blk", "off_psq", "off_row",
                                   "off_col", "off_r", "off_c", "off_blk")}
        mat.update(param=p.data_ptr(), g_stride_m=sg[0], g_stride_n=sg[1], p_stride_m=sp[0], p_stride_n=sp[1],
                   has_row_state=row_state, first_fprog=sum(fin_counts))
        if factored:
            mat.update(row_state=state["exp_avg_sq_row"].data_ptr() if row_state else 0,
                       col_state=(state["exp_avg_sq_col"] if row_state else state["exp_avg_sq"]).data_ptr())
        r = mats.add(mat)
        ws_offs.append(ws)
        ws += lay["ws"]
        fin_counts.append(lay["n_blk"])
        align = (_aligned(N, sg[0], sp[0]) and sg[1] == 1 and sp[1] == 1 and g.data_ptr() % 16 == 0
                 and p.data_ptr() % 16 == 0)
        stats_groups.setdefault((has_scale, factored, psq, align, sg[1] == 1, sp[1] == 1, TL_DTYPES[g.dtype],
                                 TL_DTYPES[p.dtype], bm, bn), []).append((r, lay["n_prog"]))

        v = None if factored else state["exp_avg_sq"]
        sr = stochastic_rounding and p.dtype == torch.bfloat16
        off_out = lay["off_usq"]
        numel = p.numel()
        common = dict(off_usq=lay["off_usq"], n_usq=lay["n_usq"], off_psq=lay["off_psq"], n_psq=lay["n_prog"],
                      n_total=N)
        for k, (ch, ((r0, r1), (c0, c1)), (n_c, tn_c, rpp_c)) in enumerate(zip(chunks_list[i], lay["bounds"],
                                                                                 lay["chunk_geo"])):
            cols = c1 - c0
            whole = ch.rows == _WHOLE and ch.cols == _WHOLE
            gc, pc = (g, p) if whole else (g[ch.rows, ch.cols], p[ch.rows, ch.cols])
            vc = None if v is None else v if whole else v[ch.rows, ch.cols]
            # the momentum operand: full momentum's m (the chunk's own state), the low-rank lift (a fresh chunk-shaped
            # fp32 tensor: 16-byte aligned), nothing
            m = state[ch.prefix + "exp_avg"] if ch.kind == "full" else None
            sm = m.stride(0) if m is not None else cols if ch.kind == "low_rank" else 0
            sv = vc.stride(0) if vc is not None else 0
            g_unit, p_unit = gc.stride(1) == 1, pc.stride(1) == 1
            ptrs = (gc.data_ptr() % 16 == 0 and pc.data_ptr() % 16 == 0 and (m is None or m.data_ptr() % 16 == 0)
                    and (vc is None or vc.data_ptr() % 16 == 0))
            al_u = _aligned(cols, gc.stride(0), sm) and g_unit and ptrs
            al_w = _aligned(cols, gc.stride(0), pc.stride(0), sm, sv) and g_unit and p_unit and ptrs
            c = rows.add(dict(param=pc.data_ptr(), v=vc.data_ptr() if vc is not None else 0, rows=r1 - r0, cols=cols,
                              col_tiles=tn_c, rows_per_prog=rpp_c, g_stride_m=gc.stride(0), g_stride_n=gc.stride(1),
                              p_stride_m=pc.stride(0), p_stride_n=pc.stride(1), m_stride=sm, v_stride=sv,
                              off_r=lay["off_r"] + r0, off_c=lay["off_c"] + c0, off_out=off_out, row0=r0, col0=c0,
                              **common),
                         dict(numel=numel, sqrt_numel=math.sqrt(numel)))
            chunks.append(_Chunk(i, r, k, ch, c, gc.data_ptr() - g.data_ptr(), m.data_ptr() if m is not None else 0,
                                 -1 if ch.kind != "low_rank" else lifts, slot))
            if ch.kind == "low_rank":
                lifts += _width((r1 - r0) * cols, 16)
            if ch.kind == "low_rank":
                slot += 3
            code = _KIND_CODES[ch.kind]
            if has_usq:
                off_out += n_c
                usq_groups.setdefault((has_scale, code, al_u, g_unit, TL_DTYPES[g.dtype], bm, bn),
                                      []).append((c, n_c))
            write_groups.setdefault((has_scale, code, adam, has_usq, has_wd, has_usq, psq, sr, al_w, g_unit, p_unit,
                                     TL_DTYPES[g.dtype], TL_DTYPES[p.dtype], bm, bn), []).append((c, n_c))
    stats = _launches(stats_groups, mats, "first_prog", dev)
    usq_l = _launches(usq_groups, rows, "first_usq", dev)
    write_l = _launches(write_groups, rows, "first_write", dev)
    chunks = [c if c.lift < 0 else c._replace(lift=ws + c.lift) for c in chunks]  # the lifts after the workspace
    return _Wave(list(members), max(ws + lifts, 16), ws_offs, _Region([mats, rows], offset), stats,
                 program_map(fin_counts, dev), sum(fin_counts), chunks, usq_l, write_l), slot


def _device_views(plan: _Plan, stream, dev) -> list:
    """The plan's device buffer on ``stream`` (stream order protects its reuse from call to call) and, per wave, its
    region's bytes and the int64 and fp32 views of its matrix rows and of its chunk rows."""
    got = plan.bufs.get(stream)
    if got is None:
        if len(plan.bufs) >= 8:
            plan.bufs.clear()
        buf = torch.empty(plan.nbytes, dtype=torch.uint8, device=dev)
        got = []
        for wave in plan.waves:
            region = wave.region
            part = buf[region.offset:region.offset + region.nbytes]
            views = [(part[a:b].view(torch.int64), part[b:c].view(torch.float32)) for a, b, c in region.at]
            got.append((part, *views))
        plan.bufs[stream] = got
    return got


def _upload(region: _Region, part: torch.Tensor, dev) -> None:
    """A region's host template to its place on the device: one (pinned on CUDA) host buffer, one copy, no host
    sync (the pinned block is not reused before the copy ran: torch's host allocator records it)."""
    host = torch.empty(region.nbytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    ctypes.memmove(host.data_ptr(), region.tmpl_c, region.nbytes)
    part.copy_(host, non_blocking=True)


_MAT_CALL = struct.Struct("<3q")  # grad, flags, workspace
_MAT_FLOATS = struct.Struct("<f")  # beta2
_MAT_ROW, _MAT_FROW, _CH_ROW, _CH_FROW = 8 * MAT_W.value, 4 * MAT_FW.value, 8 * CH_W.value, 4 * CH_FW.value
_CHUNK_CALL = struct.Struct("<5q")  # grad, m, flags, workspace, seed
_CHUNK_FLOATS = struct.Struct("<4f")  # bc1, beta2, bc2, sbc2
assert MAT_COLUMNS[:3] == ("grad", "flags", "workspace") and CHUNK_COLUMNS[:5] == ("grad", "m", "flags", "workspace",
                                                                                     "seed")
assert CHUNK_FLOATS[:4] == ("bc1", "beta2", "bc2", "sbc2")


@on_tensor_device
def adapm_update_many_(ps, gs, states, chunks_list, *, flags: torch.Tensor, ts, lr: float, beta1: float, beta2s,
                       bc2s, eps: float, weight_decay: float, second_moment: str, clip_threshold, relative_lr: bool,
                       bases, fill: bool, grad_scale, stochastic_rounding: bool, seeds) -> None:
    """One AdaPM step on each of ``ps`` (``optim.adapm.AdaPM._update``'s maths; each ``state['step']`` already at
    ``ts[i]``): matrices, or 0-D/1-D tensors seen as one row, each in its ``chunks_list[i]`` (a tuple of
    ``kernels.AdaPMChunk``, the same objects at every step of that tensor: the launch plan is keyed on them).
    ``beta2s``, ``bc2s``, ``seeds``: per tensor; ``bases``: per tensor None, or at a basis refresh a function chunk
    index -> that chunk's basis function. ``flags`` (int32 [n, 2], on the device) receives each tensor's finite
    flags [gradient finite, that and the factored statistics finite]; where not, that tensor and its state are left
    as they were. The caller bumps the version counters (``_compat.bump_versions``)."""
    dev = ps[0].device
    ctx = LaunchContext(ps[0])
    stream, device = ctx.stream, ctx.device
    factored = second_moment == "factored"
    has_scale, scale = grad_scale is not None, grad_scale if grad_scale is not None else ps[0]
    if has_scale and not isinstance(scale, torch.Tensor):
        scale = torch.full((), float(scale), dtype=torch.float32, device=dev)
    psq = factored and relative_lr
    has_usq = factored and clip_threshold is not None
    sr = bool(stochastic_rounding)
    # what the plan depends on, per tensor: identity, storage and layout of p, g's dtype, strides and alignment, the
    # chunks (immutable objects, held by the key: their identity is not reused while the plan is cached), the state
    # buffers; for the call: the settings that select kernels, the scale's dtype and alignment (launch keys)
    key = [factored, psq, has_usq, weight_decay != 0, sr, has_scale, scale.dtype, scale.data_ptr() % 16, dev]
    for p, g, st, chunks in zip(ps, gs, states, chunks_list):
        key.append((id(p), p.data_ptr(), p.shape, p.stride(), p.dtype, g.dtype, g.stride(), g.data_ptr() % 16,
                    chunks, tuple(v.data_ptr() for k, v in st.items() if k != "step")))
    key = tuple(key)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        P, G, S = zip(*(_as_matrix(p, g, st) for p, g, st in zip(ps, gs, states)))
        plan = _PLANS[key] = _build_plan(P, G, S, chunks_list, factored=factored, has_usq=has_usq, psq=psq,
                                         has_scale=has_scale, has_wd=weight_decay != 0, stochastic_rounding=sr,
                                         dev=dev)
    # from here on the tensors themselves: a 0-D/1-D tensor's row has its pointer, and low-rank chunks are 2-D
    views = _device_views(plan, stream, dev)
    fbase = flags.data_ptr()
    run = (stream, device, grouped_key(device, stream, scale))
    mid = (stream, device, None)
    eps1 = float(eps) ** 2
    b1 = float(beta1)
    floats = (float(lr), float(weight_decay), b1, float(eps), float(clip_threshold or 1.0))
    fresh = _new_bases(plan, gs, states, bases, scale if has_scale else None) if any(
        b is not None for b in bases) else {}
    for w, (wave, (part, (meta, fmeta), (cmeta, cfmeta))) in enumerate(zip(plan.waves, views)):
        buf = torch.empty(wave.numel, dtype=torch.float32, device=dev)  # the workspace, then the lifts
        base = buf.data_ptr()
        ws_ptrs = [base + 4 * o for o in wave.ws_offs]
        region = wave.region
        tmpl = region.tmpl
        (mat_at, mat_fat, _), (ch_at, ch_fat, _) = region.at
        for k, i in enumerate(wave.tensors):
            _MAT_CALL.pack_into(tmpl, mat_at + k * _MAT_ROW, gs[i].data_ptr(), fbase + 8 * i, ws_ptrs[k])
            _MAT_FLOATS.pack_into(tmpl, mat_fat + k * _MAT_FROW, float(beta2s[i]))
        for c in wave.chunks:
            i = c.tensor
            bc2 = float(bc2s[i])
            _CHUNK_CALL.pack_into(tmpl, ch_at + c.row * _CH_ROW, gs[i].data_ptr() + c.goff,
                                  c.m or (base + 4 * c.lift if c.lift >= 0 else base), fbase + 8 * i, ws_ptrs[c.mat],
                                  seed_arg(sr and ps[i].dtype == torch.bfloat16, seeds[i]))
            _CHUNK_FLOATS.pack_into(tmpl, ch_fat + c.row * _CH_FROW, 1.0 - b1 ** ts[i], float(beta2s[i]), bc2,
                                    math.sqrt(bc2))
        _upload(region, part, dev)
        # the matrices: statistics, second-moment factors, finite flags
        for launch in wave.stats:
            stats(launch.grid, (meta, fmeta, launch.pmap, scale), launch.consts, WARPS, run)
        grid = wave.finish_grid
        if factored:
            finalize(grid, (meta, fmeta, wave.finish_pmap, eps1), (_FINISH_BLOCK,), 4, run)
        factors(grid, (meta, fmeta, wave.finish_pmap), (factored, _FINISH_BLOCK, 64), 4, run)
        # the low-rank chunks' lifts (at a refresh in their new bases), then RMS(u) and the writes
        for c in wave.chunks:
            if c.lift >= 0:
                i, ch = c.tensor, c.ch
                gc = _chunk_grad(gs[i], ch)
                out = buf[c.lift:c.lift + gc.numel()].view(gc.shape)
                P_new = fresh.get((w, c.row))
                if P_new is not None:
                    _refresh_gradient(gc, scale if has_scale else None, out, flags[i][0] == 0)
                _low_rank(gc, states[i], ch, b1, ts[i], flags[i], P_new, fill, scale if has_scale else None, mid,
                          plan.keys, c.slot, out)
        if has_usq:
            for launch in wave.usq:
                usq(launch.grid, (cmeta, cfmeta, launch.pmap, scale, b1), launch.consts, WARPS, run)
        for launch in wave.write:
            write(launch.grid, (cmeta, cfmeta, launch.pmap, scale) + floats, launch.consts, WARPS, run)
        del buf  # after the launches that read it (stream order)
