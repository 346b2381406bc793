"""LOMO (fused SGD) on any tensor seen as [B, M, N]: p <- p * (1 - lr * wd) - lr * clamp(g * scale, -c, c), in two
passes: a sum of g (its finite test: the update is skipped when it is NaN or inf), then the write."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grouped
from .common import (
    and_flag,
    first_tile,
    first_tiles,
    load_tile,
    next_tiles,
    round_to_bf16,
    strides_known,
    tile_coords,
    write_scalars,
)
from .config import CONFIG, on_change, pipeline_depth_for, tiling, workspace
from .grouped import COL, FCOL, meta_int, meta_pointer, this_program
from .launch import TL_DTYPES, Launcher


@triton.jit
def _sum(pid, g_ptr, ws_ptr, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, off_fin, ALIGN: tl.constexpr,
         G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr = 1):
    N, sg_b, sg_m, sg_n = strides_known(N, sg_b, sg_m, sg_n, ALIGN, G_UNIT)
    b, i, j = tile_coords(pid, TM, TN)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    r0 = i * rows_per_prog
    g_base = g_ptr + b.to(tl.int64) * sg_b + r0.to(tl.int64) * sg_m
    lrows = tl.arange(0, BLOCK_M)
    g_offs = lrows[:, None] * sg_m + cols[None, :] * sg_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    lim = tl.minimum(M, r0 + rows_per_prog)
    g_nx = first_tile(g_base, sg_m, g_offs, r0, lrows, lim, cmask, DEPTH)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=DEPTH):
        if DEPTH <= 1:  # not next_tile: adding before the next load is the order that measured faster
            acc += g_nx.to(tl.float32)
            g_nx = load_tile(g_base, m0 + BLOCK_M, sg_m, g_offs, r0, lrows, lim, cmask)
        else:
            acc += load_tile(g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask).to(tl.float32)
    tl.store(ws_ptr + off_fin + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def _write(pid, g_ptr, p_ptr, scale_ptr, ws_ptr, ok_ptr, seed, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b,
           sp_m, sp_n, n_fin, off_scal, lr, weight_decay, clip_value, HAS_SCALE: tl.constexpr, HAS_WD: tl.constexpr,
           HAS_CLIP: tl.constexpr, SR: tl.constexpr, FOLD: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
           P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PF: tl.constexpr = False):
    N, sg_b, sg_m, sg_n = strides_known(N, sg_b, sg_m, sg_n, ALIGN, G_UNIT)
    _, sp_b, sp_m, sp_n = strides_known(N, sp_b, sp_m, sp_n, ALIGN, P_UNIT)
    ok, clip, step = write_scalars(pid, ws_ptr, scale_ptr, ok_ptr, n_fin, 0, 0, 0, 0, 0, off_scal, 1.0, 1.0, 0.0, 0.0,
                                   1.0, FOLD, HAS_SCALE, False, False)
    b, i, j = tile_coords(pid, TM, TN)
    b64 = b.to(tl.int64)
    decay = 1.0 - lr * weight_decay
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    r0 = i * rows_per_prog
    g_base = g_ptr + b64 * sg_b + r0.to(tl.int64) * sg_m
    p_base = p_ptr + b64 * sp_b + r0.to(tl.int64) * sp_m
    lrows = tl.arange(0, BLOCK_M)
    g_offs = lrows[:, None] * sg_m + cols[None, :] * sg_n
    p_offs = lrows[:, None] * sp_m + cols[None, :] * sp_n
    lim = tl.minimum(M, r0 + rows_per_prog)
    g_nx, p_nx = first_tiles(g_base, p_base, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim, cmask, PF)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=1):
        mask = (r0 + m0 + lrows < M)[:, None] & cmask[None, :]
        g, p, g_nx, p_nx = next_tiles(g_nx, p_nx, g_base, p_base, m0, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim,
                                      cmask, mask, PF, BLOCK_M)
        if HAS_SCALE:
            g = g * scale
        if HAS_CLIP:
            g = tl.minimum(tl.maximum(g, -clip_value), clip_value)
        p_ptrs = p_base + m0 * sp_m + p_offs
        if HAS_WD:
            new = p * decay
        else:
            new = p
        new = new + g * (-lr)
        if SR:
            rows = (b64 * M + r0 + m0 + lrows).to(tl.int32)
            new = round_to_bf16(new, rows[:, None] * N + cols[None, :], seed)
        tl.store(p_ptrs, new.to(p_ptr.dtype.element_ty), mask=and_flag(mask, ok))


# ------------------------------------------------------------------- one tensor per launch (FSDP2 shards)
@triton.jit(do_not_specialize=["M", "N", "TM", "TN", "rows_per_prog", "sg_b", "sg_m", "sg_n", "off_fin"])
def lomo_sum_kernel(g_ptr, ws_ptr, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, off_fin, ALIGN: tl.constexpr,
                    G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _sum(tl.program_id(0), g_ptr, ws_ptr, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, off_fin, ALIGN, G_UNIT,
         BLOCK_M, BLOCK_N)


@triton.jit(do_not_specialize=["seed", "M", "N", "TM", "TN", "rows_per_prog", "sg_b", "sg_m", "sg_n", "sp_b", "sp_m",
                               "sp_n", "n_fin", "off_scal"])
def lomo_write_kernel(g_ptr, p_ptr, scale_ptr, ws_ptr, ok_ptr, seed, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n,
                      sp_b, sp_m, sp_n, n_fin, off_scal, lr, weight_decay, clip_value, HAS_SCALE: tl.constexpr,
                      HAS_WD: tl.constexpr, HAS_CLIP: tl.constexpr, SR: tl.constexpr, ALIGN: tl.constexpr,
                      G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The write of one tensor whose finite test was reduced across ranks (folded by every program; program 0 ANDs
    the flag into ``*ok_ptr``)."""
    _write(tl.program_id(0), g_ptr, p_ptr, scale_ptr, ws_ptr, ok_ptr, seed, M, N, TM, TN, rows_per_prog, sg_b, sg_m,
           sg_n, sp_b, sp_m, sp_n, n_fin, off_scal, lr, weight_decay, clip_value, HAS_SCALE, HAS_WD, HAS_CLIP, SR,
           True, ALIGN, G_UNIT, P_UNIT, BLOCK_M, BLOCK_N)


