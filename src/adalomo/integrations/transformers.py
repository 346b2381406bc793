"""Train ``transformers`` models with AdaLomo / Lomo / Adafactor through ``Trainer``, fused by default.

Two ways, both tested with transformers 5.23 (see ``docs/integrations.md``):

``AdaLomoTrainer`` (recommended)
    A ``Trainer`` subclass: builds the optimizer from ``TrainingArguments`` (learning rate and its
    schedule, weight decay with the Trainer's no-decay groups for biases and norms), runs the fused
    backward (optionally with exact two-pass global-norm clipping), logs loss / lr / grad_norm, and saves
    and restores the optimizer state with the checkpoints::

        trainer = AdaLomoTrainer(model=model, args=TrainingArguments(..., learning_rate=1e-3, max_grad_norm=0),
                                 train_dataset=ds)

``create_optimizer(model, args)`` with a stock ``Trainer``
    ``Trainer(model, args, optimizers=(create_optimizer(model, args), None))``: no clipping (the factory
    refuses ``max_grad_norm > 0`` in fused mode) and the logged ``grad_norm`` is meaningless (0.0).

Fused mode updates each parameter inside ``loss.backward()``. What the Trainer does after backward on
the gradients cannot work then, so these settings raise a ``ValueError`` instead of training silently
wrong: ``gradient_accumulation_steps > 1``, ``max_grad_norm > 0`` without two-pass clipping, ``fp16``
(GradScaler), DeepSpeed, DDP / DataParallel. FSDP through the Trainer is refused in both modes
(accelerate swaps the parameters behind the optimizer's back); use a plain FSDP2 loop. ``fused=False``
(classic mode) is an ordinary ``torch.optim.Optimizer`` and works with gradient accumulation, the
Trainer's own clipping, fp16 and DDP.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..optim import Adafactor, AdaLomo, Lomo, LowMemoryOptimizer

try:
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("adalomo.integrations.transformers needs transformers and accelerate: "
                      "pip install 'adalomo[hf]'") from e

__all__ = ["OPTIMIZERS", "AdaLomoTrainer", "check_training_args", "create_optimizer", "parameter_groups",
           "unwrap_optimizer"]

#: names accepted by :func:`create_optimizer` and ``AdaLomoTrainer(adalomo_optimizer=...)``
OPTIMIZERS: dict[str, type[LowMemoryOptimizer]] = {"adalomo": AdaLomo, "lomo": Lomo, "adafactor": Adafactor}

_FSDP_MESSAGE = (
    "adalomo optimizers cannot be used with the Trainer's FSDP: accelerate replaces the model's parameters by "
    "sharded ones after the optimizer was built, so its state and fused hooks would belong to the old tensors. "
    "Train with FSDP2 in a plain loop (fully_shard the model first, then build the optimizer from the sharded "
    "model); see docs/integrations.md.")


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (or any ``.optimizer`` wrapper)."""
    seen = 0
    while not isinstance(optimizer, LowMemoryOptimizer) and hasattr(optimizer, "optimizer") and seen < 8:
        optimizer, seen = optimizer.optimizer, seen + 1
    return optimizer


def _decay_parameter_names(model: nn.Module) -> set[str]:
    # The Trainer's own rule (no decay on biases and LayerNorm/RMSNorm weights); the method does not use self.
    return set(Trainer.get_decay_parameter_names(None, model))


