"""Triton kernels for the per-tensor updates (imported lazily by ``adalomo.kernels``; needs ``triton``).

Every tensor is seen as a batch of matrices ``[B, M, N]`` through its strides (rows = all but the last
dim for the statistics; 0-D/1-D tensors are ``[1, 1, n]``), so non-contiguous gradients and parameters
are read and written in place. Scalars derived from device data stay on the device: the host passes
launch geometry from shapes and host floats from the CPU step counter (beta2, rho, lr, ...) only.
Reductions are two-stage (per-program partials in an fp32 workspace, then a fixed-order sum), so the
results are deterministic run to run.

Factored AdaLomo/Adafactor update (``p.dim() >= 2``), four launches, three reads of ``g``:

1. ``_fac_stats_kernel``     read g (and p): partial row/col sums of g^2 + eps1, partial sums of p^2
2. ``_fac_finalize_kernel``  row/col EMAs into temporaries, partial sums for mean(row) and the finite test
3. ``_fac_usq_kernel``       read g: partial sums of u^2, u = g * rsqrt(row/mean(row)) * rsqrt(col)
4. ``_fac_write_kernel``     every program reduces the (few, L2-resident) partials to the finite flag,
                             clip = 1/max(1, RMS(u)/d) and step = rho*max(eps2, RMS(p)) in the same fixed
                             order; then reads g, p, writes p (stochastic rounding for bf16), commits
                             row/col (and exp_avg) only when the flag is set

(with very many partials, e.g. thousands of tiny matrices, a one-program ``_finish_kernel`` reduces them
once instead). Unfactored (0-D/1-D): ``_vec_stats_kernel`` (EMA, finite test, u^2, p^2 in one pass) and
``_vec_write_kernel``. LOMO: ``_sum_kernel`` (finite test) and ``_lomo_write_kernel``.

Launch overhead matters more than anything else here (one update per parameter per step, from a
Python hook): kernels take no runtime-specialised integers (``do_not_specialize``: alignment facts are
passed as constexprs instead), so a compiled kernel depends only on the constexprs, the pointer dtypes
and pointer alignment, and ``_Launcher`` calls the compiled kernel directly on later calls.
"""

from __future__ import annotations

import ctypes
import math
import os
import struct
import sys
import warnings
import weakref

import torch
import triton
import triton.language as tl

from . import bump_versions as _bump

_PKG = sys.modules[__package__]  # adalomo.kernels: its _impl_interpreted is set once the kernels loaded

__all__ = ["scaled_rms_update_", "lomo_update_", "scaled_rms_update_many_", "lomo_update_many_", "CONFIG",
           "set_config", "bytes_moved"]

#: launch geometry; ``benchmarks/bench_kernels.py`` reports per-kernel bandwidth for it
CONFIG = {
    "block_m": 32,       # rows of a tile
    "block_n": 128,      # columns of a tile
    "max_tm": 32,        # at most this many row groups: bounds the column partials (finalize reads TM x N)
    "warps_stats": 4,
    "warps_usq": 4,
    "warps_write": 8,
    "vec_block": 1024,   # elements per program of the 0-D/1-D kernels
    "fin_block": 128,    # rows/cols per program of the finalize kernel
    "fold_max": 8192,    # at most this many partials: reduced by every write program (else one finish kernel)
    "fast_launch": True,  # call compiled kernels directly after their first launch
    # grouped AdaLomo/Adafactor: take sum(p^2) (for RMS(p)) from the previous step's write instead of reading p in
    # the statistics pass (12 -> 10 bytes per bf16 parameter; 6.7B step 1.089x of the floor against 1.106-1.111x,
    # stage ac). Used while every tensor of a bucket still has the version counter that write left; a change
    # through ``p.data`` does not bump it: the next write checks the carried sums against the p it reads, and the
    # optimizer then warns (that step's size used the old RMS(p)) and turns this off (docs/kernels.md)
    "carry_psq": True,
    # grouped AdaLomo/Adafactor: the RMS(u) pass takes its programs and rows in the reverse order of the statistics
    # pass, so that its first reads of g find the tiles that pass read last still in L2
    "reverse_usq": False,
    # register caps (ptx .maxnreg) of the grouped RMS(u) and write passes, 0 = the compiler's choice: more programs
    # per SM if the compiler fits them without spilling (sm_90, offline: RMS(u) 124 -> 96 and the write 98 -> 80
    # registers spill nothing; stage aa measures whether that is faster)
    "maxnreg_usq": 0,
    "maxnreg_write": 0,
    # software pipelining of the grouped kernels' row loops (``tl.range(num_stages=...)``): > 1 has Triton copy the
    # next tiles into shared memory asynchronously (cp.async), so that the loads in flight no longer sit in
    # registers, which bound them (~25-35 KB per SM at 2-4 registers per element: the read passes reached 2.7-3.0
    # TB/s on an H200 against 4.2 for a copy). 1 = the loop as written (the next tile prefetched into registers).
    # stages_read: the statistics, RMS(u) and Lomo sum passes (3: -3% to -6% per bucket on an H200, stage ab);
    # stages_write: the write passes (3: -2% without carry_psq; with it, the write needs 150 registers and lost)
    "stages_read": 3,
    "stages_write": 1,
    # grouped updates on CUDA: the launches of a plan (5 per group of matrices, 3 per group of vectors) are captured
    # once into a CUDA graph and replayed at every later call with the same arguments, one graph launch instead of
    # several kernel launches of host time (fused mode pays them inside a host-bound backward). Their arguments
    # are the plan's device buffers, fixed per plan and stream; what changes per call (gradient pointers,
    # workspace, seeds, step sizes) travels in the metadata copied before the replay. Not with a grad_scale tensor
    # (a new one each step). A capture that fails turns this off with a warning.
    "graphs": True,
    # grouped AdaLomo/Adafactor: the statistics and RMS(u) passes from ONE read of g (10 -> 8 bytes per bf16
    # parameter with carry_psq). A program owns whole rows, so a row's new factor r_i is known once the row is
    # read, and sum u^2 = mean(r) * sum_j W_j / c_j with W_j = sum_i g_ij^2 / r_i (accumulated with the column
    # sums) needs no second read: the finalize pass forms it with the new column factors. For matrices whose rows
    # fit one tile (next power of two of the row length <= one_read_max_n); others take the three passes.
    # H200, stage aq (grouped kernels of a bucket, all passes): a 6.7B MLP's three matrices 273 against 404 us,
    # two 4096x4096 105 against 125, six 0.94B matrices 136 against 157; in a classic 6.7B step 1.067x of the
    # floor against 1.102x (one process). Tile geometry from the same sweep (16 warps: 2x slower at width 2048).
    "one_read": True,
    "one_read_max_n": 8192,
    "one_read_elems": 16384,  # elements per row tile (rows = this / row length)
    # programs (row groups) per matrix: this many, fewer for short matrices, more for tall ones (at most
    # one_read_rows rows each). A function of the shape alone, so that fused buckets and classic groups sum alike
    # (bit-identical). H200 (ar/at): 64 suits groups of several matrices (two 11008x4096 73 us against 78 at 128);
    # the 32000x4096 embedding, alone in its bucket, 315 us at 128 against 391 at 64
    "one_read_tm": 64,
    "one_read_rows": 256,
    "warps_one_read": 8,
}
_POW2_KEYS = ("block_m", "block_n", "vec_block", "fin_block", "one_read_max_n", "one_read_elems")
_WARP_KEYS = ("warps_stats", "warps_usq", "warps_write", "warps_one_read")


def set_config(**changes) -> dict:
    """Change the launch geometry (keys of ``CONFIG``); returns the previous values of the changed keys.

    Goes through here rather than writing ``CONFIG``: the values are checked, and the cached geometry and
    launch plans, which depend on them, are dropped. ``ADALOMO_KERNEL_CONFIG='{"max_tm": 64}'`` (JSON) applies
    changes when the kernels load (benchmarks, tuning)."""
    for k, v in changes.items():
        if k not in CONFIG:
            raise ValueError(f"unknown kernel setting {k!r}; known: {', '.join(CONFIG)}")
        if k in ("fast_launch", "carry_psq", "reverse_usq", "graphs", "one_read"):
            if not isinstance(v, bool):
                raise ValueError(f"{k} must be True or False")
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if k in ("fold_max", "maxnreg_usq",
                                                                           "maxnreg_write") else 1):
            raise ValueError(f"kernel setting {k}={v!r}: expected a positive int")
        if k in ("stages_read", "stages_write") and v > 8:
            raise ValueError(f"kernel setting {k}={v}: at most 8 stages")
        if (k in _POW2_KEYS or k in _WARP_KEYS) and v & (v - 1):
            raise ValueError(f"kernel setting {k}={v}: must be a power of two")
        if k in _WARP_KEYS and v > 32:
            raise ValueError(f"kernel setting {k}={v}: at most 32 warps")
    prev = {k: CONFIG[k] for k in changes}
    CONFIG.update(changes)
    for cache in (_GEOM, _PLANS, _PMAPS):
        cache.clear()
    sharded = sys.modules.get(__package__ + "._sharded")
    if sharded is not None:
        sharded._PLANS.clear()
        sharded._LOMO_PLANS.clear()
    return prev

_SEED_MASK = (1 << 62) - 1
_SEED_BIT = 1 << 62  # always an int64 seed: one compiled variant
_I32 = 1 << 31


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# ----------------------------------------------------------------------------------------- helpers
@triton.jit
def _tile_coords(pid, TM, TN):
    j = pid % TN
    t = pid // TN
    i = t % TM
    b = t // TM
    return b, i, j


