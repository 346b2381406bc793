"""AdaLomo/Adafactor on matrices (``p.dim() >= 2``, a batch of [M, N] matrices): factored second moment, update
clipped by its RMS, step relative to RMS(p).

Passes (each a grouped launch over a group of tensors, see ``updates``; the FSDP2 path launches the single-tensor
kernels per shard, see ``sharded``):

1. statistics   read g and p: partial row/column sums of g^2 + eps1, partial sums of p^2. Matrices whose rows fit
                one tile take ``one_read``'s pass instead, which also yields what RMS(u) needs.
2. finalize     row/column EMAs into the workspace, partial sums of mean(row) and of the finite test
3. RMS(u)       read g: partial sums of u^2, u = g * rsqrt(row/mean(row)) * rsqrt(col). A 2-D FSDP2 shard takes the
                column weights' pass instead (sum_i g_ij^2 / row_i over its rows, before the all-reduce; its rows'
                finalize comes first, its columns' after)
4. finish       per tensor: finite flag, clip = 1/max(1, RMS(u)/d), step = rho*max(eps2, RMS(p)), in a fixed order
5. write        read g and p, write p (stochastic rounding for bf16); row/column state (and exp_avg) committed only
                when the flag is set
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grouped, one_read
from .common import (
    a16,
    and_flag,
    first_tile,
    first_tiles,
    next_tile,
    next_tiles,
    round_to_bf16,
    strides_known,
    sum_partial_rows,
    tile_coords,
    write_scalars,
)
from .config import CONFIG, cdiv, fin_block, next_pow2, on_change, pipeline_depth_for, tiling, workspace
from .grouped import COL, FCOL, meta_int, meta_pointer, this_program
from .launch import TL_DTYPES, Launcher


# ---------------------------------------------------------------------------------------------- passes
@triton.jit
def _stats(pid, g_ptr, p_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n,
           off_rowpart, off_colpart, off_psq, eps1, HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr,
           ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, DEPTH: tl.constexpr = 1):
    N, sg_b, sg_m, sg_n = strides_known(N, sg_b, sg_m, sg_n, ALIGN, G_UNIT)
    _, sp_b, sp_m, sp_n = strides_known(N, sp_b, sp_m, sp_n, ALIGN, P_UNIT)
    off_rowpart, off_colpart = a16(off_rowpart), a16(off_colpart)
    b, i, j = tile_coords(pid, TM, TN)
    b64 = b.to(tl.int64)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    col_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # reduced over rows once, after the loop
    psq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    r0 = i * rows_per_prog
    lim = tl.minimum(M, r0 + rows_per_prog)
    g_base = g_ptr + b64 * sg_b + r0.to(tl.int64) * sg_m
    p_base = p_ptr + b64 * sp_b + r0.to(tl.int64) * sp_m
    rowpart = ws_ptr + off_rowpart + (j * B + b).to(tl.int64) * a16(M + 15) + r0  # partial rows padded to 16
    lrows = tl.arange(0, BLOCK_M)
    g_offs = lrows[:, None] * sg_m + cols[None, :] * sg_n
    p_offs = lrows[:, None] * sp_m + cols[None, :] * sp_n
    g_nx = first_tile(g_base, sg_m, g_offs, r0, lrows, lim, cmask, DEPTH)
    if SUM_P:
        p_nx = first_tile(p_base, sp_m, p_offs, r0, lrows, lim, cmask, DEPTH)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=DEPTH):
        rmask = r0 + m0 + lrows < M
        mask = rmask[:, None] & cmask[None, :]
        g, g_nx = next_tile(g_nx, g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask, BLOCK_M, DEPTH)
        if SUM_P:
            pv, p_nx = next_tile(p_nx, p_base, m0, sp_m, p_offs, r0, lrows, lim, cmask, BLOCK_M, DEPTH)
        if HAS_SCALE:
            g = g * scale
        sq = tl.where(mask, g * g + eps1, 0.0)
        tl.store(rowpart + m0 + lrows, tl.sum(sq, axis=1), mask=rmask)
        col_acc += sq
        if SUM_P:
            psq += pv * pv
    tl.store(ws_ptr + off_colpart + (i * B + b).to(tl.int64) * a16(N + 15) + cols, tl.sum(col_acc, axis=0),
             mask=cmask)
    if SUM_P:
        tl.store(ws_ptr + off_psq + pid, tl.sum(tl.sum(psq, axis=1), axis=0))


@triton.jit
def _finalize(pid, row_ptr, col_ptr, ws_ptr, B, M, N, TM, TN, n_rp, n_cp, off_rowpart, off_colpart, off_newrow,
              off_newcol, off_rsum, off_fin, beta2, one_minus_beta2, col_count, BLOCK: tl.constexpr,
              PB: tl.constexpr):
    """Row/column means of g^2 + eps1 from the partials, EMA into new rows/columns in the workspace. The column sums
    are divided by ``col_count``: M, or the global row count when they were summed over FSDP2 shards."""
    off_rowpart, off_colpart = a16(off_rowpart), a16(off_colpart)
    off_newrow, off_newcol = a16(off_newrow), a16(off_newcol)
    per_b = n_rp + n_cp
    b = pid // per_b
    k = pid % per_b
    b64 = b.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if k < n_rp:
        idx = k * BLOCK + offs
        mask = idx < M
        mean = sum_partial_rows(ws_ptr + off_rowpart, B, b64, idx, a16(M + 15), TN, PB, BLOCK) / N
        old = tl.load(row_ptr + b64 * M + idx, mask=mask, other=0.0)
        new = old * beta2 + mean * one_minus_beta2
        tl.store(ws_ptr + off_newrow + b64 * M + idx, new, mask=mask)
        tl.store(ws_ptr + off_rsum + b * n_rp + k, tl.sum(tl.where(mask, new, 0.0), axis=0))
        tl.store(ws_ptr + off_fin + pid, tl.sum(tl.where(mask, mean, 0.0), axis=0))
    else:
        idx = (k - n_rp) * BLOCK + offs
        mask = idx < N
        mean = sum_partial_rows(ws_ptr + off_colpart, B, b64, idx, a16(N + 15), TM, PB, BLOCK) / col_count
        old = tl.load(col_ptr + b64 * N + idx, mask=mask, other=0.0)
        new = old * beta2 + mean * one_minus_beta2
        tl.store(ws_ptr + off_newcol + b64 * N + idx, new, mask=mask)
        tl.store(ws_ptr + off_fin + pid, tl.sum(tl.where(mask, mean, 0.0), axis=0))


@triton.jit
def _row_mean(ws_ptr, off_rsum, b, n_rp, M, RP_BLOCK: tl.constexpr):
    rp = tl.arange(0, RP_BLOCK)
    return tl.sum(tl.load(ws_ptr + off_rsum + b * n_rp + rp, mask=rp < n_rp, other=0.0), axis=0) / M


@triton.jit
def _rms(pid, g_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, n_rp, off_newrow,
         off_newcol, off_rsum, off_usq, HAS_SCALE: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr, DEPTH: tl.constexpr = 1,
         WEIGHTS: tl.constexpr = False):
    """This program's partial sum of u^2 (for RMS(u)). WEIGHTS: its partial column weights W_j = sum_i g_ij^2 / r_i
    instead (r: the new row statistics; one partial row per row group at ``off_usq``), from which
    sum u^2 = mean(r) * sum_j W_j / c_j once the column statistics c are known: an FSDP2 shard forms them before the
    all-reduce that yields c."""
    N, sg_b, sg_m, sg_n = strides_known(N, sg_b, sg_m, sg_n, ALIGN, G_UNIT)
    off_newrow, off_newcol = a16(off_newrow), a16(off_newcol)
    b, i, j = tile_coords(pid, TM, TN)
    b64 = b.to(tl.int64)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if not WEIGHTS:
        row_mean = _row_mean(ws_ptr, off_rsum, b, n_rp, M, RP_BLOCK)
        c = tl.rsqrt(tl.load(ws_ptr + off_newcol + b64 * N + cols, mask=cmask, other=1.0))
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    r0 = i * rows_per_prog
    lim = tl.minimum(M, r0 + rows_per_prog)
    g_base = g_ptr + b64 * sg_b + r0.to(tl.int64) * sg_m
    newrow = ws_ptr + off_newrow + b64 * M + r0
    lrows = tl.arange(0, BLOCK_M)
    g_offs = lrows[:, None] * sg_m + cols[None, :] * sg_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    g_nx = first_tile(g_base, sg_m, g_offs, r0, lrows, lim, cmask, DEPTH)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=DEPTH):
        g, g_nx = next_tile(g_nx, g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask, BLOCK_M, DEPTH)
        rmask = r0 + m0 + lrows < M
        mask = rmask[:, None] & cmask[None, :]
        if HAS_SCALE:
            g = g * scale
        new_row = tl.load(newrow + m0 + lrows, mask=rmask, other=1.0)
        if WEIGHTS:
            acc += tl.where(mask, g * g * (1.0 / new_row)[:, None], 0.0)
        else:
            r = tl.rsqrt(new_row / row_mean)
            u = g * r[:, None] * c[None, :]
            acc += tl.where(mask, u * u, 0.0)
    if WEIGHTS:
        tl.store(ws_ptr + a16(off_usq) + (i * B + b).to(tl.int64) * a16(N + 15) + cols, tl.sum(acc, axis=0),
                 mask=cmask)
    else:
        tl.store(ws_ptr + off_usq + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _write(pid, g_ptr, p_ptr, scale_ptr, ws_ptr, row_ptr, col_ptr, m_ptr, ok_ptr, seed,
           B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, n_rp, off_newrow, off_newcol, off_rsum,
           off_scal, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho, eps2, clip_threshold,
           weight_decay, beta1, one_minus_beta1, HAS_SCALE: tl.constexpr, SCALE_PARAM: tl.constexpr,
           HAS_WD: tl.constexpr, HAS_M: tl.constexpr, SR: tl.constexpr, FOLD: tl.constexpr,
           ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr,
           BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr, PF: tl.constexpr = False):
    """The write pass: p (and exp_avg) from u, the row/column state committed when the step is finite."""
    N, sg_b, sg_m, sg_n = strides_known(N, sg_b, sg_m, sg_n, ALIGN, G_UNIT)
    _, sp_b, sp_m, sp_n = strides_known(N, sp_b, sp_m, sp_n, ALIGN, P_UNIT)
    off_newrow, off_newcol = a16(off_newrow), a16(off_newcol)
    ok, clip, step = write_scalars(pid, ws_ptr, scale_ptr, ok_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq,
                                   off_scal, numel_f, sqrt_numel, rho, eps2, clip_threshold, FOLD, False, True,
                                   SCALE_PARAM)
    neg_step = -step
    decay = 1.0 - step * weight_decay
    b, i, j = tile_coords(pid, TM, TN)
    b64 = b.to(tl.int64)
    row_mean = _row_mean(ws_ptr, off_rsum, b, n_rp, M, RP_BLOCK)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    new_col = tl.load(ws_ptr + off_newcol + b64 * N + cols, mask=cmask, other=1.0)
    c = tl.rsqrt(new_col)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    r0 = i * rows_per_prog
    g_base = g_ptr + b64 * sg_b + r0.to(tl.int64) * sg_m
    p_base = p_ptr + b64 * sp_b + r0.to(tl.int64) * sp_m
    newrow = ws_ptr + off_newrow + b64 * M + r0
    lin_base = (b64 * M + r0) * N
    lrows = tl.arange(0, BLOCK_M)
    g_offs = lrows[:, None] * sg_m + cols[None, :] * sg_n
    p_offs = lrows[:, None] * sp_m + cols[None, :] * sp_n
    lin_offs = lrows[:, None] * N + cols[None, :]
    row_ok = ok & (j == 0).to(tl.int8)
    lim = tl.minimum(M, r0 + rows_per_prog)
    g_nx, p_nx = first_tiles(g_base, p_base, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim, cmask, PF)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=1):
        rmask = r0 + m0 + lrows < M
        mask = rmask[:, None] & cmask[None, :]
        g, p, g_nx, p_nx = next_tiles(g_nx, p_nx, g_base, p_base, m0, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim,
                                      cmask, mask, PF, BLOCK_M)
        if HAS_SCALE:
            g = g * scale
        new_row = tl.load(newrow + m0 + lrows, mask=rmask, other=1.0)
        r = tl.rsqrt(new_row / row_mean)
        u = g * r[:, None] * c[None, :] * clip
        if HAS_M:
            m_ptrs = m_ptr + lin_base + m0 * N + lin_offs
            m = tl.load(m_ptrs, mask=mask, other=0.0)
            m = m * beta1 + u * one_minus_beta1
            tl.store(m_ptrs, m, mask=and_flag(mask, ok))
            u = m
        p_ptrs = p_base + m0 * sp_m + p_offs
        if HAS_WD:
            new = p * decay
        else:
            new = p
        new = new + u * neg_step
        if SR:
            rows = (b64 * M + r0 + m0 + lrows).to(tl.int32)
            new = round_to_bf16(new, rows[:, None] * N + cols[None, :], seed)
        tl.store(p_ptrs, new.to(p_ptr.dtype.element_ty), mask=and_flag(mask, ok))
        tl.store(row_ptr + b64 * M + r0 + m0 + lrows, new_row, mask=and_flag(rmask, row_ok))
    tl.store(col_ptr + b64 * N + cols, new_col, mask=and_flag(cmask, ok & (i == 0).to(tl.int8)))


# ------------------------------------------------------------------- one tensor per launch (FSDP2 shards)
# every integer argument unspecialised: a compiled variant depends on the constexprs and pointers only (``Launcher``)
_STATS_INTS = "B M N TM TN rows_per_prog sg_b sg_m sg_n sp_b sp_m sp_n off_rowpart off_colpart off_psq".split()
_FINALIZE_INTS = "B M N TM TN n_rp n_cp off_rowpart off_colpart off_newrow off_newcol off_rsum off_fin".split()
_RMS_INTS = "B M N TM TN rows_per_prog sg_b sg_m sg_n n_rp off_newrow off_newcol off_rsum off_usq".split()
_WRITE_INTS = ("seed B M N TM TN rows_per_prog sg_b sg_m sg_n sp_b sp_m sp_n n_rp off_newrow off_newcol off_rsum "
               "off_scal n_fin n_usq n_psq off_fin off_usq off_psq").split()


@triton.jit(do_not_specialize=_STATS_INTS)
def factored_stats_kernel(g_ptr, p_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b,
                          sp_m, sp_n, off_rowpart, off_colpart, off_psq, eps1, HAS_SCALE: tl.constexpr,
                          SUM_P: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _stats(tl.program_id(0), g_ptr, p_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b,
           sp_m, sp_n, off_rowpart, off_colpart, off_psq, eps1, HAS_SCALE, SUM_P, ALIGN, G_UNIT, P_UNIT, BLOCK_M,
           BLOCK_N)


@triton.jit(do_not_specialize=_FINALIZE_INTS)
def factored_finalize_kernel(row_ptr, col_ptr, ws_ptr, B, M, N, TM, TN, n_rp, n_cp, off_rowpart, off_colpart,
                             off_newrow, off_newcol, off_rsum, off_fin, beta2, one_minus_beta2, col_count,
                             BLOCK: tl.constexpr, PB: tl.constexpr):
    _finalize(tl.program_id(0), row_ptr, col_ptr, ws_ptr, B, M, N, TM, TN, n_rp, n_cp, off_rowpart, off_colpart,
              off_newrow, off_newcol, off_rsum, off_fin, beta2, one_minus_beta2, col_count, BLOCK, PB)


@triton.jit(do_not_specialize=_RMS_INTS)
def factored_rms_kernel(g_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, n_rp, off_newrow,
                        off_newcol, off_rsum, off_usq, HAS_SCALE: tl.constexpr, ALIGN: tl.constexpr,
                        G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr,
                        WEIGHTS: tl.constexpr):
    _rms(tl.program_id(0), g_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, n_rp, off_newrow,
         off_newcol, off_rsum, off_usq, HAS_SCALE, ALIGN, G_UNIT, BLOCK_M, BLOCK_N, RP_BLOCK, 1, WEIGHTS)


@triton.jit(do_not_specialize=_WRITE_INTS)
def factored_write_kernel(g_ptr, p_ptr, scale_ptr, ws_ptr, row_ptr, col_ptr, m_ptr, ok_ptr, seed, B, M, N, TM, TN,
                          rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, n_rp, off_newrow, off_newcol, off_rsum,
                          off_scal, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho, eps2,
                          clip_threshold, weight_decay, beta1, one_minus_beta1, HAS_SCALE: tl.constexpr,
                          SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr, HAS_M: tl.constexpr, SR: tl.constexpr,
                          ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr):
    """The write of one tensor whose partial sums were reduced across ranks: every program folds them (FOLD) and
    program 0 ANDs the finite flag into ``*ok_ptr``."""
    _write(tl.program_id(0), g_ptr, p_ptr, scale_ptr, ws_ptr, row_ptr, col_ptr, m_ptr, ok_ptr, seed,
           B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, n_rp, off_newrow, off_newcol, off_rsum,
           off_scal, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho, eps2, clip_threshold,
           weight_decay, beta1, one_minus_beta1, HAS_SCALE, SCALE_PARAM, HAS_WD, HAS_M, SR, True, ALIGN, G_UNIT,
           P_UNIT, BLOCK_M, BLOCK_N, RP_BLOCK)


stats = Launcher(factored_stats_kernel, "HAS_SCALE", "SUM_P", "ALIGN", "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N")
finalize = Launcher(factored_finalize_kernel, "BLOCK", "PB")
rms = Launcher(factored_rms_kernel, "HAS_SCALE", "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N", "RP_BLOCK", "WEIGHTS")
write = Launcher(factored_write_kernel, "HAS_SCALE", "SCALE_PARAM", "HAS_WD", "HAS_M", "SR", "ALIGN", "G_UNIT",
                 "P_UNIT", "BLOCK_M", "BLOCK_N", "RP_BLOCK")


# ------------------------------------------------------------------------------------- grouped kernels
@triton.jit
def meta_tiling(row):
    """[B, M, N] and the row-tiled passes' geometry from a metadata row."""
    return (meta_int(row, COL.B), meta_int(row, COL.M), meta_int(row, COL.N), meta_int(row, COL.row_groups),
            meta_int(row, COL.col_tiles), meta_int(row, COL.rows_per_prog))


