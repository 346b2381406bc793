"""AdaLomo/Adafactor on 0-D/1-D tensors (unfactored second moment v), in two passes:

1. statistics  read g (and p): the EMA of g^2 + eps1 into the workspace, partial sums of the finite test, of u^2
               (u = g / sqrt(v)) and of p^2
2. write       (after the shared finish kernel) read g and p, write p; v (and exp_avg) committed only when the
               gradient was finite
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import grouped
from .common import a16, and_flag, round_to_bf16, write_scalars
from .config import VEC_BLOCK, cdiv, on_change, workspace
from .grouped import COL, FCOL, meta_int, meta_pointer, this_program
from .launch import TL_DTYPES, Launcher


@triton.jit
def _gradient(pid, g_ptr, scale_ptr, n, sg, HAS_SCALE: tl.constexpr, G_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    """This program's elements (indices, mask, int64 indices) and their gradient, in fp32 and scaled."""
    if G_UNIT:
        sg = 1
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    idx64 = idx.to(tl.int64)
    g = tl.load(g_ptr + idx64 * sg, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr).to(tl.float32)
    return idx, mask, idx64, g


@triton.jit
def _stats(pid, g_ptr, p_ptr, scale_ptr, v_ptr, ws_ptr, n, sg, sp, off_newv, off_fin, off_usq, off_psq, eps1, beta2,
           one_minus_beta2, HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, G_UNIT: tl.constexpr,
           P_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    if P_UNIT:
        sp = 1
    off_newv = a16(off_newv)
    _, mask, idx64, g = _gradient(pid, g_ptr, scale_ptr, n, sg, HAS_SCALE, G_UNIT, BLOCK)
    sq = tl.where(mask, g * g + eps1, 0.0)
    v = tl.load(v_ptr + idx64, mask=mask, other=1.0)
    new_v = v * beta2 + sq * one_minus_beta2
    tl.store(ws_ptr + off_newv + idx64, new_v, mask=mask)
    u = g * tl.rsqrt(tl.where(mask, new_v, 1.0))
    tl.store(ws_ptr + off_fin + pid, tl.sum(sq, axis=0))
    tl.store(ws_ptr + off_usq + pid, tl.sum(tl.where(mask, u * u, 0.0), axis=0))
    if SUM_P:
        pv = tl.load(p_ptr + idx64 * sp, mask=mask, other=0.0).to(tl.float32)
        tl.store(ws_ptr + off_psq + pid, tl.sum(pv * pv, axis=0))


@triton.jit
def _write(pid, g_ptr, p_ptr, scale_ptr, v_ptr, m_ptr, ok_ptr, ws_ptr, seed, n, sg, sp, off_newv, off_scal, n_fin,
           n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho, eps2, clip_threshold, weight_decay, beta1,
           one_minus_beta1, HAS_SCALE: tl.constexpr, SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr,
           HAS_M: tl.constexpr, SR: tl.constexpr, FOLD: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
           BLOCK: tl.constexpr):
    if P_UNIT:
        sp = 1
    off_newv = a16(off_newv)
    ok, clip, step = write_scalars(pid, ws_ptr, scale_ptr, ok_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq,
                                   off_scal, numel_f, sqrt_numel, rho, eps2, clip_threshold, FOLD, False, True,
                                   SCALE_PARAM)
    idx, mask, idx64, g = _gradient(pid, g_ptr, scale_ptr, n, sg, HAS_SCALE, G_UNIT, BLOCK)
    new_v = tl.load(ws_ptr + off_newv + idx64, mask=mask, other=1.0)
    u = g * tl.rsqrt(new_v) * clip
    if HAS_M:
        m = tl.load(m_ptr + idx64, mask=mask, other=0.0)
        m = m * beta1 + u * one_minus_beta1
        tl.store(m_ptr + idx64, m, mask=and_flag(mask, ok))
        u = m
    p = tl.load(p_ptr + idx64 * sp, mask=mask, other=0.0).to(tl.float32)
    if HAS_WD:
        new = p * (1.0 - step * weight_decay)
    else:
        new = p
    new = new + u * (-step)
    if SR:
        new = round_to_bf16(new, idx, seed)
    tl.store(p_ptr + idx64 * sp, new.to(p_ptr.dtype.element_ty), mask=and_flag(mask, ok))
    tl.store(v_ptr + idx64, new_v, mask=and_flag(mask, ok))


# ------------------------------------------------------------------- one tensor per launch (FSDP2 shards)
@triton.jit(do_not_specialize=["n", "sg", "sp", "off_newv", "off_fin", "off_usq", "off_psq"])
def vector_stats_kernel(g_ptr, p_ptr, scale_ptr, v_ptr, ws_ptr, n, sg, sp, off_newv, off_fin, off_usq, off_psq, eps1,
                        beta2, one_minus_beta2, HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, G_UNIT: tl.constexpr,
                        P_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    _stats(tl.program_id(0), g_ptr, p_ptr, scale_ptr, v_ptr, ws_ptr, n, sg, sp, off_newv, off_fin, off_usq, off_psq,
           eps1, beta2, one_minus_beta2, HAS_SCALE, SUM_P, G_UNIT, P_UNIT, BLOCK)


@triton.jit(do_not_specialize=["seed", "n", "sg", "sp", "off_newv", "off_scal", "n_fin", "n_usq", "n_psq", "off_fin",
                               "off_usq", "off_psq"])
def vector_write_kernel(g_ptr, p_ptr, scale_ptr, v_ptr, m_ptr, ok_ptr, ws_ptr, seed, n, sg, sp, off_newv, off_scal,
                        n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho, eps2,
                        clip_threshold, weight_decay, beta1, one_minus_beta1, HAS_SCALE: tl.constexpr,
                        SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr, HAS_M: tl.constexpr, SR: tl.constexpr,
                        G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    """The write of one tensor whose partial sums were reduced across ranks (folded by every program; program 0
    ANDs the finite flag into ``*ok_ptr``)."""
    _write(tl.program_id(0), g_ptr, p_ptr, scale_ptr, v_ptr, m_ptr, ok_ptr, ws_ptr, seed, n, sg, sp, off_newv,
           off_scal, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho, eps2, clip_threshold,
           weight_decay, beta1, one_minus_beta1, HAS_SCALE, SCALE_PARAM, HAS_WD, HAS_M, SR, True, G_UNIT, P_UNIT,
           BLOCK)


stats = Launcher(vector_stats_kernel, "HAS_SCALE", "SUM_P", "G_UNIT", "P_UNIT", "BLOCK")
write = Launcher(vector_write_kernel, "HAS_SCALE", "SCALE_PARAM", "HAS_WD", "HAS_M", "SR", "G_UNIT", "P_UNIT",
                 "BLOCK")


# ------------------------------------------------------------------------------------- grouped kernels
@triton.jit
def grouped_vector_stats_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, eps1, G_DT: tl.constexpr,
                                P_DT: tl.constexpr, HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr,
                                G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, row, frow = this_program(meta_ptr, fmeta_ptr, pmap_ptr)
    _stats(pid - meta_int(row, COL.first_prog), meta_pointer(row, COL.grad, G_DT, False),
           meta_pointer(row, COL.param, P_DT, False), scale_ptr, meta_pointer(row, COL.row_state, tl.float32, True),
           meta_pointer(row, COL.workspace, tl.float32, True), meta_int(row, COL.N), meta_int(row, COL.g_stride_n),
           meta_int(row, COL.p_stride_n), meta_int(row, COL.off_newrow), meta_int(row, COL.off_fin),
           meta_int(row, COL.off_usq), meta_int(row, COL.off_psq), eps1, tl.load(frow + FCOL.beta2),
           tl.load(frow + FCOL.one_minus_beta2), HAS_SCALE, SUM_P, G_UNIT, P_UNIT, BLOCK)


@triton.jit
def grouped_vector_write_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, oks_ptr, weight_decay, beta1,
                                one_minus_beta1, G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                                SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr, HAS_M: tl.constexpr,
                                SR: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    pid, t, row, frow = this_program(meta_ptr, fmeta_ptr, pmap_ptr)
    _write(pid - meta_int(row, COL.first_prog), meta_pointer(row, COL.grad, G_DT, False),
           meta_pointer(row, COL.param, P_DT, False), scale_ptr, meta_pointer(row, COL.row_state, tl.float32, True),
           meta_pointer(row, COL.exp_avg, tl.float32, True), oks_ptr + t,
           meta_pointer(row, COL.workspace, tl.float32, True), tl.load(row + COL.seed), meta_int(row, COL.N),
           meta_int(row, COL.g_stride_n), meta_int(row, COL.p_stride_n), meta_int(row, COL.off_newrow),
           meta_int(row, COL.off_scal), 0, 0, 0, 0, 0, 0, 1.0, 1.0, tl.load(frow + FCOL.rho), 0.0, 1.0, weight_decay,
           beta1, one_minus_beta1, HAS_SCALE, SCALE_PARAM, HAS_WD, HAS_M, SR, False, G_UNIT, P_UNIT, BLOCK)


grouped_stats = Launcher(grouped_vector_stats_kernel, "G_DT", "P_DT", "HAS_SCALE", "SUM_P", "G_UNIT", "P_UNIT",
                         "BLOCK")
grouped_write = Launcher(grouped_vector_write_kernel, "G_DT", "P_DT", "HAS_SCALE", "SCALE_PARAM", "HAS_WD", "HAS_M",
                         "SR", "G_UNIT", "P_UNIT", "BLOCK")


# ------------------------------------------------------------------------------------------- host side
_GEOM: dict = {}
on_change(_GEOM.clear)


def geometry(numel: int) -> dict:
    """Programs (``VEC_BLOCK`` elements each) and workspace layout of one 0-D/1-D tensor, cached."""
    geo = _GEOM.get(numel)
    if geo is None:
        nv = cdiv(numel, VEC_BLOCK)
        geo = dict(VEC_BLOCK=VEC_BLOCK, n_vec=nv, n_fin=nv, n_usq=nv, n_psq=nv)
        geo = _GEOM[numel] = workspace(geo, newv=numel, fin=nv, usq=nv, psq=nv, scal=2)
    return geo


def plan_group(items: list, layout: tuple, has_m: bool, dev: torch.device) -> grouped.GroupPlan:
    """A group of 0-D/1-D tensors (``items`` as ``factored.plan_group``'s)."""
    gp = grouped.GroupPlan(False, layout, [it[0] for it in items])
    for _, p, _, sts, sg, sp, (B, M, N) in items:
        numel = B * M * N
        geo = geometry(numel)
        n = geo["n_vec"]
        gp.add(p, (sts[0].data_ptr(), 0, sts[-1].data_ptr() if has_m else 0), n, geo["ws_numel"], numel, B=1, M=1,
               N=numel, g_stride_n=sg[2], p_stride_n=sp[2], n_fin=n, n_usq=n, n_psq=n, off_newrow=geo["off_newv"],
               off_fin=geo["off_fin"], off_usq=geo["off_usq"], off_psq=geo["off_psq"], off_scal=geo["off_scal"])
    gp.pmap = grouped.program_map(gp.counts, dev)
    return gp


def launch_group(gp: grouped.GroupPlan, meta_t, fmeta_t, oks, run: tuple, scale, has_scale: bool, sp_flag: bool,
                 hw: bool, has_m: bool, stochastic_rounding: bool, eps1: float, eps2: float, ct: float, wd: float,
                 b1: float, omb1: float) -> None:
    """The launches of one group of 0-D/1-D tensors (``run``: stream, device, launch-cache key)."""
    pdt, gdt, _, g_unit, p_unit = gp.layout
    sr = bool(stochastic_rounding) and pdt == torch.bfloat16
    gd, pd = TL_DTYPES[gdt], TL_DTYPES[pdt]
    grouped_stats(gp.prog, (meta_t, fmeta_t, gp.pmap, scale, eps1), (gd, pd, has_scale, sp_flag, g_unit, p_unit,
                                                                     VEC_BLOCK), 4, run)
    grouped.finish(len(gp.idx), (meta_t, fmeta_t, scale, oks, eps2, ct), (False, True, sp_flag, 1024), 4, run)
    grouped_write(gp.prog, (meta_t, fmeta_t, gp.pmap, scale, oks, wd, b1, omb1),
                  (gd, pd, has_scale, sp_flag, hw, has_m, sr, g_unit, p_unit, VEC_BLOCK), 4, run)