@triton.jit
def _a16(x):
    """``x`` (a multiple of 16 by construction or by the ALIGN contract) with that fact visible to the compiler."""
    return (x // 16) * 16


@triton.jit
def _and(mask, flag):
    """``mask & flag`` for a block mask and an int8 scalar flag (bool scalars trip Triton's interpreter)."""
    return (mask.to(tl.int8) & flag) != 0


@triton.jit
def _sum_parts(ws_ptr, off, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n, BLOCK):
        acc += tl.load(ws_ptr + off + k + offs, mask=k + offs < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _scalars(ws_ptr, psq_ptr, scale_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho,
             eps2, clip_threshold, FIN_SCALE: tl.constexpr, HAS_USQ: tl.constexpr, HAS_PSQ: tl.constexpr,
             BLOCK: tl.constexpr):
    """(finite flag as int8, clip factor, step size) from the partial sums, in a fixed order. The partial sums
    of p^2 are at ``psq_ptr + off_psq``: in the workspace, or carried over from the previous write."""
    fin = _sum_parts(ws_ptr, off_fin, n_fin, BLOCK)
    if FIN_SCALE:
        fin = fin * tl.load(scale_ptr).to(tl.float32)
    # 0 for NaN and +-inf. Not ``(fin - fin) == 0``: with the gradient scale folded in, the compiler contracts
    # ``fin * s - fin * s`` into an FMA that returns the rounding error of the product, non-zero for most s
    # (every scaled LOMO step was skipped on CUDA; the interpreter does not contract).
    ok = (tl.abs(fin) <= 3.4028234663852886e38).to(tl.int8)
    clip = fin * 0.0 + 1.0
    if HAS_USQ:
        usq = _sum_parts(ws_ptr, off_usq, n_usq, BLOCK)
        clip = 1.0 / tl.maximum(tl.sqrt_rn(usq / numel_f) / clip_threshold, 1.0)
    step = fin * 0.0 + rho
    if HAS_PSQ:
        psq = _sum_parts(psq_ptr, off_psq, n_psq, BLOCK)
        step = tl.maximum(tl.sqrt_rn(psq) / sqrt_numel, eps2) * rho
    return ok, clip, step


#: Where stochastic rounding's 16 random bits per element come from (``ADALOMO_SR_RNG``, read when the kernels
#: load). ``hash`` (default): a keyed integer hash of the element index, one round of the ``lowbias32`` mixer
#: (~15 instructions per element). ``philox``: ``tl.randint(seed, element index)``, one Philox-4x32-10 per element
#: (~60): it made the write kernels 2.5x slower than round-to-nearest on an H200 (174 vs 69 us for 11008x4096;
#: the hash: 78 us). ``philox4`` (2-D write kernels): one Philox per 4 consecutive columns (87 us). All round to a
#: neighbour without bias and draw uniform, uncorrelated bits (tested); ``bench_kernels.py --sr-ablation``.
_SR_RNG_CHOICES = ("hash", "philox", "philox4")
_SR_RNG_NAME = os.environ.get("ADALOMO_SR_RNG", "hash") or "hash"
if os.environ.get("ADALOMO_SR_RNG4", "") not in ("", "0"):  # the first name of the experiment (2026-11-29)
    _SR_RNG_NAME = "philox4"
if _SR_RNG_NAME not in _SR_RNG_CHOICES:
    raise ValueError(f"ADALOMO_SR_RNG={_SR_RNG_NAME!r}: choose one of {', '.join(_SR_RNG_CHOICES)}")
_RNG4 = tl.constexpr(_SR_RNG_NAME == "philox4")
_RNG_HASH = tl.constexpr(_SR_RNG_NAME == "hash")
#: The read-only passes (statistics, RMS(u), Lomo's finite test) issue the loads of their next row tile before
#: reducing the current one, so that two tiles per program are in flight instead of one (they are latency-bound
#: otherwise: ~2 TB/s of the H200's 4). ``ADALOMO_PREFETCH=0`` turns it off (for A/B measurements).
_PREFETCH = tl.constexpr(os.environ.get("ADALOMO_PREFETCH", "1") not in ("0", "false", "False"))


@triton.jit
def _mix32(x):
    """``lowbias32`` (C. Wellons): a bijective uint32 mixer with near-ideal avalanche."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def _hash_bits(seed, lin):
    """16 random bits (int32) per element index ``lin``: ``lowbias32(lin ^ key)``, the key folded from the 62-bit
    ``seed`` (fresh each step and tensor). A bijection per key: no two elements of a tile share an input."""
    key = (seed & 0xFFFFFFFF).to(tl.uint32) ^ _mix32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return (_mix32(lin.to(tl.uint32) ^ key) >> 16).to(tl.int32)


@triton.jit
def _sr_add(new, noise):
    bits = new.to(tl.int32, bitcast=True)
    rounded = ((bits + noise) & -65536).to(tl.float32, bitcast=True)
    return tl.where(new != new, new, rounded)


@triton.jit
def _tile(base, m0, stride_m, offs, r0, lrows, lim, cmask):
    """Row tile ``m0`` of a program's rows (``r0 + m0 + lrows < lim``), in its own dtype: 0 where masked."""
    mask = ((r0 + m0 + lrows) < lim)[:, None] & cmask[None, :]
    return tl.load(base + m0 * stride_m + offs, mask=mask, other=0.0)


@triton.jit
def _first(base, stride_m, offs, r0, lrows, lim, cmask, STAGES: tl.constexpr = 1):
    """What a streaming loop carries into its first iteration: row tile 0 when prefetching by hand, else nothing.
    STAGES > 1: the loop is software-pipelined by Triton (``tl.range(num_stages=STAGES)``: the next tiles are
    copied into shared memory asynchronously), so no tile is carried in registers."""
    if _PREFETCH and STAGES <= 1:
        return _tile(base, 0, stride_m, offs, r0, lrows, lim, cmask)
    else:
        return 0.0


@triton.jit
def _stream(nx, base, m0, stride_m, offs, r0, lrows, lim, cmask, BLOCK_M: tl.constexpr, STAGES: tl.constexpr = 1):
    """Row tile ``m0`` in fp32, and what to carry on: with _PREFETCH ``nx`` holds tile m0 and tile m0 + BLOCK_M
    is loaded now, before the caller reduces the current one (two tiles in flight); else (or STAGES > 1, see
    ``_first``) tile m0 is loaded now."""
    if _PREFETCH and STAGES <= 1:
        return nx.to(tl.float32), _tile(base, m0 + BLOCK_M, stride_m, offs, r0, lrows, lim, cmask)
    else:
        return _tile(base, m0, stride_m, offs, r0, lrows, lim, cmask).to(tl.float32), nx


@triton.jit
def _gp_first(g_base, p_base, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim, cmask, PF: tl.constexpr):
    """The write passes' (g, p) carried into the first iteration: row tile 0 of each with PF (see ``_gp_tiles``)."""
    if PF:
        return (_first(g_base, sg_m, g_offs, r0, lrows, lim, cmask),
                _first(p_base, sp_m, p_offs, r0, lrows, lim, cmask))
    else:
        return 0.0, 0.0


@triton.jit
def _gp_tiles(g_nx, p_nx, g_base, p_base, m0, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim, cmask, mask,
              PF: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tile ``m0`` of g and p in fp32 for a write pass, and what to carry on. PF (the grouped kernels): the
    next tiles are loaded before this one is computed and stored (``_stream``); else tile m0 is loaded now."""
    if PF:
        g, g_nx = _stream(g_nx, g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask, BLOCK_M)
        p, p_nx = _stream(p_nx, p_base, m0, sp_m, p_offs, r0, lrows, lim, cmask, BLOCK_M)
    else:
        g = tl.load(g_base + m0 * sg_m + g_offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_base + m0 * sp_m + p_offs, mask=mask, other=0.0).to(tl.float32)
    return g, p, g_nx, p_nx


@triton.jit
def _round_to_bf16(new, lin, seed):
    """Stochastic rounding of fp32 ``new`` (exact after the cast): add 16 random bits, truncate."""
    if _RNG_HASH:
        noise = _hash_bits(seed, lin)
    else:
        noise = (tl.randint(seed, lin) & 0xFFFF).to(tl.int32)
    return _sr_add(new, noise)


@triton.jit
def _round_to_bf16_tile(new, rows, j, N, seed, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``_round_to_bf16`` for a [BLOCK_M, BLOCK_N] tile (column tile ``j``, global row indices ``rows``)."""
    if _RNG4:
        gc = j * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
        cnt = rows[:, None] * ((N + 3) // 4) + gc[None, :]
        r0, r1, r2, r3 = tl.randint4x(seed, cnt)
        noise = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (BLOCK_M, BLOCK_N))
        return _sr_add(new, (noise & 0xFFFF).to(tl.int32))
    else:
        cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
        return _round_to_bf16(new, rows[:, None] * N + cols[None, :], seed)


@triton.jit
def _sr_bits_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    if _RNG_HASH:
        noise = _hash_bits(seed, idx)
    else:
        noise = (tl.randint(seed, idx) & 0xFFFF).to(tl.int32)
    tl.store(out_ptr + idx, noise, mask=idx < n)


def sr_bits(n: int, seed: int, device) -> torch.Tensor:
    """The 16 rounding bits (int32) that elements ``0..n-1`` of a 1-D write get with ``seed``: for tests of the
    generator's statistics (the 2-D kernels index by row * N + column, the same source)."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    _sr_bits_kernel[(_cdiv(n, 1024),)](out, (int(seed) & _SEED_MASK) | _SEED_BIT, n, BLOCK=1024)
    return out


# ----------------------------------------------------------------------------------------- kernels
_FAC_STATS_INTS = ["B", "M", "N", "TM", "TN", "rows_per_prog", "sg_b", "sg_m", "sg_n", "sp_b", "sp_m", "sp_n",
                   "off_rowpart", "off_colpart", "off_psq"]


@triton.jit
def _fac_stats_body(pid, g_ptr, p_ptr, scale_ptr, ws_ptr,
                      B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n,
                      off_rowpart, off_colpart, off_psq, eps1,
                      HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                      P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      ROW_PSQ: tl.constexpr = False, STAGES: tl.constexpr = 1):
    """ROW_PSQ: sum p^2 per row first, in the order of the sums that the write pass carries (``carry_psq``);
    else per element (5 us less per 11008x4096 bucket on an H200: the default, stage u against x)."""
    if ALIGN:
        N, sg_b, sg_m, sp_b, sp_m = _a16(N), _a16(sg_b), _a16(sg_m), _a16(sp_b), _a16(sp_m)
    if G_UNIT:
        sg_n = 1
    if P_UNIT:
        sp_n = 1
    off_rowpart, off_colpart = _a16(off_rowpart), _a16(off_colpart)
    b, i, j = _tile_coords(pid, TM, TN)
    b64 = b.to(tl.int64)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    if HAS_SCALE:
        scale = tl.load(scale_ptr).to(tl.float32)
    col_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # reduced over rows once, after the loop
    if ROW_PSQ:
        psq = tl.zeros([BLOCK_M], dtype=tl.float32)
    else:
        psq = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    r0 = i * rows_per_prog
    lim = tl.minimum(M, r0 + rows_per_prog)
    g_base = g_ptr + b64 * sg_b + r0.to(tl.int64) * sg_m
    p_base = p_ptr + b64 * sp_b + r0.to(tl.int64) * sp_m
    rowpart = ws_ptr + off_rowpart + (j * B + b).to(tl.int64) * _a16(M + 15) + r0  # partial rows padded to 16
    lrows = tl.arange(0, BLOCK_M)
    g_offs = lrows[:, None] * sg_m + cols[None, :] * sg_n
    p_offs = lrows[:, None] * sp_m + cols[None, :] * sp_n
    g_nx = _first(g_base, sg_m, g_offs, r0, lrows, lim, cmask, STAGES)
    if SUM_P:
        p_nx = _first(p_base, sp_m, p_offs, r0, lrows, lim, cmask, STAGES)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=STAGES):
        rmask = r0 + m0 + lrows < M
        mask = rmask[:, None] & cmask[None, :]
        g, g_nx = _stream(g_nx, g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask, BLOCK_M, STAGES)
        if SUM_P:
            pv, p_nx = _stream(p_nx, p_base, m0, sp_m, p_offs, r0, lrows, lim, cmask, BLOCK_M, STAGES)
        if HAS_SCALE:
            g = g * scale
        sq = tl.where(mask, g * g + eps1, 0.0)
        tl.store(rowpart + m0 + lrows, tl.sum(sq, axis=1), mask=rmask)
        col_acc += sq
        if SUM_P:
            if ROW_PSQ:
                psq += tl.sum(pv * pv, axis=1)
            else:
                psq += pv * pv
    tl.store(ws_ptr + off_colpart + (i * B + b).to(tl.int64) * _a16(N + 15) + cols, tl.sum(col_acc, axis=0),
             mask=cmask)
    if SUM_P:
        if ROW_PSQ:
            tl.store(ws_ptr + off_psq + pid, tl.sum(psq, axis=0))
        else:
            tl.store(ws_ptr + off_psq + pid, tl.sum(tl.sum(psq, axis=1), axis=0))


@triton.jit(do_not_specialize=_FAC_STATS_INTS)
def _fac_stats_kernel(g_ptr, p_ptr, scale_ptr, ws_ptr,
                      B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n,
                      off_rowpart, off_colpart, off_psq, eps1,
                      HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                      P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _fac_stats_body(tl.program_id(0), g_ptr, p_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n,
                    sp_b, sp_m, sp_n, off_rowpart, off_colpart, off_psq, eps1, HAS_SCALE, SUM_P, ALIGN, G_UNIT, P_UNIT,
                    BLOCK_M, BLOCK_N)


_FAC_FIN_INTS = ["B", "M", "N", "TM", "TN", "n_rp", "n_cp", "off_rowpart", "off_colpart", "off_newrow", "off_newcol",
                 "off_rsum", "off_fin"]


@triton.jit
def _partial_rows_sum(base, B, b64, idx, Np, n, PB: tl.constexpr, BLOCK: tl.constexpr):
    """Entries ``idx`` of matrix ``b`` summed over the ``n`` partial rows at ``base`` (row ``i * B + b``, stride
    ``Np``: padded to 16, so loads up to Np are in bounds and vectorise), in a fixed order."""
    parts = tl.arange(0, PB)
    s = tl.zeros([PB, BLOCK], dtype=tl.float32)
    for i0 in range(0, n, PB):
        ii = i0 + parts
        ptrs = base + ((ii * B).to(tl.int64) + b64)[:, None] * Np + idx[None, :]
        s += tl.load(ptrs, mask=(ii < n)[:, None] & (idx < Np)[None, :], other=0.0)
    return tl.sum(s, axis=0)


@triton.jit
def _fac_finalize_body(pid, row_ptr, col_ptr, ws_ptr, B, M, N, TM, TN, n_rp, n_cp,
                         off_rowpart, off_colpart, off_newrow, off_newcol, off_rsum, off_fin,
                         beta2, one_minus_beta2, col_count,
                         BLOCK: tl.constexpr, PB: tl.constexpr):
    """Row/column means of g^2 + eps1 from the partials, EMA into new rows/cols in the workspace. The column
    sums are divided by ``col_count``: M, or the global row count when they were summed over FSDP2 shards."""
    off_rowpart, off_colpart = _a16(off_rowpart), _a16(off_colpart)
    off_newrow, off_newcol = _a16(off_newrow), _a16(off_newcol)
    per_b = n_rp + n_cp
    b = pid // per_b
    k = pid % per_b
    b64 = b.to(tl.int64)
    offs = tl.arange(0, BLOCK)
    if k < n_rp:
        idx = k * BLOCK + offs
        mask = idx < M
        mean = _partial_rows_sum(ws_ptr + off_rowpart, B, b64, idx, _a16(M + 15), TN, PB, BLOCK) / N
        old = tl.load(row_ptr + b64 * M + idx, mask=mask, other=0.0)
        new = old * beta2 + mean * one_minus_beta2
        tl.store(ws_ptr + off_newrow + b64 * M + idx, new, mask=mask)
        tl.store(ws_ptr + off_rsum + b * n_rp + k, tl.sum(tl.where(mask, new, 0.0), axis=0))
        tl.store(ws_ptr + off_fin + pid, tl.sum(tl.where(mask, mean, 0.0), axis=0))
    else:
        idx = (k - n_rp) * BLOCK + offs
        mask = idx < N
        mean = _partial_rows_sum(ws_ptr + off_colpart, B, b64, idx, _a16(N + 15), TM, PB, BLOCK) / col_count
        old = tl.load(col_ptr + b64 * N + idx, mask=mask, other=0.0)
        new = old * beta2 + mean * one_minus_beta2
        tl.store(ws_ptr + off_newcol + b64 * N + idx, new, mask=mask)
        tl.store(ws_ptr + off_fin + pid, tl.sum(tl.where(mask, mean, 0.0), axis=0))


@triton.jit(do_not_specialize=_FAC_FIN_INTS)
def _fac_finalize_kernel(row_ptr, col_ptr, ws_ptr, B, M, N, TM, TN, n_rp, n_cp,
                         off_rowpart, off_colpart, off_newrow, off_newcol, off_rsum, off_fin,
                         beta2, one_minus_beta2, col_count,
                         BLOCK: tl.constexpr, PB: tl.constexpr):
    _fac_finalize_body(tl.program_id(0), row_ptr, col_ptr, ws_ptr, B, M, N, TM, TN, n_rp, n_cp, off_rowpart,
                       off_colpart, off_newrow, off_newcol, off_rsum, off_fin, beta2, one_minus_beta2, col_count,
                       BLOCK, PB)


@triton.jit
def _row_mean(ws_ptr, off_rsum, b, n_rp, M, RP_BLOCK: tl.constexpr):
    rp = tl.arange(0, RP_BLOCK)
    return tl.sum(tl.load(ws_ptr + off_rsum + b * n_rp + rp, mask=rp < n_rp, other=0.0), axis=0) / M


_FAC_USQ_INTS = ["B", "M", "N", "TM", "TN", "rows_per_prog", "sg_b", "sg_m", "sg_n", "n_rp", "off_newrow",
                 "off_newcol", "off_rsum", "off_usq"]


@triton.jit
def _fac_usq_body(pid, g_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n,
                    n_rp, off_newrow, off_newcol, off_rsum, off_usq,
                    HAS_SCALE: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr, REVERSE: tl.constexpr = False,
                    STAGES: tl.constexpr = 1):
    """REVERSE: stream the program's rows bottom-up (the grouped kernel also takes programs in reverse order), so
    that the tiles the statistics pass read last, still in L2, are read first (``reverse_usq``)."""
    if ALIGN:
        N, sg_b, sg_m = _a16(N), _a16(sg_b), _a16(sg_m)
    if G_UNIT:
        sg_n = 1
    off_newrow, off_newcol = _a16(off_newrow), _a16(off_newcol)
    b, i, j = _tile_coords(pid, TM, TN)
    b64 = b.to(tl.int64)
    row_mean = _row_mean(ws_ptr, off_rsum, b, n_rp, M, RP_BLOCK)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
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
    last = rows_per_prog - BLOCK_M
    if REVERSE and STAGES <= 1:
        g_nx = _tile(g_base, last, sg_m, g_offs, r0, lrows, lim, cmask)
    else:
        g_nx = _first(g_base, sg_m, g_offs, r0, lrows, lim, cmask, STAGES)
    for k in tl.range(0, rows_per_prog, BLOCK_M, num_stages=STAGES):
        if REVERSE:
            m0 = last - k
            if STAGES > 1:
                g = _tile(g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask).to(tl.float32)
            else:
                g = g_nx.to(tl.float32)
                # the next tile up; none before row 0 of the program (a limit below every row masks it all)
                g_nx = _tile(g_base, m0 - BLOCK_M, sg_m, g_offs, r0, lrows, tl.where(m0 > 0, lim, r0 - BLOCK_M),
                             cmask)
        else:
            m0 = k
            g, g_nx = _stream(g_nx, g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask, BLOCK_M, STAGES)
        rmask = r0 + m0 + lrows < M
        mask = rmask[:, None] & cmask[None, :]
        if HAS_SCALE:
            g = g * scale
        r = tl.rsqrt(tl.load(newrow + m0 + lrows, mask=rmask, other=1.0) / row_mean)
        u = g * r[:, None] * c[None, :]
        acc += tl.where(mask, u * u, 0.0)
    tl.store(ws_ptr + off_usq + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit(do_not_specialize=_FAC_USQ_INTS)
def _fac_usq_kernel(g_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n,
                    n_rp, off_newrow, off_newcol, off_rsum, off_usq,
                    HAS_SCALE: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr):
    _fac_usq_body(tl.program_id(0), g_ptr, scale_ptr, ws_ptr, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, n_rp,
                  off_newrow, off_newcol, off_rsum, off_usq, HAS_SCALE, ALIGN, G_UNIT, BLOCK_M, BLOCK_N, RP_BLOCK)


_FINISH_INTS = ["n_fin", "n_usq", "n_psq", "off_fin", "off_usq", "off_psq", "off_scal"]


@triton.jit
def _finish_body(pid, ws_ptr, psq_ptr, scale_ptr, ok_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, off_scal,
                   numel_f, sqrt_numel, rho, eps2, clip_threshold,
                   FIN_SCALE: tl.constexpr, HAS_USQ: tl.constexpr, HAS_PSQ: tl.constexpr, BLOCK: tl.constexpr):
    ok, clip, step = _scalars(ws_ptr, psq_ptr, scale_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f,
                              sqrt_numel, rho, eps2, clip_threshold, FIN_SCALE, HAS_USQ, HAS_PSQ, BLOCK)
    tl.store(ok_ptr, ok != 0)
    tl.store(ws_ptr + off_scal, clip)
    tl.store(ws_ptr + off_scal + 1, step)


@triton.jit(do_not_specialize=_FINISH_INTS)
def _finish_kernel(ws_ptr, scale_ptr, ok_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, off_scal,
                   numel_f, sqrt_numel, rho, eps2, clip_threshold,
                   FIN_SCALE: tl.constexpr, HAS_USQ: tl.constexpr, HAS_PSQ: tl.constexpr, BLOCK: tl.constexpr):
    _finish_body(tl.program_id(0), ws_ptr, ws_ptr, scale_ptr, ok_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq,
                 off_scal, numel_f, sqrt_numel, rho, eps2, clip_threshold, FIN_SCALE, HAS_USQ, HAS_PSQ, BLOCK)


@triton.jit
def _load_scalars(pid, ws_ptr, scale_ptr, ok_ptr, okacc_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, off_scal,
                  numel_f, sqrt_numel, rho, eps2, clip_threshold, FOLD: tl.constexpr, FIN_SCALE: tl.constexpr,
                  HAS_USQ: tl.constexpr, HAS_PSQ: tl.constexpr, HAS_OKACC: tl.constexpr):
    """The write kernels' scalars: reduced here (FOLD; program 0 stores the flag) or loaded."""
    if FOLD:
        ok, clip, step = _scalars(ws_ptr, ws_ptr, scale_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f,
                                  sqrt_numel, rho, eps2, clip_threshold, FIN_SCALE, HAS_USQ, HAS_PSQ, 1024)
        if pid == 0:
            tl.store(ok_ptr, ok != 0)
    else:
        ok = tl.load(ok_ptr).to(tl.int8)
        clip = tl.load(ws_ptr + off_scal)
        step = tl.load(ws_ptr + off_scal + 1)
        if not HAS_PSQ:
            step = rho
    if HAS_OKACC:
        if pid == 0:
            acc = tl.load(okacc_ptr).to(tl.int8)
            tl.store(okacc_ptr, (acc & ok) != 0)
    return ok, clip, step


_FAC_WRITE_INTS = ["seed", "B", "M", "N", "TM", "TN", "rows_per_prog", "sg_b", "sg_m", "sg_n", "sp_b", "sp_m", "sp_n",
                   "n_rp", "off_newrow", "off_newcol", "off_rsum", "off_scal", "n_fin", "n_usq", "n_psq", "off_fin",
                   "off_usq", "off_psq"]


@triton.jit
def _fac_write_body(pid, g_ptr, p_ptr, scale_ptr, ws_ptr, row_ptr, col_ptr, m_ptr, ok_ptr, okacc_ptr, psqc_ptr,
                      stale_ptr, seed,
                      B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n,
                      n_rp, off_newrow, off_newcol, off_rsum, off_scal, n_fin, n_usq, n_psq, off_fin, off_usq,
                      off_psq, numel_f, sqrt_numel, rho, eps2, clip_threshold, weight_decay, beta1, one_minus_beta1,
                      HAS_SCALE: tl.constexpr, SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr,
                      HAS_M: tl.constexpr, SR: tl.constexpr, FOLD: tl.constexpr, HAS_OKACC: tl.constexpr,
                      STORE_PSQ: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr, PF: tl.constexpr = False,
                      VERIFY: tl.constexpr = False, STAGES: tl.constexpr = 1):
    """The factored write pass. With STORE_PSQ also this program's partial sum of p^2 over the values it leaves in
    p (the written ones, or the old ones when the step is skipped) at ``psqc_ptr + pid``, in the tiling and order
    of the statistics pass, so that the next step can take it instead of reading p again (``carry_psq``).
    VERIFY (this step used carried sums): the same sum over the values of p read now, compared with the carried
    one; a difference means p changed without a version bump (through ``p.data``) and sets ``*stale_ptr``."""
    if ALIGN:
        N, sg_b, sg_m, sp_b, sp_m = _a16(N), _a16(sg_b), _a16(sg_m), _a16(sp_b), _a16(sp_m)
    if G_UNIT:
        sg_n = 1
    if P_UNIT:
        sp_n = 1
    off_newrow, off_newcol = _a16(off_newrow), _a16(off_newcol)
    ok, clip, step = _load_scalars(pid, ws_ptr, scale_ptr, ok_ptr, okacc_ptr, n_fin, n_usq, n_psq, off_fin, off_usq,
                                   off_psq, off_scal, numel_f, sqrt_numel, rho, eps2, clip_threshold, FOLD, False,
                                   True, SCALE_PARAM, HAS_OKACC)
    neg_step = -step
    decay = 1.0 - step * weight_decay
    b, i, j = _tile_coords(pid, TM, TN)
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
    if STORE_PSQ:
        psq = tl.zeros([BLOCK_M], dtype=tl.float32)  # per row: a 2-D accumulator costs 16 more registers
    if VERIFY:
        carried = tl.load(psqc_ptr + pid)  # before this program overwrites it
        chk = tl.zeros([BLOCK_M], dtype=tl.float32)
    lim = tl.minimum(M, r0 + rows_per_prog)
    g_nx, p_nx = _gp_first(g_base, p_base, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim, cmask, PF and STAGES <= 1)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=STAGES):
        rmask = r0 + m0 + lrows < M
        mask = rmask[:, None] & cmask[None, :]
        g, p, g_nx, p_nx = _gp_tiles(g_nx, p_nx, g_base, p_base, m0, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim,
                                     cmask, mask, PF and STAGES <= 1, BLOCK_M)
        if VERIFY:  # p as read (0 where masked), summed like the carried sums were
            chk += tl.sum(p * p, axis=1)
        if HAS_SCALE:
            g = g * scale
        new_row = tl.load(newrow + m0 + lrows, mask=rmask, other=1.0)
        r = tl.rsqrt(new_row / row_mean)
        u = g * r[:, None] * c[None, :] * clip
        if HAS_M:
            m_ptrs = m_ptr + lin_base + m0 * N + lin_offs
            m = tl.load(m_ptrs, mask=mask, other=0.0)
            m = m * beta1 + u * one_minus_beta1
            tl.store(m_ptrs, m, mask=_and(mask, ok))
            u = m
        p_ptrs = p_base + m0 * sp_m + p_offs
        if HAS_WD:
            new = p * decay
        else:
            new = p
        new = new + u * neg_step
        if SR:
            new = _round_to_bf16_tile(new, (b64 * M + r0 + m0 + lrows).to(tl.int32), j, N, seed, BLOCK_M, BLOCK_N)
        stored = new.to(p_ptr.dtype.element_ty)
        tl.store(p_ptrs, stored, mask=_and(mask, ok))
        tl.store(row_ptr + b64 * M + r0 + m0 + lrows, new_row, mask=_and(rmask, row_ok))
        if STORE_PSQ:
            kept = tl.where(ok != 0, stored.to(tl.float32), p)
            kept = tl.where(mask, kept, 0.0)
            psq += tl.sum(kept * kept, axis=1)
    tl.store(col_ptr + b64 * N + cols, new_col, mask=_and(cmask, ok & (i == 0).to(tl.int8)))
    if STORE_PSQ:
        tl.store(psqc_ptr + pid, tl.sum(psq, axis=0))
    if VERIFY:  # the same values when p is unchanged, summed by another compiled variant (whose reductions a
        # compiler may order otherwise). 1e-5 relative is what matters: a carried sum within it gives RMS(p) within
        # 5e-6, below bf16's resolution, so a change that moves the sum less is harmless; any larger one is reported
        now = tl.sum(chk, axis=0)
        tl.store(stale_ptr, 1, mask=tl.abs(now - carried) > 1e-5 * carried)


@triton.jit(do_not_specialize=_FAC_WRITE_INTS)
def _fac_write_kernel(g_ptr, p_ptr, scale_ptr, ws_ptr, row_ptr, col_ptr, m_ptr, ok_ptr, okacc_ptr, seed,
                      B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n,
                      n_rp, off_newrow, off_newcol, off_rsum, off_scal, n_fin, n_usq, n_psq, off_fin, off_usq,
                      off_psq, numel_f, sqrt_numel, rho, eps2, clip_threshold, weight_decay, beta1, one_minus_beta1,
                      HAS_SCALE: tl.constexpr, SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr,
                      HAS_M: tl.constexpr, SR: tl.constexpr, FOLD: tl.constexpr, HAS_OKACC: tl.constexpr,
                      ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr):
    _fac_write_body(tl.program_id(0), g_ptr, p_ptr, scale_ptr, ws_ptr, row_ptr, col_ptr, m_ptr, ok_ptr, okacc_ptr,
                    ws_ptr, ws_ptr, seed, B, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, n_rp,
                    off_newrow, off_newcol,
                    off_rsum, off_scal, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho, eps2,
                    clip_threshold, weight_decay, beta1, one_minus_beta1, HAS_SCALE, SCALE_PARAM, HAS_WD, HAS_M, SR,
                    FOLD, HAS_OKACC, False, ALIGN, G_UNIT, P_UNIT, BLOCK_M, BLOCK_N, RP_BLOCK)


_VEC_STATS_INTS = ["n", "sg", "sp", "off_newv", "off_fin", "off_usq", "off_psq"]


@triton.jit
def _vec_stats_body(pid, g_ptr, p_ptr, scale_ptr, v_ptr, ws_ptr, n, sg, sp,
                      off_newv, off_fin, off_usq, off_psq, eps1, beta2, one_minus_beta2,
                      HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                      BLOCK: tl.constexpr):
    if G_UNIT:
        sg = 1
    if P_UNIT:
        sp = 1
    off_newv = _a16(off_newv)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    idx64 = idx.to(tl.int64)
    g = tl.load(g_ptr + idx64 * sg, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr).to(tl.float32)
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


@triton.jit(do_not_specialize=_VEC_STATS_INTS)
def _vec_stats_kernel(g_ptr, p_ptr, scale_ptr, v_ptr, ws_ptr, n, sg, sp,
                      off_newv, off_fin, off_usq, off_psq, eps1, beta2, one_minus_beta2,
                      HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                      BLOCK: tl.constexpr):
    _vec_stats_body(tl.program_id(0), g_ptr, p_ptr, scale_ptr, v_ptr, ws_ptr, n, sg, sp, off_newv, off_fin, off_usq,
                    off_psq, eps1, beta2, one_minus_beta2, HAS_SCALE, SUM_P, G_UNIT, P_UNIT, BLOCK)


_VEC_WRITE_INTS = ["seed", "n", "sg", "sp", "off_newv", "off_scal", "n_fin", "n_usq", "n_psq", "off_fin", "off_usq",
                   "off_psq"]


@triton.jit
def _vec_write_body(pid, g_ptr, p_ptr, scale_ptr, v_ptr, m_ptr, ok_ptr, okacc_ptr, ws_ptr, seed, n, sg, sp,
                      off_newv, off_scal, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel,
                      rho, eps2, clip_threshold, weight_decay, beta1, one_minus_beta1,
                      HAS_SCALE: tl.constexpr, SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr,
                      HAS_M: tl.constexpr, SR: tl.constexpr, FOLD: tl.constexpr, HAS_OKACC: tl.constexpr,
                      G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    if G_UNIT:
        sg = 1
    if P_UNIT:
        sp = 1
    off_newv = _a16(off_newv)
    ok, clip, step = _load_scalars(pid, ws_ptr, scale_ptr, ok_ptr, okacc_ptr, n_fin, n_usq, n_psq, off_fin, off_usq,
                                   off_psq, off_scal, numel_f, sqrt_numel, rho, eps2, clip_threshold, FOLD, False,
                                   True, SCALE_PARAM, HAS_OKACC)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    mask = idx < n
    idx64 = idx.to(tl.int64)
    g = tl.load(g_ptr + idx64 * sg, mask=mask, other=0.0).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr).to(tl.float32)
    new_v = tl.load(ws_ptr + off_newv + idx64, mask=mask, other=1.0)
    u = g * tl.rsqrt(new_v) * clip
    if HAS_M:
        m = tl.load(m_ptr + idx64, mask=mask, other=0.0)
        m = m * beta1 + u * one_minus_beta1
        tl.store(m_ptr + idx64, m, mask=_and(mask, ok))
        u = m
    p = tl.load(p_ptr + idx64 * sp, mask=mask, other=0.0).to(tl.float32)
    if HAS_WD:
        new = p * (1.0 - step * weight_decay)
    else:
        new = p
    new = new + u * (-step)
    if SR:
        new = _round_to_bf16(new, idx, seed)
    tl.store(p_ptr + idx64 * sp, new.to(p_ptr.dtype.element_ty), mask=_and(mask, ok))
    tl.store(v_ptr + idx64, new_v, mask=_and(mask, ok))


@triton.jit(do_not_specialize=_VEC_WRITE_INTS)
def _vec_write_kernel(g_ptr, p_ptr, scale_ptr, v_ptr, m_ptr, ok_ptr, okacc_ptr, ws_ptr, seed, n, sg, sp,
                      off_newv, off_scal, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel,
                      rho, eps2, clip_threshold, weight_decay, beta1, one_minus_beta1,
                      HAS_SCALE: tl.constexpr, SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr,
                      HAS_M: tl.constexpr, SR: tl.constexpr, FOLD: tl.constexpr, HAS_OKACC: tl.constexpr,
                      G_UNIT: tl.constexpr, P_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    _vec_write_body(tl.program_id(0), g_ptr, p_ptr, scale_ptr, v_ptr, m_ptr, ok_ptr, okacc_ptr, ws_ptr, seed, n, sg, sp,
                    off_newv, off_scal, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel, rho, eps2,
                    clip_threshold, weight_decay, beta1, one_minus_beta1, HAS_SCALE, SCALE_PARAM, HAS_WD, HAS_M, SR,
                    FOLD, HAS_OKACC, G_UNIT, P_UNIT, BLOCK)


_SUM_INTS = ["M", "N", "TM", "TN", "rows_per_prog", "sg_b", "sg_m", "sg_n", "off_fin"]


@triton.jit
def _sum_body(pid, g_ptr, ws_ptr, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, off_fin,
                ALIGN: tl.constexpr, G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                STAGES: tl.constexpr = 1):
    if ALIGN:
        N, sg_b, sg_m = _a16(N), _a16(sg_b), _a16(sg_m)
    if G_UNIT:
        sg_n = 1
    b, i, j = _tile_coords(pid, TM, TN)
    cols = j * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    r0 = i * rows_per_prog
    g_base = g_ptr + b.to(tl.int64) * sg_b + r0.to(tl.int64) * sg_m
    lrows = tl.arange(0, BLOCK_M)
    g_offs = lrows[:, None] * sg_m + cols[None, :] * sg_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    lim = tl.minimum(M, r0 + rows_per_prog)
    g_nx = _first(g_base, sg_m, g_offs, r0, lrows, lim, cmask, STAGES)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=STAGES):
        if _PREFETCH and STAGES <= 1:  # not _stream: adding before the next load is the order measured on the H200
            acc += g_nx.to(tl.float32)
            g_nx = _tile(g_base, m0 + BLOCK_M, sg_m, g_offs, r0, lrows, lim, cmask)
        else:
            acc += _tile(g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask).to(tl.float32)
    tl.store(ws_ptr + off_fin + pid, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit(do_not_specialize=_SUM_INTS)
def _sum_kernel(g_ptr, ws_ptr, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, off_fin,
                ALIGN: tl.constexpr, G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _sum_body(tl.program_id(0), g_ptr, ws_ptr, M, N, TM, TN, rows_per_prog, sg_b, sg_m, sg_n, off_fin, ALIGN, G_UNIT,
              BLOCK_M, BLOCK_N)


_LOMO_WRITE_INTS = ["seed", "M", "N", "TM", "TN", "rows_per_prog", "sg_b", "sg_m", "sg_n", "sp_b", "sp_m", "sp_n",
                    "n_fin", "off_scal"]


@triton.jit
def _lomo_write_body(pid, g_ptr, p_ptr, scale_ptr, ws_ptr, ok_ptr, okacc_ptr, seed, M, N, TM, TN, rows_per_prog,
                       sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, n_fin, off_scal, lr, weight_decay, clip_value,
                       HAS_SCALE: tl.constexpr, HAS_WD: tl.constexpr, HAS_CLIP: tl.constexpr, SR: tl.constexpr,
                       FOLD: tl.constexpr, HAS_OKACC: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                       P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PF: tl.constexpr = False,
                       STAGES: tl.constexpr = 1):
    if ALIGN:
        N, sg_b, sg_m, sp_b, sp_m = _a16(N), _a16(sg_b), _a16(sg_m), _a16(sp_b), _a16(sp_m)
    if G_UNIT:
        sg_n = 1
    if P_UNIT:
        sp_n = 1
    ok, clip, step = _load_scalars(pid, ws_ptr, scale_ptr, ok_ptr, okacc_ptr, n_fin, 0, 0, 0, 0, 0, off_scal, 1.0, 1.0,
                                   0.0, 0.0, 1.0, FOLD, HAS_SCALE, False, False, HAS_OKACC)
    b, i, j = _tile_coords(pid, TM, TN)
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
    g_nx, p_nx = _gp_first(g_base, p_base, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim, cmask, PF and STAGES <= 1)
    for m0 in tl.range(0, rows_per_prog, BLOCK_M, num_stages=STAGES):
        mask = (r0 + m0 + lrows < M)[:, None] & cmask[None, :]
        g, p, g_nx, p_nx = _gp_tiles(g_nx, p_nx, g_base, p_base, m0, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim,
                                     cmask, mask, PF and STAGES <= 1, BLOCK_M)
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
            new = _round_to_bf16_tile(new, (b64 * M + r0 + m0 + lrows).to(tl.int32), j, N, seed, BLOCK_M, BLOCK_N)
        tl.store(p_ptrs, new.to(p_ptr.dtype.element_ty), mask=_and(mask, ok))


@triton.jit(do_not_specialize=_LOMO_WRITE_INTS)
def _lomo_write_kernel(g_ptr, p_ptr, scale_ptr, ws_ptr, ok_ptr, okacc_ptr, seed, M, N, TM, TN, rows_per_prog,
                       sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, n_fin, off_scal, lr, weight_decay, clip_value,
                       HAS_SCALE: tl.constexpr, HAS_WD: tl.constexpr, HAS_CLIP: tl.constexpr, SR: tl.constexpr,
                       FOLD: tl.constexpr, HAS_OKACC: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                       P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    _lomo_write_body(tl.program_id(0), g_ptr, p_ptr, scale_ptr, ws_ptr, ok_ptr, okacc_ptr, seed, M, N, TM, TN,
                     rows_per_prog, sg_b, sg_m, sg_n, sp_b, sp_m, sp_n, n_fin, off_scal, lr, weight_decay, clip_value,
                     HAS_SCALE, HAS_WD, HAS_CLIP, SR, FOLD, HAS_OKACC, ALIGN, G_UNIT, P_UNIT, BLOCK_M, BLOCK_N)


# ------------------------------------------------------------------------------ grouped (multi-tensor)
# Classic ``step()``: one launch per pass for a whole group of tensors (same dtypes and layout class).
# Each tensor has a row of int64 metadata (pointers, geometry, strides, workspace offsets) and a row of
# fp32 metadata (per-tensor step-dependent floats); ``pmap`` maps a program id to its tensor.
_W = 42  # int64 metadata columns (even: the fp32 rows after them stay 16-byte aligned)
(_C_G, _C_P, _C_ROW, _C_COL, _C_M, _C_WS, _C_B, _C_M_, _C_N, _C_TM, _C_TN, _C_RPP, _C_SGB, _C_SGM, _C_SGN, _C_SPB,
 _C_SPM, _C_SPN, _C_NRP, _C_NCP, _C_START, _C_FSTART, _C_SEED, _C_NFIN, _C_NUSQ, _C_NPSQ, _C_OROWPART, _C_OCOLPART,
 _C_ONEWROW, _C_ONEWCOL, _C_ORSUM, _C_OFIN, _C_OUSQ, _C_OPSQ, _C_OSCAL, _C_NVEC, _C_PSQC,
 # the one-read statistics (``one_read``): row groups, rows per program, its partial rows, its first program
 _C_TM1, _C_RPP1, _C_OCOLPART1, _C_OWPART, _C_START1) = (tl.constexpr(i) for i in range(42))
_WF = 8  # fp32 metadata columns
(_F_RHO, _F_BETA2, _F_OMB2, _F_NUMEL, _F_SQRTN) = (tl.constexpr(i) for i in range(5))
_CW = tl.constexpr(_W)
_CWF = tl.constexpr(_WF)


@triton.jit
def _mi(row, k):
    """An int32 field of a metadata row."""
    return tl.load(row + k).to(tl.int32)


@triton.jit
def _mp(row, k, DT: tl.constexpr, ALIGN: tl.constexpr):
    """A pointer field of a metadata row (16-byte aligned when ALIGN)."""
    ptr = tl.load(row + k).to(tl.pointer_type(DT))
    if ALIGN:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _g_fac_stats_kernel(meta_ptr, pmap_ptr, scale_ptr, eps1, G_DT: tl.constexpr, P_DT: tl.constexpr,
                        HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                        P_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROW_PSQ: tl.constexpr,
                        STAGES: tl.constexpr):
    pid = tl.program_id(0)
    row = meta_ptr + tl.load(pmap_ptr + pid).to(tl.int64) * _CW
    _fac_stats_body(pid - _mi(row, _C_START), _mp(row, _C_G, G_DT, ALIGN), _mp(row, _C_P, P_DT, ALIGN), scale_ptr,
                    _mp(row, _C_WS, tl.float32, True), _mi(row, _C_B), _mi(row, _C_M_), _mi(row, _C_N),
                    _mi(row, _C_TM), _mi(row, _C_TN), _mi(row, _C_RPP), _mi(row, _C_SGB), _mi(row, _C_SGM),
                    _mi(row, _C_SGN), _mi(row, _C_SPB), _mi(row, _C_SPM), _mi(row, _C_SPN), _mi(row, _C_OROWPART),
                    _mi(row, _C_OCOLPART), _mi(row, _C_OPSQ), eps1, HAS_SCALE, SUM_P, ALIGN, G_UNIT, P_UNIT,
                    BLOCK_M, BLOCK_N, ROW_PSQ, STAGES)


@triton.jit
def _g_fac_finalize_kernel(meta_ptr, fmeta_ptr, pmap_ptr, BLOCK: tl.constexpr, PB: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    row = meta_ptr + t * _CW
    frow = fmeta_ptr + t * _CWF
    _fac_finalize_body(pid - _mi(row, _C_FSTART), _mp(row, _C_ROW, tl.float32, True),
                       _mp(row, _C_COL, tl.float32, True), _mp(row, _C_WS, tl.float32, True), _mi(row, _C_B),
                       _mi(row, _C_M_), _mi(row, _C_N), _mi(row, _C_TM), _mi(row, _C_TN), _mi(row, _C_NRP),
                       _mi(row, _C_NCP), _mi(row, _C_OROWPART), _mi(row, _C_OCOLPART), _mi(row, _C_ONEWROW),
                       _mi(row, _C_ONEWCOL), _mi(row, _C_ORSUM), _mi(row, _C_OFIN), tl.load(frow + _F_BETA2),
                       tl.load(frow + _F_OMB2), _mi(row, _C_M_), BLOCK, PB)


@triton.jit
def _g_fac_usq_kernel(meta_ptr, pmap_ptr, scale_ptr, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                      ALIGN: tl.constexpr, G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      RP_BLOCK: tl.constexpr, REVERSE: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    row = meta_ptr + tl.load(pmap_ptr + pid).to(tl.int64) * _CW
    _fac_usq_body(pid - _mi(row, _C_START), _mp(row, _C_G, G_DT, ALIGN), scale_ptr, _mp(row, _C_WS, tl.float32, True),
                  _mi(row, _C_B), _mi(row, _C_M_), _mi(row, _C_N), _mi(row, _C_TM), _mi(row, _C_TN),
                  _mi(row, _C_RPP), _mi(row, _C_SGB), _mi(row, _C_SGM), _mi(row, _C_SGN), _mi(row, _C_NRP),
                  _mi(row, _C_ONEWROW), _mi(row, _C_ONEWCOL), _mi(row, _C_ORSUM), _mi(row, _C_OUSQ),
                  HAS_SCALE, ALIGN, G_UNIT, BLOCK_M, BLOCK_N, RP_BLOCK, REVERSE, STAGES)


@triton.jit
def _g_fac_stats1_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, eps1, G_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                         ALIGN: tl.constexpr, G_UNIT: tl.constexpr, BLOCK_M: tl.constexpr, NB: tl.constexpr):
    """The statistics and what RMS(u) needs from one read of g (``one_read``). A program owns whole rows of one
    matrix (a row per tile line, NB >= its length): each row's new factor r_i (EMA of the row mean of g^2 + eps1)
    is known once the row is read, so besides the column sums of g^2 + eps1 it accumulates W_j = sum_i g_ij^2 / r_i;
    the finalize pass then has sum u^2 = mean(r) * sum_j W_j / c_j. Per program: one partial row of each, the sum
    of its new r_i and of its row means (the finite test)."""
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    row = meta_ptr + t * _CW
    frow = fmeta_ptr + t * _CWF
    local = pid - _mi(row, _C_START1)
    g_ptr = _mp(row, _C_G, G_DT, ALIGN)
    ws_ptr = _mp(row, _C_WS, tl.float32, True)
    old_ptr = _mp(row, _C_ROW, tl.float32, True)
    B, M, N = _mi(row, _C_B), _mi(row, _C_M_), _mi(row, _C_N)
    TM1, rpp = _mi(row, _C_TM1), _mi(row, _C_RPP1)
    sg_b, sg_m, sg_n = _mi(row, _C_SGB), _mi(row, _C_SGM), _mi(row, _C_SGN)
    if ALIGN:
        N, sg_b, sg_m = _a16(N), _a16(sg_b), _a16(sg_m)
    if G_UNIT:
        sg_n = 1
    beta2, omb2 = tl.load(frow + _F_BETA2), tl.load(frow + _F_OMB2)
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
    newrow = ws_ptr + _a16(_mi(row, _C_ONEWROW)) + b64 * M + r0
    old = old_ptr + b64 * M + r0
    c_acc = tl.zeros([NB], dtype=tl.float32)
    w_acc = tl.zeros([NB], dtype=tl.float32)
    r_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    f_acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    nx = _tile(g_base, 0, sg_m, offs, r0, lrows, lim, cmask)
    for m0 in range(0, rpp, BLOCK_M):
        g = nx.to(tl.float32)
        nx = _tile(g_base, m0 + BLOCK_M, sg_m, offs, r0, lrows, lim, cmask)  # the next rows in flight
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
    part = (i * B + b).to(tl.int64) * _a16(N + 15)
    tl.store(ws_ptr + _a16(_mi(row, _C_OCOLPART1)) + part + cols, c_acc, mask=cmask)
    tl.store(ws_ptr + _a16(_mi(row, _C_OWPART)) + part + cols, w_acc, mask=cmask)
    tl.store(ws_ptr + _mi(row, _C_ORSUM) + b * TM1 + i, tl.sum(r_acc, axis=0))
    tl.store(ws_ptr + _mi(row, _C_OFIN) + B * _mi(row, _C_NCP) + b * TM1 + i, tl.sum(f_acc, axis=0))


@triton.jit
def _g_fac_finalize1_kernel(meta_ptr, fmeta_ptr, pmap_ptr, BLOCK: tl.constexpr, PB: tl.constexpr):
    """After ``_g_fac_stats1_kernel``: per block of columns the new column factors c_j (EMA of the column means),
    their share of the finite test and of sum u^2 = mean(r) * sum_j W_j / c_j."""
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    row = meta_ptr + t * _CW
    frow = fmeta_ptr + t * _CWF
    local = pid - _mi(row, _C_FSTART)
    ws_ptr = _mp(row, _C_WS, tl.float32, True)
    col_ptr = _mp(row, _C_COL, tl.float32, True)
    B, M, N, n_cp, TM1 = _mi(row, _C_B), _mi(row, _C_M_), _mi(row, _C_N), _mi(row, _C_NCP), _mi(row, _C_TM1)
    b = local // n_cp
    k = local % n_cp
    b64 = b.to(tl.int64)
    idx = k * BLOCK + tl.arange(0, BLOCK)
    mask = idx < N
    Np = _a16(N + 15)
    mean = _partial_rows_sum(ws_ptr + _a16(_mi(row, _C_OCOLPART1)), B, b64, idx, Np, TM1, PB, BLOCK) / M
    w = _partial_rows_sum(ws_ptr + _a16(_mi(row, _C_OWPART)), B, b64, idx, Np, TM1, PB, BLOCK)
    new = tl.load(col_ptr + b64 * N + idx, mask=mask, other=0.0) * tl.load(frow + _F_BETA2) \
        + mean * tl.load(frow + _F_OMB2)
    tl.store(ws_ptr + _a16(_mi(row, _C_ONEWCOL)) + b64 * N + idx, new, mask=mask)
    tl.store(ws_ptr + _mi(row, _C_OFIN) + local, tl.sum(tl.where(mask, mean, 0.0), axis=0))
    row_mean = _sum_parts(ws_ptr, _mi(row, _C_ORSUM) + b * TM1, TM1, 64) / M
    usq = tl.sum(tl.where(mask, w / tl.where(mask, new, 1.0), 0.0), axis=0) * row_mean
    tl.store(ws_ptr + _mi(row, _C_OUSQ) + local, usq)


@triton.jit
def _g_finish_kernel(meta_ptr, fmeta_ptr, scale_ptr, oks_ptr, eps2, clip_threshold, FIN_SCALE: tl.constexpr,
                     HAS_USQ: tl.constexpr, HAS_PSQ: tl.constexpr, PSQ_CARRIED: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    row = meta_ptr + t * _CW
    frow = fmeta_ptr + t * _CWF
    ws = _mp(row, _C_WS, tl.float32, True)
    if PSQ_CARRIED:  # the sums of p^2 that the previous write left (``carry_psq``)
        psq_ptr, off_psq = _mp(row, _C_PSQC, tl.float32, True), 0
    else:
        psq_ptr, off_psq = ws, _mi(row, _C_OPSQ)
    _finish_body(0, ws, psq_ptr, scale_ptr, oks_ptr + t, _mi(row, _C_NFIN), _mi(row, _C_NUSQ),
                 _mi(row, _C_NPSQ), _mi(row, _C_OFIN), _mi(row, _C_OUSQ), off_psq, _mi(row, _C_OSCAL),
                 tl.load(frow + _F_NUMEL), tl.load(frow + _F_SQRTN), tl.load(frow + _F_RHO), eps2, clip_threshold,
                 FIN_SCALE, HAS_USQ, HAS_PSQ, BLOCK)


@triton.jit
def _g_fac_write_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, oks_ptr, stale_ptr, weight_decay, beta1,
                        one_minus_beta1, G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_SCALE: tl.constexpr,
                        SCALE_PARAM: tl.constexpr, HAS_WD: tl.constexpr, HAS_M: tl.constexpr, SR: tl.constexpr,
                        STORE_PSQ: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RP_BLOCK: tl.constexpr, VERIFY: tl.constexpr,
                        STAGES: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    row = meta_ptr + t * _CW
    frow = fmeta_ptr + t * _CWF
    ws = _mp(row, _C_WS, tl.float32, True)
    _fac_write_body(pid - _mi(row, _C_START), _mp(row, _C_G, G_DT, ALIGN), _mp(row, _C_P, P_DT, ALIGN), scale_ptr, ws,
                    _mp(row, _C_ROW, tl.float32, True), _mp(row, _C_COL, tl.float32, True),
                    _mp(row, _C_M, tl.float32, True), oks_ptr + t, oks_ptr + t, _mp(row, _C_PSQC, tl.float32, True),
                    stale_ptr, tl.load(row + _C_SEED),
                    _mi(row, _C_B), _mi(row, _C_M_), _mi(row, _C_N), _mi(row, _C_TM), _mi(row, _C_TN),
                    _mi(row, _C_RPP), _mi(row, _C_SGB), _mi(row, _C_SGM), _mi(row, _C_SGN), _mi(row, _C_SPB),
                    _mi(row, _C_SPM), _mi(row, _C_SPN), _mi(row, _C_NRP), _mi(row, _C_ONEWROW), _mi(row, _C_ONEWCOL),
                    _mi(row, _C_ORSUM), _mi(row, _C_OSCAL), 0, 0, 0, 0, 0, 0, 1.0, 1.0, tl.load(frow + _F_RHO), 0.0,
                    1.0, weight_decay, beta1, one_minus_beta1, HAS_SCALE, SCALE_PARAM, HAS_WD, HAS_M, SR, False, False,
                    STORE_PSQ, ALIGN, G_UNIT, P_UNIT, BLOCK_M, BLOCK_N, RP_BLOCK, True, VERIFY, STAGES)


@triton.jit
def _g_vec_stats_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, eps1, G_DT: tl.constexpr, P_DT: tl.constexpr,
                        HAS_SCALE: tl.constexpr, SUM_P: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                        BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    row = meta_ptr + t * _CW
    frow = fmeta_ptr + t * _CWF
    _vec_stats_body(pid - _mi(row, _C_START), _mp(row, _C_G, G_DT, False), _mp(row, _C_P, P_DT, False), scale_ptr,
                    _mp(row, _C_ROW, tl.float32, True), _mp(row, _C_WS, tl.float32, True), _mi(row, _C_N),
                    _mi(row, _C_SGN), _mi(row, _C_SPN), _mi(row, _C_ONEWROW), _mi(row, _C_OFIN), _mi(row, _C_OUSQ),
                    _mi(row, _C_OPSQ), eps1, tl.load(frow + _F_BETA2), tl.load(frow + _F_OMB2), HAS_SCALE, SUM_P,
                    G_UNIT, P_UNIT, BLOCK)


@triton.jit
def _g_vec_write_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, oks_ptr, weight_decay, beta1, one_minus_beta1,
                        G_DT: tl.constexpr, P_DT: tl.constexpr, HAS_SCALE: tl.constexpr, SCALE_PARAM: tl.constexpr,
                        HAS_WD: tl.constexpr, HAS_M: tl.constexpr, SR: tl.constexpr, G_UNIT: tl.constexpr,
                        P_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    row = meta_ptr + t * _CW
    frow = fmeta_ptr + t * _CWF
    _vec_write_body(pid - _mi(row, _C_START), _mp(row, _C_G, G_DT, False), _mp(row, _C_P, P_DT, False), scale_ptr,
                    _mp(row, _C_ROW, tl.float32, True), _mp(row, _C_M, tl.float32, True), oks_ptr + t, oks_ptr + t,
                    _mp(row, _C_WS, tl.float32, True), tl.load(row + _C_SEED), _mi(row, _C_N), _mi(row, _C_SGN),
                    _mi(row, _C_SPN), _mi(row, _C_ONEWROW), _mi(row, _C_OSCAL), 0, 0, 0, 0, 0, 0, 1.0, 1.0,
                    tl.load(frow + _F_RHO), 0.0, 1.0, weight_decay, beta1, one_minus_beta1, HAS_SCALE, SCALE_PARAM,
                    HAS_WD, HAS_M, SR, False, False, G_UNIT, P_UNIT, BLOCK)


@triton.jit
def _g_sum_kernel(meta_ptr, pmap_ptr, G_DT: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0)
    row = meta_ptr + tl.load(pmap_ptr + pid).to(tl.int64) * _CW
    _sum_body(pid - _mi(row, _C_START), _mp(row, _C_G, G_DT, ALIGN), _mp(row, _C_WS, tl.float32, True),
              _mi(row, _C_M_), _mi(row, _C_N), _mi(row, _C_TM), _mi(row, _C_TN), _mi(row, _C_RPP), _mi(row, _C_SGB),
              _mi(row, _C_SGM), _mi(row, _C_SGN), _mi(row, _C_OFIN), ALIGN, G_UNIT, BLOCK_M, BLOCK_N, STAGES)


@triton.jit
def _g_lomo_write_kernel(meta_ptr, fmeta_ptr, pmap_ptr, scale_ptr, oks_ptr, clip_value, G_DT: tl.constexpr,
                         P_DT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_WD: tl.constexpr, HAS_CLIP: tl.constexpr,
                         SR: tl.constexpr, ALIGN: tl.constexpr, G_UNIT: tl.constexpr, P_UNIT: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    # lr and weight decay come with the per-call metadata (the fp32 row's rho and beta2 columns), not as arguments:
    # a replayed CUDA graph then follows an LR scheduler
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    row = meta_ptr + t * _CW
    frow = fmeta_ptr + t * _CWF
    lr = tl.load(frow + _F_RHO)
    weight_decay = tl.load(frow + _F_BETA2)
    _lomo_write_body(pid - _mi(row, _C_START), _mp(row, _C_G, G_DT, ALIGN), _mp(row, _C_P, P_DT, ALIGN), scale_ptr,
                     _mp(row, _C_WS, tl.float32, True), oks_ptr + t, oks_ptr + t, tl.load(row + _C_SEED),
                     _mi(row, _C_M_), _mi(row, _C_N), _mi(row, _C_TM), _mi(row, _C_TN), _mi(row, _C_RPP),
                     _mi(row, _C_SGB), _mi(row, _C_SGM), _mi(row, _C_SGN), _mi(row, _C_SPB), _mi(row, _C_SPM),
                     _mi(row, _C_SPN), _mi(row, _C_NFIN), _mi(row, _C_OSCAL), lr, weight_decay, clip_value,
                     HAS_SCALE, HAS_WD, HAS_CLIP, SR, False, False, ALIGN, G_UNIT, P_UNIT, BLOCK_M, BLOCK_N, True,
                     STAGES)


# ------------------------------------------------------------------------------------------ launching
def _fast_launch_supported() -> bool:
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
        from triton import knobs  # noqa: F401  (3.4+)
    except Exception:
        return False
    return (major, minor) >= (3, 4)


_FAST = _fast_launch_supported() and os.environ.get("ADALOMO_FAST_LAUNCH", "1") not in ("0", "false", "False")
#: launches that went through Triton's own (slower, Python) launch path: the first of each variant, and all of them
#: once the direct call is off. Should stop growing after warm-up (benchmarks/bench_gpu.py records it per row)
JIT_LAUNCHES = [0]


class _Launcher:
    """``fn[grid](*args, **consts)``, but after the first launch of a variant the compiled kernel is called
    directly. A variant is keyed by the constexprs, num_warps, the device and the dtype and 16-byte
    alignment of every tensor argument: with ``do_not_specialize`` on every integer argument (all of them
    fit in int32: ``use_triton`` refuses larger tensors; the seed is always int64) that is all Triton
    specialises on. ``ADALOMO_FAST_LAUNCH=0`` (or ``CONFIG["fast_launch"] = False``) turns this off."""

    def __init__(self, fn, const_names: tuple[str, ...]):
        names = list(fn.arg_names)
        assert tuple(names[-len(const_names):]) == const_names, (fn.__name__, const_names)
        self.fn = fn
        self.const_names = const_names
        self.n_ptr = sum(1 for n in names if n.endswith("_ptr"))
        assert all(n.endswith("_ptr") for n in names[:self.n_ptr]), fn.__name__
        self.cache: dict = {}

    def __call__(self, grid: int, args: tuple, consts: tuple, num_warps: int, stream, device: int,
                 interpreted: bool, rkey: tuple | None = None, maxnreg: int | None = None) -> None:
        global _FAST
        key = None
        if _FAST and stream is not None and CONFIG["fast_launch"]:
            if rkey is not None:  # the caller vouches for dtype and alignment of every pointer (see _run_key)
                key = (consts, num_warps, maxnreg) + rkey
            else:
                key = (consts, num_warps, maxnreg, device) + tuple((a.dtype, a.data_ptr() % 16 == 0)
                                                                   for a in args[:self.n_ptr])
            k = self.cache.get(key)
            if k is not None:
                try:
                    k.run(grid, 1, 1, stream, k.function, k.packed_metadata, None, None, None, *args, *consts)
                    return
                except (TypeError, AttributeError, ValueError, SystemError) as e:  # another Triton: its path
                    _FAST = False
                    key = None
                    warnings.warn(f"adalomo.kernels: calling a compiled kernel directly failed ({e!r}); every "
                                  "launch now goes through Triton's own launch path, which costs more host time "
                                  "per launch (fused mode runs them inside backward)", RuntimeWarning, stacklevel=2)
        opts = {} if maxnreg is None else {"maxnreg": maxnreg}
        JIT_LAUNCHES[0] += 1
        k = self.fn[(grid,)](*args, **dict(zip(self.const_names, consts)), num_warps=num_warps, **opts)
        if key is not None and k is not None and _direct_call_ok(k, len(args) + len(consts), self.n_ptr):
            self.cache[key] = k


def _direct_call_ok(k, n_args: int, n_ptr: int) -> bool:
    """The compiled kernel takes all declared parameters in order (pointers first) and no launch hook is
    installed (the direct call passes none): what ``JITFunction.run`` itself passes in Triton >= 3.3."""
    try:
        from triton import knobs
        for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
            if h is not None and getattr(h, "calls", True):  # an empty HookChain is the default, not a hook
                return False
        names = list(k.src.fn.arg_names)
        sig = k.src.signature
        ptrs = [n for n in names if str(sig.get(n, "")).startswith("*")]
        return len(names) == n_args and ptrs == names[:n_ptr] and callable(k.run)
    except Exception:
        return False


def _consts(fn, *names):
    return _Launcher(fn, names)


_STATS = _consts(_fac_stats_kernel, "HAS_SCALE", "SUM_P", "ALIGN", "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N")
_FINALIZE = _consts(_fac_finalize_kernel, "BLOCK", "PB")
_USQ = _consts(_fac_usq_kernel, "HAS_SCALE", "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N", "RP_BLOCK")
_FINISH = _consts(_finish_kernel, "FIN_SCALE", "HAS_USQ", "HAS_PSQ", "BLOCK")
_WRITE = _consts(_fac_write_kernel, "HAS_SCALE", "SCALE_PARAM", "HAS_WD", "HAS_M", "SR", "FOLD", "HAS_OKACC",
                 "ALIGN", "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N", "RP_BLOCK")
_VSTATS = _consts(_vec_stats_kernel, "HAS_SCALE", "SUM_P", "G_UNIT", "P_UNIT", "BLOCK")
_VWRITE = _consts(_vec_write_kernel, "HAS_SCALE", "SCALE_PARAM", "HAS_WD", "HAS_M", "SR", "FOLD", "HAS_OKACC",
                  "G_UNIT", "P_UNIT", "BLOCK")
_SUM = _consts(_sum_kernel, "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N")
_LWRITE = _consts(_lomo_write_kernel, "HAS_SCALE", "HAS_WD", "HAS_CLIP", "SR", "FOLD", "HAS_OKACC", "ALIGN",
                  "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N")


# ------------------------------------------------------------------------------------------ host side
def _strides3(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides of ``t`` seen as [B, M, N] (0-D/1-D: [1, 1, n]); None when the leading dims don't merge."""
    d = t.dim()
    s = t.stride()
    if d == 2:
        return 0, s[0], s[1]
    if d == 1:
        return 0, 0, s[0]
    if d == 0:
        return 0, 0, 1
    sh = t.shape
    lead = [(sh[k], s[k]) for k in range(d - 2) if sh[k] != 1]
    for (_, s_outer), (n_inner, s_inner) in zip(lead, lead[1:]):
        if s_outer != s_inner * n_inner:
            return None
    return (lead[-1][1] if lead else 0), s[-2], s[-1]


def _shape3(t: torch.Tensor) -> tuple[int, int, int]:
    d = t.dim()
    if d < 2:
        return 1, 1, max(t.numel(), 1)
    m, n = t.shape[-2], t.shape[-1]
    return t.numel() // (m * n), m, n


_GEOM: dict = {}


def _fin_block(M: int, N: int) -> int:
    return max(CONFIG["fin_block"], _next_pow2(_cdiv(max(M, N), 1024)))


def _geometry(B: int, M: int, N: int, kind: str, grouped_fb: int = 0) -> dict:
    """Tiling and workspace layout (fp32 offsets, 16-aligned) for one [B, M, N] shape; cached.

    ``grouped_fb`` > 0: the tile sizes of a grouped launch (the CONFIG blocks for every shape, that
    finalize block)."""
    key = (B, M, N, kind, grouped_fb, CONFIG["block_m"], CONFIG["block_n"], CONFIG["max_tm"], CONFIG["vec_block"],
           CONFIG["fin_block"], CONFIG["fold_max"])
    geo = _GEOM.get(key)
    if geo is not None:
        return geo
    if grouped_fb:
        bn, bm = CONFIG["block_n"], CONFIG["block_m"]
    else:
        bn = min(CONFIG["block_n"], max(16, _next_pow2(N)))
        bm = min(CONFIG["block_m"], _next_pow2(M))
    m_tiles = _cdiv(M, bm)
    per = _cdiv(m_tiles, min(m_tiles, CONFIG["max_tm"]))
    rows_per_prog = per * bm
    TM, TN = _cdiv(M, rows_per_prog), _cdiv(N, bn)
    n_prog = B * TM * TN
    geo = dict(BLOCK_M=bm, BLOCK_N=bn, TM=TM, TN=TN, rows_per_prog=rows_per_prog, n_prog=n_prog)
    if kind == "fac":
        fb = grouped_fb or _fin_block(M, N)
        n_rp, n_cp = _cdiv(M, fb), _cdiv(N, fb)
        n_fin = B * (n_rp + n_cp)
        geo.update(FIN_BLOCK=fb, PB=max(1, min(32, 4096 // fb)), n_rp=n_rp, n_cp=n_cp,
                   RP_BLOCK=max(2, _next_pow2(n_rp)), n_fin=n_fin, n_usq=n_prog, n_psq=n_prog,
                   fold=n_fin + 2 * n_prog <= CONFIG["fold_max"])
        mp, np_ = _cdiv(M, 16) * 16, _cdiv(N, 16) * 16  # partial rows padded to 16 floats
        sizes = dict(rowpart=TN * B * mp, colpart=TM * B * np_, newrow=B * M, newcol=B * N, rsum=B * n_rp,
                     fin=n_fin, usq=n_prog, psq=n_prog, scal=2)
    elif kind == "vec":
        vb = CONFIG["vec_block"]
        nv = _cdiv(B * M * N, vb)
        geo.update(VEC_BLOCK=vb, n_vec=nv, n_fin=nv, n_usq=nv, n_psq=nv, fold=3 * nv <= CONFIG["fold_max"])
        sizes = dict(newv=B * M * N, fin=nv, usq=nv, psq=nv, scal=2)
    else:  # lomo
        geo.update(n_fin=n_prog, fold=n_prog <= CONFIG["fold_max"])
        sizes = dict(fin=n_prog, scal=2)
    off = 0
    for name, size in sizes.items():
        geo["off_" + name] = off
        off += _cdiv(size, 16) * 16
    geo["ws_numel"] = off
    _GEOM[key] = geo
    return geo


def _one_read_nb(N: int) -> int:
    """The row tile width of the one-read statistics (``one_read``) for rows of N elements, 0 for three passes."""
    nb = max(16, _next_pow2(N))
    return nb if CONFIG["one_read"] and nb <= CONFIG["one_read_max_n"] else 0


def _one_read_rows(nb: int) -> int:
    """Rows per tile of the one-read statistics (one per group: a constexpr)."""
    return min(max(1, CONFIG["one_read_elems"] // nb), 256)


def _geometry1(B: int, M: int, N: int, nb: int, fb: int) -> dict:
    """``_geometry`` of a grouped matrix whose statistics take one read (``one_read``): the write's tiles and the
    three-pass statistics' regions as there (that pass still runs, for the sums of p^2 only, when they are not
    carried), the one-read programs (TM1 row groups of RPP1 rows, ``_one_read_rows(nb)`` rows per tile) and their
    regions: partial column sums and W, the sums of the new rows (TM1 per matrix), the finite test's and sum u^2's
    partials."""
    geo = dict(_geometry(B, M, N, "fac", fb))
    bm1 = _one_read_rows(nb)
    m_tiles = _cdiv(M, bm1)
    tm_cap = max(CONFIG["one_read_tm"], _cdiv(M, CONFIG["one_read_rows"]))
    rpp1 = _cdiv(m_tiles, min(m_tiles, tm_cap)) * bm1
    tm1 = _cdiv(M, rpp1)
    n_cp = geo["n_cp"]
    geo.update(TM1=tm1, RPP1=rpp1, n_prog1=B * tm1, n_rp=tm1, RP_BLOCK=max(2, _next_pow2(tm1)),
               n_fin=B * (n_cp + tm1), n_usq=B * n_cp, n_fprog=B * n_cp)
    np_ = _cdiv(N, 16) * 16
    off = geo["ws_numel"]
    for name, size in dict(rsum=B * tm1, fin=B * (n_cp + tm1), usq=B * n_cp, colpart1=tm1 * B * np_,
                           wpart=tm1 * B * np_).items():
        geo["off_" + name] = off
        off += _cdiv(size, 16) * 16
    geo["ws_numel"] = off
    return geo


def _seed(stochastic_rounding: bool, generator, seed: int | None) -> int:
    if not stochastic_rounding:
        return _SEED_BIT
    if seed is None:
        seed = generator.initial_seed() if generator is not None else int(torch.randint(0, 1 << 62, (1,)))
    return (int(seed) & _SEED_MASK) | _SEED_BIT


def _scale_arg(grad_scale, ref: torch.Tensor):
    if grad_scale is None:
        return False, ref
    if not isinstance(grad_scale, torch.Tensor):
        grad_scale = torch.full((), float(grad_scale), dtype=torch.float32, device=ref.device)
    return True, grad_scale


def _contig_state(state: dict, key: str, copies: list) -> torch.Tensor:
    t = state[key]
    if t.is_contiguous() and t.dtype == torch.float32:
        return t
    t = t.float().contiguous()
    copies.append((key, t))
    return t


def _raw_stream(device: int) -> int:
    return torch.cuda.current_stream(device).cuda_stream


if hasattr(torch._C, "_cuda_getCurrentRawStream"):
    _raw_stream = torch._C._cuda_getCurrentRawStream  # noqa: F811  (the same, without a Stream object)


class _Ctx:
    """Per-call launch context: device index, raw stream, interpreter or not."""
    __slots__ = ("device", "stream", "interpreted")

    def __init__(self, t: torch.Tensor):
        self.interpreted = _PKG._impl_interpreted or t.device.type != "cuda"
        if self.interpreted:
            self.device, self.stream = -1, None
        else:
            self.device = t.device.index
            self.stream = _raw_stream(self.device)


def _run_key(ctx, g, p, scale, ok_into, *fp32_state) -> tuple | None:
    """One launch-cache key for all kernels of an update: everything Triton specialises on besides the
    constexprs. The other pointer arguments are fresh allocations (workspace, flag: aligned) or fp32 state;
    None (each launch computes its own key) when one of those is not 16-byte aligned."""
    if ctx.stream is None:
        return None
    for t in (scale, ok_into, *fp32_state):
        if t is not None and t.data_ptr() % 16:
            return None
    return ("rk", ctx.device, g.dtype, g.data_ptr() % 16 == 0, p.dtype, p.data_ptr() % 16 == 0, scale.dtype,
            None if ok_into is None else ok_into.dtype)


def _prepare(p, g):
    """Strided [B, M, N] views of g and p (copies only when leading dims cannot be merged)."""
    sg = _strides3(g)
    if sg is None:
        g = g.contiguous()
        sg = _strides3(g)
    p_work = p
    sp = _strides3(p)
    if sp is None:
        p_work = p.contiguous()
        sp = _strides3(p_work)
    return g, sg, p_work, sp


def _align(N: int, sg, sp) -> tuple[bool, bool, bool]:
    g_unit, p_unit = sg[2] == 1, sp[2] == 1
    align = g_unit and p_unit and N % 16 == 0 and sg[0] % 16 == 0 and sg[1] % 16 == 0 and sp[0] % 16 == 0 \
        and sp[1] % 16 == 0
    return align, g_unit, p_unit


def scaled_rms_update_(p, g, state, *, rho, eps, clip_threshold, beta2, weight_decay, scale_parameter, beta1,
                       grad_scale, stochastic_rounding, generator, seed=None, ok_into=None):
    """Triton version of ``functional._scaled_rms_update_``; returns the 0-d bool "gradient was finite"."""
    ctx = _Ctx(p)
    if ctx.device >= 0 and ctx.device != torch.cuda.current_device():
        with torch.cuda.device(ctx.device):
            return scaled_rms_update_(p, g, state, rho=rho, eps=eps, clip_threshold=clip_threshold, beta2=beta2,
                                      weight_decay=weight_decay, scale_parameter=scale_parameter, beta1=beta1,
                                      grad_scale=grad_scale, stochastic_rounding=stochastic_rounding,
                                      generator=generator, seed=seed, ok_into=ok_into)
    g, sg, p_work, sp = _prepare(p, g)
    B, M, N = _shape3(p)
    dev = p.device
    has_scale, scale = _scale_arg(grad_scale, p)
    sr = bool(stochastic_rounding) and p.dtype == torch.bfloat16
    sd = _seed(sr, generator, seed)
    has_m = beta1 is not None
    copies: list = []
    m_t = _contig_state(state, "exp_avg", copies) if has_m else None
    ok = torch.empty((), dtype=torch.bool, device=dev)
    okacc = ok if ok_into is None else ok_into
    beta2, omb2 = float(beta2), 1.0 - float(beta2)
    b1, omb1 = (float(beta1), 1.0 - float(beta1)) if has_m else (0.0, 1.0)
    numel = B * M * N
    sp_flag = bool(scale_parameter)
    hw = weight_decay != 0
    scal = (float(numel), math.sqrt(numel), float(rho), float(eps[1]), float(clip_threshold))
    if p.dim() >= 2:
        row = _contig_state(state, "exp_avg_sq_row", copies)
        col = _contig_state(state, "exp_avg_sq_col", copies)
        run = (ctx.stream, ctx.device, ctx.interpreted, _run_key(ctx, g, p_work, scale, ok_into, row, col, m_t))
        geo = _geometry(B, M, N, "fac")
        ws = torch.empty(geo["ws_numel"], dtype=torch.float32, device=dev)
        if m_t is None:
            m_t = ws
        align, g_unit, p_unit = _align(N, sg, sp)
        TM, TN, rpp, n = geo["TM"], geo["TN"], geo["rows_per_prog"], geo["n_prog"]
        bm, bn, fold = geo["BLOCK_M"], geo["BLOCK_N"], geo["fold"]
        _STATS(n, (g, p_work, scale, ws, B, M, N, TM, TN, rpp, *sg, *sp, geo["off_rowpart"], geo["off_colpart"],
                   geo["off_psq"], float(eps[0])),
               (has_scale, sp_flag, align, g_unit, p_unit, bm, bn), CONFIG["warps_stats"], *run)
        _FINALIZE(B * (geo["n_rp"] + geo["n_cp"]),
                  (row, col, ws, B, M, N, TM, TN, geo["n_rp"], geo["n_cp"], geo["off_rowpart"], geo["off_colpart"],
                   geo["off_newrow"], geo["off_newcol"], geo["off_rsum"], geo["off_fin"], beta2, omb2, float(M)),
                  (geo["FIN_BLOCK"], geo["PB"]), 4, *run)
        _USQ(n, (g, scale, ws, B, M, N, TM, TN, rpp, *sg, geo["n_rp"], geo["off_newrow"], geo["off_newcol"],
                 geo["off_rsum"], geo["off_usq"]),
             (has_scale, align, g_unit, bm, bn, geo["RP_BLOCK"]), CONFIG["warps_usq"], *run)
        fin = (geo["n_fin"], geo["n_usq"], geo["n_psq"], geo["off_fin"], geo["off_usq"], geo["off_psq"])
        if not fold:
            _FINISH(1, (ws, scale, ok, *fin, geo["off_scal"], *scal), (False, True, sp_flag, 1024), 4, *run)
        _WRITE(n, (g, p_work, scale, ws, row, col, m_t, ok, okacc, sd, B, M, N, TM, TN, rpp, *sg, *sp,
                   geo["n_rp"], geo["off_newrow"], geo["off_newcol"], geo["off_rsum"], geo["off_scal"], *fin, *scal,
                   float(weight_decay), b1, omb1),
               (has_scale, sp_flag, hw, has_m, sr, fold, ok_into is not None, align, g_unit, p_unit, bm, bn,
                geo["RP_BLOCK"]), CONFIG["warps_write"], *run)
    else:
        v = _contig_state(state, "exp_avg_sq", copies)
        run = (ctx.stream, ctx.device, ctx.interpreted, _run_key(ctx, g, p_work, scale, ok_into, v, m_t))
        geo = _geometry(B, M, N, "vec")
        ws = torch.empty(geo["ws_numel"], dtype=torch.float32, device=dev)
        if m_t is None:
            m_t = ws
        nv, vb, fold = geo["n_vec"], geo["VEC_BLOCK"], geo["fold"]
        g_unit, p_unit = sg[2] == 1, sp[2] == 1
        _VSTATS(nv, (g, p_work, scale, v, ws, numel, sg[2], sp[2], geo["off_newv"], geo["off_fin"], geo["off_usq"],
                     geo["off_psq"], float(eps[0]), beta2, omb2),
                (has_scale, sp_flag, g_unit, p_unit, vb), 4, *run)
        fin = (nv, nv, nv, geo["off_fin"], geo["off_usq"], geo["off_psq"])
        if not fold:
            _FINISH(1, (ws, scale, ok, *fin, geo["off_scal"], *scal), (False, True, sp_flag, 1024), 4, *run)
        _VWRITE(nv, (g, p_work, scale, v, m_t, ok, okacc, ws, sd, numel, sg[2], sp[2], geo["off_newv"],
                     geo["off_scal"], *fin, *scal, float(weight_decay), b1, omb1),
                (has_scale, sp_flag, hw, has_m, sr, fold, ok_into is not None, g_unit, p_unit, vb), 4, *run)
    for key, t in copies:
        state[key].copy_(t)
    if p_work is not p:
        p.copy_(p_work)
    torch.autograd.graph.increment_version(p)
    return ok


def lomo_update_(p, g, *, lr, weight_decay, clip_grad_value, grad_scale, stochastic_rounding, generator, seed=None,
                 ok_into=None):
    """Triton version of ``functional.lomo_update_`` (two reads of ``g``); returns the finite flag."""
    ctx = _Ctx(p)
    if ctx.device >= 0 and ctx.device != torch.cuda.current_device():
        with torch.cuda.device(ctx.device):
            return lomo_update_(p, g, lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                                grad_scale=grad_scale, stochastic_rounding=stochastic_rounding, generator=generator,
                                seed=seed, ok_into=ok_into)
    g, sg, p_work, sp = _prepare(p, g)
    B, M, N = _shape3(p)
    dev = p.device
    has_scale, scale = _scale_arg(grad_scale, p)
    sr = bool(stochastic_rounding) and p.dtype == torch.bfloat16
    sd = _seed(sr, generator, seed)
    geo = _geometry(B, M, N, "lomo")
    ws = torch.empty(geo["ws_numel"], dtype=torch.float32, device=dev)
    ok = torch.empty((), dtype=torch.bool, device=dev)
    okacc = ok if ok_into is None else ok_into
    run = (ctx.stream, ctx.device, ctx.interpreted, _run_key(ctx, g, p_work, scale, ok_into))
    align, g_unit, p_unit = _align(N, sg, sp)
    TM, TN, rpp, n = geo["TM"], geo["TN"], geo["rows_per_prog"], geo["n_prog"]
    bm, bn, fold = geo["BLOCK_M"], geo["BLOCK_N"], geo["fold"]
    _SUM(n, (g, ws, M, N, TM, TN, rpp, *sg, geo["off_fin"]), (align, g_unit, bm, bn), CONFIG["warps_usq"], *run)
    if not fold:
        _FINISH(1, (ws, scale, ok, n, 0, 0, geo["off_fin"], 0, 0, geo["off_scal"], 1.0, 1.0, 0.0, 0.0, 1.0),
                (has_scale, False, False, 1024), 4, *run)
    clip = clip_grad_value is not None
    _LWRITE(n, (g, p_work, scale, ws, ok, okacc, sd, M, N, TM, TN, rpp, *sg, *sp, n, geo["off_scal"], float(lr),
                float(weight_decay), float(clip_grad_value) if clip else 0.0),
            (has_scale, weight_decay != 0, clip, sr, fold, ok_into is not None, align, g_unit, p_unit, bm, bn),
            CONFIG["warps_write"], *run)
    if p_work is not p:
        p.copy_(p_work)
    torch.autograd.graph.increment_version(p)
    return ok


def bytes_moved(p: torch.Tensor, g: torch.Tensor, kind: str, *, scale_parameter: bool = True,
                beta1: bool = False) -> dict[str, int]:
    """Device-memory bytes each kernel must move for one update (the floor each kernel is timed against).

    Workspace traffic (partials: ~numel/32 fp32 values, mostly L2-resident) is not counted.
    """
    n = p.numel()
    eg, ep = g.element_size(), p.element_size()
    if kind == "lomo":
        return {"sum": n * eg, "write": n * (eg + 2 * ep)}
    m = 8 * n if beta1 else 0
    if p.dim() >= 2:
        return {"stats": n * (eg + (ep if scale_parameter else 0)), "usq": n * eg,
                "write": n * (eg + 2 * ep) + m}
    return {"stats": n * (eg + 8 + (ep if scale_parameter else 0)), "write": n * (eg + 2 * ep + 12) + m}


# ------------------------------------------------------------------------------- grouped host side
_TL_DT = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_G_STATS = _consts(_g_fac_stats_kernel, "G_DT", "P_DT", "HAS_SCALE", "SUM_P", "ALIGN", "G_UNIT", "P_UNIT", "BLOCK_M",
                   "BLOCK_N", "ROW_PSQ", "STAGES")
_G_FINALIZE = _consts(_g_fac_finalize_kernel, "BLOCK", "PB")
_G_USQ = _consts(_g_fac_usq_kernel, "G_DT", "HAS_SCALE", "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N", "RP_BLOCK",
                 "REVERSE", "STAGES")
_G_STATS1 = _consts(_g_fac_stats1_kernel, "G_DT", "HAS_SCALE", "ALIGN", "G_UNIT", "BLOCK_M", "NB")
_G_FINALIZE1 = _consts(_g_fac_finalize1_kernel, "BLOCK", "PB")
_G_FINISH = _consts(_g_finish_kernel, "FIN_SCALE", "HAS_USQ", "HAS_PSQ", "PSQ_CARRIED", "BLOCK")
_G_WRITE = _consts(_g_fac_write_kernel, "G_DT", "P_DT", "HAS_SCALE", "SCALE_PARAM", "HAS_WD", "HAS_M", "SR",
                   "STORE_PSQ", "ALIGN", "G_UNIT", "P_UNIT", "BLOCK_M", "BLOCK_N", "RP_BLOCK", "VERIFY",
                   "STAGES")
_G_VSTATS = _consts(_g_vec_stats_kernel, "G_DT", "P_DT", "HAS_SCALE", "SUM_P", "G_UNIT", "P_UNIT", "BLOCK")
_G_VWRITE = _consts(_g_vec_write_kernel, "G_DT", "P_DT", "HAS_SCALE", "SCALE_PARAM", "HAS_WD", "HAS_M", "SR",
                    "G_UNIT", "P_UNIT", "BLOCK")
_G_SUM = _consts(_g_sum_kernel, "G_DT", "ALIGN", "G_UNIT", "BLOCK_M", "BLOCK_N", "STAGES")
_G_LWRITE = _consts(_g_lomo_write_kernel, "G_DT", "P_DT", "HAS_SCALE", "HAS_WD", "HAS_CLIP", "SR", "ALIGN", "G_UNIT",
                    "P_UNIT", "BLOCK_M", "BLOCK_N", "STAGES")
_PMAPS: dict = {}


def _pmap(counts: tuple[int, ...], dev: torch.device) -> torch.Tensor:
    """program id -> tensor index (int32), for a grouped launch; cached per device and group layout."""
    key = (dev, counts)
    m = _PMAPS.get(key)
    if m is None:
        m = torch.repeat_interleave(torch.arange(len(counts), dtype=torch.int32),
                                    torch.tensor(counts, dtype=torch.int64)).to(dev)
        if len(_PMAPS) > 256:
            _PMAPS.clear()
        _PMAPS[key] = m
    return m


def _aligned(*ts) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def _classify(p, g):
    """(key, g, sg, sp) for a grouped launch, or None when this tensor needs the per-tensor path."""
    sg = _strides3(g)
    sp = _strides3(p)
    if sg is None or sp is None:
        return None
    B, M, N = _shape3(p)
    align, g_unit, p_unit = _align(N, sg, sp)
    align = align and _aligned(g, p)
    return (p.dim() >= 2, p.dtype, g.dtype, align, g_unit, p_unit), sg, sp, (B, M, N)


def _state_ok(*ts) -> bool:
    return all(t.is_contiguous() and t.dtype == torch.float32 and t.data_ptr() % 16 == 0 for t in ts)


def scaled_rms_update_many_(ps, gs, states, *, rhos, beta2s, eps, clip_threshold, weight_decay, scale_parameter,
                            beta1, grad_scale, stochastic_rounding, seeds):
    """``scaled_rms_update_`` for many tensors with a handful of launches (classic ``step()``).

    ``rhos``, ``beta2s``, ``seeds``: one per tensor (host numbers). Tensors are grouped by dtypes and
    layout class; each group runs the five passes as five grouped launches. Returns a 0-d bool device
    tensor: every gradient was finite (tensors whose gradient was not are left untouched, each on its own).
    """
    if not ps:
        return None
    dev = ps[0].device
    ctx = _Ctx(ps[0])
    if ctx.device >= 0 and ctx.device != torch.cuda.current_device():
        with torch.cuda.device(ctx.device):
            return scaled_rms_update_many_(ps, gs, states, rhos=rhos, beta2s=beta2s, eps=eps,
                                           clip_threshold=clip_threshold, weight_decay=weight_decay,
                                           scale_parameter=scale_parameter, beta1=beta1, grad_scale=grad_scale,
                                           stochastic_rounding=stochastic_rounding, seeds=seeds)
    has_scale, scale = _scale_arg(grad_scale, ps[0])
    has_m = beta1 is not None
    b1, omb1 = (float(beta1), 1.0 - float(beta1)) if has_m else (0.0, 1.0)
    sp_flag, hw = bool(scale_parameter), weight_decay != 0
    carry, rev = CONFIG["carry_psq"], CONFIG["reverse_usq"]
    plan = _scaled_plan(ps, gs, states, has_m, dev)
    flags = []
    for i in plan.single:
        flags.append(scaled_rms_update_(ps[i], gs[i], states[i], rho=rhos[i], eps=eps, clip_threshold=clip_threshold,
                                        beta2=beta2s[i], weight_decay=weight_decay, scale_parameter=scale_parameter,
                                        beta1=beta1, grad_scale=grad_scale, stochastic_rounding=stochastic_rounding,
                                        generator=None, seed=seeds[i]))
    if not plan.groups:
        return _all(flags)
    bufs, ws = _upload(plan, ctx, dev, gs, seeds, stochastic_rounding, rhos, beta2s)  # ws: read through meta
    eps1, eps2, ct, wd = float(eps[0]), float(eps[1]), float(clip_threshold), float(weight_decay)
    bm, bn = CONFIG["block_m"], CONFIG["block_n"]
    store = carry and sp_flag
    carried_all = tuple(gp.fac and store and gp.psq_versions is not None
                        and gp.psq_versions == [ps[i]._version for i in gp.idx]
                        and all(r() is ps[i] for r, i in zip(gp.psq_owners, gp.idx)) for gp in plan.groups)
    stale = _stale_flag(dev) if any(carried_all) else None

    def launch(run):
        for gp, (meta_t, fmeta_t, oks), carried in zip(plan.groups, bufs.views, carried_all):
            _scaled_group(gp, meta_t, fmeta_t, oks, carried, stale, run, scale, has_scale, sp_flag, hw, has_m,
                          stochastic_rounding, store, rev, eps1, eps2, ct, wd, b1, omb1, bm, bn)

    _launch_or_replay(launch, bufs, ctx, scale, has_scale,
                      ("s", carried_all, stale is not None and stale.data_ptr(), eps1, eps2, ct, wd, b1, sp_flag,
                       has_m, bool(stochastic_rounding)))
    for gp in plan.groups:
        if gp.fac and not store:
            gp.psq_versions = None
    _bump(ps if not plan.single else [ps[i] for gp in plan.groups for i in gp.idx])
    if carry and sp_flag:  # the versions the carried sums of p^2 belong to: any later in-place change bumps them
        for gp in plan.groups:
            if gp.fac:
                gp.psq_versions = [ps[i]._version for i in gp.idx]
                # and the tensors they belong to: a plan is found by id() and data pointer, which new tensors can
                # reuse once the old ones are freed, with version counters small enough to match
                gp.psq_owners = [weakref.ref(ps[i]) for i in gp.idx]
    flags.append(bufs.oks_all)
    return _all(flags)


_CAPTURE_STREAMS: dict = {}
GRAPH_CAPTURES = [0]  # CUDA graphs captured so far (tests, benchmarks)


def _launch_or_replay(launch, bufs: _Bufs, ctx, scale, has_scale: bool, key: tuple) -> None:
    """``launch(run)`` issues a grouped update's kernels; on CUDA with ``CONFIG["graphs"]`` they are captured into a
    CUDA graph at the second call with the same ``key`` (the first compiles every variant) and replayed after."""
    run = (ctx.stream, ctx.device, ctx.interpreted, _grouped_key(ctx, scale))
    if ctx.stream is None or has_scale or not CONFIG["graphs"]:
        launch(run)
        return
    graph = bufs.graphs.get(key)
    if graph is None:
        if key not in bufs.seen:
            if len(bufs.seen) >= 64:  # keys that keep changing (a hyper-parameter set every step): launched directly
                bufs.seen.clear()
            bufs.seen.add(key)
            launch(run)
            return
        graph = _capture(launch, ctx, scale)
        if graph is None:
            launch(run)
            return
        if len(bufs.graphs) >= 8:
            bufs.graphs.clear()
        bufs.graphs[key] = graph
    graph.replay()  # on the current stream, after the metadata copy


def _capture(launch, ctx, scale):
    """The launches captured on a side stream (thread-local mode: other threads keep issuing work), or None."""
    side = _CAPTURE_STREAMS.get(ctx.device)
    if side is None:
        side = _CAPTURE_STREAMS[ctx.device] = torch.cuda.Stream(ctx.device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                launch((side.cuda_stream, ctx.device, False, _grouped_key(ctx, scale)))
            finally:
                graph.capture_end()
    except Exception as e:  # noqa: BLE001 - any failure: launch directly from now on
        CONFIG["graphs"] = False
        warnings.warn(f"adalomo.kernels: capturing the grouped update's launches in a CUDA graph failed ({e!r}); "
                      "they are launched one by one from now on (more host time per bucket). "
                      "adalomo.kernels.set_config(graphs=False) skips the attempt.", RuntimeWarning, stacklevel=4)
        return None
    GRAPH_CAPTURES[0] += 1
    return graph


def _scaled_group(gp, meta_t, fmeta_t, oks, carried, stale, run, scale, has_scale, sp_flag, hw, has_m,
                  stochastic_rounding, store, rev, eps1, eps2, ct, wd, b1, omb1, bm, bn) -> None:
    """The launches of one group of a grouped AdaLomo/Adafactor update (``run``: stream, device, interpreted,
    launch-cache key)."""
    fac, (pdt, gdt, align, g_unit, p_unit) = gp.fac, gp.layout
    rs = _pipeline_stages(CONFIG["stages_read"], bm, bn, gdt, pdt)
    wst = _pipeline_stages(CONFIG["stages_write"], bm, bn, gdt, pdt)
    sr = bool(stochastic_rounding) and pdt == torch.bfloat16
    n_t = len(gp.idx)
    pm = gp.pmap
    gd, pd = _TL_DT[gdt], _TL_DT[pdt]
    if fac:
        fb, rp_block = gp.fb, gp.rp_block
        sum_p = sp_flag and not carried
        if not gp.nb or sum_p:  # one_read: this pass only for the sums of p^2 (in the order the write carries)
            _G_STATS(gp.prog, (meta_t, pm, scale, eps1),
                     (gd, pd, has_scale, sum_p, align, g_unit, p_unit, bm, bn, store, rs),
                     CONFIG["warps_stats"], *run)
        if gp.nb:
            _G_STATS1(gp.prog1, (meta_t, fmeta_t, gp.pmap1, scale, eps1),
                      (gd, has_scale, align, g_unit, gp.bm1, gp.nb), CONFIG["warps_one_read"], *run)
            _G_FINALIZE1(gp.fprog, (meta_t, fmeta_t, gp.fpmap), (fb, max(1, min(32, 4096 // fb))), 4, *run)
        else:
            _G_FINALIZE(gp.fprog, (meta_t, fmeta_t, gp.fpmap), (fb, max(1, min(32, 4096 // fb))), 4, *run)
            _G_USQ(gp.prog, (meta_t, pm, scale), (gd, has_scale, align, g_unit, bm, bn, rp_block, rev, rs),
                   CONFIG["warps_usq"], *run, maxnreg=CONFIG["maxnreg_usq"] or None)
        _G_FINISH(n_t, (meta_t, fmeta_t, scale, oks, eps2, ct), (False, True, sp_flag, carried, 1024), 4, *run)
        # the check's sums take ~18 more registers per thread: capped (ptxas then fits 108 without spilling)
        # so that the write keeps its two programs per SM
        cap = CONFIG["maxnreg_write"] or None
        if carried:
            cap = min(cap or _VERIFY_MAXNREG, _VERIFY_MAXNREG)
        if store:  # pipelined, the write that sums p^2 needs 150 registers (one program per SM) and took 92
            wst = 1  # against 74 us (stage ab)
        _G_WRITE(gp.prog, (meta_t, fmeta_t, pm, scale, oks, stale if carried else oks, wd, b1, omb1),
                 (gd, pd, has_scale, sp_flag, hw, has_m, sr, store, align, g_unit, p_unit, bm, bn, rp_block,
                  carried, wst), CONFIG["warps_write"], *run, maxnreg=cap)
    else:
        vb = CONFIG["vec_block"]
        _G_VSTATS(gp.prog, (meta_t, fmeta_t, pm, scale, eps1), (gd, pd, has_scale, sp_flag, g_unit, p_unit, vb), 4,
                  *run)
        _G_FINISH(n_t, (meta_t, fmeta_t, scale, oks, eps2, ct), (False, True, sp_flag, False, 1024), 4, *run)
        _G_VWRITE(gp.prog, (meta_t, fmeta_t, pm, scale, oks, wd, b1, omb1),
                  (gd, pd, has_scale, sp_flag, hw, has_m, sr, g_unit, p_unit, vb), 4, *run)


# carry_psq's check: a write that used carried sums of p^2 compares them with the p it reads and sets this
# per-device flag when they differ (p changed through ``p.data``: the version counter did not move). The optimizer
# takes it once per step while carry_psq is on (``take_carry_stale``) and reports it without waiting.
_STALE: dict = {}
_VERIFY_MAXNREG = 128  # == the registers of the write variant without the check (8 warps, tests/test_kernels_sm90.py)


def _stale_flag(dev: torch.device) -> torch.Tensor:
    dev = _device_key(dev)
    flag = _STALE.get(dev)
    if flag is None:
        flag = _STALE[dev] = torch.zeros(1, dtype=torch.int32, device=dev)
    return flag


def _device_key(dev) -> torch.device:
    """``dev`` with its index: the flags are keyed by a tensor's device (``cuda:0``), and ``torch.device("cuda")``
    is not equal to it."""
    dev = torch.device(dev)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def take_carry_stale(dev) -> torch.Tensor | None:
    """A 0-d bool device tensor: some carried sum of p^2 on ``dev`` (e.g. ``"cuda"``, ``cuda:1``) was stale since
    the last call (then cleared); None when nothing was carried on ``dev`` yet."""
    flag = _STALE.get(_device_key(dev))
    if flag is None:
        return None
    out = flag[0] != 0
    flag.zero_()
    return out


# The launch plan of a grouped update: which tensors go together, their geometry and the static part of their
# metadata rows. It depends only on the tensors' identities, layouts and state buffers, which are the same
# step after step (fused mode flushes the same buckets every backward), so it is cached; each call then only
# writes the gradient pointers, the workspace base, the seeds and the step-dependent floats into the plan's
# packed host template, copies it to the device in one piece (one pinned buffer, one copy for all groups) and
# launches. The device copy of the metadata and the finite flags live in a small device buffer that the plan
# keeps per stream: a call reuses it after the previous call on the same stream, so stream order protects it
# (a call on another stream, e.g. ``side_stream``, gets its own). The workspace is allocated per call (one for
# all groups): it scales with the tensors, and caching it for every bucket would cost real memory.
_PLANS: dict = {}
_COL_SEED = 22
_COL_PSQC = 36  # == _C_PSQC
_ROW_BYTES, _FROW_BYTES = 8 * _W, 4 * _WF
_S6 = struct.Struct("<6q")  # G, P, ROW, COL, M, WS: the first six int64 columns
_SQ = struct.Struct("<q")
_S3F = struct.Struct("<3f")  # RHO, BETA2, 1 - BETA2



class _GroupPlan:
    __slots__ = ("fac", "layout", "idx", "prog", "fprog", "fb", "rp_block", "ws_total", "pmap", "fpmap", "statics",
                 "moff", "foff", "ooff", "psqc", "psq_versions", "psq_owners", "nb", "bm1", "prog1", "pmap1")


class _Plan:
    __slots__ = ("single", "groups", "ws_total", "meta_bytes", "oks_bytes", "tmpl", "tmpl_c", "bufs")


class _Bufs:
    """A plan's device buffer on one stream: the metadata (uploaded each call) and the finite flags; the CUDA
    graphs of its launches (they read these buffers), by the rest of their arguments, and the keys launched once."""
    __slots__ = ("meta_region", "views", "oks_all", "graphs", "seen")


def _layout(plan: _Plan, metas: list, fmetas: list | None) -> None:
    """Byte layout of the packed metadata (per group: int64 rows, then fp32 rows; 16-byte aligned), the flags
    after it, and the host template holding the static columns. ``metas``/``fmetas``: flat lists per group."""
    off, ooff, ws = 0, 0, 0
    for gp in plan.groups:
        n = len(gp.idx)
        gp.moff = off
        off += n * _ROW_BYTES
        gp.foff = off
        if fmetas is not None:
            off += n * _FROW_BYTES
        gp.ooff = ooff
        ooff += _cdiv(n, 16) * 16
        gp.statics = [(p, r, c, m, 4 * ws + w) for (p, r, c, m, w) in gp.statics]  # WS offsets within the call's ws
        ws += gp.ws_total
    plan.ws_total = max(ws, 16)
    plan.meta_bytes, plan.oks_bytes = off, ooff
    tmpl = bytearray(off)
    for k, gp in enumerate(plan.groups):
        struct.pack_into(f"<{len(metas[k])}q", tmpl, gp.moff, *metas[k])
        if fmetas is not None:
            struct.pack_into(f"<{len(fmetas[k])}f", tmpl, gp.foff, *fmetas[k])
    plan.tmpl, plan.tmpl_c = tmpl, (ctypes.c_char * off).from_buffer(tmpl)
    plan.bufs = {}


def _device_bufs(plan: _Plan, stream, dev: torch.device, floats: bool) -> _Bufs:
    bufs = plan.bufs.get(stream)
    if bufs is None:
        if len(plan.bufs) >= 8:
            plan.bufs.clear()
        buf = torch.empty(plan.meta_bytes + plan.oks_bytes, dtype=torch.uint8, device=dev)
        oks = buf[plan.meta_bytes:]
        oks.fill_(1)  # the padding between groups' flags stays True: ``all()`` reads the whole region
        bufs = plan.bufs[stream] = _Bufs()
        bufs.meta_region, bufs.oks_all = buf[:plan.meta_bytes], oks.view(torch.bool)
        bufs.graphs, bufs.seen = {}, set()
        bufs.views = [(buf[gp.moff:gp.moff + len(gp.idx) * _ROW_BYTES].view(torch.int64),
                       buf[gp.foff:gp.foff + len(gp.idx) * _FROW_BYTES].view(torch.float32) if floats else None,
                       oks[gp.ooff:gp.ooff + len(gp.idx)].view(torch.bool)) for gp in plan.groups]
    return bufs


def _upload(plan: _Plan, ctx, dev: torch.device, gs, seeds, stochastic_rounding, rhos, beta2s) -> tuple:
    """This call's metadata into the plan's device buffer: workspace pointers, gradient pointers, seeds and floats
    written into the host template, one (pinned on CUDA) host buffer, one copy. Returns (device buffers, this
    call's workspace)."""
    ws = torch.empty(plan.ws_total, dtype=torch.float32, device=dev)
    base = ws.data_ptr()
    tmpl = plan.tmpl
    pack6, packq, pack3f = _S6.pack_into, _SQ.pack_into, _S3F.pack_into
    for gp in plan.groups:
        sr = bool(stochastic_rounding) and gp.layout[0] == torch.bfloat16
        o = gp.moff
        for i, (p_ptr, row_ptr, col_ptr, m_ptr, ws_off) in zip(gp.idx, gp.statics):
            pack6(tmpl, o, gs[i].data_ptr(), p_ptr, row_ptr, col_ptr, m_ptr or base, base + ws_off)
            packq(tmpl, o + 8 * _COL_SEED, ((int(seeds[i]) if seeds is not None else 0) & _SEED_MASK) | _SEED_BIT
                  if sr else _SEED_BIT)
            o += _ROW_BYTES
        if rhos is not None:
            f = gp.foff
            for i in gp.idx:
                beta2 = float(beta2s[i])
                try:
                    pack3f(tmpl, f, float(rhos[i]), beta2, 1.0 - beta2)
                except OverflowError:  # beyond fp32: the value torch.tensor(..., dtype=float32) would hold
                    pack3f(tmpl, f, *torch.tensor([float(rhos[i]), beta2, 1.0 - beta2], dtype=torch.float32).tolist())
                f += _FROW_BYTES
    host = torch.empty(plan.meta_bytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    ctypes.memmove(host.data_ptr(), plan.tmpl_c, plan.meta_bytes)
    bufs = _device_bufs(plan, ctx.stream, dev, rhos is not None)
    # no host sync; the pinned block is not reused before the copy ran (torch's host allocator records it)
    bufs.meta_region.copy_(host, non_blocking=True)
    return bufs, ws


def _grouped_key(ctx, scale) -> tuple | None:
    """The launch-cache key of the grouped kernels (see ``_run_key``): their pointer arguments are the plan's
    metadata, program maps and flags (fixed dtypes, 16-byte aligned by construction) and ``scale``."""
    if ctx.stream is None:
        return None
    return ("grk", ctx.device, scale.dtype, scale.data_ptr() % 16 == 0)


def _scaled_states(st: dict, fac: bool, has_m: bool) -> tuple:
    sts = (st["exp_avg_sq_row"], st["exp_avg_sq_col"]) if fac else (st["exp_avg_sq"],)
    return sts + (st["exp_avg"],) if has_m else sts


def _scaled_plan(ps, gs, states, has_m: bool, dev) -> _Plan:
    # everything the plan depends on, per tensor: identity, pointer and layout of p, dtype, strides and alignment
    # of g, the state buffers' pointers (one flat tuple: this runs at every flush)
    key = [has_m, dev, *CONFIG.values()]
    add = key.extend
    for p, g, st in zip(ps, gs, states):
        shape = p.shape
        if len(shape) >= 2:
            add((id(p), p.data_ptr(), shape, p.stride(), p.dtype, g.dtype, g.stride(), g.data_ptr() % 16 == 0,
                 st["exp_avg_sq_row"].data_ptr(), st["exp_avg_sq_col"].data_ptr()))
        else:
            add((id(p), p.data_ptr(), shape, p.stride(), p.dtype, g.dtype, g.stride(), g.data_ptr() % 16 == 0,
                 st["exp_avg_sq"].data_ptr(), None))
        if has_m:
            key.append(st["exp_avg"].data_ptr())
    key = tuple(key)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 1024:
            _PLANS.clear()
        plan = _PLANS[key] = _build_scaled_plan(ps, gs, states, has_m, dev)
    return plan


def _build_scaled_plan(ps, gs, states, has_m: bool, dev) -> _Plan:
    plan = _Plan()
    plan.single, plan.groups = [], []
    groups: dict = {}
    for i, (p, g, st) in enumerate(zip(ps, gs, states)):
        c = _classify(p, g)
        sts = _scaled_states(st, p.dim() >= 2, has_m)
        if c is None or not _state_ok(*sts):
            plan.single.append(i)
            continue
        nb = _one_read_nb(c[3][2]) if c[0][0] else 0  # matrices: one tile width per group of one-read ones
        groups.setdefault(c[0] + (nb,), []).append((i, p, g, sts, c[1], c[2], c[3]))
    metas, fmetas = [], []
    for (fac, pdt, gdt, align, g_unit, p_unit, nb), items in groups.items():
        gp = _GroupPlan()
        gp.fac, gp.layout, gp.idx = fac, (pdt, gdt, align, g_unit, p_unit), [it[0] for it in items]
        fb = max(_fin_block(M, N) for *_, (B, M, N) in items) if fac else 0
        if nb:
            geos = [_geometry1(B, M, N, nb, fb) for *_, (B, M, N) in items]
        else:
            geos = [_geometry(B, M, N, "fac" if fac else "vec", fb) for *_, (B, M, N) in items]
        gp.nb, gp.bm1 = nb, _one_read_rows(nb) if nb else 0
        prog, fprog, counts, fcounts, rows, frows, ws_total, statics = 0, 0, [], [], [], [], 0, []
        prog1, counts1 = 0, []
        # the sums of p^2 that a write leaves for the next step (``carry_psq``): n_psq floats per tensor, 16-byte
        # aligned; a few KB per tensor, kept with the plan
        psq_offs = [0]
        for geo in geos:
            psq_offs.append(psq_offs[-1] + (_cdiv(geo["n_psq"], 4) * 4 if fac else 0))
        gp.psqc = torch.zeros(max(psq_offs[-1], 4), dtype=torch.float32, device=dev) if fac else None
        gp.psq_versions, gp.psq_owners = None, []
        for k, ((_, p, _, sts, sg, sp, (B, M, N)), geo) in enumerate(zip(items, geos)):
            numel, ws_off = B * M * N, ws_total
            ws_total += geo["ws_numel"]
            m_ptr = sts[-1].data_ptr() if has_m else 0
            col_ptr = sts[1].data_ptr() if fac else 0
            statics.append((p.data_ptr(), sts[0].data_ptr(), col_ptr, m_ptr, 4 * ws_off))
            if fac:
                nf = geo["n_fprog"] if nb else B * (geo["n_rp"] + geo["n_cp"])
                row = [0, p.data_ptr(), sts[0].data_ptr(), col_ptr, m_ptr, 4 * ws_off,
                       B, M, N, geo["TM"], geo["TN"], geo["rows_per_prog"], *sg, *sp, geo["n_rp"], geo["n_cp"],
                       prog, fprog, 0, geo["n_fin"], geo["n_usq"], geo["n_psq"], geo["off_rowpart"],
                       geo["off_colpart"], geo["off_newrow"], geo["off_newcol"], geo["off_rsum"], geo["off_fin"],
                       geo["off_usq"], geo["off_psq"], geo["off_scal"], 0]
                n = geo["n_prog"]
                fcounts.append(nf)
                fprog += nf
            else:
                n = geo["n_vec"]
                row = [0, p.data_ptr(), sts[0].data_ptr(), 0, m_ptr, 4 * ws_off,
                       1, 1, numel, 0, 0, 0, 0, 0, sg[2], 0, 0, sp[2], 0, 0, prog, 0, 0, n, n, n,
                       0, 0, geo["off_newv"], 0, 0, geo["off_fin"], geo["off_usq"], geo["off_psq"], geo["off_scal"], n]
            row = row + [0] * (_W - len(row))
            if fac:
                row[_COL_PSQC] = gp.psqc.data_ptr() + 4 * psq_offs[k]
            if nb:
                row[_COL_PSQC + 1:] = [geo["TM1"], geo["RPP1"], geo["off_colpart1"], geo["off_wpart"], prog1]
                counts1.append(geo["n_prog1"])
                prog1 += geo["n_prog1"]
            rows.extend(row)
            frows.extend([0.0, 0.0, 0.0, float(numel), math.sqrt(numel), 0.0, 0.0, 0.0])
            counts.append(n)
            prog += n
        gp.prog, gp.fprog, gp.fb, gp.ws_total, gp.statics = prog, fprog, fb, ws_total, statics
        gp.rp_block = max(g_["RP_BLOCK"] for g_ in geos) if fac else 0
        gp.pmap = _pmap(tuple(counts), dev)
        gp.fpmap = _pmap(tuple(fcounts), dev) if fac else None
        gp.prog1, gp.pmap1 = prog1, (_pmap(tuple(counts1), dev) if nb else None)
        plan.groups.append(gp)
        metas.append(rows)
        fmetas.append(frows)
    _layout(plan, metas, fmetas)
    return plan


def lomo_update_many_(ps, gs, *, lr, weight_decay, clip_grad_value, grad_scale, stochastic_rounding, seeds):
    """``lomo_update_`` for many tensors with three launches per group; returns "every gradient was finite"."""
    if not ps:
        return None
    dev = ps[0].device
    ctx = _Ctx(ps[0])
    if ctx.device >= 0 and ctx.device != torch.cuda.current_device():
        with torch.cuda.device(ctx.device):
            return lomo_update_many_(ps, gs, lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                                     grad_scale=grad_scale, stochastic_rounding=stochastic_rounding, seeds=seeds)
    has_scale, scale = _scale_arg(grad_scale, ps[0])
    clip = clip_grad_value is not None
    plan = _lomo_plan(ps, gs, dev)
    flags = []
    for i in plan.single:
        flags.append(lomo_update_(ps[i], gs[i], lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                                  grad_scale=grad_scale, stochastic_rounding=stochastic_rounding, generator=None,
                                  seed=seeds[i] if seeds is not None else None))
    if not plan.groups:
        return _all(flags)
    n = len(ps)
    lr, wd = float(lr), float(weight_decay)
    # lr and weight decay travel in the fp32 rows' rho and beta2 columns (per call: schedulers), like AdaLomo's rho
    bufs, ws = _upload(plan, ctx, dev, gs, seeds, stochastic_rounding, [lr] * n, [wd] * n)
    bm, bn = CONFIG["block_m"], CONFIG["block_n"]
    cv = float(clip_grad_value) if clip else 0.0

    def launch(run):
        for gp, (meta_t, fmeta_t, oks) in zip(plan.groups, bufs.views):
            pdt, gdt, align, g_unit, p_unit = gp.layout
            sr = bool(stochastic_rounding) and pdt == torch.bfloat16
            gd, pd = _TL_DT[gdt], _TL_DT[pdt]
            _G_SUM(gp.prog, (meta_t, gp.pmap),
                   (gd, align, g_unit, bm, bn, _pipeline_stages(CONFIG["stages_read"], bm, bn, gdt)),
                   CONFIG["warps_usq"], *run)
            _G_FINISH(len(gp.idx), (meta_t, fmeta_t, scale, oks, 0.0, 1.0), (has_scale, False, False, False, 1024), 4,
                      *run)  # its floats are not used here
            _G_LWRITE(gp.prog, (meta_t, fmeta_t, gp.pmap, scale, oks, cv),
                      (gd, pd, has_scale, wd != 0, clip, sr, align, g_unit, p_unit, bm, bn,
                       _pipeline_stages(CONFIG["stages_write"], bm, bn, gdt, pdt)),
                      CONFIG["warps_write"], *run, maxnreg=CONFIG["maxnreg_write"] or None)

    _launch_or_replay(launch, bufs, ctx, scale, has_scale, ("l", wd != 0, cv, bool(stochastic_rounding)))
    del ws  # read through the metadata: kept until the launches above were issued
    _bump(ps if not plan.single else [ps[i] for gp in plan.groups for i in gp.idx])
    flags.append(bufs.oks_all)
    return _all(flags)


def _lomo_plan(ps, gs, dev) -> _Plan:
    key = ["lomo", dev, *CONFIG.values()]
    add = key.extend
    for p, g in zip(ps, gs):
        add((id(p), p.data_ptr(), p.shape, p.stride(), p.dtype, g.dtype, g.stride(), g.data_ptr() % 16 == 0))
    key = tuple(key)
    plan = _PLANS.get(key)
    if plan is not None:
        return plan
    if len(_PLANS) > 1024:
        _PLANS.clear()
    plan = _Plan()
    plan.single, plan.groups = [], []
    groups: dict = {}
    for i, (p, g) in enumerate(zip(ps, gs)):
        c = _classify(p, g)
        if c is None:
            plan.single.append(i)
            continue
        groups.setdefault(c[0][1:], []).append((i, p, c[1], c[2], c[3]))
    metas, fmetas = [], []
    for layout, items in groups.items():
        gp = _GroupPlan()
        gp.fac, gp.layout, gp.idx, gp.fpmap = False, layout, [it[0] for it in items], None
        fmetas.append([0.0] * (_WF * len(items)))  # lr and weight decay, written per call
        prog, counts, rows, ws_total, statics = 0, [], [], 0, []
        for _, p, sg, sp, (B, M, N) in items:
            geo = _geometry(B, M, N, "lomo", 1)
            n = geo["n_prog"]
            row = [0, p.data_ptr(), 0, 0, 0, 4 * ws_total, B, M, N, geo["TM"], geo["TN"],
                   geo["rows_per_prog"], *sg, *sp, 0, 0, prog, 0, 0, n, 0, 0, 0, 0, 0, 0, 0, geo["off_fin"], 0,
                   0, geo["off_scal"], 0]
            rows.extend(row + [0] * (_W - len(row)))
            statics.append((p.data_ptr(), 0, 0, 0, 4 * ws_total))
            ws_total += geo["ws_numel"]
            counts.append(n)
            prog += n
        gp.prog, gp.fprog, gp.fb, gp.rp_block, gp.ws_total, gp.statics = prog, 0, 0, 0, ws_total, statics
        gp.pmap = _pmap(tuple(counts), dev)
        plan.groups.append(gp)
        metas.append(rows)
    _layout(plan, metas, fmetas)
    _PLANS[key] = plan
    return plan


_STAGE_SMEM = 96 * 1024  # shared memory a pipelined loop may take for its tiles in flight, per program


def _pipeline_stages(stages: int, bm: int, bn: int, *dtypes: torch.dtype) -> int:
    """The stages a row loop gets: Triton keeps ``stages - 1`` tiles of every loaded tensor in shared memory, so
    large tiles (``block_m``/``block_n``) of wide dtypes get fewer, down to 1 (not pipelined), instead of a launch
    that fails for want of shared memory (64x256 fp32 tiles at 3 stages asked 263 KB of an H200's 227)."""
    per_stage = bm * bn * sum(d.itemsize for d in dtypes)
    return max(1, min(stages, 1 + _STAGE_SMEM // per_stage))


def _all(flags: list) -> torch.Tensor:
    if len(flags) == 1:
        return flags[0].all()
    return torch.cat([f.reshape(-1) for f in flags]).all()


if os.environ.get("ADALOMO_KERNEL_CONFIG"):
    import json as _json

    set_config(**_json.loads(os.environ["ADALOMO_KERNEL_CONFIG"]))
