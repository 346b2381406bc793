"""AdaLomo/Adafactor over a bucket of FSDP2 shards: the single-tensor Triton kernels on each local shard, and
the statistics that span ranks summed in **one all-reduce per bucket** (not one per tensor).

Each rank holds whole rows of every 2-D parameter (``Shard(0)``). Row statistics are local. Everything that needs
the other ranks goes into one flat fp32 buffer, summed once, per tensor:

* 2-D: the column sums of g^2 + eps1, the sum of the old row statistics, sum(p^2), and the column weights
  W_j = sum_i g_ij^2 / r_i over the local rows, r the new row statistics (local: finalized before the all-reduce).
  With u = g * rsqrt(r / mean(r)) * rsqrt(c): sum(u^2) = mean(r) * sum_j W_j / c_j, and W sums over the ranks'
  rows, so RMS(u) needs no second reduction once the new column statistics c are known. The pass over g that
  forms W replaces the RMS(u) pass: g is read as often as on one process;
* 1-D, and >= 3-D (sharded on dim 0, a batch dim of the factorisation: each rank holds whole matrices, whose
  statistics and RMS pass are the single-process ones, run before the all-reduce): the sums of the finite test,
  u^2 and p^2.

From the sums the new column statistics are the global column mean (the finalize kernel divides by the global
row count), the global mean of the new row statistics is beta2 * sum(old rows) + (1 - beta2) * total / N over the
global row count, and the total doubles as the finite test: every rank reaches the same verdict, and the write
kernels commit nothing of a tensor whose test failed. The reduced scalars go into a few slots of each tensor's
workspace, where the write kernel reads them as "partials" of length one. Partial sums are reduced by gathers and
sums (no atomics: deterministic). A rank whose shard of a tensor is empty (fewer rows than ranks) takes part in the
all-reduce with zeros and updates its copy of the replicated column statistics in torch.
"""

from __future__ import annotations

import math

import torch

from .. import _compat
from . import factored, lomo, updates, vector
from .config import CONFIG, cdiv, on_change
from .launch import LaunchContext, align_flags, on_tensor_device, prepare, scale_arg, seed_arg, shape3, state_fp32

_GLOB = 16  # per-tensor slots: 0 fin (total of g^2 + eps1), 1 sum u^2, 2 sum p^2, 3 row-mean numerator


class _Item:
    __slots__ = ("fac", "bat", "B", "M", "N", "n_local", "numel", "rows_global", "geo", "ws_off", "colg", "wpart",
                 "glob", "buf", "empty")


class _ShardPlan:
    __slots__ = ("items", "ws_total", "buf1_len", "gather1", "dst1", "col_src", "col_dst", "tot_idx", "rowold_idx",
                 "psq_idx", "w_src", "newcol_src", "w_seg", "vec_src", "scat_dst", "inv_n", "inv_rows", "m_local")


_PLANS: dict = {}
on_change(_PLANS.clear)


