"""A plain ``accelerate`` loop with a fused adalomo optimizer.

``accelerator.prepare(model, optimizer, scheduler)`` works as is: the ``AcceleratedOptimizer`` wrapper
forwards ``step()`` / ``zero_grad()`` (no-ops in fused mode), ``param_groups`` (so the wrapped
scheduler drives the lr the hooks read) and ``state_dict()`` (so ``accelerator.save_state`` /
``load_state`` checkpoint the optimizer), and ``accelerator.backward(loss)`` runs the updating
backward. Three things of a usual accelerate loop are silently wrong in fused mode, and :func:`backward`
replaces ``accelerator.backward`` to catch or do them::

    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for batch in loader:
        loss = model(**batch).loss
        grad_norm = adalomo.integrations.accelerate.backward(accelerator, optimizer, loss)  # updates
        scheduler.step()

* ``Accelerator(gradient_accumulation_steps>1)``: every backward would be an update -> ``ValueError``;
* ``accelerator.clip_grad_norm_`` after backward sees no gradients and returns 0 -> build the optimizer
  with ``clip_grad_norm=...``; :func:`backward` then runs the exact two-pass clipping;
* ``mixed_precision="fp16"`` (GradScaler), DeepSpeed, multi-process DDP, accelerate's FSDP ->
  ``ValueError`` (use bf16; FSDP2 with ``fully_shard`` in a plain loop).

Classic mode (``fused=False``) needs none of this: it is an ordinary optimizer under accelerate.
"""

from __future__ import annotations

from typing import Any

import torch

from ..optim import LowMemoryOptimizer

__all__ = ["backward", "check_accelerator"]


def _unwrap(optimizer: Any) -> Any:
    for _ in range(8):
        if isinstance(optimizer, LowMemoryOptimizer) or not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    return optimizer


def check_accelerator(accelerator: Any, optimizer: Any) -> None:
    """Raise ``ValueError`` if ``accelerator`` is set up in a way the (fused) optimizer cannot honour."""
    opt = _unwrap(optimizer)
    if not isinstance(opt, LowMemoryOptimizer):
        raise TypeError(f"expected an adalomo optimizer (or accelerate's wrapper of one), got {type(opt).__name__}")
    kind = str(getattr(accelerator.distributed_type, "value", accelerator.distributed_type)).upper()
    if kind == "FSDP":
        raise ValueError("adalomo optimizers cannot be prepared with accelerate's FSDP: it swaps the parameters for "
                         "sharded ones after the optimizer was built. fully_shard the model yourself and build the "
                         "optimizer from the sharded parameters (docs/integrations.md).")
    if not opt.fused:
        return
    hint = " Use fused=False (classic mode) for this setting."
    ga = int(getattr(accelerator, "gradient_accumulation_steps", 1) or 1)
    if ga > 1:
        raise ValueError(f"Accelerator(gradient_accumulation_steps={ga}) with a fused optimizer: each backward is an "
                         "update, so the micro-batches would be applied one by one. Use a larger batch instead "
                         "(fused mode keeps no gradients)." + hint)
    if getattr(accelerator, "scaler", None) is not None:
        raise ValueError("mixed_precision='fp16' uses a GradScaler, which cannot unscale gradients consumed inside "
                         "backward. Use mixed_precision='bf16', or loss_scaler=adalomo.DynamicLossScaler() with fp16 "
                         "weights and no accelerate mixed precision." + hint)
    if kind == "DEEPSPEED":
        raise ValueError("DeepSpeed owns the backward and the gradients; a fused optimizer cannot run under it." + hint)
    if int(getattr(accelerator, "num_processes", 1) or 1) > 1 or kind.startswith("MULTI_"):
        raise ValueError("fused mode with DDP: the hooks would apply each rank's local gradient before the "
                         "all-reduce, and the ranks would drift apart. Use FSDP2 (fully_shard; HSDP for pure data "
                         "parallelism), where the hooks run after the reduction." + hint)


def backward(accelerator: Any, optimizer: Any, loss: torch.Tensor) -> torch.Tensor | None:
    """``accelerator.backward(loss)`` for adalomo optimizers; returns the global gradient norm or ``None``.

    Fused mode: checks the accelerator (a few attribute reads), runs ``optimizer.grad_norm(loss)`` first when
    the optimizer has ``clip_grad_norm`` (exact clipping, one extra backward), then the updating
    backward; a step whose norm is not finite is skipped as a whole. Classic mode: plain
    ``accelerator.backward(loss)``; call ``optimizer.step()`` / ``zero_grad()`` as usual.
    """
    opt = _unwrap(optimizer)
    check_accelerator(accelerator, opt)
    if not opt.fused:
        accelerator.backward(loss)
        return None
    loss = loss / accelerator.gradient_accumulation_steps
    norm = opt.grad_norm(loss) if opt.clip_grad_norm is not None else None
    opt.fused_backward(loss)
    return norm
