"""Adafactor (Shazeer & Stern, 2018) with the keywords and conventions of transformers' Adafactor."""

from __future__ import annotations

from typing import Any

from .. import functional as F
from .checks import as_float, check_eps, check_number
from .factored import FactoredOptimizer

__all__ = ["Adafactor"]

#: with relative_step the group's ``lr`` holds the cap of the relative step (rho_t = min(lr, 1/sqrt(t)))
RELATIVE_STEP_CAP = 1e-2


class Adafactor(FactoredOptimizer):
    """Adafactor: the same factored second moment and update clipping as AdaLomo, plus

    * the step size rho_t: ``relative_step=True`` gives min(1e-2, 1/sqrt(t)) (min(1e-6 t, 1/sqrt(t))
      with ``warmup_init``), else ``lr``; times max(eps2, RMS(p)) when ``scale_parameter``;
    * optional first moment ``beta1``: m = beta1 m + (1 - beta1) u on the clipped update, then
      p -= alpha_t m. (transformers keeps the EMA of the *lr-scaled* update instead: the two differ
      when the step size changes between steps.)
    * decoupled weight decay p -= wd * alpha_t * p before the update.

    As in transformers, passing ``lr`` together with ``relative_step=True`` is an error. With
    ``relative_step`` the group's ``lr`` entry holds the cap 1e-2 of rho_t, so an LR scheduler scales
    that cap (as ``torch.optim.Adafactor`` does); it has no effect with ``warmup_init``. The other options
    are :class:`~adalomo.optim.base.LowMemoryOptimizer`'s.
    """

    def __init__(self, params, lr: float | None = None, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, beta1: float | None = None,
                 weight_decay: float = 0.0, scale_parameter: bool = True, relative_step: bool = True,
                 warmup_init: bool = False, fused: bool = False, *, stochastic_rounding: bool | None = None,
                 **options: Any):
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
        super().__init__(params, defaults, fused=fused, **options)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0.0)
        group["eps"] = check_eps(group["eps"])
        check_number("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
        check_number("decay_rate", group["decay_rate"], high=0.0, high_open=True,
                      hint=" (beta2_t = 1 - t^decay_rate; the usual value is -0.8)")
        if group["beta1"] is not None:
            check_number("beta1", group["beta1"], low=0.0, high=1.0, high_open=True)
        check_number("weight_decay", group["weight_decay"], low=0.0)

    def _rho(self, group: dict[str, Any], step: float) -> float:
        lr = as_float(group["lr"])
        return F.relative_step_size(step, group["warmup_init"], lr) if group["relative_step"] else lr
