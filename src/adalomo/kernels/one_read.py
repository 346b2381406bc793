"""AdaLomo/Adafactor's statistics, RMS(u) and RMS(p) from ONE read of g and p (kernel setting ``one_read``), for
matrices whose rows fit one tile (grouped launches only).

A program owns whole rows of one matrix, so a row's new factor r_i (EMA of the row mean of g^2 + eps1) is known
once the row is read, and

    sum_ij u_ij^2 = mean(r) * sum_j W_j / c_j,    W_j = sum_i g_ij^2 / r_i

needs no second read: the statistics pass accumulates W with the column sums, and the finalize pass forms sum u^2
with the new column factors c_j. The same loop sums p^2 (for RMS(p)). 10 bytes per bf16 parameter for the whole
update instead of 12.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import a16, load_tile, strides_known, sum_partial_rows, sum_parts
from .config import CONFIG, ONE_READ_MAX_ROWS, cdiv, next_pow2, workspace
from .grouped import COL, FCOL, meta_int, meta_pointer, this_program
from .launch import Launcher


@triton.jit
def grouped_factored_stats_one_read_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, eps1, G_DT: tl.constexpr,
                                           P_DT: tl.constexpr, HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr,
                                           ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                                           BLOCK_M: tl.constexpr, NB: tl.constexpr):
    """A program owns whole rows of one matrix (a row per tile line, NB >= its length): besides the column sums of
    g^2 + eps1 it accumulates W_j = sum_i g_ij^2 / r_i. Per program: one partial row of each, the sum of its new r_i
    and of its row means (the finite test), and with SUM_P (``scale_parameter``) its partial sum of p^2."""
    pid, t, row, frow = this_program(meta_ptr, fmeta_ptr, pmap_ptr)
    local = pid - meta_int(row, COL.first_prog_1)
    g_ptr = meta_pointer(row, COL.grad, G_DT, ALIGN)
    ws_ptr = meta_pointer(row, COL.workspace, tl.float32, True)
    old_ptr = meta_pointer(row, COL.row_state, tl.float32, True)
    B, M, N = meta_int(row, COL.B), meta_int(row, COL.M), meta_int(row, COL.N)
    TM1, rpp = meta_int(row, COL.row_groups_1), meta_int(row, COL.rows_per_prog_1)
    sg_b, sg_m, sg_n = meta_int(row, COL.g_stride_b), meta_int(row, COL.g_stride_m), meta_int(row, COL.g_stride_n)
    N, sg_b, sg_m, sg_n = strides_known(N, sg_b, sg_m, sg_n, ALIGN, G_UNIT)
    sp_b, sp_m, sp_n = meta_int(row, COL.p_stride_b), meta_int(row, COL.p_stride_m), meta_int(row, COL.p_stride_n)
    _, sp_b, sp_m, sp_n = strides_known(N, sp_b, sp_m, sp_n, ALIGN, P_UNIT)
    beta2, omb2 = tl.load(frow + FCOL.beta2), tl.load(frow + FCOL.one_minus_beta2)
    b = local // TM1
    i = local % TM1
    b64 = b.to(tl.int64)
    cols = tl.arange(0, NB)
    cmask = cols < N
    lrows = tl.arange(0, BLOCK_M)
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    r0 = i * rpp
    lim = tl.minimum(M, r0 + rpp)
    g_base = g_ptr + b64 * sg_b + r0.to(tl.int64) * sg_m
    offs = lrows[:, None] * sg_m + cols[None, :] * sg_n
    p_base = meta_pointer(row, COL.param, P_DT, ALIGN) + b64 * sp_b + r0.to(tl.int64) * sp_m
    p_offs = lrows[:, None] * sp_m + cols[None, :] * sp_n
    newrow = ws_ptr + a16(meta_int(row, COL.off_newrow)) + b64 * M + r0
    old = old_ptr + b64 * M + r0
    c_acc = tl.zeros([NB], dtype=tl.float32)
    w_acc = tl.zeros([NB], dtype=tl.float32)
    r_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    f_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    p_acc = tl.zeros([NB], dtype=tl.float32)
    nx = load_tile(g_base, 0, sg_m, offs, r0, lrows, lim, cmask)
    if SUM_P:
        p_nx = load_tile(p_base, 0, sp_m, p_offs, r0, lrows, lim, cmask)
    for m0 in range(0, rpp, BLOCK_M):
        g = nx.to(tl.float32)
        nx = load_tile(g_base, m0 + BLOCK_M, sg_m, offs, r0, lrows, lim, cmask)  # the next rows in flight
        if SUM_P:
            pv = p_nx.to(tl.float32)
            p_nx = load_tile(p_base, m0 + BLOCK_M, sp_m, p_offs, r0, lrows, lim, cmask)
            p_acc += tl.sum(pv * pv, axis=0)
        rmask = r0 + m0 + lrows < lim
        if HAS_SCALE:
            g = g * scale
        g2 = g * g
        a = tl.where(rmask[:, None] & cmask[None, :], g2 + eps1, 0.0)
        mean = tl.sum(a, axis=1) / N
        r = tl.load(old + m0 + lrows, mask=rmask, other=0.0) * beta2 + mean * omb2
        tl.store(newrow + m0 + lrows, r, mask=rmask)
        r_acc += tl.where(rmask, r, 0.0)
        f_acc += tl.where(rmask, mean, 0.0)
        c_acc += tl.sum(a, axis=0)
        w_acc += tl.sum(g2 * tl.where(rmask, 1.0 / tl.where(rmask, r, 1.0), 0.0)[:, None], axis=0)
    part = (i * B + b).to(tl.int64) * a16(N + 15)
    tl.store(ws_ptr + a16(meta_int(row, COL.off_colpart_1)) + part + cols, c_acc, mask=cmask)
    tl.store(ws_ptr + a16(meta_int(row, COL.off_wpart)) + part + cols, w_acc, mask=cmask)
    tl.store(ws_ptr + meta_int(row, COL.off_rsum) + b * TM1 + i, tl.sum(r_acc, axis=0))
    tl.store(ws_ptr + meta_int(row, COL.off_fin) + B * meta_int(row, COL.n_col_blocks) + b * TM1 + i,
             tl.sum(f_acc, axis=0))
    if SUM_P:
        tl.store(ws_ptr + meta_int(row, COL.off_psq) + local, tl.sum(p_acc, axis=0))


@triton.jit
def grouped_factored_finalize_one_read_kernel(meta_ptr, fmeta_ptr, pmap_ptr, BLOCK: tl.constexpr, PB: tl.constexpr):
    """Per block of columns: the new column factors c_j (EMA of the column means), their share of the finite test
    and of sum u^2 = mean(r) * sum_j W_j / c_j."""
    pid, t, row, frow = this_program(meta_ptr, fmeta_ptr, pmap_ptr)
    local = pid - meta_int(row, COL.first_finalize_prog)
    ws_ptr = meta_pointer(row, COL.workspace, tl.float32, True)
    col_ptr = meta_pointer(row, COL.col_state, tl.float32, True)
    B, M, N = meta_int(row, COL.B), meta_int(row, COL.M), meta_int(row, COL.N)
    n_cp, TM1 = meta_int(row, COL.n_col_blocks), meta_int(row, COL.row_groups_1)
    b = local // n_cp
    k = local % n_cp
    b64 = b.to(tl.int64)
    idx = k * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    Np = a16(N + 15)
    mean = sum_partial_rows(ws_ptr + a16(meta_int(row, COL.off_colpart_1)), B, b64, idx, Np, TM1, PB, BLOCK) / M
    w = sum_partial_rows(ws_ptr + a16(meta_int(row, COL.off_wpart)), B, b64, idx, Np, TM1, PB, BLOCK)
    new = tl.load(col_ptr + b64 * N + idx, mask=mask, other=0.0) * tl.load(frow + FCOL.beta2) \
        + mean * tl.load(frow + FCOL.one_minus_beta2)
    tl.store(ws_ptr + a16(meta_int(row, COL.off_newcol)) + b64 * N + idx, new, mask=mask)
    tl.store(ws_ptr + meta_int(row, COL.off_fin) + local, tl.sum(tl.where(mask, mean, 0.0), axis=0))
    row_mean = sum_parts(ws_ptr, meta_int(row, COL.off_rsum) + b * TM1, TM1, 64) / M
    usq = tl.sum(tl.where(mask, w / tl.where(mask, new, 1.0), 0.0), axis=0) * row_mean
    tl.store(ws_ptr + meta_int(row, COL.off_usq) + local, usq)


stats = Launcher(grouped_factored_stats_one_read_kernel, "G_DT", "P_DT", "HAS_SCALE", "SUM_P", "ALIGN", "G_UNIT",
                 "P_UNIT", "BLOCK_M", "NB")
finalize = Launcher(grouped_factored_finalize_one_read_kernel, "BLOCK", "PB")


def tile_width(N: int) -> int:
    """The row tile width of the one-read statistics for rows of N elements; 0: three passes."""
    nb = max(16, next_pow2(N))
    return nb if CONFIG["one_read"] and nb <= CONFIG["one_read_max_n"] else 0


def tile_rows(nb: int) -> int:
    """Rows per tile of the one-read statistics (one value per group: a constexpr)."""
    return min(max(1, CONFIG["one_read_elems"] // nb), ONE_READ_MAX_ROWS)


def geometry(geo: dict, B: int, M: int, N: int, nb: int) -> dict:
    """A grouped matrix's three-pass geometry ``geo`` (the write's tiles) with the one-read programs (TM1 row groups
    of RPP1 rows, ``tile_rows(nb)`` rows per tile: a function of the shape alone, so that fused buckets and classic
    groups sum alike) and a workspace of their own regions only: partial column sums and W, the new rows and
    columns, the sums of the new rows (TM1 per matrix), the finite test's, sum u^2's and sum p^2's partials."""
    geo = {k: v for k, v in geo.items() if not k.startswith("off_") and k != "ws_numel"}
    bm1 = tile_rows(nb)
    m_tiles = cdiv(M, bm1)
    tm_cap = max(CONFIG["one_read_tm"], cdiv(M, ONE_READ_MAX_ROWS))
    rpp1 = cdiv(m_tiles, min(m_tiles, tm_cap)) * bm1
    tm1 = cdiv(M, rpp1)
    n_cp = geo["n_cp"]
    geo.update(TM1=tm1, RPP1=rpp1, n_prog1=B * tm1, n_rp=tm1, RP_BLOCK=max(2, next_pow2(tm1)),
               n_fin=B * (n_cp + tm1), n_usq=B * n_cp, n_psq=B * tm1, n_fprog=B * n_cp)
    np_ = cdiv(N, 16) * 16
    # no three-pass statistics for this matrix: its partial rows and columns take no room
    return workspace(geo, rowpart=0, colpart=0, newrow=B * M, newcol=B * N, rsum=B * tm1, fin=B * (n_cp + tm1),
                     usq=B * n_cp, psq=B * tm1, scal=2, colpart1=tm1 * B * np_, wpart=tm1 * B * np_)
