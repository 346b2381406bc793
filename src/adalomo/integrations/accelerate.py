"""A plain ``accelerate`` loop with a fused adalomo optimizer.

``accelerator.prepare(model, optimizer, scheduler)`` works as is on one process: the ``AcceleratedOptimizer``
wrapper forwards ``step()`` / ``zero_grad()``, ``param_groups`` (so the wrapped scheduler drives the lr the hooks
read) and ``state_dict()`` (so ``accelerator.save_state`` / ``load_state`` checkpoint the optimizer), and
:func:`backward` replaces ``accelerator.backward(loss)``::

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for batch in loader:
        with accelerator.accumulate(model):  # only with Accelerator(gradient_accumulation_steps=K)
            loss = model(**batch).loss
            grad_norm = adalomo.integrations.accelerate.backward(accelerator, optimizer, loss)
            optimizer.step()  # ends the accumulation window (accelerate calls it on the window's last step)
            scheduler.step()
            optimizer.zero_grad()

* gradient accumulation (``Accelerator(gradient_accumulation_steps=K)`` with ``accelerator.accumulate``):
  :func:`backward` lets the gradients of a window's micro-batches sum in ``p.grad`` and updates in the backward
  that ``accelerator.sync_gradients`` marks as the last (exactly classic mode's result);
* ``accelerator.clip_grad_norm_`` after a fused backward sees no gradients -> build the optimizer with
  ``clip_grad_norm=...``; :func:`backward` then runs the exact two-pass clipping (with accumulation,
  ``optimizer.step()`` clips the summed gradient);
* several processes: accelerate's FSDP2 (``FullyShardedDataParallelPlugin(fsdp_version=2)``), whose hooks run
  after the reduce-scatter, with the optimizer built from the sharded model: ``model = shard_model(accelerator,
  model)`` (accelerate's own FSDP2 sharding, done before the optimizer exists), then the optimizer, then
  ``accelerator.prepare(model, optimizer, ...)``;
* ``mixed_precision="fp16"`` (GradScaler), DeepSpeed, DDP, FSDP1 -> ``ValueError``.

Classic mode (``fused=False``) needs none of this: it is an ordinary optimizer under accelerate.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import is_dtensor
from ..optim import LowMemoryOptimizer

__all__ = ["backward", "check_accelerator", "shard_model"]


def _unwrap(optimizer: Any) -> Any:
    for _ in range(8):
        if isinstance(optimizer, LowMemoryOptimizer) or not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    return optimizer


_FSDP2_RECIPE = ("model = adalomo.integrations.accelerate.shard_model(accelerator, model); optimizer = "
                 "AdaLomo(model.parameters(), fused=True); model, optimizer, ... = accelerator.prepare(model, "
                 "optimizer, ...)")


def shard_model(accelerator: Any, model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` with accelerate's own FSDP2 code (its activation checkpointing, wrap policy, mixed precision
    and offload settings) before the optimizer is built from it.

    ``accelerator.prepare(model, optimizer)`` shards the model and then swaps the optimizer's parameters for the
    sharded ones behind its back, which an optimizer with per-parameter state and hooks cannot follow; a model
    sharded here is found sharded by ``prepare``, which keeps it and the optimizer's parameters as they are. Without
    FSDP2 (one process, DDP) the model is returned unchanged."""
    from torch.distributed.fsdp import FSDPModule

    if not getattr(accelerator, "is_fsdp2", False) or isinstance(model, FSDPModule):
        return model
    from accelerate.utils import fsdp2_apply_ac, fsdp2_prepare_model

    if accelerator.state.fsdp_plugin.activation_checkpointing:
        model = fsdp2_apply_ac(accelerator, model)
    return fsdp2_prepare_model(accelerator, model)


def check_accelerator(accelerator: Any, optimizer: Any) -> None:
    """Raise ``ValueError`` if ``accelerator`` is set up in a way the (fused) optimizer cannot honour."""
    opt = _unwrap(optimizer)
    if not isinstance(opt, LowMemoryOptimizer):
        raise TypeError(f"expected an adalomo optimizer (or accelerate's wrapper of one), got {type(opt).__name__}")
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if kind == "FSDP":
        if not getattr(accelerator, "is_fsdp2", False):
            raise ValueError("adalomo optimizers need accelerate's FSDP2 (FullyShardedDataParallelPlugin("
                             "fsdp_version=2)): FSDP1 flattens the parameters, so a matrix's factored statistics "
                             "would be computed on flat 1-D shards")
        if not any(is_dtensor(p) for g in opt.param_groups for p in g["params"]):
            raise ValueError("under accelerate's FSDP2 build the optimizer from the prepared (sharded) model: "
                             f"{_FSDP2_RECIPE}")
    if not opt.fused:
        return
    hint = " Use fused=False (classic mode) for this setting."
    if getattr(accelerator, "scaler", None) is not None:
        raise ValueError("mixed_precision='fp16' uses a GradScaler, which cannot unscale gradients consumed inside "
                         "backward. Use mixed_precision='bf16', or loss_scaler=adalomo.DynamicLossScaler() with fp16 "
                         "weights and no accelerate mixed precision." + hint)
    if kind == "DEEPSPEED":
        raise ValueError("DeepSpeed owns the backward and the gradients; a fused optimizer cannot run under it. Use "
                         f"accelerate's FSDP2 instead: {_FSDP2_RECIPE}." + hint)
    if kind != "FSDP" and (int(getattr(accelerator, "num_processes", 1) or 1) > 1 or kind.startswith("MULTI_")):
        raise ValueError("fused mode with DDP: the hooks would apply each rank's local gradient before the "
                         "all-reduce, and the ranks would drift apart. Use accelerate's FSDP2 "
                         f"(FullyShardedDataParallelPlugin(fsdp_version=2)) and {_FSDP2_RECIPE}, where the hooks "
                         "run after the reduction." + hint)


def backward(accelerator: Any, optimizer: Any, loss: torch.Tensor) -> torch.Tensor | None:
    """``accelerator.backward(loss)`` for adalomo optimizers; returns the global gradient norm or ``None``.

    Fused mode: checks the accelerator (a few attribute reads); inside an accumulation window
    (``accelerator.sync_gradients`` False) the gradients are summed in ``p.grad``; the window's last backward
    updates, after ``optimizer.grad_norm(loss)`` when the optimizer has ``clip_grad_norm`` and the window is one
    micro-batch (a longer window is clipped and applied by ``optimizer.step()``); a step whose norm is not finite is
    skipped as a whole. Classic mode: plain ``accelerator.backward(loss)``; call ``optimizer.step()`` /
    ``zero_grad()`` as usual.
    """
    opt = _unwrap(optimizer)
    check_accelerator(accelerator, opt)
    if not opt.fused:
        accelerator.backward(loss)
        return None
    loss = loss / accelerator.gradient_accumulation_steps
    return opt._micro_batch_backward(loss, last=accelerator.sync_gradients)
