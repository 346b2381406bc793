"""AdaLomo (Lv et al., 2023): LOMO's fused update with Adafactor's factored second moment, no momentum."""

from __future__ import annotations

import warnings
from typing import Any

from .checks import as_float, check_eps, check_number
from .factored import FactoredOptimizer

__all__ = ["AdaLomo", "LR_ADVICE"]

LR_ADVICE = ("AdaLomo's lr is relative to the weight RMS (step = lr * max(1e-3, RMS(weight))): use 1e-3 or 5e-4 to "
             "fine-tune a pretrained model (the authors' values) and ~1e-2 to 3e-2 from scratch, not an AdamW value "
             "such as 2e-5")
#: below this, an lr is almost surely an AdamW habit (the step would be ~lr * 0.02 for weights of RMS 0.02)
_SMALL_LR = 1e-4


class AdaLomo(FactoredOptimizer):
    """AdaLomo: p <- p * (1 - lr_t wd) - lr_t * clip(g / sqrt(v_hat)), lr_t = lr * max(eps2, RMS(p)).

    v_hat is the factored (rank-1, row x column) EMA of g^2 + eps1 with beta2_t = 1 - t^decay_rate;
    the update is divided by max(1, RMS(u) / clip_threshold). State: row and column statistics
    per matrix (a full second moment for 0-D/1-D tensors; fp32, fp64 for fp64 parameters) and a step count:
    O(rows + cols).

    ``lr`` is relative to the weight RMS: 1e-3 / 5e-4 (the authors' values) suit fine-tuning a
    pretrained model; training from scratch (weights of RMS ~0.02) wants ~1e-2 to 3e-2 (an lr below 1e-4
    warns). Matches ``lomo_optim.AdaLomo`` (0.1.1, ``loss_scale=None``) and extends it to >2-D tensors by
    factoring the last two dimensions. ``clip_grad_value`` clamps the (unscaled) gradient first.
    ``stochastic_rounding`` (default: on for bf16 parameters) rounds the result to bf16 without bias. The
    other options (``fused``, ``clip_grad_norm``, ``nonfinite``, ``loss_scaler``, ``bucket_cap_mb``, ...) are
    :class:`~adalomo.optim.base.LowMemoryOptimizer`'s.
    """

    def __init__(self, params, lr: float = 1e-3, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8, weight_decay: float = 0.0,
                 fused: bool = False, *, clip_grad_value: float | None = None,
                 stochastic_rounding: bool | None = None, **options: Any):
        defaults = dict(lr=lr, eps=eps, clip_threshold=clip_threshold, decay_rate=decay_rate,
                        weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                        stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, fused=fused, **options)

    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0.0, hint=" (AdaLomo's lr is relative to the weight RMS: "
                      "1e-3 for fine-tuning, ~1e-2 from scratch)")
        if 0 < as_float(group["lr"]) < _SMALL_LR:
            warnings.warn(f"AdaLomo with lr={as_float(group['lr']):g}: {LR_ADVICE}.", UserWarning, stacklevel=4)
        group["eps"] = check_eps(group["eps"])
        check_number("clip_threshold", group["clip_threshold"], low=0.0, low_open=True)
        check_number("decay_rate", group["decay_rate"], high=0.0, high_open=True,
                      hint=" (beta2_t = 1 - t^decay_rate; the usual value is -0.8)")
        check_number("weight_decay", group["weight_decay"], low=0.0)
        if group["clip_grad_value"] is not None:
            check_number("clip_grad_value", group["clip_grad_value"], low=0.0, low_open=True)

    def _rho(self, group: dict[str, Any], step: float) -> float:
        return as_float(group["lr"])