def parameter_groups(model: nn.Module, weight_decay: float,
                     decay_parameters: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """The Trainer's two parameter groups: ``weight_decay`` for weights, 0 for biases and norms.

    Only trainable parameters; an empty group is left out. Tied weights appear once.
    """
    decay = _decay_parameter_names(model) if decay_parameters is None else set(decay_parameters)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": float(weight_decay)},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(model: nn.Module, args: Any = None, name: str = "adalomo", *, fused: bool = True,
                     lr: float | None = None, weight_decay: float | None = None,
                     decay_parameters: Iterable[str] | None = None, **kwargs: Any) -> LowMemoryOptimizer:
    """Build ``AdaLomo`` / ``Lomo`` / ``Adafactor`` for a ``transformers`` model from ``TrainingArguments``.

    ``lr`` and ``weight_decay`` default to ``args.learning_rate`` / ``args.weight_decay``; parameters are
    grouped as the Trainer does (no decay on biases and norms). ``name="adafactor"`` follows the
    Trainer's ``optim="adafactor"`` (``relative_step=False, scale_parameter=False`` and an explicit lr)
    unless ``relative_step=True`` is passed. Other keyword arguments go to the optimizer
    (``clip_grad_norm``, ``clip_threshold``, ``nonfinite``, ...). With ``args`` given, the settings that
    would be silently wrong in fused mode raise a ``ValueError`` (see :func:`check_training_args`).
    Create it after the model is on its device.
    """
    key = str(getattr(name, "value", name)).lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(OPTIMIZERS)}")
    cls = OPTIMIZERS[key]
    if lr is None and args is not None:
        lr = float(args.learning_rate)
    if weight_decay is None:
        weight_decay = float(getattr(args, "weight_decay", 0.0) or 0.0)
    kw = dict(kwargs)
    if cls is Adafactor:
        if kw.get("relative_step", False):
            lr = None  # the relative step size replaces lr (its cap 1e-2 is what a scheduler then scales)
        else:
            kw.setdefault("relative_step", False)
            kw.setdefault("scale_parameter", False)
            kw.setdefault("warmup_init", False)
    if lr is not None:
        kw["lr"] = lr
    groups = parameter_groups(model, weight_decay, decay_parameters)
    if not groups:
        raise ValueError(f"{cls.__name__}: the model has no trainable parameters")
    optimizer = cls(groups, fused=fused, **kw)
    if args is not None:
        try:
            check_training_args(args, optimizer)
        except Exception:
            if optimizer.fused:
                optimizer.remove_hooks()  # leave the model usable for another optimizer
            raise
    return optimizer