@triton.jit
def meta_strides(row):
    """The strides of g and p from a metadata row."""
    return (meta_int(row, COL.g_stride_b), meta_int(row, COL.g_stride_m), meta_int(row, COL.g_stride_n),
            meta_int(row, COL.p_stride_b), meta_int(row, COL.p_stride_m), meta_int(row, COL.p_stride_n))


@triton.jit
def grouped_factored_stats_kernel(meta_ptr, pmap_ptr, scale_ptr, eps1, G_DT: tl.constexpr, P_DT: tl.constexpr,
                                  HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, ALIGN: tl.constexpr,
                                  G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, DEPTH: tl.constexpr):
    pid, _, row, _ = this_program(meta_ptr, meta_ptr, pmap_ptr)
    B, M, N, TM, TN, rpp = meta_tiling(row)
    sg_b, sg_m, sg_n, sp_b, sp_m, sp_n = meta_strides(row)
    _stats(pid - meta_int(row, COL.first_prog), meta_pointer(row, COL.grad, G_DT, ALIGN),
           meta_pointer(row, COL.param, P_DT, ALIGN), scale_ptr, meta_pointer(row, COL.workspace, tl.float32, True),
           B, M, N, TM, TN, rpp, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, meta_int(row, COL.off_rowpart),
           meta_int(row, COL.off_colpart), meta_int(row, COL.off_psq), eps1, HAS_SCALE, SUM_P, ALIGN, G_UNIT, P_UNIT,
           BLOCK_M, BLOCK_N, DEPTH)


