"""``@triton.jit`` helpers shared by the kernel families: tile loads, partial sums, the scalar prologue of the write
passes, and stochastic rounding's random bits.

Every tensor is seen as a batch of matrices [B, M, N] through its strides, so non-contiguous gradients and
parameters are read and written in place. Reductions are two-level (per-program partials in an fp32 workspace,
then a fixed-order sum), so the results are deterministic run to run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import cdiv
from .launch import SEED_BIT, SEED_MASK


@triton.jit
def tile_coords(pid, TM, TN):
    """(matrix, row group, column tile) of a row-tiled program."""
    j = pid % TN
    t = pid // TN
    i = t % TM
    b = t // TM
    return b, i, j


@triton.jit
def a16(x):
    """``x`` (a multiple of 16 by construction or by the ALIGN contract) with that fact visible to the compiler."""
    return (x // 16) * 16


@triton.jit
def strides_known(N, s_b, s_m, s_n, ALIGN: tl.constexpr, UNIT: tl.constexpr):
    """``N`` and a tensor's [B, M, N] strides, with what the launch vouches for made visible to the compiler: ALIGN
    (N and the batch and row strides are multiples of 16 elements), UNIT (unit column stride)."""
    if ALIGN:
        N, s_b, s_m = a16(N), a16(s_b), a16(s_m)
    if UNIT:
        s_n = 1
    return N, s_b, s_m, s_n


@triton.jit
def and_flag(mask, flag):
    """``mask & flag`` for a block mask and an int8 scalar flag (bool scalars trip Triton's interpreter)."""
    return (mask.to(tl.int8) & flag) != 0


# ------------------------------------------------------------------------------------------- row tiles
@triton.jit
def load_tile(base, m0, stride_m, offs, r0, lrows, lim, cmask):
    """Row tile ``m0`` of a program's rows (``r0 + m0 + lrows < lim``), in its own dtype: 0 where masked."""
    mask = ((r0 + m0 + lrows) < lim)[:, None] & cmask[None, :]
    return tl.load(base + m0 * stride_m + offs, mask=mask, other=0.0)


@triton.jit
def first_tile(base, stride_m, offs, r0, lrows, lim, cmask, DEPTH: tl.constexpr = 1):
    """What a streaming loop carries into its first iteration: row tile 0, prefetched by hand; nothing when the loop
    is software-pipelined by Triton (DEPTH > 1: the next tiles are copied into shared memory asynchronously)."""
    if DEPTH <= 1:
        return load_tile(base, 0, stride_m, offs, r0, lrows, lim, cmask)
    else:
        return 0.0


@triton.jit
def next_tile(nx, base, m0, stride_m, offs, r0, lrows, lim, cmask, BLOCK_M: tl.constexpr,
              DEPTH: tl.constexpr = 1):
    """Row tile ``m0`` in fp32, and what to carry on. ``nx`` holds tile m0 and tile m0 + BLOCK_M is loaded now, before
    the caller reduces the current one: two tiles in flight per program (the read passes are latency-bound with
    one). Pipelined (DEPTH > 1): tile m0 is loaded now, Triton overlaps the loads."""
    if DEPTH <= 1:
        return nx.to(tl.float32), load_tile(base, m0 + BLOCK_M, stride_m, offs, r0, lrows, lim, cmask)
    else:
        return load_tile(base, m0, stride_m, offs, r0, lrows, lim, cmask).to(tl.float32), nx


@triton.jit
def first_tiles(g_base, p_base, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim, cmask, PF: tl.constexpr):
    """A write pass's (g, p) carried into the first iteration: row tile 0 of each with PF (see ``next_tiles``)."""
    if PF:
        return (first_tile(g_base, sg_m, g_offs, r0, lrows, lim, cmask),
                first_tile(p_base, sp_m, p_offs, r0, lrows, lim, cmask))
    else:
        return 0.0, 0.0


@triton.jit
def next_tiles(g_nx, p_nx, g_base, p_base, m0, sg_m, sp_m, g_offs, p_offs, r0, lrows, lim, cmask, mask,
               PF: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tile ``m0`` of g and p in fp32 for a write pass, and what to carry on. PF (the grouped kernels): the next
    tiles are loaded before this one is computed and stored; else tile m0 is loaded now."""
    if PF:
        g, g_nx = next_tile(g_nx, g_base, m0, sg_m, g_offs, r0, lrows, lim, cmask, BLOCK_M)
        p, p_nx = next_tile(p_nx, p_base, m0, sp_m, p_offs, r0, lrows, lim, cmask, BLOCK_M)
    else:
        g = tl.load(g_base + m0 * sg_m + g_offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_base + m0 * sp_m + p_offs, mask=mask, other=0.0).to(tl.float32)
    return g, p, g_nx, p_nx


# ----------------------------------------------------------------------------------------- partial sums
@triton.jit
def sum_parts(ws_ptr, off, n, BLOCK: tl.constexpr):
    """The ``n`` partial sums at ``ws_ptr + off`` summed in a fixed order."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for k in range(0, n, BLOCK):
        acc += tl.load(ws_ptr + off + k + offs, mask=k + offs < n, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def sum_partial_rows(base, B, b64, idx, Np, n, PB: tl.constexpr, BLOCK: tl.constexpr):
    """Entries ``idx`` of matrix ``b`` summed over the ``n`` partial rows at ``base`` (row ``i * B + b``, stride
    ``Np``: padded to 16, so loads up to Np are in bounds and vectorise), in a fixed order."""
    parts = tl.arange(0, PB)
    s = tl.zeros([PB, BLOCK], dtype=tl.float32)
    for i0 in range(0, n, PB):
        ii = i0 + parts
        ptrs = base + ((ii * B).to(tl.int64) + b64)[:, None] * Np + idx[None, :]
        s += tl.load(ptrs, mask=(ii < n)[:, None] & (idx < Np)[None, :], other=0.0)
    return tl.sum(s, axis=0)


# ---------------------------------------------------------------------------------------- scalar prologue
@triton.jit
def step_scalars(ws_ptr, scale_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, numel_f, sqrt_numel,
                 rho, eps2, clip_threshold, FIN_SCALE: tl.constexpr, HAS_USQ: tl.constexpr, HAS_PSQ: tl.constexpr,
                 BLOCK: tl.constexpr):
    """(finite flag as int8, clip factor 1/max(1, RMS(u)/d), step size rho*max(eps2, RMS(p))) from the partial sums
    in the workspace, in a fixed order."""
    fin = sum_parts(ws_ptr, off_fin, n_fin, BLOCK)
    if FIN_SCALE:
        fin = fin * tl.load(scale_ptr).to(tl.float32)
    # 0 for NaN and +-inf. Not ``(fin - fin) == 0``: with the gradient scale folded in, the compiler contracts
    # ``fin * s - fin * s`` into an FMA that returns the rounding error of the product, non-zero for most s.
    ok = (tl.abs(fin) <= 3.4028234663852886e38).to(tl.int8)
    clip = fin * 0.0 + 1.0
    if HAS_USQ:
        usq = sum_parts(ws_ptr, off_usq, n_usq, BLOCK)
        clip = 1.0 / tl.maximum(tl.sqrt_rn(usq / numel_f) / clip_threshold, 1.0)
    step = fin * 0.0 + rho
    if HAS_PSQ:
        psq = sum_parts(ws_ptr, off_psq, n_psq, BLOCK)
        step = tl.maximum(tl.sqrt_rn(psq) / sqrt_numel, eps2) * rho
    return ok, clip, step


@triton.jit
def write_scalars(pid, ws_ptr, scale_ptr, ok_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq, off_scal, numel_f,
                  sqrt_numel, rho, eps2, clip_threshold, FOLD: tl.constexpr, FIN_SCALE: tl.constexpr,
                  HAS_USQ: tl.constexpr, HAS_PSQ: tl.constexpr):
    """A write pass's (finite flag, clip, step). FOLD (one tensor per launch, the FSDP2 path): every program reduces
    the (few, L2-resident) partials itself, and program 0 ANDs the flag into ``*ok_ptr``; else they were stored by
    the finish kernel (the flag at ``ok_ptr``, clip and step in the workspace)."""
    if FOLD:
        ok, clip, step = step_scalars(ws_ptr, scale_ptr, n_fin, n_usq, n_psq, off_fin, off_usq, off_psq,
                                      numel_f, sqrt_numel, rho, eps2, clip_threshold, FIN_SCALE, HAS_USQ, HAS_PSQ,
                                      1024)
        if pid == 0:
            acc = tl.load(ok_ptr).to(tl.int8)
            tl.store(ok_ptr, (acc & ok) != 0)
    else:
        ok = tl.load(ok_ptr).to(tl.int8)
        clip = tl.load(ws_ptr + off_scal)
        step = tl.load(ws_ptr + off_scal + 1)
        if not HAS_PSQ:
            step = rho
    return ok, clip, step


# ----------------------------------------------------------------------------------- stochastic rounding
# 16 random bits per element from a keyed integer hash of its index (one round of the ``lowbias32`` mixer, ~15
# instructions per element): Philox (``tl.randint``, ~60) made the write kernels 2.5x slower than rounding to
# nearest. Both round to a neighbour without bias and draw uniform, uncorrelated bits (tests/test_kernels.py).
@triton.jit
def _mix32(x):
    """``lowbias32`` (C. Wellons): a bijective uint32 mixer with near-ideal avalanche."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit
def hash_bits(seed, lin):
    """16 random bits (int32) per element index ``lin``: ``lowbias32(lin ^ key)``, the key folded from the 62-bit
    ``seed`` (fresh each step and tensor). A bijection per key: no two elements of a tile share an input."""
    key = (seed & 0xFFFFFFFF).to(tl.uint32) ^ _mix32(((seed >> 32) & 0xFFFFFFFF).to(tl.uint32))
    return (_mix32(lin.to(tl.uint32) ^ key) >> 16).to(tl.int32)


@triton.jit
def round_to_bf16(new, lin, seed):
    """Stochastic rounding of fp32 ``new`` (exact after the cast to bf16): add 16 random bits, truncate. ``lin``:
    the elements' indices in the tensor (row * N + column)."""
    bits = new.to(tl.int32, bitcast=True)
    rounded = ((bits + hash_bits(seed, lin)) & -65536).to(tl.float32, bitcast=True)
    return tl.where(new != new, new, rounded)


@triton.jit
def _sr_bits_kernel(out_ptr, seed, n, BLOCK: tl.constexpr):
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + idx, hash_bits(seed, idx), mask=idx < n)


def sr_bits(n: int, seed: int, device) -> torch.Tensor:
    """The 16 rounding bits (int32) that elements ``0..n-1`` of a write get with ``seed``: for tests of the
    generator's statistics."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    _sr_bits_kernel[(cdiv(n, 1024),)](out, (int(seed) & SEED_MASK) | SEED_BIT, n, BLOCK=1024)
    return out