def check_training_args(args: Any, optimizer: Any = None, *, fused: bool | None = None,
                        clip_grad_norm: float | None = None) -> None:
    """Raise ``ValueError`` for ``TrainingArguments`` that the (fused) optimizer cannot honour.

    Pass the optimizer, or describe the planned one with ``fused`` / ``clip_grad_norm``.
    """
    if optimizer is not None:
        optimizer = unwrap_optimizer(optimizer)
        if not isinstance(optimizer, LowMemoryOptimizer):
            return
        fused, clip_grad_norm = optimizer.fused, optimizer.clip_grad_norm
    fused = True if fused is None else bool(fused)
    max_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)
    if getattr(args, "fsdp", None):
        raise ValueError(_FSDP_MESSAGE)
    if not fused:
        if clip_grad_norm is not None and max_norm > 0:
            raise ValueError(f"gradients would be clipped twice: by the Trainer (max_grad_norm={max_norm:g}) and by "
                             f"the optimizer (clip_grad_norm={clip_grad_norm:g}); in classic mode (fused=False) keep "
                             "max_grad_norm and drop clip_grad_norm")
        return
    hint = " Use fused=False (classic mode) for this setting."
    ga = int(getattr(args, "gradient_accumulation_steps", 1) or 1)
    if ga > 1:
        raise ValueError(
            f"gradient_accumulation_steps={ga} with a fused optimizer: every backward is an optimizer step, so the "
            f"{ga} micro-batches would be applied as {ga} separate updates. Use gradient_accumulation_steps=1 with a "
            "larger per_device_train_batch_size (fused mode keeps no gradients, which frees the memory for it), or "
            "fused=False (classic mode accumulates gradients normally).")
    if max_norm > 0 and clip_grad_norm is None:
        raise ValueError(
            f"max_grad_norm={max_norm:g} (the TrainingArguments default is 1.0) cannot be applied in fused mode: "
            "the gradients are consumed inside backward, before the Trainer could clip them. Either set "
            "max_grad_norm=0 (AdaLomo and Adafactor still clip every update to RMS <= clip_threshold), or clip "
            f"exactly with a second backward pass per step: AdaLomoTrainer(..., adalomo_kwargs={{'clip_grad_norm': "
            f"{max_norm:g}}}) (slower; the stock Trainer cannot run it), or use fused=False.")
    if max_norm > 0 and clip_grad_norm is not None and abs(max_norm - clip_grad_norm) > 1e-12 * max_norm:
        raise ValueError(f"max_grad_norm={max_norm:g} and clip_grad_norm={clip_grad_norm:g} disagree; in fused mode "
                         "the optimizer clips (two-pass): set max_grad_norm=0 or to the same value")
    if getattr(args, "fp16", False):
        raise ValueError("fp16=True uses torch's GradScaler, which cannot unscale gradients that are consumed inside "
                         "backward. Use bf16=True (no loss scaling needed), or fused=False, or a plain loop with "
                         "loss_scaler=adalomo.DynamicLossScaler().")
    if getattr(args, "deepspeed", None):
        raise ValueError("DeepSpeed owns the backward and the gradients; a fused optimizer cannot run under it." + hint)
    world = int(getattr(args, "world_size", 1) or 1)
    if world > 1:
        raise ValueError(
            f"fused mode with {world} processes: DDP all-reduces gradients after the fused hooks already applied the "
            "local (unreduced) gradient, so the ranks would drift apart. Use FSDP2 (fully_shard, or HSDP for pure "
            "data parallelism) in a plain loop, where the hooks run after the reduction (docs/integrations.md)."
            + hint)
    if int(getattr(args, "n_gpu", 0) or 0) > 1:
        raise ValueError("fused mode under torch.nn.DataParallel (several GPUs in one process) is not supported; run "
                         "one process per GPU with FSDP2, or set CUDA_VISIBLE_DEVICES to one GPU." + hint)


def _non_reentrant_checkpointing(args: Any) -> None:
    """Make activation checkpointing non-reentrant unless the user chose otherwise.

    transformers 5 defaults to ``use_reentrant=False`` only when no checkpointing kwargs are given (and
    torch's own default is reentrant); reentrant checkpointing can fire a fused hook twice in one
    backward (detected and raised, but better avoided).
    """
    for flag, field in (("activation_checkpointing", "activation_checkpointing_kwargs"),
                        ("gradient_checkpointing", "gradient_checkpointing_kwargs")):
        if getattr(args, flag, False) and hasattr(args, field):
            ckpt_kwargs = dict(getattr(args, field) or {})
            if "use_reentrant" not in ckpt_kwargs:
                ckpt_kwargs["use_reentrant"] = False
                setattr(args, field, ckpt_kwargs)