@triton.jit
def grouped_factored_finalize_kernel(meta_ptr, fmeta_ptr, pmap_ptr, BLOCK: tl.constexpr, PB: tl.constexpr):
    pid, t, row, frow = this_program(meta_ptr, fmeta_ptr, pmap_ptr)
    B, M, N, TM, TN, _ = meta_tiling(row)
    _finalize(pid - meta_int(row, COL.first_finalize_prog), meta_pointer(row, COL.row_state, tl.float32, True),
              meta_pointer(row, COL.col_state, tl.float32, True), meta_pointer(row, COL.workspace, tl.float32, True),
              B, M, N, TM, TN, meta_int(row, COL.n_row_blocks), meta_int(row, COL.n_col_blocks),
              meta_int(row, COL.off_rowpart), meta_int(row, COL.off_colpart), meta_int(row, COL.off_newrow),
              meta_int(row, COL.off_newcol), meta_int(row, COL.off_rsum), meta_int(row, COL.off_fin),
              tl.load(frow + FCOL.beta2), tl.load(frow + FCOL.one_minus_beta2), M, BLOCK, PB)


@triton.jit
def grouped_factored_rms_kernel(meta_ptr, pmap_ptr, scale_ptr, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                                ALIGN: tl.constexpr, G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr,
                                BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr, DEPTH: tl.constexpr):
    pid, _, row, _ = this_program(meta_ptr, meta_ptr, pmap_ptr)
    B, M, N, TM, TN, rpp = meta_tiling(row)
    _rms(pid - meta_int(row, COL.first_prog), meta_pointer(row, COL.grad, G_DT, ALIGN), scale_ptr,
         meta_pointer(row, COL.workspace, tl.float32, True), B, M, N, TM, TN, rpp, meta_int(row, COL.g_stride_b),
         meta_int(row, COL.g_stride_m), meta_int(row, COL.g_stride_n), meta_int(row, COL.n_row_blocks),
         meta_int(row, COL.off_newrow), meta_int(row, COL.off_newcol), meta_int(row, COL.off_rsum),
         meta_int(row, COL.off_usq), HAS_SCALE, ALIGN, G_UNIT, BLOCK_M, BLOCK_N, RP_BLOCK, DEPTH)


