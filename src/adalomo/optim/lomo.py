"""LOMO (Lv et al., 2023): SGD fused into the backward pass; no optimizer state."""

from __future__ import annotations

from typing import Any

from .. import functional as F
from .. import kernels
from ..distributed import functional as DF
from .base import LowMemoryOptimizer
from .checks import as_float, check_number

__all__ = ["Lomo"]


class Lomo(LowMemoryOptimizer):
    """LOMO: p <- p * (1 - lr * wd) - lr * clamp(g, -clip_grad_value, clip_grad_value).

    No maths state: only a step counter per tensor, which seeds bf16 stochastic rounding. Global
    gradient-norm clipping (``clip_grad_norm``) needs two passes in fused mode: ``opt.grad_norm(loss)``
    then ``opt.fused_backward(loss)`` (or ``loss.backward()``), exactly like ``lomo_optim.Lomo``. The other
    options are :class:`~adalomo.optim.base.LowMemoryOptimizer`'s.
    """

    _has_many = True
    _sharded_many = True

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.0, clip_grad_value: float | None = None,
                 fused: bool = False, *, stochastic_rounding: bool | None = None, **options: Any):
        defaults = dict(lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, fused=fused, **options)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        if group["clip_grad_value"] is not None:
            check_number("clip_grad_value", group["clip_grad_value"], low=0.0, low_open=True,
                          hint=" (use None to disable)")

    def _hyper(self, group: dict[str, Any]) -> dict[str, Any]:
        return dict(lr=as_float(group["lr"]), weight_decay=group["weight_decay"],
                    clip_grad_value=group["clip_grad_value"])

    def _update(self, p, grad, group, state, grad_scale, stochastic_rounding, generator):
        state["step"] += 1
        return F.lomo_update_(p, grad, **self._hyper(group), grad_scale=grad_scale,
                              stochastic_rounding=stochastic_rounding, generator=generator)

    def _update_sharded(self, p, grad, group, state, grad_scale, stochastic_rounding, generator, shard):
        state["step"] += 1
        return DF.lomo_update_(p, grad, **self._hyper(group), grad_scale=grad_scale,
                               stochastic_rounding=stochastic_rounding, generator=generator, shard=shard)

    def _update_many(self, ps, grads, group, *, states, steps, seeds, sr, grad_scale, shards):
        return kernels.lomo_update_many_(ps, grads, **self._hyper(group), grad_scale=grad_scale,
                                         stochastic_rounding=sr, seeds=seeds, shards=shards)