class AdaLomoTrainer(Trainer):
    """``transformers.Trainer`` that trains with an adalomo optimizer (fused by default).

    Args (besides the Trainer's):
        adalomo_optimizer: ``"adalomo"`` (default), ``"adafactor"`` or ``"lomo"``; if left ``None`` and
            ``args.optim`` is one of these names (e.g. ``optim="adalomo"``), that one.
        adalomo_kwargs: passed to :func:`create_optimizer`, e.g. ``{"fused": False}``,
            ``{"clip_grad_norm": 1.0}`` (exact global-norm clipping in fused mode with a second backward
            pass per step; then ``max_grad_norm`` must be 0 or the same value),
            ``{"clip_threshold": 1.0}``, ``{"nonfinite": "raise"}``.

    ``args.learning_rate`` is the optimizer's lr (relative to the weight RMS for AdaLomo: 1e-3 / 5e-4
    for fine-tuning) and follows the Trainer's schedule; ``args.weight_decay`` applies to all but
    biases and norms. A custom optimizer can still be passed with ``optimizers=(opt, None)``.
    """

    def __init__(self, *args: Any, adalomo_optimizer: str | None = None,
                 adalomo_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if adalomo_optimizer is None:
            adalomo_optimizer = optim if optim in OPTIMIZERS else "adalomo"
        if str(adalomo_optimizer).lower() not in OPTIMIZERS:
            raise ValueError(f"adalomo_optimizer must be one of {sorted(OPTIMIZERS)}, got {adalomo_optimizer!r}")
        self.adalomo_optimizer = str(adalomo_optimizer).lower()
        self.adalomo_kwargs = dict(adalomo_kwargs or {})
        self._adalomo_grad_norm: torch.Tensor | None = None
        self._check_adalomo_setup()
        if self._planned_fused():
            _non_reentrant_checkpointing(self.args)

    # ------------------------------------------------------------------ setup
    def _lowmem(self) -> LowMemoryOptimizer | None:
        opt = unwrap_optimizer(self.optimizer)
        return opt if isinstance(opt, LowMemoryOptimizer) else None

    def _planned_fused(self) -> bool:
        opt = self._lowmem()
        if opt is not None:
            return opt.fused
        return self.optimizer is None and bool(self.adalomo_kwargs.get("fused", True))

    def _check_adalomo_setup(self) -> None:
        if self.optimizer is not None:
            check_training_args(self.args, self.optimizer)
        else:
            check_training_args(self.args, fused=self.adalomo_kwargs.get("fused", True),
                                clip_grad_norm=self.adalomo_kwargs.get("clip_grad_norm"))
        if self._planned_fused() and getattr(self, "is_deepspeed_enabled", False):
            raise ValueError("DeepSpeed owns the backward and the gradients; a fused adalomo optimizer cannot run "
                             "under it. Use fused=False, or FSDP2 in a plain loop.")
        if getattr(self, "is_fsdp_enabled", False):
            raise ValueError(_FSDP_MESSAGE)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            self.optimizer = create_optimizer(opt_model, self.args, self.adalomo_optimizer,
                                              decay_parameters=self.get_decay_parameter_names(opt_model),
                                              **self.adalomo_kwargs)
        return self.optimizer

    def train(self, *args: Any, **kwargs: Any):
        self._check_adalomo_setup()  # args may have changed since __init__
        return super().train(*args, **kwargs)

    # --------------------------------------------------------------- one step
    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        opt = self._lowmem()
        accelerator = self.accelerator
        original = accelerator.backward
        self._adalomo_grad_norm = None

        def backward(loss: torch.Tensor, **kwargs: Any) -> None:
            kwargs.pop("learning_rate", None)  # passed by the Trainer when args.optim is "lomo"/"adalomo"
            if opt is None or not opt.fused:
                return original(loss, **kwargs)
            if accelerator.scaler is not None:
                raise ValueError("fused adalomo optimizers cannot run with a GradScaler (fp16): use bf16 "
                                 "or fused=False")
            loss = loss / accelerator.gradient_accumulation_steps
            if opt.clip_grad_norm is not None:
                self._adalomo_grad_norm = opt.grad_norm(loss)  # first pass: global norm, no update
            opt.fused_backward(loss)  # the updating backward (skipped exactly if the norm is not finite)

        had_own = "backward" in vars(accelerator)
        accelerator.backward = backward
        try:
            return super().training_step(model, inputs, num_items_in_batch)
        finally:
            if had_own:
                accelerator.backward = original
            else:
                del accelerator.backward

    def _clip_grad_norm(self, model: nn.Module):
        opt = self._lowmem()
        if opt is not None and opt.fused:
            return self._adalomo_grad_norm  # the optimizer already clipped with the two-pass norm
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None):
        opt = self._lowmem()
        if opt is not None and opt.fused:
            # no gradients exist after a fused backward: report the two-pass norm, or nothing (not 0.0)
            return grad_norm if grad_norm is not None else self._adalomo_grad_norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)