def _plan(ps, shards, dev) -> _ShardPlan:
    key = tuple((tuple(p.shape), tuple(s.global_shape)) for p, s in zip(ps, shards)) + (dev,)  # shapes only
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    plan = _ShardPlan()
    items, off, blen = [], 0, 0
    for p, s in zip(ps, shards):
        it = _Item()
        nd = len(s.global_shape)
        it.fac, it.bat = nd == 2, nd >= 3  # bat: dim 0 (sharded) is a batch dim, each rank holds whole matrices
        it.B, it.M, it.N = shape3(p) if p.numel() else (1, 0, (p.shape[-1] if p.dim() else 1))
        it.n_local = p.numel()
        it.numel = math.prod(s.global_shape)
        it.rows_global = s.global_shape[0]
        it.empty = p.numel() == 0
        it.geo = None if it.empty else vector.geometry(it.n_local) if nd == 1 else factored.geometry(it.B, it.M, it.N)
        it.ws_off = off
        size = 0 if it.empty else it.geo["ws_numel"]
        if it.fac:  # the reduced column sums, then the partial column weights (one row per row group)
            np_ = cdiv(it.N, 16) * 16
            it.colg = size
            it.wpart = size + np_
            size += np_ + (0 if it.empty else it.geo["TM"] * np_)
        it.glob = size
        size += _GLOB
        off += size
        it.buf = blen  # 2-D: [column sums | sum of old rows | sum p^2 | column weights]; else [fin | u^2 | p^2]
        blen += (2 * it.N + 2) if it.fac else 3
        items.append(it)
    plan.items = items
    plan.ws_total = off + 16  # the last 16 floats stay zero: the padding of the gathers below
    zero_ws = plan.ws_total - 1
    plan.buf1_len = blen + 1  # the last one stays zero (all-reduced too)
    zero_b = blen

    def pad(rows: list[list[int]], fill: int) -> torch.Tensor:
        width = max((len(r) for r in rows), default=0) or 1
        return torch.tensor([r + [fill] * (width - len(r)) for r in rows] or [[fill]], dtype=torch.int64)

    def index(xs) -> torch.Tensor:
        return torch.tensor(list(xs), dtype=torch.int64).to(dev)

    # partial sums in the workspace -> buffer slots (the column sums, the old row sums and the column weights are
    # reduced per tensor, straight into the buffer)
    g_rows, dst = [], []
    for it in items:
        if it.empty:
            continue
        w, geo = it.ws_off, it.geo
        if it.fac:
            g_rows.append([w + geo["off_psq"] + k for k in range(geo["n_prog"])])
            dst.append(it.buf + it.N + 1)
        else:
            for j, name in enumerate(("fin", "usq", "psq")):
                g_rows.append([w + geo["off_" + name] + k for k in range(geo["n_" + name])])
                dst.append(it.buf + j)
    plan.gather1 = pad(g_rows, zero_ws).to(dev)
    plan.dst1 = index(dst)
    # after the all-reduce: column sums into each workspace; per 2-D tensor its total, row-mean numerator, sum p^2
    # and sum u^2 (from the column weights and the new column statistics); the other tensors' three sums
    facs = [it for it in items if it.fac]
    live = [it for it in facs if not it.empty]
    plan.col_src = index(k for it in live for k in range(it.buf, it.buf + it.N))
    plan.col_dst = index(k for it in live for k in range(it.ws_off + it.colg, it.ws_off + it.colg + it.N))
    plan.w_src = index(k for it in live for k in range(it.buf + it.N + 2, it.buf + 2 * it.N + 2))
    plan.newcol_src = index(k for it in live for k in range(it.ws_off + it.geo["off_newcol"],
                                                             it.ws_off + it.geo["off_newcol"] + it.N))
    seg, n = [], 0  # per 2-D tensor, its entries of W / c (an empty shard: none, it sums to zero)
    for it in facs:
        seg.append(list(range(n, n + (0 if it.empty else it.N))))
        n += len(seg[-1])
    plan.w_seg = pad(seg, n).to(dev)  # entry n: the zero appended to W / c
    plan.tot_idx = pad([list(range(it.buf, it.buf + it.N)) for it in facs], zero_b).to(dev)
    plan.rowold_idx = index(it.buf + it.N for it in facs)
    plan.psq_idx = index(it.buf + it.N + 1 for it in facs)
    others = [it for it in items if not it.fac and not it.empty]
    plan.vec_src = index(it.buf + j for it in others for j in range(3))
    vec_dst = [it.ws_off + it.glob + j for it in others for j in range(3)]

    # scatter order: [totals | row-mean numerators | sum p^2 | sum u^2] of the 2-D tensors (empty shards to the
    # zero slot, which is rewritten to zero below), then the other tensors' sums
    def slot(it, j):
        return it.ws_off + it.glob + j if not it.empty else zero_ws
    plan.scat_dst = index([slot(it, j) for j in (0, 3, 2, 1) for it in facs] + vec_dst)
    plan.inv_n = torch.tensor([1.0 / it.N for it in facs], dtype=torch.float32).to(dev)
    plan.inv_rows = torch.tensor([1.0 / it.rows_global for it in facs], dtype=torch.float32).to(dev)
    plan.m_local = torch.tensor([float(it.M) for it in facs], dtype=torch.float32).to(dev)
    _PLANS[key] = plan
    return plan


