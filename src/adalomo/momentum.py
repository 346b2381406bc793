"""First-moment (momentum) estimates for AdaPM, one tensor at a time: ``full``, ``low_rank``, ``none``.

Every function returns or updates fp32 tensors and takes a 0-d bool ``ok`` (was the gradient finite?):
state is only changed where ``ok`` is True, with ``torch.where`` (no host synchronisation).

``full``
    m_t = beta1 m_{t-1} + (1 - beta1) g_t,  m_hat_t = m_t / (1 - beta1^t)  (Adam's first moment).
``none``
    m_hat_t = g_t (no state).
``low_rank`` (bias-corrected partial momentum)
    For the gradient viewed as an a x b matrix (tensors with more than two dims are flattened to
    (shape[0], rest)), an orthonormal basis P of the smaller side (``left``: P is a x r when a <= b;
    ``right``: P is b x r otherwise) and a small momentum of the projected gradient,
    M_t = beta1 M_{t-1} + (1 - beta1) P^T g_t (``left``; ``right``: g_t P). The estimate is

        m_hat_t = P M_t / (1 - beta1^t) + (g_t - P P^T g_t)

    (``right``: M_t P^T / (1 - beta1^t) + g_t - g_t P P^T): the component of the gradient outside the
    subspace, which has no stored history, enters with the current gradient instead of being dropped.
    For a fixed P and gradients g_t = G + noise_t with E[noise_t] = 0,
    E[m_hat_t] = P P^T G + (I - P P^T) G = G: the same expectation as the bias-corrected full
    momentum. With r = min(a, b), P P^T = I and m_hat is exactly the full momentum.

    Basis refresh (step 1 and every ``update_proj_gap`` steps, from the current gradient): the stored
    momentum is carried into the new basis, M <- P_new^T P_old M, and the part of the new subspace that
    the old one did not cover, which has no history either, is filled with the current gradient at the
    weight that history would have had: M <- P_new^T P_old M + (1 - beta1^{t-1}) P_new^T (I - P_old P_old^T) g_t.
    This keeps E[M_t] = (1 - beta1^t) P^T G across refreshes (given the bases), hence E[m_hat_t] = G.
    (The fill is our own design; without it the carried momentum keeps only the old subspace's part.)
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "KINDS",
    "SplitMomentum",
    "as_matrix",
    "low_rank_layout",
    "init_momentum_state",
    "momentum_state_numel",
    "orthonormal_basis",
    "range_sketch",
    "leading_subspaces",
    "project",
    "lift",
    "full_momentum_",
    "refresh_basis_",
    "low_rank_momentum_",
    "low_rank_estimate",
    "momentum_estimate_",
]

KINDS = ("full", "low_rank", "none")


class SplitMomentum(NamedTuple):
    """Different momentum kinds for equal chunks of one tensor along ``dim`` (fused QKV weights).

    ``SplitMomentum(-1, ("low_rank", "low_rank", "full"))`` is GPT-2's ``c_attn`` (a ``Conv1D`` of shape
    (in, 3 * dim)): low-rank momentum for the Q and K columns, full momentum for the V columns.
    """

    dim: int
    kinds: tuple[str, ...]


def as_matrix(x: Tensor) -> Tensor:
    """The 2-D view used by the low-rank maths: (shape[0], prod(shape[1:]))."""
    return x if x.dim() == 2 else x.reshape(x.shape[0], -1)


def _matrix_shape(shape: torch.Size | tuple[int, ...]) -> tuple[int, int]:
    a = int(shape[0])
    b = int(math.prod(shape[1:]))
    return a, b


def low_rank_layout(shape, rank: int) -> tuple[str, int, tuple[int, int], tuple[int, int]]:
    """(side, r, shape of P, shape of M) for a tensor of ``shape`` (>= 2 dims) and a rank cap ``rank``.

    The basis lives on the smaller side: ``left`` (P: a x r, M: r x b) when a <= b, else ``right``
    (P: b x r, M: a x r); r = min(rank, a, b).
    """
    a, b = _matrix_shape(shape)
    r = max(1, min(int(rank), a, b))
    if a <= b:
        return "left", r, (a, r), (r, b)
    return "right", r, (b, r), (a, r)


def init_momentum_state(kind: str, shape, rank: int, device=None, prefix: str = "",
                        dtype: torch.dtype = torch.float32) -> dict[str, Tensor]:
    """Zero state (fp32 by default) for one momentum kind: ``exp_avg`` (full), ``proj`` + ``exp_avg_lr``
    (low_rank)."""
    kw = dict(dtype=dtype, device=device)
    if kind == "full":
        return {prefix + "exp_avg": torch.zeros(tuple(shape), **kw)}
    if kind == "low_rank":
        _, _, p_shape, m_shape = low_rank_layout(shape, rank)
        return {prefix + "proj": torch.zeros(p_shape, **kw), prefix + "exp_avg_lr": torch.zeros(m_shape, **kw)}
    if kind == "none":
        return {}
    raise ValueError(f"unknown momentum kind {kind!r}; choose one of {KINDS}")


def momentum_state_numel(kind: str, shape, rank: int) -> int:
    """Number of fp32 values the momentum of ``kind`` keeps for a tensor of ``shape``."""
    if kind == "full":
        return int(math.prod(shape))
    if kind == "low_rank":
        _, _, p_shape, m_shape = low_rank_layout(shape, rank)
        return p_shape[0] * p_shape[1] + m_shape[0] * m_shape[1]
    if kind == "none":
        return 0
    raise ValueError(f"unknown momentum kind {kind!r}; choose one of {KINDS}")


# ----------------------------------------------------------------------------- bases


def orthonormal_basis(g: Tensor, r: int, side: str, method: str = "randomized",
                      generator: torch.Generator | None = None, oversample: int = 8,
                      power_iters: int = 2, iterate=None) -> Tensor:
    """An orthonormal basis (columns) of the top-r singular subspace of the 2-D fp32 ``g`` on ``side``.

    ``svd``: the leading r singular vectors of ``torch.linalg.svd``. ``randomized``: a range finder
    (Halko, Martinsson & Tropp 2011, ``range_sketch``): Gaussian sketch of r + ``oversample`` columns drawn from
    ``generator``, ``power_iters`` QR-stabilised power iterations, then the leading r-dimensional subspace of
    the small projected matrix (``leading_subspaces``: orthogonal iteration, QR only, no host synchronisation on
    CUDA). Both give an a x r (``left``) or b x r (``right``) matrix. ``iterate``: the orthogonal iteration's steps
    in one call (``kernels.orthogonal_iteration``).
    """
    if method == "svd":
        x = g if side == "left" else g.mT
        u, _, _ = torch.linalg.svd(x, full_matrices=False)
        return u[:, :r].contiguous()
    if method != "randomized":
        raise ValueError(f"unknown basis method {method!r}; choose 'randomized' or 'svd'")
    q, s, z = range_sketch(g, r, side, generator, oversample, power_iters)
    return (q @ leading_subspaces(s, z, iterate)).contiguous()


def range_sketch(g: Tensor, r: int, side: str, generator: torch.Generator | None = None, oversample: int = 8,
                 power_iters: int = 2) -> tuple[Tensor, Tensor, Tensor]:
    """The randomized basis's large part: an orthonormal rows x k basis q of the sketched range of x (g or g^T by
    ``side``, k = min(r + oversample, rows, cols)), the small k x k s = b b^T of b = q^T x, and the orthogonal
    iteration's k x r starting vectors, drawn after the sketch. The basis is q @ ``leading_subspaces(s, z)``; apart,
    the small problems of many matrices can be solved together."""
    x = g if side == "left" else g.mT
    rows, cols = x.shape
    k = min(r + oversample, rows, cols)
    omega = torch.randn(cols, k, generator=generator, device=x.device, dtype=x.dtype)
    q, _ = torch.linalg.qr(x @ omega)
    for _ in range(power_iters):
        z, _ = torch.linalg.qr(x.mT @ q)
        q, _ = torch.linalg.qr(x @ z)
    b = q.mT @ x
    return q, b @ b.mT, torch.randn(k, r, generator=generator, device=x.device, dtype=x.dtype)


def leading_subspaces(s: Tensor, z: Tensor, iterate=None, iters: int = 32) -> Tensor:
    """Orthonormal k x r bases of the leading r-dimensional eigenspaces of the symmetric k x k ``s`` (b b^T of a
    ``range_sketch``), by orthogonal iteration from ``z``: ``iters`` times z <- Q(s z), QR only. s (..., k, k) and z
    (..., k, r) may be batches. On CUDA ``torch.linalg.svd`` and ``eigh`` wait for the device (they read an error
    code back); ``qr`` does not, so a basis refresh never stalls the step. The subspace is all that matters (m_hat is
    invariant under a rotation of P within it); each iteration shrinks the part outside it by
    (sigma_{r+1} / sigma_r)^2. Iterated well past the point where the subspace stops moving, so that a gradient that
    differs by rounding (FSDP2's averaged one against one process's) gives a basis that differs as little as an
    SVD's would (fewer iterations leave the result sensitive to the starting vectors' mix).

    ``iterate(s, z, iters)``, if given, runs the steps (the same QRs to rounding) in one call and returns z, or None
    where it cannot (torch's steps then): each QR is a few hundred microseconds of cuSOLVER launches on CUDA, so
    the 32 of them are most of a refresh."""
    if iterate is not None:
        out = iterate(s, z, iters)
        if out is not None:
            return out
    for _ in range(iters):
        z, _ = torch.linalg.qr(s @ z)
    return z


def project(g: Tensor, P: Tensor, side: str) -> Tensor:
    """P^T g (``left``, r x b) or g P (``right``, a x r)."""
    return P.mT @ g if side == "left" else g @ P


def lift(c: Tensor, P: Tensor, side: str) -> Tensor:
    """P c (``left``) or c P^T (``right``): back to a x b."""
    return P @ c if side == "left" else c @ P.mT


# ----------------------------------------------------------------------------- updates


def _masked_copy_(dst: Tensor, new: Tensor, ok: Tensor) -> None:
    dst.copy_(torch.where(ok, new, dst))


def full_momentum_(m: Tensor, g: Tensor, beta1: float, ok: Tensor) -> None:
    """m <- beta1 m + (1 - beta1) g where ``ok``."""
    _masked_copy_(m, torch.lerp(g, m, beta1) if beta1 != 0 else g, ok)


def refresh_basis_(P: Tensor, M: Tensor, P_new: Tensor, g: Tensor, side: str, *, carry_weight: float,
                   ok: Tensor, fill: bool = True) -> None:
    """Move the low-rank momentum to the basis ``P_new`` (in place, where ``ok``).

    M <- P_new^T P_old M (``left``; ``right``: M P_old^T P_new), plus, with ``fill``,
    ``carry_weight`` * the projection on P_new of the part of ``g`` outside the old subspace
    (``carry_weight`` = 1 - beta1^{t-1}: the weight the missing history would have had).
    """
    if side == "left":
        c = P_new.mT @ P  # r x r
        M_new = c @ M
    else:
        c = P.mT @ P_new
        M_new = M @ c
    if fill and carry_weight != 0:
        outside = project(g, P_new, side) - (c @ project(g, P, side) if side == "left" else project(g, P, side) @ c)
        M_new = M_new + carry_weight * outside
    _masked_copy_(M, M_new, ok)
    _masked_copy_(P, P_new, ok)


def low_rank_momentum_(P: Tensor, M: Tensor, g: Tensor, side: str, beta1: float, ok: Tensor) -> Tensor:
    """M <- beta1 M + (1 - beta1) proj(g) where ``ok``; returns proj(g) (reused by the estimate)."""
    pg = project(g, P, side)
    _masked_copy_(M, torch.lerp(pg, M, beta1) if beta1 != 0 else pg, ok)
    return pg


def low_rank_estimate(g: Tensor, P: Tensor, M: Tensor, pg: Tensor, side: str, bias_correction: float) -> Tensor:
    """m_hat = lift(M / bc) + g - lift(proj(g)) = g + lift(M / bc - proj(g)), a new fp32 tensor."""
    return g + lift(M / bias_correction - pg, P, side)


def momentum_estimate_(kind: str, state: dict[str, Tensor], g: Tensor, *, beta1: float, step: float,
                       ok: Tensor, refresh: bool = False, basis=None, rank: int | None = None,
                       fill: bool = True, prefix: str = "") -> Tensor:
    """Update the momentum state of one tensor (or chunk) and return its bias-corrected estimate m_hat.

    ``g``: the fp32 gradient (any shape; it is not modified). ``step``: t, counted from 1.
    ``refresh``: recompute the low-rank basis from ``g`` first, with ``basis(g2d, r, side) -> P``.
    The returned tensor has ``g``'s shape; for ``none`` it is ``g`` itself (do not modify it in place).
    """
    if kind == "none":
        return g
    bc = 1.0 - beta1 ** step
    if kind == "full":
        m = state[prefix + "exp_avg"]
        full_momentum_(m, g, beta1, ok)
        return m / bc
    if kind != "low_rank":
        raise ValueError(f"unknown momentum kind {kind!r}; choose one of {KINDS}")
    P, M = state[prefix + "proj"], state[prefix + "exp_avg_lr"]
    g2 = as_matrix(g)
    side = "left" if g2.shape[0] <= g2.shape[1] else "right"
    if refresh:
        if basis is None:
            raise ValueError("refresh=True needs a basis function")
        safe = torch.where(ok, g2, torch.zeros((), dtype=g2.dtype, device=g2.device))
        P_new = basis(safe, P.shape[1], side)
        refresh_basis_(P, M, P_new, safe, side, carry_weight=1.0 - beta1 ** (step - 1), ok=ok, fill=fill)
    pg = low_rank_momentum_(P, M, g2, side, beta1, ok)
    return low_rank_estimate(g2, P, M, pg, side, bc).view(g.shape)
