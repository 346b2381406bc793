"""The small end of an AdaPM basis refresh (``momentum.orthonormal_basis``) in one kernel: orthogonal iteration
z <- Q(s z) on a k x k matrix s (k = r + oversample), ``iters`` times, for a batch of such problems at once.

In torch each step is a cuSOLVER QR of a k x r matrix, a few hundred microseconds of launches and small kernels
whatever the size; a refresh takes 32 of them per matrix, most of its time. Here one program runs every step of
one problem, its working k x r matrix in registers: the product in fp32, then the QR's Q by Householder
reflections with LAPACK's conventions (``geqrf`` + ``orgqr``: beta = -sign(alpha) ||x||, a zero column gives
tau = 0 and e_j), so that the result is torch's to rounding, rank-deficient s included. The steps are sequential
(a reduction or two per column), so a launch is latency-bound; programs of a batch run side by side, and
refreshing many matrices costs about as much as one. k up to ``MAX_K`` (the tile must fit registers); callers use
torch above it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import next_pow2
from .launch import on_tensor_device

__all__ = ["orthogonal_iteration", "MAX_K"]

MAX_K = 128


@triton.jit(do_not_specialize=["k", "r", "iters"])
def orthogonal_iteration_kernel(s_ptr, z_ptr, work_ptr, k, r, iters, KP: tl.constexpr, RP: tl.constexpr):
    """Program b: z[b] <- Q(s[b] @ z[b]) ``iters`` times (s: k x k, z: k x r, both contiguous fp32). Only the
    working matrix and Q live in registers: s and z are read a column and a row at a time for the product
    (L1-resident), and the reflectors go through ``work`` (KP x RP vectors, then RP taus per program)."""
    b = tl.program_id(0).to(tl.int64)
    s_ptr += b * k * k
    z_ptr += b * k * r
    v_ptr = work_ptr + b * (KP * RP + RP)
    tau_ptr = v_ptr + KP * RP
    rows1 = tl.arange(0, KP)
    cols1 = tl.arange(0, RP)
    rows, cols = rows1[:, None], cols1[None, :]
    zmask = (rows < k) & (cols < r)
    for _ in range(iters):
        x = tl.zeros([KP, RP], dtype=tl.float32)
        for c in range(k):  # s @ z as k rank-1 updates (a tl.dot in fp32 spills its operands here)
            sc = tl.load(s_ptr + rows1 * k + c, mask=rows1 < k, other=0.0)
            zr = tl.load(z_ptr + c * r + cols1, mask=cols1 < r, other=0.0)
            x += sc[:, None] * zr[None, :]
        # geqrf: reflectors H_j = I - tau_j v_j v_j^T, x <- H_j x zeroing column j below its diagonal
        for j in range(r):
            col = tl.sum(tl.where(cols == j, x, 0.0), axis=1)
            alpha = tl.sum(tl.where(rows1 == j, col, 0.0), axis=0)
            tail2 = tl.sum(tl.where(rows1 > j, col * col, 0.0), axis=0)
            norm = tl.sqrt_rn(alpha * alpha + tail2)
            beta = tl.where(alpha >= 0, -norm, norm)
            live = tail2 > 0.0
            tau = tl.where(live, tl.div_rn(beta - alpha, tl.where(live, beta, 1.0)), 0.0)
            scale = tl.div_rn(1.0, tl.where(live, alpha - beta, 1.0))
            v = tl.where(rows1 == j, 1.0, tl.where(rows1 > j, col * scale, 0.0))
            x = x - (tau * v)[:, None] * tl.sum(v[:, None] * x, axis=0)[None, :]
            tl.store(v_ptr + j * KP + rows1, v)
            tl.store(tau_ptr + j, tau)
        tl.debug_barrier()
        # orgqr: Q = H_0 H_1 ... H_{r-1} applied to the first r columns of the identity
        q = (rows == cols).to(tl.float32)
        for i in range(r):
            j = r - 1 - i
            v = tl.load(v_ptr + j * KP + rows1)
            q = q - (tl.load(tau_ptr + j) * v)[:, None] * tl.sum(v[:, None] * q, axis=0)[None, :]
        tl.store(z_ptr + rows * r + cols, q, mask=zmask)
        tl.debug_barrier()


def _warps(tile: int) -> int:
    """Warps per program: the working matrix and Q at 16 values per thread or fewer (more spill on sm_90)."""
    return max(4, min(16, tile // (16 * 32)))


@on_tensor_device
def orthogonal_iteration(s: torch.Tensor, z: torch.Tensor, iters: int) -> torch.Tensor | None:
    """``for _ in range(iters): z = torch.linalg.qr(s @ z).Q`` for s (..., k, k) and z (..., k, r), r <= k: a new
    tensor (z's shape); None for k > ``MAX_K`` or other dtypes than fp32 (the caller takes torch's steps)."""
    k, r = z.shape[-2], z.shape[-1]
    if s.shape[-2:] != (k, k) or s.shape[:-2] != z.shape[:-2] or r > k:
        raise ValueError(f"orthogonal_iteration: s {tuple(s.shape)} and z {tuple(z.shape)} must be (..., k, k) and "
                         f"(..., k, r) with r <= k")
    if k > MAX_K or s.dtype != torch.float32 or z.dtype != torch.float32:
        return None
    out = z.clone(memory_format=torch.contiguous_format)
    s = s.contiguous()
    batch = out.numel() // (k * r) if r else 0
    if batch == 0 or iters <= 0:
        return out
    kp, rp = max(16, next_pow2(k)), max(16, next_pow2(r))
    work = torch.empty(batch * (kp * rp + rp), dtype=torch.float32, device=out.device)
    orthogonal_iteration_kernel[(batch,)](s, out, work, k, r, iters, KP=kp, RP=rp,
                                          num_warps=_warps(kp * rp))
    return out