@on_tensor_device
def scaled_rms_update_sharded_(ps, gs, states, shards, *, rhos, beta2s, eps, clip_threshold, weight_decay,
                               scale_parameter, beta1, grad_scale, stochastic_rounding, seeds):
    """``kernels.scaled_rms_update_many_`` for the local shards ``ps``/``gs``/``states`` (plain tensors) of
    FSDP2 parameters with :class:`~adalomo.distributed.ShardInfo` ``shards`` (one process group for all).
    Returns the 0-d bool "every gradient was finite" (the same on every rank)."""
    import torch.distributed as dist

    dev = ps[0].device
    ctx = LaunchContext(ps[0])
    group = shards[0].group
    plan = _plan(ps, shards, dev)
    has_scale, scale = scale_arg(grad_scale, ps[0])
    has_m = beta1 is not None
    b1, omb1 = (float(beta1), 1.0 - float(beta1)) if has_m else (0.0, 1.0)
    sp_flag, hw = bool(scale_parameter), weight_decay != 0
    eps1, eps2, ct, wd = float(eps[0]), float(eps[1]), float(clip_threshold), float(weight_decay)
    run = (ctx.stream, ctx.device, None)
    ws_all = torch.zeros(plan.ws_total, dtype=torch.float32, device=dev)
    buf1 = torch.zeros(plan.buf1_len, dtype=torch.float32, device=dev)
    okacc = torch.ones((), dtype=torch.bool, device=dev)  # the write kernels AND their tensor's flag into it
    copies_all, work = [], []
    for i, (it, p, g, st) in enumerate(zip(plan.items, ps, gs, states)):
        copies: list = []
        copies_all.append(copies)
        if it.empty:
            work.append(None)
            continue
        g, sg, p_work, sp = prepare(p, g)
        ws = ws_all[it.ws_off:it.ws_off + it.glob + _GLOB]
        geo = it.geo
        B, M, N = it.B, it.M, it.N
        b2 = float(beta2s[i])
        if it.fac or it.bat:
            row = state_fp32(st, "exp_avg_sq_row", copies)
            col = state_fp32(st, "exp_avg_sq_col", copies)
            align, g_unit, p_unit = align_flags(N, sg, sp)
            tiles = (B, M, N, geo["TM"], geo["TN"], geo["rows_per_prog"])
            blocks = (geo["BLOCK_M"], geo["BLOCK_N"])
            factored.stats(geo["n_prog"], (g, p_work, scale, ws, *tiles, *sg, *sp, geo["off_rowpart"],
                                           geo["off_colpart"], geo["off_psq"], eps1),
                           (has_scale, sp_flag, align, g_unit, p_unit, *blocks), CONFIG["warps_stats"], run)
            fin_in = (geo["n_rp"], geo["n_cp"], geo["off_rowpart"])  # the finalize pass: its blocks, its inputs
            fin_out = (geo["off_newrow"], geo["off_newcol"], geo["off_rsum"], geo["off_fin"], b2, 1.0 - b2)
            if it.bat:  # whole matrices: the single-process passes, with the local partials
                factored.finalize(B * (geo["n_rp"] + geo["n_cp"]), (row, col, ws, *tiles[:5], *fin_in,
                                                                   geo["off_colpart"], *fin_out, float(M)),
                                  (geo["FIN_BLOCK"], geo["PB"]), 4, run)
                factored.rms(geo["n_prog"], (g, scale, ws, *tiles, *sg, geo["n_rp"], geo["off_newrow"],
                                             geo["off_newcol"], geo["off_rsum"], geo["off_usq"]),
                             (has_scale, align, g_unit, *blocks, geo["RP_BLOCK"], False), CONFIG["warps_usq"], run)
            else:
                np_ = cdiv(N, 16) * 16
                cp = ws[geo["off_colpart"]:geo["off_colpart"] + geo["TM"] * np_].view(geo["TM"], np_)[:, :N]
                torch.sum(cp, 0, out=buf1[it.buf:it.buf + N])
                torch.sum(row, 0, keepdim=True, out=buf1[it.buf + N:it.buf + N + 1])
                # this rank's rows are whole, so their new statistics are local: the row programs of the finalize
                # pass, then the column weights (sum u^2 once the column statistics are reduced)
                factored.finalize(geo["n_rp"], (row, col, ws, B, M, N, 1, geo["TN"], *fin_in, it.colg, *fin_out,
                                                float(it.rows_global)),
                                  (geo["FIN_BLOCK"], geo["PB"]), 4, run)
                factored.rms(geo["n_prog"], (g, scale, ws, *tiles, *sg, 1, geo["off_newrow"], geo["off_newcol"],
                                             geo["off_rsum"], it.wpart),
                             (has_scale, align, g_unit, *blocks, 2, True), CONFIG["warps_usq"], run)
                wp = ws[it.wpart:it.wpart + geo["TM"] * np_].view(geo["TM"], np_)[:, :N]
                torch.sum(wp, 0, out=buf1[it.buf + N + 2:it.buf + 2 * N + 2])
            work.append((g, sg, p_work, sp, ws, row, col, align, g_unit, p_unit))
        else:
            v = state_fp32(st, "exp_avg_sq", copies)
            g_unit, p_unit = sg[2] == 1, sp[2] == 1
            vector.stats(geo["n_vec"], (g, p_work, scale, v, ws, it.n_local, sg[2], sp[2], geo["off_newv"],
                                        geo["off_fin"], geo["off_usq"], geo["off_psq"], eps1, b2, 1.0 - b2),
                         (has_scale, sp_flag, g_unit, p_unit, geo["VEC_BLOCK"]), 4, run)
            work.append((g, sg, p_work, sp, ws, v, g_unit, p_unit))
    if plan.dst1.numel():
        buf1[plan.dst1] = ws_all[plan.gather1].sum(1)
    dist.all_reduce(buf1, op=dist.ReduceOp.SUM, group=group)

    vals = []
    facs = [it for it in plan.items if it.fac]
    if facs:
        if plan.col_src.numel():
            ws_all[plan.col_dst] = buf1[plan.col_src]
        for i, (it, w) in enumerate(zip(plan.items, work)):
            if w is None or not it.fac:
                continue
            row, col, ws, geo, b2 = w[5], w[6], w[4], it.geo, float(beta2s[i])
            # the column programs of the finalize pass only (n_rp = 0; the rows were finalized before the
            # all-reduce), over the reduced column sums and the global row count
            factored.finalize(geo["n_cp"], (row, col, ws, it.B, it.M, it.N, 1, geo["TN"], 0, geo["n_cp"],
                                            geo["off_rowpart"], it.colg, geo["off_newrow"], geo["off_newcol"],
                                            geo["off_rsum"], geo["off_fin"], b2, 1.0 - b2, float(it.rows_global)),
                              (geo["FIN_BLOCK"], geo["PB"]), 4, run)
        totals = buf1[plan.tot_idx].sum(1)
        rowold = buf1[plan.rowold_idx]
        fac_b2 = [float(beta2s[i]) for i, it in enumerate(plan.items) if it.fac]
        if len(set(fac_b2)) == 1:
            b2, omb2 = fac_b2[0], 1.0 - fac_b2[0]
        else:  # tensors at different step counts in one bucket (rare): a small upload from pageable memory
            b2 = torch.tensor(fac_b2, dtype=torch.float32).to(dev, non_blocking=True)
            omb2 = 1.0 - b2
        # the global mean of the new row statistics
        row_mean = (rowold * b2 + totals * plan.inv_n * omb2) * plan.inv_rows
        # sum u^2 = mean(r) * sum_j W_j / c_j; the last entry of buf1 (zero) ends W / c for the padded sums
        w_over_c = torch.cat([buf1[plan.w_src] / ws_all[plan.newcol_src], buf1[-1:]])
        usq = w_over_c[plan.w_seg].sum(1) * row_mean
        # the row-mean numerator: times the local row count (the write kernel divides by it)
        vals = [totals, row_mean * plan.m_local, buf1[plan.psq_idx], usq]
    if plan.vec_src.numel():
        vals.append(buf1[plan.vec_src])
    if vals:
        ws_all[plan.scat_dst] = torch.cat(vals)
        # empty shards' slots went there. zero_() on a slice, not ``ws_all[-1] = 0.0``: assigning a Python number to
        # a 0-d CUDA view copies a CPU tensor in with copy_(), which synchronises the host with the device
        ws_all[-1:].zero_()
    for i, (it, w, s) in enumerate(zip(plan.items, work, shards)):
        sr = bool(stochastic_rounding) and ps[i].dtype == torch.bfloat16
        seed = seeds[i]
        if sr and s.row_offset:  # other shards draw other bits (as the per-tensor path does)
            seed = (seed * 1_000_037 + s.row_offset) % (1 << 62)
        sd = seed_arg(sr, seed)
        scal = (float(it.numel), math.sqrt(it.numel), float(rhos[i]), eps2, ct)
        glob = (1, 1, 1, it.glob, it.glob + 1, it.glob + 2)
        if w is None:
            _empty_shard_(it, states[i], buf1, float(beta2s[i]), okacc)
            continue
        copies = copies_all[i]
        m_t = state_fp32(states[i], "exp_avg", copies) if has_m else None
        if it.fac or it.bat:
            g, sg, p_work, sp, ws, row, col, align, g_unit, p_unit = w
            geo, B, M, N = it.geo, it.B, it.M, it.N
            # mean(row): the global one in a slot (2-D), or per matrix from the local partials (>= 3-D)
            rsum = (geo["n_rp"], geo["off_rsum"], geo["RP_BLOCK"]) if it.bat else (1, it.glob + 3, 2)
            factored.write(geo["n_prog"], (g, p_work, scale, ws, row, col, ws if m_t is None else m_t, okacc, sd, B,
                                           M, N, geo["TM"], geo["TN"], geo["rows_per_prog"], *sg, *sp, rsum[0],
                                           geo["off_newrow"], geo["off_newcol"], rsum[1], geo["off_scal"], *glob,
                                           *scal, wd, b1, omb1),
                           (has_scale, sp_flag, hw, has_m, sr, align, g_unit, p_unit, geo["BLOCK_M"], geo["BLOCK_N"],
                            rsum[2]), CONFIG["warps_write"], run)
        else:
            g, sg, p_work, sp, ws, v, g_unit, p_unit = w
            geo = it.geo
            vector.write(geo["n_vec"], (g, p_work, scale, v, ws if m_t is None else m_t, okacc, ws, sd, it.n_local,
                                        sg[2], sp[2], geo["off_newv"], geo["off_scal"], *glob, *scal, wd, b1, omb1),
                         (has_scale, sp_flag, hw, has_m, sr, g_unit, p_unit, geo["VEC_BLOCK"]), 4, run)
        for key, t in copies:
            states[i][key].copy_(t)
        if p_work is not ps[i]:
            ps[i].copy_(p_work)
    live = [p for p, w in zip(ps, work) if w is not None]
    if live:
        _compat.bump_versions(live)
    return okacc


