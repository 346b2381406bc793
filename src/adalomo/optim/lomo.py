"""LOMO (Lv et al., 2023): SGD fused into the backward pass; no optimizer state."""

from __future__ import annotations

from typing import Any

from .. import functional as F
from .. import kernels
from ..precision import DynamicLossScaler
from .base import DEFAULT_BUCKET_CAP_MB, LowMemoryOptimizer, _check_number

__all__ = ["Lomo"]


class Lomo(LowMemoryOptimizer):
    """LOMO: p <- p * (1 - lr * wd) - lr * clamp(g, -clip_grad_value, clip_grad_value).

    No maths state: only a step counter per tensor, which seeds bf16 stochastic rounding. Global
    gradient-norm clipping (``clip_grad_norm``) needs two passes in fused mode: ``opt.grad_norm(loss)``
    then ``opt.fused_backward(loss)`` (or ``loss.backward()``), exactly like ``lomo_optim.Lomo``.
    """

    _sharded_many = True

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, clip_grad_value: float | None = None,
                 fused: bool = False, *, clip_grad_norm: float | None = None,
                 stochastic_rounding: bool | None = None, nonfinite: str = "warn",
                 loss_scaler: DynamicLossScaler | None = None, sr_seed: int = 0,
                 bucket_cap_mb: float | str = DEFAULT_BUCKET_CAP_MB, side_stream: bool = False,
                 flush_thread: bool = False):
        defaults = dict(lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, fused=fused, nonfinite=nonfinite, loss_scaler=loss_scaler,
                         clip_grad_norm=clip_grad_norm, sr_seed=sr_seed,
                         bucket_cap_mb=bucket_cap_mb, side_stream=side_stream, flush_thread=flush_thread)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check_number("lr", group["lr"], low=0.0)
        _check_number("weight_decay", group["weight_decay"], low=0.0)
        if group["clip_grad_value"] is not None:
            _check_number("clip_grad_value", group["clip_grad_value"], low=0.0, low_open=True,
                          hint=" (use None to disable)")

    def _update(self, p, grad, group, state, grad_scale, stochastic_rounding, generator):
        state["step"] += 1
        return F.lomo_update_(p, grad, lr=group["lr"], weight_decay=group["weight_decay"],
                              clip_grad_value=group["clip_grad_value"], grad_scale=grad_scale,
                              stochastic_rounding=stochastic_rounding, generator=generator)

    def _update_many(self, ps, grads, group, shards=None):
        _, seeds, _, sr = self._begin_many(ps, group)
        return kernels.lomo_update_many_(ps, grads, lr=group["lr"], weight_decay=group["weight_decay"],
                                         clip_grad_value=group["clip_grad_value"],
                                         grad_scale=self._grad_scale(ps[0].device), stochastic_rounding=sr,
                                         seeds=seeds, shards=shards)
