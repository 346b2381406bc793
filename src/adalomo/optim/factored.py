"""The shared part of AdaLomo and Adafactor: a factored second moment, update clipping and a relative step.

Both update a tensor with ``scaled_rms_update_`` (torch: :mod:`adalomo.functional`; FSDP2 shards:
:mod:`adalomo.distributed.functional`; many tensors at once: ``adalomo.kernels.scaled_rms_update_many_``); they
differ only in the step size rho_t (``_rho``) and in which extras they allow (Adafactor's first moment and
``scale_parameter``, AdaLomo's ``clip_grad_value``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .. import kernels
from ..distributed import functional as DF
from .base import LowMemoryOptimizer

__all__ = ["FactoredOptimizer"]


class FactoredOptimizer(LowMemoryOptimizer):
    """Base of :class:`~adalomo.AdaLomo` and :class:`~adalomo.Adafactor`: ``functional.scaled_rms_update_``."""

    _has_many = True
    _sharded_many = True

    def _rho(self, group: dict[str, Any], step: float) -> float:  # pragma: no cover - abstract
        """The step size rho_t (before the relative scale max(eps2, RMS(p)))."""
        raise NotImplementedError

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        state = {"step": torch.tensor(0.0), **F.init_factored_state(p)}
        if group.get("beta1") is not None:
            state["exp_avg"] = torch.zeros(p.shape, dtype=F.compute_dtype(p), device=p.device)
        return state

    def _core(self, group: dict[str, Any], step: float) -> dict[str, Any]:
        """The keyword arguments of ``scaled_rms_update_`` for this group at step ``step``."""
        return dict(rho=self._rho(group, step), eps=group["eps"], clip_threshold=group["clip_threshold"],
                    beta2=F.beta2_at(step, group["decay_rate"]), weight_decay=group["weight_decay"],
                    scale_parameter=group.get("scale_parameter", True), beta1=group.get("beta1"))

    def _prepare(self, grad: Tensor, group: dict[str, Any], grad_scale: Tensor | None) -> tuple[Tensor, Any]:
        """The gradient and grad scale the maths sees (AdaLomo's ``clip_grad_value`` clamps the scaled gradient)."""
        value = group.get("clip_grad_value")
        if value is None:
            return grad, grad_scale
        g = F.upcast(grad, grad_scale)
        return g.clamp_(-value, value), None

    def _update(self, p, grad, group, state, grad_scale, stochastic_rounding, generator):
        state["step"] += 1
        grad, grad_scale = self._prepare(grad, group, grad_scale)
        return F.scaled_rms_update_(p, grad, state, **self._core(group, float(state["step"])), grad_scale=grad_scale,
                                    stochastic_rounding=stochastic_rounding, generator=generator)

    def _update_sharded(self, p, grad, group, state, grad_scale, stochastic_rounding, generator, shard):
        state["step"] += 1
        grad, grad_scale = self._prepare(grad, group, grad_scale)
        return DF.scaled_rms_update_(p, grad, state, **self._core(group, float(state["step"])), grad_scale=grad_scale,
                                     stochastic_rounding=stochastic_rounding, generator=generator, shard=shard)

    def _grouped_supported(self, group: dict[str, Any]) -> bool:
        return group.get("clip_grad_value") is None

    def _update_many(self, ps, grads, group, *, states, steps, seeds, sr, grad_scale, shards):
        decay = group["decay_rate"]
        return kernels.scaled_rms_update_many_(
            ps, grads, states, rhos=[self._rho(group, t) for t in steps], beta2s=[F.beta2_at(t, decay) for t in steps],
            eps=group["eps"], clip_threshold=group["clip_threshold"], weight_decay=group["weight_decay"],
            scale_parameter=group.get("scale_parameter", True), beta1=group.get("beta1"), grad_scale=grad_scale,
            stochastic_rounding=sr, seeds=seeds, shards=shards)
