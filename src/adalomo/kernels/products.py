"""fp32-accurate matrix products on the 16-bit tensor cores, for AdaPM's rank-r projections and lifts.

An fp32 operand is written as three bfloat16 pieces, x = x0 + x1 + x2 (8 significant bits each, 24 together as in
fp32; each remainder is exact in fp32). The product of two bfloat16 numbers is exact in fp32 and the GEMM accumulates
in fp32 (``torch.mm(..., out_dtype=torch.float32)``, cuBLAS), so of the nine piece products x_i y_j the six with
i + j <= 2 give x @ y to fp32 accuracy: the dropped ones are ~2^-24 of it. A bfloat16 gradient is its own single
piece and a float16 one is two (11 significant bits), so a projection needs three or five products.

* ``lift`` (A @ B with both fp32, a x r times r x b): the six products side by side along the reduced dimension,
  one GEMM with K = 6r.
* ``project`` (P^T g or g P): the pieces of P side by side along the output (the large g is not repeated), one GEMM
  per piece of g, the blocks of the output summed after.

``adapm_pieces_kernel`` writes the pieces in one pass. On the CPU (Triton's interpreter) the GEMM runs in fp32 on the
same pieces, whose products are exact there too.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .config import cdiv
from .launch import Launcher

__all__ = ["pieces", "project", "lift"]

#: the piece pairs (i, j) of a product x_i y_j kept in a lift, in the order their blocks sit along K
_LIFT = ((0, 0), (0, 1), (1, 0), (0, 2), (2, 0), (1, 1))
_PIECES_OF = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
_BLOCK = (32, 64)


@triton.jit(do_not_specialize=["R", "C", "sx_r", "sx_c"])
def adapm_pieces_kernel(x_ptr, out_ptr, R, C, sx_r, sx_c, PATTERN: tl.constexpr, K: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[:, k C:(k + 1) C] = piece PATTERN[k] of x (an R x C matrix of any strides; PATTERN packs K piece indices
    of 2 bits each, lowest first). out: bfloat16, R x K C, contiguous."""
    pid = tl.program_id(0)
    tc = tl.cdiv(C, BLOCK_C)
    rows = (pid // tc) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = (pid % tc) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows < R)[:, None] & (cols < C)[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * sx_r + cols[None, :] * sx_c, mask=mask, other=0.0).to(tl.float32)
    x0 = x.to(tl.bfloat16)
    rest = x - x0.to(tl.float32)  # exact: x0 is x rounded to 8 significant bits
    x1 = rest.to(tl.bfloat16)
    x2 = (rest - x1.to(tl.float32)).to(tl.bfloat16)
    out = out_ptr + r64 * (K * C) + cols[None, :]
    for k in tl.static_range(K):
        which = (PATTERN >> (2 * k)) & 3
        if which == 0:
            tl.store(out + k * C, x0, mask=mask)
        elif which == 1:
            tl.store(out + k * C, x1, mask=mask)
        else:
            tl.store(out + k * C, x2, mask=mask)


_pieces = Launcher(adapm_pieces_kernel, "PATTERN", "K", "BLOCK_R", "BLOCK_C")


def pieces(x: torch.Tensor, pattern: tuple[int, ...], run: tuple) -> torch.Tensor:
    """The bfloat16 pieces ``pattern`` of the 2-D ``x`` side by side: [x_{pattern[0]} | x_{pattern[1]} | ...]."""
    R, C = x.shape
    out = torch.empty((R, len(pattern) * C), dtype=torch.bfloat16, device=x.device)
    packed = sum(i << (2 * k) for k, i in enumerate(pattern))
    br, bc = _BLOCK
    _pieces(cdiv(R, br) * cdiv(C, bc), (x, out, R, C, x.stride(0), x.stride(1)), (packed, len(pattern), br, bc), 4,
            run)
    return out


def _mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32 from bfloat16 operands (fp32 accumulation)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def project(g: torch.Tensor, P: torch.Tensor, side: str, run: tuple) -> torch.Tensor:
    """``momentum.project(g, P, side)`` in fp32: P^T g (``left``, r x b) or g P (``right``, a x r), ``g`` in its own
    dtype (bfloat16, float16 or float32), ``P`` fp32."""
    n = _PIECES_OF[g.dtype]
    r = P.shape[1]
    Pc = pieces(P, (0, 1, 2), run)
    if n == 1:
        parts = [g]
    else:
        gc = pieces(g, tuple(range(n)), run)
        parts = [gc[:, i * g.shape[1]:(i + 1) * g.shape[1]] for i in range(n)]
    out = None
    for i, gi in enumerate(parts):
        k = 3 - i  # the pieces of P that g's piece i meets (i + j <= 2)
        if side == "left":
            part = _mm32(Pc[:, :k * r].mT, gi).view(k, r, -1).sum(0)
        else:
            part = _mm32(gi, Pc[:, :k * r]).view(-1, k, r).sum(1)
        out = part if out is None else out.add_(part)
    return out


def lift(A: torch.Tensor, Bt: torch.Tensor, run: tuple) -> torch.Tensor:
    """A @ Bt^T in fp32 (a x b) from fp32 A (a x r) and Bt (b x r)."""
    return _mm32(pieces(A, tuple(i for i, _ in _LIFT), run), pieces(Bt, tuple(j for _, j in _LIFT), run).mT)
