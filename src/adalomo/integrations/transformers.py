"""Train ``transformers`` models with AdaLomo / Lomo / Adafactor / AdaPM through ``Trainer``, fused by default.

Two ways, both tested with transformers 5.25 (see ``docs/integrations.md``):

``AdaLomoTrainer`` (recommended)
    A ``Trainer`` subclass: builds the optimizer from ``TrainingArguments`` (learning rate and its
    schedule, weight decay with the Trainer's no-decay groups for biases and norms), runs the fused
    backward (optionally with exact two-pass global-norm clipping), accumulates gradients exactly
    (``gradient_accumulation_steps``), logs loss / lr / grad_norm, and saves and restores the optimizer
    state with the checkpoints. Under ``torchrun`` it keeps fused mode on several processes: with the
    Trainer's FSDP (``fsdp_config={"version": 2}``) it builds the optimizer on the sharded model; without
    FSDP (data parallelism) it runs FSDP2 as HSDP with full replicas, whose hooks see reduced gradients::

        trainer = AdaLomoTrainer(model=model, args=TrainingArguments(..., learning_rate=1e-3, max_grad_norm=0),
                                 train_dataset=ds)

``create_optimizer(model, args)`` with a stock ``Trainer``
    ``Trainer(model, args, optimizers=(create_optimizer(model, args), None))``, one process: no clipping (the
    factory refuses ``max_grad_norm > 0`` in fused mode), no accumulation, and the logged ``grad_norm`` is
    meaningless (0.0).

What cannot work raises a ``ValueError`` that says what to do instead: ``max_grad_norm > 0`` in fused mode
without two-pass clipping, ``fp16`` (GradScaler) in fused mode, DeepSpeed in fused mode (use FSDP2), FSDP1,
``DataParallel``. ``fused=False`` (classic mode) is an ordinary ``torch.optim.Optimizer``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..distributed import is_dtensor
from ..optim import Adafactor, AdaLomo, AdaPM, Lomo, LowMemoryOptimizer
from .accelerate import shard_model

try:
    from accelerate.utils import DistributedType
    from transformers import Trainer
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("adalomo.integrations.transformers needs transformers and accelerate: "
                      "pip install 'adalomo[hf]'") from e

__all__ = ["OPTIMIZERS", "AdaLomoTrainer", "AdaLomoTrainerMixin", "check_training_args", "create_optimizer",
           "parameter_groups", "shard_hsdp", "unwrap_optimizer"]

#: names accepted by :func:`create_optimizer` and ``AdaLomoTrainer(adalomo_optimizer=...)``
OPTIMIZERS: dict[str, type[LowMemoryOptimizer]] = {"adalomo": AdaLomo, "lomo": Lomo, "adafactor": Adafactor,
                                                   "adapm": AdaPM}

#: the Trainer's FSDP through accelerate, for fused and classic mode alike (docs/integrations.md)
FSDP2_ARGS = 'TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2})'
_FSDP1_MESSAGE = (
    "adalomo optimizers need FSDP2 under the Trainer: FSDP1 flattens the parameters, so a matrix's factored "
    f"statistics would be computed on flat 1-D shards. Use {FSDP2_ARGS} (or fsdp_version: 2 in the accelerate "
    "config).")
_DEEPSPEED_MESSAGE = (
    "DeepSpeed owns the backward and the gradients, so a fused adalomo optimizer cannot run under it. Use PyTorch's "
    f"FSDP2 instead, which keeps fused mode: {FSDP2_ARGS}, launched with torchrun --nproc-per-node N (for data "
    "parallelism without sharding, launch without fsdp: AdaLomoTrainer then uses FSDP2 as HSDP). Or fused=False.")


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
                     decay_parameters: Iterable[str] | None = None, *, named: bool = False) -> list[dict[str, Any]]:
    """The Trainer's two parameter groups: ``weight_decay`` for weights, 0 for biases and norms.

    Only trainable parameters; an empty group is left out. Tied weights appear once. ``named``: (name, tensor)
    pairs, so that the optimizer keeps the names (AdaPM's momentum policy reads them).
    """
    decay = _decay_parameter_names(model) if decay_parameters is None else set(decay_parameters)
    named_ps = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [(n, p) if named else p for n, p in named_ps if n in decay],
               "weight_decay": float(weight_decay)},
              {"params": [(n, p) if named else p for n, p in named_ps if n not in decay], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(model: nn.Module, args: Any = None, name: str = "adalomo", *, fused: bool = True,
                     lr: float | None = None, weight_decay: float | None = None,
                     decay_parameters: Iterable[str] | None = None, **kwargs: Any) -> LowMemoryOptimizer:
    """Build ``AdaLomo`` / ``Lomo`` / ``Adafactor`` / ``AdaPM`` for a ``transformers`` model from ``TrainingArguments``.

    ``lr`` and ``weight_decay`` default to ``args.learning_rate`` / ``args.weight_decay``; parameters are
    grouped as the Trainer does (no decay on biases and norms). ``name="adafactor"`` follows the
    Trainer's ``optim="adafactor"`` (``relative_step=False, scale_parameter=False`` and an explicit lr)
    unless ``relative_step=True`` is passed; ``name="adapm"`` takes ``betas`` and ``eps`` from the Trainer's
    Adam arguments and the parameter names for its momentum policy. Other keyword arguments go to the optimizer
    (``clip_grad_norm``, ``clip_threshold``, ``nonfinite``, ...). With ``args`` given, the settings that
    would be silently wrong in fused mode raise a ``ValueError`` (see :func:`check_training_args`).
    Create it after the model is on its device (and sharded, under FSDP2).
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
    if cls is AdaPM and args is not None:
        kw.setdefault("betas", (float(args.adam_beta1), float(args.adam_beta2)))
        kw.setdefault("eps", float(args.adam_epsilon))
    if lr is not None:
        kw["lr"] = lr
    if args is not None:  # a stock Trainer calls step() after each window: the K-th backward updates
        kw.setdefault("accumulation_steps", int(getattr(args, "gradient_accumulation_steps", 1) or 1))
    groups = parameter_groups(model, weight_decay, decay_parameters, named=cls is AdaPM)
    if not groups:
        raise ValueError(f"{cls.__name__}: the model has no trainable parameters")
    world = int(getattr(args, "world_size", 1) or 1)
    if fused and world > 1 and not any(is_dtensor(p) for g in groups for _, p in _named(g["params"])):
        raise ValueError(f"a fused optimizer on the unsharded model of a {world}-process run: the Trainer would wrap "
                         "it in DDP, whose all-reduce comes after the hooks. Use AdaLomoTrainer, which shards the "
                         "model (FSDP2, or HSDP for data parallelism) before it builds the optimizer.")
    optimizer = cls(groups, fused=fused, **kw)
    if args is not None:
        try:
            check_training_args(args, optimizer)
        except Exception:
            if optimizer.fused:
                optimizer.remove_hooks()  # leave the model usable for another optimizer
            raise
    return optimizer


def _named(params: list) -> list:
    return [x if isinstance(x, tuple) else (None, x) for x in params]


def _fsdp_version(args: Any) -> int | None:
    """The FSDP version the Trainer's accelerate will use (arguments or the ``accelerate launch`` config), or None."""
    plugin_args = getattr(args, "fsdp_plugin_args", None)
    if plugin_args:
        return int(plugin_args.get("fsdp_version", 1))
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and "FSDP_VERSION" in os.environ:
        return int(os.environ["FSDP_VERSION"])  # accelerate launch --config_file with FSDP
    return None


def _deepspeed(args: Any) -> bool:
    return bool(getattr(args, "deepspeed", None)) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"


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
    if _fsdp_version(args) == 1:
        raise ValueError(_FSDP1_MESSAGE)
    if not fused:
        if clip_grad_norm is not None and max_norm > 0:
            raise ValueError(f"gradients would be clipped twice: by the Trainer (max_grad_norm={max_norm:g}) and by "
                             f"the optimizer (clip_grad_norm={clip_grad_norm:g}); in classic mode (fused=False) keep "
                             "max_grad_norm and drop clip_grad_norm")
        return
    hint = " Use fused=False (classic mode) for this setting."
    if max_norm > 0 and clip_grad_norm is None:
        raise ValueError(
            f"max_grad_norm={max_norm:g} (the TrainingArguments default is 1.0) cannot be applied in fused mode: "
            "the gradients are consumed inside backward, before the Trainer could clip them. Either set "
            "max_grad_norm=0 (AdaLomo and Adafactor still clip every update to RMS <= clip_threshold), or clip "
            f"exactly: AdaLomoTrainer(..., adalomo_kwargs={{'clip_grad_norm': {max_norm:g}}}) (a second backward "
            "pass per step without accumulation; the stock Trainer cannot run it), or use fused=False.")
    if max_norm > 0 and clip_grad_norm is not None and abs(max_norm - clip_grad_norm) > 1e-12 * max_norm:
        raise ValueError(f"max_grad_norm={max_norm:g} and clip_grad_norm={clip_grad_norm:g} disagree; in fused mode "
                         "the optimizer clips: set max_grad_norm=0 or to the same value")
    if getattr(args, "fp16", False):
        raise ValueError("fp16=True uses torch's GradScaler, which cannot unscale gradients that are consumed inside "
                         "backward. Use bf16=True (no loss scaling needed), or fused=False, or a plain loop with "
                         "loss_scaler=adalomo.DynamicLossScaler().")
    if _deepspeed(args):
        raise ValueError(_DEEPSPEED_MESSAGE)
    if int(getattr(args, "n_gpu", 0) or 0) > 1:
        raise ValueError("fused mode under torch.nn.DataParallel (several GPUs in one process) is not supported; run "
                         "one process per GPU (torchrun --nproc-per-node N), or set CUDA_VISIBLE_DEVICES to one GPU."
                         + hint)


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


def fsdp2_on_cpu(accelerator: Any, plugin: Any) -> bool:
    """Give a CPU multi-process ``accelerator`` the FSDP2 ``plugin`` it ignored; returns whether FSDP is now on.

    accelerate enables FSDP on accelerators only, but FSDP2 runs on CPU processes (gloo) as well: this sets the
    state that accelerate sets on a GPU (tests, CPU clusters)."""
    if accelerator.distributed_type != DistributedType.MULTI_CPU:
        return accelerator.distributed_type == DistributedType.FSDP
    from accelerate.state import PartialState

    if accelerator.mixed_precision != "no":
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as AcceleratorState does
    return True


def _is_fsdp2_module(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or isinstance(getattr(model, "_orig_mod", None), FSDPModule)


def shard_hsdp(model: nn.Module, plugin: Any, device: torch.device) -> nn.Module:
    """FSDP2 as HSDP with full replicas, mesh (replicate=world size, shard=1) on ``device``'s type, wrapped like
    accelerate's FSDP2 (one unit per decoder layer, then the root): data parallelism whose hooks see the
    all-reduced gradients. ``fully_shard`` moves the model to the mesh's device."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from ..distributed import hsdp_mesh

    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    if policy is not None and getattr(model, "is_activation_checkpointing", False):
        # checkpoint *inside* each FSDP unit, as accelerate's FSDP2 activation checkpointing does: the
        # Trainer's checkpointing would recompute the unit with FSDP2's all-gather hooks inside the region
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        model.activation_checkpointing_disable()
        for name, m in list(model.named_modules()):
            if m is not model and policy(m):
                model.set_submodule(name, checkpoint_wrapper(m, preserve_rng_state=False))
    world = torch.distributed.get_world_size()
    kw = dict(mesh=hsdp_mesh(world, 1, torch.device(device).type),
              reshard_after_forward=plugin.reshard_after_forward,
              mp_policy=plugin.mixed_precision_policy or MixedPrecisionPolicy())
    if policy is not None:
        inner = {id(m._checkpoint_wrapped_module) for m in model.modules() if hasattr(m, "_checkpoint_wrapped_module")}
        units = [m for m in model.modules() if m is not model and id(m) not in inner and policy(m)]
        for m in reversed(units):  # innermost first
            fully_shard(m, **kw)
    fully_shard(model, **kw)
    return model


class AdaLomoTrainerMixin:
    """The adalomo parts of :class:`AdaLomoTrainer`, for any ``Trainer`` subclass: ``class
    AdaLomoSFTTrainer(AdaLomoTrainerMixin, trl.SFTTrainer): pass`` (list it first)."""

    def __init__(self, *args: Any, adalomo_optimizer: str | None = None,
                 adalomo_kwargs: dict[str, Any] | None = None, **kwargs: Any):
        # read by create_accelerator_and_postprocess, which the Trainer's __init__ calls
        self.adalomo_kwargs = dict(adalomo_kwargs or {})
        self._adalomo_given = (kwargs.get("optimizers") or (None, None))[0]
        self._adalomo_hsdp = False
        super().__init__(*args, **kwargs)
        optim = str(getattr(self.args.optim, "value", self.args.optim))
        if adalomo_optimizer is None:
            adalomo_optimizer = optim if optim in OPTIMIZERS else "adalomo"
        if str(adalomo_optimizer).lower() not in OPTIMIZERS:
            raise ValueError(f"adalomo_optimizer must be one of {sorted(OPTIMIZERS)}, got {adalomo_optimizer!r}")
        self.adalomo_optimizer = str(adalomo_optimizer).lower()
        self._adalomo_grad_norm: torch.Tensor | None = None
        self._check_adalomo_setup()
        if self._planned_fused():
            _non_reentrant_checkpointing(self.args)

    # ------------------------------------------------------------------ setup
    def _lowmem(self) -> LowMemoryOptimizer | None:
        opt = unwrap_optimizer(self.optimizer)
        return opt if isinstance(opt, LowMemoryOptimizer) else None

    def _planned_fused(self) -> bool:
        given = unwrap_optimizer(getattr(self, "optimizer", None) or self._adalomo_given)
        if isinstance(given, LowMemoryOptimizer):
            return given.fused
        return given is None and bool(self.adalomo_kwargs.get("fused", True))

    def create_accelerator_and_postprocess(self) -> None:
        """Data parallelism in fused mode runs FSDP2 as HSDP: accelerate is given an FSDP2 plugin (so that it
        neither wraps the model in DDP nor refuses its DTensors, and checkpoints it with DCP); the model is
        sharded on the (replicate=N, shard=1) mesh in :meth:`create_optimizer`."""
        args = self.args
        self._adalomo_hsdp = (self._planned_fused() and int(args.world_size) > 1 and _fsdp_version(args) is None
                              and not _deepspeed(args) and int(getattr(args, "n_gpu", 0) or 0) <= 1)
        saved = args.fsdp_plugin_args
        if self._adalomo_hsdp:
            args.fsdp_plugin_args = {"fsdp_version": 2, "state_dict_type": "FULL_STATE_DICT"}
            if args.bf16:  # bf16 compute; gradients reduced and handed to the hooks in fp32
                args.fsdp_plugin_args["mixed_precision_policy"] = {"param_dtype": torch.bfloat16,
                                                                   "reduce_dtype": torch.float32}
        plugin_args = args.fsdp_plugin_args
        try:
            super().create_accelerator_and_postprocess()
        finally:
            args.fsdp_plugin_args = saved
        if plugin_args and plugin_args.get("fsdp_version") == 2 and not self.is_fsdp_enabled:
            from accelerate.utils import FullyShardedDataParallelPlugin

            self.is_fsdp_enabled = fsdp2_on_cpu(self.accelerator, FullyShardedDataParallelPlugin(**plugin_args))

    def _check_adalomo_setup(self) -> None:
        if self.optimizer is not None:
            check_training_args(self.args, self.optimizer)
        else:
            check_training_args(self.args, fused=self.adalomo_kwargs.get("fused", True),
                                clip_grad_norm=self.adalomo_kwargs.get("clip_grad_norm"))
        if self._planned_fused() and getattr(self, "is_deepspeed_enabled", False):
            raise ValueError(_DEEPSPEED_MESSAGE)
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None) if self.is_fsdp_enabled else None
        if plugin is not None and int(getattr(plugin, "fsdp_version", 1)) != 2:
            raise ValueError(_FSDP1_MESSAGE)
        if plugin is not None and self.optimizer is not None and not _is_fsdp2_module(self.model):
            raise ValueError("under FSDP2 the optimizer must be built from the sharded model, which does not exist "
                             "yet when the Trainer is created: drop optimizers=(opt, ...) and choose the optimizer "
                             "with adalomo_optimizer= and adalomo_kwargs=")

    def _shard_for_optimizer(self, model: nn.Module) -> nn.Module:
        """Under FSDP2 shard ``model`` now, with accelerate's own FSDP2 code (or HSDP for data parallelism), so that
        the optimizer is built on the sharded parameters; accelerate's ``prepare`` then finds it sharded and keeps it
        (it would otherwise swap the parameters of an optimizer built on the full model behind its back)."""
        if not self.is_fsdp_enabled or _is_fsdp2_module(model):
            return model
        if self._adalomo_hsdp:
            return shard_hsdp(model, self.accelerator.state.fsdp_plugin, self.accelerator.device)
        return shard_model(self.accelerator, model)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            opt_model = self._shard_for_optimizer(self.model if model is None else model)
            if model is None:
                self.model = opt_model
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
            # the Trainer marks the last micro-batch of each accumulation window with sync_gradients
            self._adalomo_grad_norm = opt._micro_batch_backward(loss, last=accelerator.sync_gradients)

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
            if opt._engine.pending_window():  # accumulated for clipping: step() clips; report the norm it uses
                grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
                return opt._total_norm(grads) if grads else None
            return self._adalomo_grad_norm  # the optimizer already clipped with the two-pass norm
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None):
        opt = self._lowmem()
        if opt is not None and opt.fused:
            # no gradients exist after a fused backward: report the two-pass norm, or nothing (not 0.0)
            return grad_norm if grad_norm is not None else self._adalomo_grad_norm
        return super()._get_grad_norm(model, grad_norm=grad_norm)


class AdaLomoTrainer(AdaLomoTrainerMixin, Trainer):
    """``transformers.Trainer`` that trains with an adalomo optimizer (fused by default).

    Args (besides the Trainer's):
        adalomo_optimizer: ``"adalomo"`` (default), ``"adafactor"``, ``"lomo"`` or ``"adapm"``; if left ``None``
            and ``args.optim`` is one of these names (e.g. ``optim="adalomo"``), that one.
        adalomo_kwargs: passed to :func:`create_optimizer`, e.g. ``{"fused": False}``,
            ``{"clip_grad_norm": 1.0}`` (exact global-norm clipping in fused mode; then ``max_grad_norm`` must
            be 0 or the same value), ``{"clip_threshold": 1.0}``, ``{"nonfinite": "raise"}``.

    ``args.learning_rate`` is the optimizer's lr (relative to the weight RMS for AdaLomo: 1e-3 / 5e-4
    for fine-tuning) and follows the Trainer's schedule; ``args.weight_decay`` applies to all but
    biases and norms. ``gradient_accumulation_steps = K``: the micro-batches' gradients are summed in
    ``p.grad`` and the K-th backward updates (exactly classic mode's result).

    Several processes (``torchrun --nproc-per-node N``): with the Trainer's FSDP (version 2) the model is
    sharded by accelerate's own FSDP2 code *before* the optimizer is built from it; without FSDP, fused mode
    runs FSDP2 as HSDP (full replicas, the hooks see all-reduced gradients) instead of DDP, through accelerate's
    FSDP2 path (checkpoints with its FSDP2 state dicts). Classic mode without FSDP keeps DDP.
    A custom optimizer can still be passed with ``optimizers=(opt, None)`` on one process.
    """
