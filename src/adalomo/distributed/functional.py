"""The torch maths of the optimizers on the local rows of an FSDP2 parameter (sharded on dim 0).

Each function equals its single-process counterpart in :mod:`adalomo.functional` applied to the full
tensor: row statistics stay local; column sums, mean(row), RMS(u), RMS(p) and the finite flag are summed
over the shard group given explicitly as ``shard`` (an :class:`~adalomo.distributed.ShardInfo`), in one
batched all-reduce per tensor, on the device (no host synchronisation).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import functional as F
from .shard import ShardInfo

__all__ = ["second_moment_", "scaled_rms_update_", "lomo_update_", "gather_rows", "param_scale"]


def second_moment_(state: dict[str, Tensor], g: Tensor, *, beta2: float, eps1: float,
                   grad_scale: Tensor | float | None, shard: ShardInfo, extra: tuple[Tensor, ...] = (),
                   sum_sq: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None, list[Tensor]]:
    """``functional.update_second_moment_`` on the local rows, in one all-reduce.

    For a 2-D tensor the column statistics reduce over the sharded dim: their sums are all-reduced and
    divided by the global row count. For 1-D and >= 3-D tensors every statistic is local. The non-finite
    count, the sums needed for the global mean of the new row statistics (2-D) and the caller's ``extra``
    partial sums ride in the same all-reduce.

    ``sum_sq``: also the global sum(u^2) of u = g / sqrt(v_hat) under the new statistics (clipping by RMS(u)),
    from what rides in the same all-reduce: the local sum(u^2) where every statistic is local, and for a 2-D
    tensor the column weights W_j = sum_i g_ij^2 / row_i over the local rows (their new statistics are local),
    with sum(u^2) = mean(row) sum_j W_j / col_j (``functional.factored_sum_of_squares``).

    Returns (ok, global mean of the new row statistics as a 0-d tensor or None, sum(u^2) or None, reduced
    ``extra``).
    """
    if not F.is_factored(g):
        v = state["exp_avg_sq"]
        u = F.square(g, grad_scale).add_(eps1)
        bad = (~torch.isfinite(u.sum())).float()
        v_new = v * beta2 + u * (1.0 - beta2)
        local = [F.sum_of_squares(F.precondition(g, (v_new.rsqrt(),), grad_scale=grad_scale))] if sum_sq else []
        out = shard.all_reduce_sum_([bad, *local, *extra])
        ok = out[0] == 0
        v.copy_(torch.where(ok, v_new, v))
        return ok, None, out[1] if sum_sq else None, out[1 + len(local):]
    row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
    row_mean, col_sum, weights = F.factored_statistics(g, eps1, grad_scale, row if sum_sq else None, beta2)
    bad = (~torch.isfinite(row_mean.sum() + col_sum.sum())).float()
    row_new = row * beta2 + row_mean * (1.0 - beta2)
    if g.dim() != 2:  # dim 0 is a batch dim of the factorisation: everything is local but the flag
        col_new = col * beta2 + col_sum.div_(g.shape[-2]) * (1.0 - beta2)
        local = [F.factored_sum_of_squares(weights, col_new, row_new.mean(-1))] if sum_sq else []
        out = shard.all_reduce_sum_([bad, *local, *extra])
        ok, row_mean_global, total = out[0] == 0, None, out[1] if sum_sq else None
        rest = out[1 + len(local):]
    else:
        m = shard.global_shape[0]
        local = [weights] if sum_sq else []
        out = shard.all_reduce_sum_([col_sum, bad, row_new.sum(), row.sum(), *local, *extra])
        col_sum, bad, new_sum, old_sum = out[:4]
        ok = bad == 0
        col_new = col * beta2 + (col_sum.to(col.dtype) / m) * (1.0 - beta2)
        row_mean_global = torch.where(ok, new_sum, old_sum).to(row.dtype) / m
        total = F.factored_sum_of_squares(out[4], col_new, row_mean_global) if sum_sq else None
        rest = out[4 + len(local):]
    row.copy_(torch.where(ok, row_new, row))
    col.copy_(torch.where(ok, col_new, col))
    return ok, row_mean_global, total, rest


def scaled_rms_update_(p: Tensor, g: Tensor, state: dict[str, Tensor], *, rho: float, eps: tuple[float, float],
                       clip_threshold: float, beta2: float, weight_decay: float, scale_parameter: bool,
                       beta1: float | None, grad_scale: Tensor | float | None, stochastic_rounding: bool,
                       generator: torch.Generator | None, shard: ShardInfo) -> Tensor:
    """``functional.scaled_rms_update_`` on the local rows: one all-reduce of [column sums | non-finite count |
    sums of the old and new row statistics | the partial sums of u^2 | sum p^2] (``second_moment_``)."""
    extra = (torch.linalg.vector_norm(p, dtype=F.compute_dtype(p)).square(),) if scale_parameter else ()
    ok, row_mean, sum_sq, extra = second_moment_(state, g, beta2=beta2, eps1=eps[0], grad_scale=grad_scale,
                                                 shard=shard, extra=extra, sum_sq=True)
    numel = shard.numel
    if scale_parameter:
        step_size = param_scale(extra[0], numel, eps[1]) * rho
    else:
        step_size = torch.full((), rho, device=p.device)
    F.clip_and_apply_(p, g, state, F.preconditioner(state, row_mean), ok, step_size, numel=numel,
                      clip_threshold=clip_threshold, weight_decay=weight_decay, beta1=beta1, grad_scale=grad_scale,
                      stochastic_rounding=stochastic_rounding, generator=generator, sum_sq=sum_sq)
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
