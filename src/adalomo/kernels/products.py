"""fp32-accurate matrix products on the 16-bit tensor cores, for AdaPM's rank-r projections and lifts.

An fp32 operand is written as three bfloat16 pieces, x = x0 + x1 + x2 (8 significant bits each, 24 together as in
fp32; each remainder is exact in fp32). The product of two bfloat16 numbers is exact in fp32 and the GEMM accumulates
in fp32 (``torch.mm(..., out_dtype=torch.float32)``, cuBLAS), so of the nine piece products x_i y_j the six with
i + j <= 2 give x @ y to fp32 accuracy: the dropped ones are ~2^-24 of it. A bfloat16 gradient is its own single
piece and a float16 one two (11 significant bits).

* lift (A @ B, both fp32, a x r times r x b): the six products side by side along the reduced dimension, one GEMM
  with K = 6r, from A's pieces in the order ``LIFT_A`` and B's in ``LIFT_B``.
* projection (P^T g or g P): the pieces of P side by side along the output (the large g is not repeated), one GEMM
  per piece of g; the caller sums the output's three blocks (``adapm_momentum_kernel`` does, as it reads them).

``adapm_pieces_kernel`` writes the pieces of an operand in one pass, in any order. On the CPU (Triton's interpreter)
the GEMM runs in fp32 on the same pieces, whose products are exact there too.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .config import cdiv
from .launch import Launcher, keyed_launch

__all__ = ["pieces", "pack", "project", "lift", "LIFT_A", "LIFT_B", "PROJECT"]

#: the piece pairs (i, j) of a lift's products x_i y_j, in the order their blocks sit along K: A's pieces, B's
_PAIRS = ((0, 0), (0, 1), (1, 0), (0, 2), (2, 0), (1, 1))
LIFT_A = tuple(i for i, _ in _PAIRS)
LIFT_B = tuple(j for _, j in _PAIRS)
#: the basis's pieces in a projection: all three, each meeting the gradient's first piece
PROJECT = (0, 1, 2)
_PIECES_OF = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
_BLOCK = (32, 64)


@functools.lru_cache(maxsize=64)
def pack(pattern: tuple[int, ...]) -> int:
    """A piece order as ``adapm_pieces_kernel``'s PATTERN: 2 bits per block, the first lowest."""
    return sum(i << (2 * k) for k, i in enumerate(pattern))


@triton.jit
def split3(x):
    """The three bfloat16 pieces of the fp32 ``x`` (x0 + x1 + x2 = x to fp32 rounding)."""
    x0 = x.to(tl.bfloat16)
    rest = x - x0.to(tl.float32)  # exact: x0 is x rounded to 8 significant bits
    x1 = rest.to(tl.bfloat16)
    return x0, x1, (rest - x1.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def store_pieces(out, x, mask, stride, PATTERN: tl.constexpr, K: tl.constexpr):
    """Store the pieces of ``x`` in the order PATTERN (``pack``), block k at ``out + k * stride``."""
    x0, x1, x2 = split3(x)
    for k in tl.static_range(K):
        which = (PATTERN >> (2 * k)) & 3
        if which == 0:
            tl.store(out + k * stride, x0, mask=mask)
        elif which == 1:
            tl.store(out + k * stride, x1, mask=mask)
        else:
            tl.store(out + k * stride, x2, mask=mask)


@triton.jit(do_not_specialize=["R", "C", "sx_r", "sx_c"])
def adapm_pieces_kernel(x_ptr, out_ptr, R, C, sx_r, sx_c, PATTERN: tl.constexpr, K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[:, k C:(k + 1) C] = piece PATTERN[k] of x (an R x C matrix of any strides). out: bfloat16, R x K C,
    contiguous."""
    pid = tl.program_id(0)
    tc = tl.cdiv(C, BLOCK_C)
    rows = (pid // tc) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % tc) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * sx_r + cols[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
    store_pieces(out_ptr + r64 * (K * C) + cols[None, :], x, mask, C, PATTERN, K)


_pieces = Launcher(adapm_pieces_kernel, "PATTERN", "K", "BLOCK_R", "BLOCK_C")


def pieces(x: torch.Tensor, pattern: tuple[int, ...], run: tuple, keys: list | None = None, slot: int = 0
           ) -> torch.Tensor:
    """The bfloat16 pieces ``pattern`` of the 2-D ``x`` side by side: [x_{pattern[0]} | x_{pattern[1]} | ...].
    ``keys``, ``slot``: a launch plan's cached launch key (``launch.keyed_launch``)."""
    R, C = x.shape
    out = torch.empty((R, len(pattern) * C), dtype=torch.bfloat16, device=x.device)
    br, bc = _BLOCK
    grid, args, consts = cdiv(R, br) * cdiv(C, bc), (x, out, R, C, x.stride(0), x.stride(1)), (pack(pattern),
                                                                                                len(pattern), br, bc)
    if keys is None:
        _pieces(grid, args, consts, 4, run)
    else:
        keyed_launch(_pieces, keys, slot, grid, args, consts, 4, run[0], run[1])
    return out


def _mm32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b in fp32 from bfloat16 operands (fp32 accumulation), into ``out`` if given (contiguous fp32)."""
    if a.is_cuda:
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    if out is None:
        return torch.mm(a.float(), b.float())
    return torch.mm(a.float(), b.float(), out=out)


def project(g: torch.Tensor, Pc: torch.Tensor, side: str, run: tuple) -> torch.Tensor:
    """``momentum.project(g, P, side)`` as three blocks to be summed: P_0^T g, P_1^T g, P_2^T g stacked (``left``,
    3r x b) or g P_0 | g P_1 | g P_2 side by side (``right``, a x 3r). ``g`` in its own dtype (bfloat16, float16 or
    float32), ``Pc``: P's pieces ``PROJECT`` (n x 3r)."""
    left = side == "left"
    r = Pc.shape[1] // 3
    n = _PIECES_OF[g.dtype]
    out = None if n > 1 else _mm32(Pc.mT, g) if left else _mm32(g, Pc)
    if n > 1:
        gp = pieces(g, tuple(range(n)), run)
        b = g.shape[1]
        for i in range(n):
            gi, k = gp[:, i * b:(i + 1) * b], 3 - i  # g's piece i meets P's pieces j <= 2 - i
            part = _mm32(Pc[:, :k * r].mT, gi) if left else _mm32(gi, Pc[:, :k * r])
            if out is None:
                out = part
            elif left:
                out[:k * r] += part
            else:
                out[:, :k * r] += part
    return out


def lift(Ac: torch.Tensor, Bc: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """A @ B in fp32 (a x b) from A's pieces ``LIFT_A`` (a x 6r) and B's ``LIFT_B`` (6r x b), into ``out`` if given
    (contiguous fp32, a x b)."""
    return _mm32(Ac, Bc, out)