def _empty_shard_(it: _Item, state: dict, buf1: torch.Tensor, beta2: float, okacc: torch.Tensor) -> None:
    """This rank holds no rows of the tensor: join the verdict, and for a matrix update this rank's copy of the
    replicated column statistics (what the finalize kernel does on the ranks that hold rows)."""
    if it.fac:
        col_sum = buf1[it.buf:it.buf + it.N]
        ok = torch.isfinite(col_sum.sum())
        col = state["exp_avg_sq_col"]
        col.copy_(torch.where(ok, col * beta2 + (col_sum / it.rows_global) * (1.0 - beta2), col))
    else:  # the sum of the finite test in slot 0 (a >= 3-D tensor keeps no state here: its statistics are per matrix)
        ok = torch.isfinite(buf1[it.buf])
    okacc.logical_and_(ok)


@on_tensor_device
def lomo_update_sharded_(ps, gs, shards, *, lr, weight_decay, clip_grad_value, grad_scale, stochastic_rounding,
                         seeds):
    """``kernels.lomo_update_many_`` for the local shards of FSDP2 parameters: the sum kernel per shard, its
    partial sums reduced into one buffer, **one all-reduce** (the finite test must be global: every rank skips
    a tensor together), the global sum written into slot 0 of each workspace, the write kernel per shard."""
    import torch.distributed as dist

    dev = ps[0].device
    ctx = LaunchContext(ps[0])
    plan = _lomo_plan(ps, dev)
    has_scale, scale = scale_arg(grad_scale, ps[0])
    run = (ctx.stream, ctx.device, None)
    ws_all = torch.zeros(plan.ws_total, dtype=torch.float32, device=dev)
    okacc = torch.ones((), dtype=torch.bool, device=dev)
    work = []
    for (off, geo), p, g in zip(plan.items, ps, gs):
        if geo is None:
            work.append(None)
            continue
        g, sg, p_work, sp = prepare(p, g)
        B, M, N = shape3(p)
        ws = ws_all[off:off + geo["ws_numel"]]
        align, g_unit, p_unit = align_flags(N, sg, sp)
        lomo.sum_(geo["n_prog"], (g, ws, M, N, geo["TM"], geo["TN"], geo["rows_per_prog"], *sg, geo["off_fin"]),
                  (align, g_unit, geo["BLOCK_M"], geo["BLOCK_N"]), CONFIG["warps_usq"], run)
        work.append((g, sg, p_work, sp, ws, M, N, align, g_unit, p_unit))
    fin = ws_all[plan.gather].sum(1)  # one partial sum per tensor (0 for an empty shard)
    dist.all_reduce(fin, op=dist.ReduceOp.SUM, group=shards[0].group)
    if plan.dst.numel():
        ws_all[plan.dst] = fin[plan.live]  # slot 0 of each workspace: the write kernels read it as one partial
    clip = clip_grad_value is not None
    for i, (w, p, s) in enumerate(zip(work, ps, shards)):
        if w is None:  # no rows here: join the verdict
            f = fin[i] * scale if has_scale else fin[i]
            okacc.logical_and_(torch.isfinite(f))
            continue
        g, sg, p_work, sp, ws, M, N, align, g_unit, p_unit = w
        geo = plan.items[i][1]
        sr = bool(stochastic_rounding) and p.dtype == torch.bfloat16
        seed = seeds[i]
        if sr and s.row_offset:
            seed = (seed * 1_000_037 + s.row_offset) % (1 << 62)
        lomo.write(geo["n_prog"], (g, p_work, scale, ws, okacc, seed_arg(sr, seed), M, N, geo["TM"], geo["TN"],
                                   geo["rows_per_prog"], *sg, *sp, 1, geo["off_scal"], float(lr), float(weight_decay),
                                   float(clip_grad_value) if clip else 0.0),
                   (has_scale, weight_decay != 0, clip, sr, align, g_unit, p_unit, geo["BLOCK_M"], geo["BLOCK_N"]),
                   CONFIG["warps_write"], run)
        if p_work is not p:
            p.copy_(p_work)
    live = [p for p, w in zip(ps, work) if w is not None]
    if live:
        _compat.bump_versions(live)
    return okacc