@triton.jit
def grouped_factored_write_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, oks_ptr, weight_decay, beta1,
                                  one_minus_beta1, G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                                  SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr, HAS_M: tl.constexpr,
                                  SR: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr):
    pid, t, row, frow = this_program(meta_ptr, fmeta_ptr, pmap_ptr)
    B, M, N, TM, TN, rpp = meta_tiling(row)
    sg_b, sg_m, sg_n, sp_b, sp_m, sp_n = meta_strides(row)
    _write(pid - meta_int(row, COL.first_prog), meta_pointer(row, COL.grad, G_DT, ALIGN),
           meta_pointer(row, COL.param, P_DT, ALIGN), scale_ptr, meta_pointer(row, COL.workspace, tl.float32, True),
           meta_pointer(row, COL.row_state, tl.float32, True), meta_pointer(row, COL.col_state, tl.float32, True),
           meta_pointer(row, COL.exp_avg, tl.float32, True), oks_ptr + t, tl.load(row + COL.seed),
           B, M, N, TM, TN, rpp, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, meta_int(row, COL.n_row_blocks),
           meta_int(row, COL.off_newrow), meta_int(row, COL.off_newcol), meta_int(row, COL.off_rsum),
           meta_int(row, COL.off_scal), 0, 0, 0, 0, 0, 0, 1.0, 1.0, tl.load(frow + FCOL.rho), 0.0, 1.0, weight_decay,
           beta1, one_minus_beta1, HAS_SCALE, SCALE_PARAM, HAS_WD, HAS_M, SR, False, ALIGN, G_UNIT, P_UNIT, BLOCK_M,
           BLOCK_N, RP_BLOCK, True)


