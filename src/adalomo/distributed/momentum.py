"""AdaPM's momentum (:mod:`adalomo.momentum`) on the local rows of an FSDP2 parameter sharded on dim 0.

The low-rank maths views a tensor as the a x b matrix (shape[0], rest); this rank holds rows [o, o + L). Which
state follows the rows and what crosses ranks, per kind (docs/adapm.md counts the bytes):

* ``full``: m follows the rows; elementwise, nothing to reduce.
* ``low_rank``, side ``left`` (a <= b): P (a x r) follows the rows, M (r x b) is whole on every rank.
  P^T g = sum over ranks of P_l^T g_l is an r x b all-reduce (it rides in the step's first all-reduce); the
  estimate g_l + P_l (M / bc - P^T g) is local rows.
* ``low_rank``, side ``right`` (a > b): P (b x r) is whole on every rank, M (a x r) follows the rows;
  g_l P and the estimate g_l + (M_l / bc - g_l P) P^T are local: nothing to reduce.
* basis refresh (step 1 and every ``update_proj_gap`` steps): one all-gather of the whole gradient matrix with the
  row-sharded one of P and M beside it; every rank then runs the single-process refresh on the whole matrices, so
  the new basis is bit for bit the one a single process computes from the same gradient.
* ``SplitMomentum`` along a dim other than 0: every chunk has all of the parameter's rows, so each chunk is one
  of the above. Along dim 0 the chunks are blocks of rows that straddle the shards: a chunk's row state would be
  split unevenly across ranks, which a ``DTensor`` (even shards) cannot describe. Refused (:func:`check_split`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import momentum as M
from ..momentum import SplitMomentum
from .functional import gather_rows
from .shard import ShardInfo

__all__ = ["Chunk", "check_split", "row_state_keys", "second_moment_row_keys", "chunks", "refresh_",
           "partial_projections", "estimates_"]


class Chunk(NamedTuple):
    """One momentum kind's part of a parameter: its kind, state-key prefix, local gradient and global shape."""

    kind: str
    prefix: str
    g: Tensor
    shape: torch.Size


def check_split(kind: Any, shape: torch.Size, where: str) -> None:
    """Refuse a ``SplitMomentum`` along dim 0 of a tensor whose rows are sharded over several ranks."""
    if isinstance(kind, SplitMomentum) and kind.dim % len(shape) == 0:
        raise NotImplementedError(
            f"{where}: SplitMomentum along dim 0 on a parameter sharded on dim 0 (FSDP2): its chunks are blocks of "
            "rows that straddle the shards, whose momentum state cannot be a DTensor. Give that tensor one kind "
            "(e.g. momentum_policy={r'qkv_proj': 'low_rank'}), or shard its module on one rank (HSDP)")


def row_state_keys(kind: str, shape: torch.Size, prefix: str = "") -> tuple[str, ...]:
    """The momentum state keys of ``kind`` that follow the rows of a tensor of global ``shape`` (the others are
    whole on every rank)."""
    if kind == "full":
        return (prefix + "exp_avg",)
    if kind == "low_rank":
        return (prefix + _row_key(shape),)
    return ()


def second_moment_row_keys(second_moment: str, ndim: int) -> tuple[str, ...]:
    """The second-moment state keys that follow the rows: v (Adam, or a 0-D/1-D tensor), the row statistics of a
    factored matrix, both statistics of a tensor of more than two dims (dim 0 is a batch dim of the factorisation)."""
    if second_moment == "adam" or ndim < 2:
        return ("exp_avg_sq",)
    return ("exp_avg_sq_row",) if ndim == 2 else ("exp_avg_sq_row", "exp_avg_sq_col")


def _row_key(shape: torch.Size) -> str:
    """The low-rank state that follows the rows: P on the ``left`` side, M on the ``right``."""
    return "proj" if _side(shape) == "left" else "exp_avg_lr"


def _reduces(c: Chunk) -> bool:
    """Whether this chunk's projection P^T g needs the other ranks' rows (``left`` low-rank)."""
    return c.kind == "low_rank" and _side(c.shape) == "left"


def chunks(kind: Any, g: Tensor, shape: torch.Size, chunk_shape: torch.Size | None) -> list[Chunk]:
    """The chunks of the local gradient ``g`` (global ``shape``; ``chunk_shape`` for a split along dim >= 1)."""
    if not isinstance(kind, SplitMomentum):
        return [Chunk(kind, "", g, shape)]
    parts = g.chunk(len(kind.kinds), kind.dim)
    return [Chunk(k, f"{i}.", gc, chunk_shape) for i, (k, gc) in enumerate(zip(kind.kinds, parts))]