class _LomoPlan:
    __slots__ = ("items", "ws_total", "gather", "dst", "live")


_LOMO_PLANS: dict = {}
on_change(_LOMO_PLANS.clear)


def _lomo_plan(ps, dev) -> _LomoPlan:
    key = tuple(tuple(p.shape) for p in ps) + (dev,)
    plan = _LOMO_PLANS.get(key)
    if plan is not None:
        return plan
    plan = _LomoPlan()
    items, rows, dst, live, off = [], [], [], [], 0
    for i, p in enumerate(ps):
        if p.numel() == 0:
            items.append((off, None))
            rows.append([])
            continue
        geo = lomo.geometry(*shape3(p), grouped=False)
        assert geo["off_fin"] == 0  # the write kernel reads its one partial at offset 0
        items.append((off, geo))
        rows.append([off + k for k in range(geo["n_prog"])])
        dst.append(off)
        live.append(i)
        off += geo["ws_numel"]
    plan.items = items
    plan.ws_total = off + 16
    zero = plan.ws_total - 1  # stays zero: the padding of the gather
    width = max((len(r) for r in rows), default=1) or 1
    plan.gather = torch.tensor([r + [zero] * (width - len(r)) for r in rows], dtype=torch.int64).to(dev)
    plan.dst = torch.tensor(dst, dtype=torch.int64).to(dev)
    plan.live = torch.tensor(live, dtype=torch.int64).to(dev)
    _LOMO_PLANS[key] = plan
    return plan


