"""The torch maths of the optimizers on the local rows of an FSDP2 parameter (sharded on dim 0).

Each function equals its single-process counterpart in :mod:`adalomo.functional` applied to the full
tensor: row statistics stay local; column sums, mean(row), RMS(u), RMS(p) and the finite flag are summed
over the shard group given explicitly as ``shard`` (an :class:`~adalomo.distributed.ShardInfo`), in two
batched all-reduces per tensor, on the device (no host synchronisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import functional as F
from .shard import ShardInfo

__all__ = ["second_moment_", "scaled_rms_update_", "lomo_update_", "gather_rows", "param_scale"]


def second_moment_(state: dict[str, Tensor], g: Tensor, *, beta2: float, eps1: float,
                   grad_scale: Tensor | float | None, shard: ShardInfo,
                   extra: tuple[Tensor, ...] = ()) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """``functional.update_second_moment_`` on the local rows, in one all-reduce.

    For a 2-D tensor the column statistics reduce over the sharded dim: their sums are all-reduced and
    divided by the global row count. For 1-D and >= 3-D tensors every statistic is local. The non-finite
    count, the sums needed for the global mean of the new row statistics (2-D) and the caller's ``extra``
    partial sums ride in the same all-reduce. Returns (ok, global mean of the new row statistics as a 0-d
    tensor or None, reduced ``extra``).
    """
    if not F.is_factored(g):
        v = state["exp_avg_sq"]
        u = F.square(g, grad_scale).add_(eps1)
        bad = (~torch.isfinite(u.sum())).float()
        out = shard.all_reduce_sum_([bad, *extra])
        ok = out[0] == 0
        F.masked_ema_(v, u, beta2, ok)
        return ok, None, out[1:]
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    row_mean, col_sum = F.row_means_col_sums(g, eps1, grad_scale)
    bad = (~torch.isfinite(row_mean.sum() + col_sum.sum())).float()
    if g.dim() != 2:  # dim 0 is a batch dim of the factorisation: everything is local but the flag
        out = shard.all_reduce_sum_([bad, *extra])
        ok = out[0] == 0
        F.masked_ema_(row, row_mean, beta2, ok)
        F.masked_ema_(col, col_sum.div_(g.shape[-2]), beta2, ok)
        return ok, None, out[1:]
    row_new = row * beta2 + row_mean * (1.0 - beta2)
    out = shard.all_reduce_sum_([col_sum, bad, row_new.sum(), row.sum(), *extra])
    col_sum, bad, new_sum, old_sum = out[:4]
    ok = bad == 0
    m = shard.global_shape[0]
    row.copy_(torch.where(ok, row_new, row))
    F.masked_ema_(col, col_sum.to(col.dtype) / m, beta2, ok)
    row_mean_global = torch.where(ok, new_sum, old_sum).to(row.dtype) / m
    return ok, row_mean_global, out[4:]


def scaled_rms_update_(p: Tensor, g: Tensor, state: dict[str, Tensor], *, rho: float, eps: tuple[float, float],
                       clip_threshold: float, beta2: float, weight_decay: float, scale_parameter: bool,
                       beta1: float | None, grad_scale: Tensor | float | None, stochastic_rounding: bool,
                       generator: torch.Generator | None, shard: ShardInfo) -> Tensor:
    """``functional.scaled_rms_update_`` on the local rows: two all-reduces.

    1. [column sums | non-finite count | sums of the old and new row statistics | sum p^2];
    2. [sum u^2].
    """
    extra = (torch.linalg.vector_norm(p, dtype=F.compute_dtype(p)).square(),) if scale_parameter else ()
    ok, row_mean, extra = second_moment_(state, g, beta2=beta2, eps1=eps[0], grad_scale=grad_scale, shard=shard,
                                         extra=extra)
    numel = shard.numel
    if scale_parameter:
        step_size = param_scale(extra[0], numel, eps[1]) * rho
    else:
        step_size = torch.full((), rho, device=p.device)
    F.clip_and_apply_(p, g, state, F.preconditioner(state, row_mean), ok, step_size, numel=numel,
                      clip_threshold=clip_threshold, weight_decay=weight_decay, beta1=beta1, grad_scale=grad_scale,
                      stochastic_rounding=stochastic_rounding, generator=generator,
                      reduce_sum_sq=lambda x: shard.all_reduce_sum_([x])[0])
    return ok


def lomo_update_(p: Tensor, g: Tensor, *, lr: float, weight_decay: float, clip_grad_value: float | None,
                 grad_scale: Tensor | float | None, stochastic_rounding: bool, generator: torch.Generator | None,
                 shard: ShardInfo) -> Tensor:
    """``functional.lomo_update_`` on the local rows: only the finite flag needs the other ranks (all of them
    skip together)."""
    scaled_sum = g.sum(dtype=torch.float32)
    ok = torch.isfinite(scaled_sum if grad_scale is None else scaled_sum * grad_scale)
    ok = shard.all_reduce_sum_([(~ok).float()])[0] == 0
    return F.lomo_update_(p, g, lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                          grad_scale=grad_scale, stochastic_rounding=stochastic_rounding, generator=generator, ok=ok)


def gather_rows(x: Tensor, shard: ShardInfo) -> Tensor:
    """The whole tensor from every rank's rows (``x``: this rank's, any trailing shape): one all-gather.

    Shards are padded to the largest one (``ceil(rows / world)`` rows); as only the trailing shards can be short,
    the first ``rows`` rows of the gathered buffer are the whole tensor, in order.
    """
    import torch.distributed as dist

    world = dist.get_world_size(shard.group)
    rows = shard.global_shape[0]
    chunk = -(-rows // world)
    buf = x.new_zeros((chunk, *x.shape[1:]))
    buf[:x.shape[0]] = x
    out = x.new_empty((chunk * world, *x.shape[1:]))
    dist.all_gather_into_tensor(out, buf, group=shard.group)
    return out[:rows]


def param_scale(sum_sq: Tensor, numel: int, eps2: float) -> Tensor:
    """``functional.param_scale`` (max(eps2, RMS(p))) from the all-reduced sum of squares of p."""
    return (sum_sq.sqrt() / math.sqrt(max(numel, 1))).clamp_min(eps2)