grouped_stats = Launcher(grouped_factored_stats_kernel, "G_DT", "P_DT", "HAS_SCALE", "SUM_P", "ALIGN", "G_UNIT",
                         "P_UNIT", "BLOCK_M", "BLOCK_N", "DEPTH")
grouped_finalize = Launcher(grouped_factored_finalize_kernel, "BLOCK", "PB")
grouped_rms = Launcher(grouped_factored_rms_kernel, "G_DT", "HAS_SCALE", "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N",
                       "RP_BLOCK", "DEPTH")
grouped_write = Launcher(grouped_factored_write_kernel, "G_DT", "P_DT", "HAS_SCALE", "SCALE_PARAM", "HAS_WD", "HAS_M",
                         "SR", "ALIGN", "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N", "RP_BLOCK")


# ------------------------------------------------------------------------------------------- host side
_GEOM: dict = {}
on_change(_GEOM.clear)


def geometry(B: int, M: int, N: int, fb: int = 0) -> dict:
    """Tiling and workspace layout (fp32 offsets, 16-aligned) of one [B, M, N] tensor, cached. ``fb`` > 0: in a
    grouped launch (the configured tiles, that finalize block); 0: one tensor per launch (tiles fit the matrix)."""
    key = (B, M, N, fb)
    geo = _GEOM.get(key)
    if geo is not None:
        return geo
    geo = tiling(M, N, fit=not fb)
    n_prog = B * geo["TM"] * geo["TN"]
    fb = fb or fin_block(M, N)
    n_rp, n_cp = cdiv(M, fb), cdiv(N, fb)
    n_fin = B * (n_rp + n_cp)
    geo.update(n_prog=n_prog, FIN_BLOCK=fb, PB=max(1, min(32, 4096 // fb)), n_rp=n_rp, n_cp=n_cp,
               RP_BLOCK=max(2, next_pow2(n_rp)), n_fin=n_fin, n_usq=n_prog, n_psq=n_prog)
    mp, np_ = cdiv(M, 16) * 16, cdiv(N, 16) * 16  # partial rows padded to 16 floats
    workspace(geo, rowpart=geo["TN"] * B * mp, colpart=geo["TM"] * B * np_, newrow=B * M, newcol=B * N,
              rsum=B * n_rp, fin=n_fin, usq=n_prog, psq=n_prog, scal=2)
    _GEOM[key] = geo
    return geo


#: metadata columns taken from a matrix's geometry (``geometry``'s keys)
_GEOMETRY_COLUMNS = {"row_groups": "TM", "col_tiles": "TN", "rows_per_prog": "rows_per_prog", "n_row_blocks": "n_rp",
                     "n_col_blocks": "n_cp", "n_fin": "n_fin", "n_usq": "n_usq", "n_psq": "n_psq",
                     **{f"off_{r}": f"off_{r}" for r in ("rowpart", "colpart", "newrow", "newcol", "rsum", "fin", "usq",
                                                         "psq", "scal")}}


def plan_group(items: list, layout: tuple, nb: int, fb: int, has_m: bool, dev: torch.device) -> grouped.GroupPlan:
    """A group of matrices (``items``: (index, p, g, state tensors, g strides, p strides, (B, M, N))) with finalize
    block ``fb``, whose statistics take ``one_read``'s pass when ``nb`` (its row tile width) is not 0."""
    gp = grouped.GroupPlan(True, layout, [it[0] for it in items])
    gp.fb = fb
    geos = [geometry(B, M, N, fb) for *_, (B, M, N) in items]
    if nb:
        geos = [one_read.geometry(geo, B, M, N, nb) for geo, (*_, (B, M, N)) in zip(geos, items)]
        gp.nb, gp.bm1 = nb, one_read.tile_rows(nb)
    fcounts, counts1 = [], []
    for (_, p, _, sts, sg, sp, (B, M, N)), geo in zip(items, geos):
        n_fprog = geo["n_fprog"] if nb else B * (geo["n_rp"] + geo["n_cp"])
        extra = {}
        if nb:
            extra = dict(row_groups_1=geo["TM1"], rows_per_prog_1=geo["RPP1"], off_colpart_1=geo["off_colpart1"],
                         off_wpart=geo["off_wpart"], first_prog_1=gp.prog1)
            counts1.append(geo["n_prog1"])
            gp.prog1 += geo["n_prog1"]
        gp.add(p, (sts[0].data_ptr(), sts[1].data_ptr(), sts[-1].data_ptr() if has_m else 0), geo["n_prog"],
               geo["ws_numel"], B * M * N, B=B, M=M, N=N, **grouped.stride_columns(sg, sp),
               first_finalize_prog=gp.fprog, **{col: geo[key] for col, key in _GEOMETRY_COLUMNS.items()}, **extra)
        fcounts.append(n_fprog)
        gp.fprog += n_fprog
    gp.rp_block = max(geo["RP_BLOCK"] for geo in geos)
    gp.pmap, gp.fpmap = grouped.program_map(gp.counts, dev), grouped.program_map(fcounts, dev)
    gp.pmap1 = grouped.program_map(counts1, dev) if nb else None
    return gp


def launch_group(gp: grouped.GroupPlan, meta_t, fmeta_t, oks, run: tuple, scale, has_scale: bool, sp_flag: bool,
                 hw: bool, has_m: bool, stochastic_rounding: bool, eps1: float, eps2: float, ct: float, wd: float,
                 b1: float, omb1: float) -> None:
    """The launches of one group of matrices (``run``: stream, device, launch-cache key). The statistics pass reads
    p (for RMS(p), ``sp_flag``) in the loop that reads g: every step sizes itself by the p it updates."""
    pdt, gdt, align, g_unit, p_unit = gp.layout
    bm, bn = CONFIG["block_m"], CONFIG["block_n"]
    rs = pipeline_depth_for(CONFIG["pipeline_depth"], bm, bn, gdt, pdt)
    sr = bool(stochastic_rounding) and pdt == torch.bfloat16
    gd, pd = TL_DTYPES[gdt], TL_DTYPES[pdt]
    fin = (gp.fb, max(1, min(32, 4096 // gp.fb)))
    if gp.nb:
        one_read.stats(gp.prog1, (meta_t, fmeta_t, gp.pmap1, scale, eps1),
                       (gd, pd, has_scale, sp_flag, align, g_unit, p_unit, gp.bm1, gp.nb), CONFIG["warps_one_read"],
                       run)
        one_read.finalize(gp.fprog, (meta_t, fmeta_t, gp.fpmap), fin, 4, run)
    else:
        grouped_stats(gp.prog, (meta_t, gp.pmap, scale, eps1),
                      (gd, pd, has_scale, sp_flag, align, g_unit, p_unit, bm, bn, rs), CONFIG["warps_stats"], run)
        grouped_finalize(gp.fprog, (meta_t, fmeta_t, gp.fpmap), fin, 4, run)
        grouped_rms(gp.prog, (meta_t, gp.pmap, scale), (gd, has_scale, align, g_unit, bm, bn, gp.rp_block, rs),
                    CONFIG["warps_usq"], run)
    grouped.finish(len(gp.idx), (meta_t, fmeta_t, scale, oks, eps2, ct), (False, True, sp_flag, 1024), 4, run)
    grouped_write(gp.prog, (meta_t, fmeta_t, gp.pmap, scale, oks, wd, b1, omb1),
                  (gd, pd, has_scale, sp_flag, hw, has_m, sr, align, g_unit, p_unit, bm, bn, gp.rp_block),
                  CONFIG["warps_write"], run)