def update_many_by_shard(kind: str, ps, gs, states, shards, per_tensor: dict, common: dict):
    """``kernels.scaled_rms_update_many_`` (``kind`` "scaled_rms_update") or ``lomo_update_many_`` ("lomo_update") on
    DTensors: their local tensors, split into those whose local tensor is whole (``None`` shard: one rank on the
    shard dim, the single-process grouped path) and the FSDP2 shards (the sharded path, with its collectives).
    ``per_tensor``: the per-tensor arguments (lists), ``common`` the others. Returns the AND of the finite flags."""
    ps, gs = [_compat.local_tensor(p) for p in ps], [_compat.local_tensor(g) for g in gs]
    if states is not None:
        states = [{k: _compat.local_tensor(v) for k, v in st.items()} for st in states]
    flags = []
    for whole in (True, False):
        idx = [i for i, s in enumerate(shards) if (s is None) == whole]
        if not idx:
            continue
        args = [[ps[i] for i in idx], [gs[i] for i in idx]] + ([[states[i] for i in idx]] if states is not None else [])
        kw = {**common, **{k: [v[i] for i in idx] for k, v in per_tensor.items()}}
        if whole:
            fn = updates.scaled_rms_update_many_ if kind == "scaled_rms_update" else updates.lomo_update_many_
            flags.append(fn(*args, **kw))
        else:
            fn = scaled_rms_update_sharded_ if kind == "scaled_rms_update" else lomo_update_sharded_
            flags.append(fn(*args, [shards[i] for i in idx], **kw))
    return flags[0] if len(flags) == 1 else torch.stack(flags).all()
