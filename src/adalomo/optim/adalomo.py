"""AdaLomo (Lv et al., 2023): LOMO's fused update with Adafactor's factored second moment, no momentum."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .. import kernels
from ..precision import DynamicLossScaler
from .base import DEFAULT_BUCKET_CAP_MB, LowMemoryOptimizer, _check_number, check_eps

__all__ = ["AdaLomo"]


class AdaLomo(LowMemoryOptimizer):
    """AdaLomo: p <- p * (1 - lr_t wd) - lr_t * clip(g / sqrt(v_hat)), lr_t = lr * max(eps2, RMS(p)).

    v_hat is the factored (rank-1, row x column) EMA of g^2 + eps1 with beta2_t = 1 - t^decay_rate;
    the update is divided by max(1, RMS(u) / clip_threshold). State: fp32 row and column statistics
    per matrix (a full fp32 second moment for 0-D/1-D tensors) and a step count: O(rows + cols).

    ``lr`` is relative to the weight RMS: 1e-3 / 5e-4 (the authors' values) suit fine-tuning a
    pretrained model; training from scratch (weights of RMS ~0.02) wants ~1e-2 to 3e-2.
    Matches ``lomo_optim.AdaLomo`` (0.1.1, ``loss_scale=None``) and extends it to >2-D tensors by
    factoring the last two dimensions. See :class:`LowMemoryOptimizer` for ``fused``,
    ``nonfinite``, ``loss_scaler``, ``clip_grad_norm``; ``stochastic_rounding`` (default: on for
    bf16 parameters) rounds the fp32 result to bf16 without bias.
    """

    _sharded_many = True

    def __init__(self, params, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0,
                 fused: bool = False, *, clip_grad_norm: float | None = None,
                 clip_grad_value: float | None = None, stochastic_rounding: bool | None = None,
                 nonfinite: str = "warn", loss_scaler: DynamicLossScaler | None = None, sr_seed: int = 0,
                 bucket_cap_mb: float | str = DEFAULT_BUCKET_CAP_MB, side_stream: bool = False,
                 flush_thread: bool = False):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, fused=fused, nonfinite=nonfinite, loss_scaler=loss_scaler,
                         clip_grad_norm=clip_grad_norm, sr_seed=sr_seed,
                         bucket_cap_mb=bucket_cap_mb, side_stream=side_stream, flush_thread=flush_thread)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check_number("lr", group["lr"], low=0.0, hint=" (AdaLomo's lr is relative to the weight RMS: "
                      "1e-3 for fine-tuning, ~1e-2 from scratch)")
        group["eps"] = check_eps(group["eps"])
        _check_number("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
        _check_number("decay_rate", group["decay_rate"], high=0.0, high_open=True,
                      hint=" (beta2_t = 1 - t^decay_rate; the usual value is -0.8)")
        _check_number("weight_decay", group["weight_decay"], low=0.0)
        if group["clip_grad_value"] is not None:
            _check_number("clip_grad_value", group["clip_grad_value"], low=0.0, low_open=True)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {"step": torch.tensor(0.0), **F.init_factored_state(p)}

    def _update(self, p, grad, group, state, grad_scale, stochastic_rounding, generator):
        if group["clip_grad_value"] is not None:
            grad = _clamped(grad, group["clip_grad_value"], grad_scale)
            grad_scale = None
        return F.adalomo_update_(p, grad, state, lr=group["lr"], eps=group["eps"],
                                 clip_threshold=group["clip_threshold"], decay_rate=group["decay_rate"],
                                 weight_decay=group["weight_decay"], grad_scale=grad_scale,
                                 stochastic_rounding=stochastic_rounding, generator=generator)


    def _update_many(self, ps, grads, group, shards=None):
        if group["clip_grad_value"] is not None:
            return None
        states, seeds, steps, sr = self._begin_many(ps, group)
        return kernels.scaled_rms_update_many_(
            ps, grads, states, rhos=[group["lr"]] * len(ps), beta2s=[F.beta2_at(t, group["decay_rate"]) for t in steps],
            eps=group["eps"], clip_threshold=group["clip_threshold"], weight_decay=group["weight_decay"],
            scale_parameter=True, beta1=None, grad_scale=self._grad_scale(ps[0].device), stochastic_rounding=sr,
            seeds=seeds, shards=shards)


def _clamped(grad: Tensor, value: float, grad_scale: Tensor | None) -> Tensor:
    g = grad.float() if grad_scale is None else grad.float() * grad_scale
    return g.clamp_(-value, value)