sum_ = Launcher(lomo_sum_kernel, "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N")
write = Launcher(lomo_write_kernel, "HAS_SCALE", "HAS_WD", "HAS_CLIP", "SR", "ALIGN", "G_UNIT", "P_UNIT", "BLOCK_M",
                 "BLOCK_N")


# ------------------------------------------------------------------------------------- grouped kernels
@triton.jit
def grouped_lomo_sum_kernel(meta_ptr, pmap_ptr, G_DT: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr):
    pid, _, row, _ = this_program(meta_ptr, meta_ptr, pmap_ptr)
    _sum(pid - meta_int(row, COL.first_prog), meta_pointer(row, COL.grad, G_DT, ALIGN),
         meta_pointer(row, COL.workspace, tl.float32, True), meta_int(row, COL.M), meta_int(row, COL.N),
         meta_int(row, COL.row_groups), meta_int(row, COL.col_tiles), meta_int(row, COL.rows_per_prog),
         meta_int(row, COL.g_stride_b), meta_int(row, COL.g_stride_m), meta_int(row, COL.g_stride_n),
         meta_int(row, COL.off_fin), ALIGN, G_UNIT, BLOCK_M, BLOCK_N, DEPTH)


@triton.jit
def grouped_lomo_write_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, oks_ptr, clip_value, G_DT: tl.constexpr,
                              P_DT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WD: tl.constexpr,
                              HAS_CLIP: tl.constexpr, SR: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                              P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # lr and weight decay come with the per-call metadata, like the scaled updates' step sizes
    pid, t, row, frow = this_program(meta_ptr, fmeta_ptr, pmap_ptr)
    _write(pid - meta_int(row, COL.first_prog), meta_pointer(row, COL.grad, G_DT, ALIGN),
           meta_pointer(row, COL.param, P_DT, ALIGN), scale_ptr, meta_pointer(row, COL.workspace, tl.float32, True),
           oks_ptr + t, tl.load(row + COL.seed), meta_int(row, COL.M), meta_int(row, COL.N),
           meta_int(row, COL.row_groups), meta_int(row, COL.col_tiles), meta_int(row, COL.rows_per_prog),
           meta_int(row, COL.g_stride_b), meta_int(row, COL.g_stride_m), meta_int(row, COL.g_stride_n),
           meta_int(row, COL.p_stride_b), meta_int(row, COL.p_stride_m), meta_int(row, COL.p_stride_n),
           meta_int(row, COL.n_fin), meta_int(row, COL.off_scal), tl.load(frow + FCOL.lr),
           tl.load(frow + FCOL.weight_decay), clip_value, HAS_SCALE, HAS_WD, HAS_CLIP, SR, False, ALIGN, G_UNIT,
           P_UNIT, BLOCK_M, BLOCK_N, True)