def _matrix(x: Tensor, shape: torch.Size) -> Tensor:
    """``momentum.as_matrix`` of local rows of a tensor of global ``shape`` (also when there are no local rows)."""
    return x if x.dim() == 2 else x.reshape(x.shape[0], shape.numel() // shape[0])


def _side(shape: torch.Size) -> str:
    a, b = shape[0], shape.numel() // shape[0]
    return "left" if a <= b else "right"


def refresh_(kind: Any, parts: list[Chunk], g: Tensor, state: dict[str, Tensor], *, beta1: float, step: float,
             bases: list, fill: bool, shard: ShardInfo) -> None:
    """The basis refresh of every low-rank chunk, equal bit for bit to the single-process refresh.

    One all-gather brings the whole gradient and, per chunk, the row-sharded one of P (``left``) or M (``right``);
    each rank then refreshes the whole matrices (``bases[i](g2, r, side)`` as in one process, its finite flag from
    the whole gradient) and keeps its rows. ``g``: the local gradient of the whole parameter.
    """
    rows = g.shape[0]
    low = [(i, c) for i, c in enumerate(parts) if c.kind == "low_rank"]
    sharded = [state[c.prefix + _row_key(c.shape)] for _, c in low]
    packed = torch.cat([_matrix(g, shard.global_shape), *sharded], 1)
    whole = gather_rows(packed, ShardInfo(shard.group, torch.Size((shard.global_shape[0], packed.shape[1]))))
    width = shard.global_shape.numel() // shard.global_shape[0]
    g_whole = whole[:, :width].reshape(shard.global_shape).contiguous()
    ok = torch.isfinite(g_whole.sum())
    g_parts = [g_whole] if not isinstance(kind, SplitMomentum) else g_whole.chunk(len(kind.kinds), kind.dim)
    offset, col = shard.row_offset, width
    for (i, c), mine in zip(low, sharded):
        r = mine.shape[1]
        full_rows = whole[:, col:col + r]  # a fresh tensor's columns: refreshed in place, then this rank's rows kept
        col += r
        P, Mom = state[c.prefix + "proj"], state[c.prefix + "exp_avg_lr"]
        side = _side(c.shape)
        g2 = M.as_matrix(g_parts[i])
        safe = torch.where(ok, g2, torch.zeros((), dtype=g2.dtype, device=g2.device))
        P_new = bases[i](safe, r, side)
        full_P, full_M = (full_rows, Mom) if side == "left" else (P, full_rows)
        M.refresh_basis_(full_P, full_M, P_new, safe, side, carry_weight=1.0 - beta1 ** (step - 1), ok=ok, fill=fill)
        mine.copy_(full_rows[offset:offset + rows])


def partial_projections(parts: list[Chunk], state: dict[str, Tensor]) -> list[Tensor]:
    """P_l^T g_l (r x b) of every ``left`` low-rank chunk: this rank's part of P^T g, to be summed over ranks."""
    return [M.project(_matrix(c.g, c.shape), state[c.prefix + "proj"], "left") for c in parts if _reduces(c)]


def estimates_(parts: list[Chunk], state: dict[str, Tensor], *, beta1: float, step: float, ok: Tensor,
               projected: list[Tensor]) -> list[Tensor]:
    """:func:`estimate_` of every chunk, ``projected``: the summed :func:`partial_projections`, in order."""
    reduced = iter(projected)
    return [estimate_(c, state, beta1=beta1, step=step, ok=ok, projected=next(reduced) if _reduces(c) else None)
            for c in parts]


def estimate_(c: Chunk, state: dict[str, Tensor], *, beta1: float, step: float, ok: Tensor,
              projected: Tensor | None) -> Tensor:
    """The momentum update of one chunk on its local rows and its estimate m_hat (local rows).

    ``projected``: P^T g summed over the ranks for a ``left`` low-rank chunk (else None: g_l P is local).
    Returns a new tensor, or the gradient itself for ``none`` (do not modify it in place).
    """
    if c.kind == "none":
        return c.g
    bc = 1.0 - beta1 ** step
    if c.kind == "full":
        m = state[c.prefix + "exp_avg"]
        M.full_momentum_(m, c.g, beta1, ok)
        return m / bc
    P, Mom = state[c.prefix + "proj"], state[c.prefix + "exp_avg_lr"]
    side = _side(c.shape)
    g2 = _matrix(c.g, c.shape)
    pg = projected if side == "left" else M.project(g2, P, side)
    M.full_momentum_(Mom, pg, beta1, ok)  # M <- beta1 M + (1 - beta1) proj(g): the same EMA as full momentum
    return M.low_rank_estimate(g2, P, Mom, pg, side, bc).view(c.g.shape)
