"""Adafactor (Shazeer & Stern, 2018) with the keywords and conventions of transformers' Adafactor."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .. import kernels
from ..precision import DynamicLossScaler
from .base import DEFAULT_BUCKET_CAP_MB, LowMemoryOptimizer, _check_number, check_eps

__all__ = ["Adafactor"]

#: with relative_step the group's ``lr`` holds the cap of the relative step (rho_t = min(lr, 1/sqrt(t)))
RELATIVE_STEP_CAP = 1e-2


class Adafactor(LowMemoryOptimizer):
    """Adafactor: the same factored second moment and update clipping as AdaLomo, plus

    * the step size rho_t: ``relative_step=True`` gives min(1e-2, 1/sqrt(t)) (min(1e-6 t, 1/sqrt(t))
      with ``warmup_init``), else ``lr``; times max(eps2, RMS(p)) when ``scale_parameter``;
    * optional first moment ``beta1``: m = beta1 m + (1 - beta1) u on the clipped update, then
      p -= alpha_t m. (transformers keeps the EMA of the *lr-scaled* update instead: the two differ
      when the step size changes between steps.)
    * decoupled weight decay p -= wd * alpha_t * p before the update.

    As in transformers, passing ``lr`` together with ``relative_step=True`` is an error. With
    ``relative_step`` the group's ``lr`` entry holds the cap 1e-2 of rho_t, so an LR scheduler scales
    that cap (as ``torch.optim.Adafactor`` does); it has no effect with ``warmup_init``.
    """

    _sharded_many = True

    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, fused: bool = False, *, clip_grad_norm: float | None = None,
                 stochastic_rounding: bool | None = None, nonfinite: str = "warn",
                 loss_scaler: DynamicLossScaler | None = None, sr_seed: int = 0,
                 bucket_cap_mb: float | str = DEFAULT_BUCKET_CAP_MB, side_stream: bool = False,
                 flush_thread: bool = False):
        if lr is not None and relative_step:
            raise ValueError("Adafactor: cannot combine a manual lr with relative_step=True; pass "
                             "relative_step=False to use lr (and usually scale_parameter=False, warmup_init=False)")
        if warmup_init and not relative_step:
            raise ValueError("Adafactor: warmup_init=True requires relative_step=True")
        if lr is None and not relative_step:
            raise ValueError("Adafactor: relative_step=False needs an explicit lr")
        defaults = dict(lr=RELATIVE_STEP_CAP if lr is None else lr, eps=eps, clip_threshold=clip_threshold,
                        decay_rate=decay_rate, beta1=beta1, weight_decay=weight_decay,
                        scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, fused=fused, nonfinite=nonfinite, loss_scaler=loss_scaler,
                         clip_grad_norm=clip_grad_norm, sr_seed=sr_seed,
                         bucket_cap_mb=bucket_cap_mb, side_stream=side_stream, flush_thread=flush_thread)

    def _validate_group(self, group: dict[str, Any]) -> None:
        _check_number("lr", group["lr"], low=0.0)
        group["eps"] = check_eps(group["eps"])
        _check_number("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
        _check_number("decay_rate", group["decay_rate"], high=0.0, high_open=True,
                      hint=" (beta2_t = 1 - t^decay_rate; the usual value is -0.8)")
        if group["beta1"] is not None:
            _check_number("beta1", group["beta1"], low=0.0, high=1.0, high_open=True)
        _check_number("weight_decay", group["weight_decay"], low=0.0)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = {"step": torch.tensor(0.0), **F.init_factored_state(p)}
        if group["beta1"] is not None:
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return state

    def _update(self, p, grad, group, state, grad_scale, stochastic_rounding, generator):
        return F.adafactor_update_(p, grad, state, lr=group["lr"], relative_step=group["relative_step"],
                                   warmup_init=group["warmup_init"], scale_parameter=group["scale_parameter"],
                                   eps=group["eps"], clip_threshold=group["clip_threshold"],
                                   decay_rate=group["decay_rate"], beta1=group["beta1"],
                                   weight_decay=group["weight_decay"], grad_scale=grad_scale,
                                   stochastic_rounding=stochastic_rounding, generator=generator)

    def _update_many(self, ps, grads, group, shards=None):
        states, seeds, steps, sr = self._begin_many(ps, group)
        rhos = [F.relative_step_size(t, group["warmup_init"], group["lr"]) if group["relative_step"] else group["lr"]
                for t in steps]
        return kernels.scaled_rms_update_many_(
            ps, grads, states, rhos=rhos, beta2s=[F.beta2_at(t, group["decay_rate"]) for t in steps],
            eps=group["eps"], clip_threshold=group["clip_threshold"], weight_decay=group["weight_decay"],
            scale_parameter=group["scale_parameter"], beta1=group["beta1"], grad_scale=self._grad_scale(ps[0].device),
            stochastic_rounding=sr, seeds=seeds, shards=shards)