grouped_sum = Launcher(grouped_lomo_sum_kernel, "G_DT", "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N", "DEPTH")
grouped_write = Launcher(grouped_lomo_write_kernel, "G_DT", "P_DT", "HAS_SCALE", "HAS_WD", "HAS_CLIP", "SR", "ALIGN",
                         "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N")


# ------------------------------------------------------------------------------------------- host side
_GEOM: dict = {}
on_change(_GEOM.clear)


def geometry(B: int, M: int, N: int, grouped: bool = True) -> dict:
    """Tiling and workspace layout of one tensor (its one partial sum per program at offset 0), cached.
    ``grouped``: the configured tiles (else tiles that fit the matrix: one tensor per launch)."""
    key = (B, M, N, grouped)
    geo = _GEOM.get(key)
    if geo is None:
        geo = tiling(M, N, fit=not grouped)
        n_prog = geo["n_prog"] = geo["n_fin"] = B * geo["TM"] * geo["TN"]
        geo = _GEOM[key] = workspace(geo, fin=n_prog, scal=2)
    return geo


def plan_group(items: list, layout: tuple, dev: torch.device) -> grouped.GroupPlan:
    """A group of tensors (``items``: (index, p, g, (), g strides, p strides, (B, M, N))); lr and weight decay go into
    the fp32 rows per call."""
    gp = grouped.GroupPlan(False, layout, [it[0] for it in items])
    for _, p, _, _, sg, sp, (B, M, N) in items:
        geo = geometry(B, M, N)
        n = geo["n_prog"]
        gp.add(p, (0, 0, 0), n, geo["ws_numel"], B * M * N, B=B, M=M, N=N, row_groups=geo["TM"],
               col_tiles=geo["TN"], rows_per_prog=geo["rows_per_prog"], **grouped.stride_columns(sg, sp), n_fin=n,
               off_fin=geo["off_fin"], off_scal=geo["off_scal"])
    gp.pmap = grouped.program_map(gp.counts, dev)
    return gp


def launch_group(gp: grouped.GroupPlan, meta_t, fmeta_t, oks, run: tuple, scale, has_scale: bool, clip: bool,
                 cv: float, wd: float, stochastic_rounding: bool) -> None:
    """The launches of one group (``run``: stream, device, launch-cache key)."""
    pdt, gdt, align, g_unit, p_unit = gp.layout
    bm, bn = CONFIG["block_m"], CONFIG["block_n"]
    sr = bool(stochastic_rounding) and pdt == torch.bfloat16
    gd, pd = TL_DTYPES[gdt], TL_DTYPES[pdt]
    grouped_sum(gp.prog, (meta_t, gp.pmap),
                (gd, align, g_unit, bm, bn, pipeline_depth_for(CONFIG["pipeline_depth"], bm, bn, gdt)),
                CONFIG["warps_usq"], run)
    grouped.finish(len(gp.idx), (meta_t, fmeta_t, scale, oks, 0.0, 1.0), (has_scale, False, False, 1024), 4, run)
    grouped_write(gp.prog, (meta_t, fmeta_t, gp.pmap, scale, oks, cv),
                  (gd, pd, has_scale, wd != 0, clip, sr, align, g_unit, p_unit, bm, bn), CONFIG["warps_write"], run)
