"""The shared base of the optimizers: validation, parameter groups, state, the classic step, checkpoints.

A subclass validates its hyper-parameters (``_validate_group``), creates its state (``_init_state``) and
supplies its maths per backend: ``_update`` (torch, one tensor), ``_update_sharded`` (torch, the local rows of
an FSDP2 parameter) and optionally ``_update_many`` (the grouped Triton kernels). *When* the maths runs is
decided here: after ``backward()`` in ``step()`` (classic), or inside ``backward()`` by the fused engine
(:mod:`adalomo.optim.engine`); *which* backend runs is decided in :mod:`adalomo.optim.dispatch` for both modes.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from ..distributed import state as _dist_state
from ..precision import DynamicLossScaler
from . import dispatch
from .checks import check_number, check_param, check_state_dict, param_list, split_names
from .engine import FusedEngine
from .finite import NONFINITE_MODES, FiniteReport, all_finite

__all__ = ["LowMemoryOptimizer", "auto_bucket_cap_mb"]

#: fused mode on CUDA: gradients queued per param group before one grouped update (see ``bucket_cap_mb``).
#: "auto": 15% of the trainable parameters' bytes, kept within [64, 256] MiB. Each flush costs host time inside a
#: backward that is close to host-bound, so fewer, larger buckets are faster; the peak does not move, because
#: the forward's own peak (at the logits) is higher than anything a bucket adds later (docs/benchmarks.md).
DEFAULT_BUCKET_CAP_MB = "auto"
AUTO_BUCKET_RANGE_MB = (64.0, 256.0)
AUTO_BUCKET_FRACTION = 0.15
_REMOVED_OPTIONS = ("side_stream", "flush_thread")


def auto_bucket_cap_mb(params: Iterable[Tensor]) -> float:
    """``bucket_cap_mb="auto"``: 15% of the trainable bytes (global sizes for DTensors), clamped."""
    total = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    lo, hi = AUTO_BUCKET_RANGE_MB
    return min(hi, max(lo, total * AUTO_BUCKET_FRACTION / 2**20))


def _capturing() -> bool:
    """A CUDA graph is being captured on the current stream (never true before CUDA is initialised)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


class LowMemoryOptimizer(torch.optim.Optimizer):
    """Base of AdaLomo, Lomo, Adafactor and AdaPM: a real ``torch.optim.Optimizer``.

    ``params``: ``model.parameters()``, ``model.named_parameters()`` (names are kept in each group's
    ``param_names``), a list of param-group dicts (whose ``params`` may be (name, tensor) pairs), or an
    ``nn.Module`` (its named parameters, as ``lomo-optim`` takes it).

    Modes
        ``fused=False``: ``loss.backward(); opt.step(); opt.zero_grad()``.
        ``fused=True``: each parameter is updated inside ``loss.backward()`` the moment its gradient is
        accumulated, and the gradient is freed at once. ``step()`` does no second update: it checks that
        at most one backward updated since the last ``step()`` (more would be gradient accumulation done wrong:
        it raises) and picks up parameters unfrozen since the optimizer was built.
        ``torch.nn.utils.clip_grad_norm_`` sees no gradients after a fused backward: use ``clip_grad_norm``.

    Gradient accumulation
        ``accumulation_steps=K``: the loop of classic mode (K backwards, then ``step()``) works unchanged in
        fused mode. The first K-1 backwards after a ``step()`` leave their gradients in ``p.grad`` (summed
        there as usual); the K-th updates from the sum inside backward and frees it. A ``step()`` after fewer
        than K backwards (the last, short window of an epoch) applies the sum as classic mode would. With
        ``clip_grad_norm`` every backward of the window accumulates and ``step()`` clips and updates (the norm
        of the summed gradient exists only then). The result equals classic mode's bit for bit. Classic mode
        ignores the setting (its ``step()`` already ends the window).

    Robustness
        ``nonfinite``: a tensor whose gradient has NaN/inf is never updated (the check runs on the
        device); then ``"warn"`` (default) warns once per such step without synchronising (on a GPU the
        warning comes when the flag has reached the host: at a later step, at the latest in
        ``state_dict()``), ``"raise"`` raises after the backward (or step; this waits for the device),
        ``"count"`` only counts (``opt.skipped_updates``, a device tensor).
        ``loss_scaler``: a :class:`~adalomo.precision.DynamicLossScaler` for fp16 training; scale the
        loss with ``opt.scale_loss(loss)`` or use ``opt.fused_backward(loss)``. torch's ``GradScaler`` is
        refused in fused mode before it can change a weight.
        ``clip_grad_norm``: global gradient-norm clipping; in fused mode it needs a first pass,
        ``opt.grad_norm(loss)``, before the updating backward (as in ``lomo-optim``).

    Speed (fused mode, CUDA, Triton kernels)
        ``bucket_cap_mb``: gradients that arrive during backward are queued per param group and
        updated together by the grouped kernels once the queue holds this many MiB (and at the end of
        backward), like DDP's gradient buckets: a few launches instead of several per tensor, for at most
        this much extra gradient memory. ``"auto"`` (default): 15% of the trainable parameters' bytes,
        within [64, 256] MiB (the value is in ``opt.bucket_cap_mb``). ``0`` updates each tensor on its own.
        Results are the same as classic mode's.

    Multi-GPU (see :mod:`adalomo.distributed`)
        FSDP2 ``DTensor`` parameters (``Shard(0)``, HSDP) are updated exactly as the full tensor would be
        in one process, in both modes; their state is stored as DTensors. Fused mode refuses plain
        parameters in a multi-process run (DDP) unless ``allow_unsharded_distributed=True``.
    """

    #: the subclass has grouped kernels (``_update_many``)
    _has_many = False
    #: ``_update_many`` takes FSDP2 shards (``shards=``): one all-reduce per call (AdaLomo, Adafactor, Lomo)
    _sharded_many = False
    #: FSDP2 (DTensor) parameters: False gives a clear error at construction
    _supports_sharding = True

    def __init__(self, params: Any, defaults: dict[str, Any], *, fused: bool = False, nonfinite: str = "warn",
                 loss_scaler: DynamicLossScaler | None = None, clip_grad_norm: float | None = None,
                 sr_seed: int = 0, allow_unsharded_distributed: bool = False,
                 bucket_cap_mb: float | str = DEFAULT_BUCKET_CAP_MB, accumulation_steps: int = 1, **removed: Any):
        name = type(self).__name__
        for key in removed:
            if key not in _REMOVED_OPTIONS:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}")
            warnings.warn(f"{name}: {key} was removed (it measured no gain) and is ignored; drop the argument",
                          DeprecationWarning, stacklevel=3)
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_MODES}, got {nonfinite!r}")
        if clip_grad_norm is not None:
            check_number("clip_grad_norm", clip_grad_norm, low=0.0, low_open=True,
                          hint=" (use None to disable clipping)")
        if loss_scaler is not None and not isinstance(loss_scaler, DynamicLossScaler):
            raise TypeError("loss_scaler must be an adalomo.DynamicLossScaler (torch's GradScaler cannot "
                            "unscale gradients that are consumed inside backward)")
        auto_cap = isinstance(bucket_cap_mb, str) and bucket_cap_mb == "auto"
        if not auto_cap:
            check_number("bucket_cap_mb", bucket_cap_mb, low=0.0,
                          hint=' ("auto", or MiB; 0 updates each tensor on its own)')
        params = param_list(params, name)
        self._engine = None
        self.accumulation_steps = accumulation_steps
        self.nonfinite = nonfinite
        self.loss_scaler = loss_scaler
        self.clip_grad_norm = clip_grad_norm
        self.sr_seed = int(sr_seed)
        self.allow_unsharded_distributed = bool(allow_unsharded_distributed)
        self._init_runtime()
        self._setting_names = tuple(defaults)  # this optimizer's group settings (torch adds its own later)
        self._engine = FusedEngine(self, 0.0 if auto_cap else float(bucket_cap_mb)) if fused else None
        super().__init__(params, defaults)
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            warnings.warn(f"{name}: every parameter has requires_grad=False; they are updated once unfrozen "
                          "(fused mode picks them up at the next backward or step())", UserWarning, stacklevel=2)
        if self._engine is not None and auto_cap:
            self._engine.bucket_cap_mb = auto_bucket_cap_mb(p for g in self.param_groups for p in g["params"])

    def _init_runtime(self) -> None:
        """What is rebuilt, not saved, with the optimizer (``__init__`` and unpickling)."""
        self._group_index: dict[int, int] = {}
        self._param_index: dict[int, int] = {}
        self._shard_layouts: dict[int, Any] = {}  # id(p) -> distributed.ParamLayout, for DTensor parameters
        self._fits: dict[int, bool] = {}  # id(p) -> the grouped kernels take p (dispatch.grouped_fits)
        # id(p) -> (its step counter, that tensor's _version after our last write, the value written, exact below)
        self._step_cache: dict[int, tuple] = {}
        self._clip_coef: Tensor | None = None
        self._grad_scale_cache: Tensor | None = None
        self._oks: list[Tensor] = []
        self._report = FiniteReport(self)
        self._skip_next = False

    # ------------------------------------------------------------------ wiring
    @property
    def fused(self) -> bool:
        return self._engine is not None

    @property
    def accumulation_steps(self) -> int:
        """Micro-batches per optimizer step (see Gradient accumulation above)."""
        return self._accumulation_steps

    @accumulation_steps.setter
    def accumulation_steps(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"accumulation_steps must be an int >= 1 (micro-batches per optimizer step), got {k!r}")
        self._accumulation_steps = k
        if self._engine is not None:
            self._engine.plan()

    @property
    def bucket_cap_mb(self) -> float:
        return self._engine.bucket_cap_mb if self._engine is not None else 0.0

    def _refuse_capture(self) -> None:
        if _capturing():
            raise RuntimeError(
                f"{type(self).__name__}: a CUDA graph is being captured, but this optimizer's update cannot be "
                "replayed from a graph: its step size, beta2 and the kernels' launch metadata are computed on the "
                "host at every step, so each replay would repeat the captured step's values. Capture the forward "
                "and backward only (fused=False, so that backward does not update) and call step() outside the "
                "graph.")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        name = type(self).__name__
        group = dict(param_group)
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        params, names = split_names(params, name)
        if names is not None:
            group["param_names"] = names
        seen: set[int] = set()
        for i, p in enumerate(params):
            check_param(p, i, name)
            if id(p) in seen or id(p) in self._group_index:
                raise ValueError(f"{name}: parameter {i} (shape {tuple(p.shape)}) is registered twice; pass each "
                                 "tensor once (tied weights appear once in model.parameters())")
            seen.add(id(p))
        group["params"] = params
        names = group.get("param_names")
        if names is not None and len(names) != len(params):
            raise ValueError(f"{name}: a group has {len(params)} params but {len(names)} param_names")
        super().add_param_group(group)
        group = self.param_groups[-1]
        self._validate_group(group)
        gi = len(self.param_groups) - 1
        for p in group["params"]:
            self._group_index[id(p)] = gi
            self._param_index[id(p)] = len(self._param_index)
            if _dist.is_dtensor(p):
                if not self._supports_sharding:
                    raise NotImplementedError(f"{name} does not support FSDP2-sharded (DTensor) parameters yet")
                self._shard_layouts[id(p)] = _dist.param_layout(p)
            if p.requires_grad:
                self._ensure_state(p)
            if self._engine is not None:
                self._engine.attach(p)

    def _ensure_state(self, p: Tensor) -> dict[str, Any]:
        """``p``'s state, created when missing (eagerly at construction for trainable parameters, so that
        ``torch.distributed.checkpoint`` finds it; later for parameters unfrozen after construction)."""
        state = self.state.get(p)
        if state:
            return state
        group = self.param_groups[self._group_index[id(p)]]
        layout = self._shard_layouts.get(id(p))
        if layout is not None:
            self.state[p] = _dist_state.init_sharded_state(self, p, group, layout)
        else:
            self.state[p] = self._init_state(p, group)
        return self.state[p]

    def remove_hooks(self) -> None:
        """Detach the fused hooks; the optimizer then behaves as ``fused=False``."""
        if self._engine is not None:
            self._engine.detach()
            self._engine = None

    # ------------------------------------------------------------ subclass API
    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {"step": torch.tensor(0.0)}

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                grad_scale: Tensor | None, stochastic_rounding: bool,
                generator: torch.Generator | None) -> Tensor:  # pragma: no cover - abstract
        """The torch maths on one tensor (increments ``state['step']``); returns the 0-d bool finite flag."""
        raise NotImplementedError

    def _update_sharded(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                        grad_scale: Tensor | None, stochastic_rounding: bool, generator: torch.Generator | None,
                        shard: Any) -> Tensor:
        """``_update`` on the local rows of an FSDP2 parameter (``shard``: its ShardInfo)."""
        raise NotImplementedError(f"{type(self).__name__} does not support FSDP2-sharded parameters")

    def _grouped_supported(self, group: dict[str, Any]) -> bool:
        """Whether ``_update_many`` can take this group's settings (else the torch maths runs)."""
        return True

    def _grouped_takes(self, p: Tensor) -> bool:
        """Whether ``_update_many`` takes ``p`` (on a device where the kernels run); else ``_update`` does."""
        return True

    def _update_many(self, ps: list[Tensor], grads: list[Tensor], group: dict[str, Any], *, states: list,
                     steps: list[float], seeds: list[int], sr: bool, grad_scale: Tensor | None,
                     shards: list | None) -> Tensor:  # pragma: no cover - abstract
        """The grouped kernels on many tensors (step counts already advanced to ``steps``)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- helpers of the maths
    def _check_grad(self, grad: Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use a dense "
                               "embedding (nn.Embedding(sparse=False))")
        if self.clip_grad_norm is not None and self._clip_coef is None:
            raise RuntimeError(f"{type(self).__name__}: clip_grad_norm is set, so each step needs the global "
                               "gradient norm first: call opt.grad_norm(loss) before the backward that "
                               "updates (or opt.fused_backward(loss) after it); classic mode computes it in step()")

    def _sr_seed(self, p: Tensor, state: dict[str, Tensor]) -> int:
        """Stochastic-rounding seed from (optimizer seed, parameter index, step): resumes draw the same bits."""
        step = int(state["step"]) if "step" in state else 0
        return ((self.sr_seed * 1_000_003 + self._param_index[id(p)]) * 1_000_033 + step) % (1 << 62)

    def _sr_enabled(self, group: dict[str, Any], p: Tensor) -> bool:
        sr = group.get("stochastic_rounding")
        return (p.dtype == torch.bfloat16) if sr is None else (bool(sr) and p.dtype == torch.bfloat16)

    def _grad_scale(self, device: torch.device) -> Tensor | None:
        if self.loss_scaler is None and self._clip_coef is None:
            return None
        if self._grad_scale_cache is None or self._grad_scale_cache.device != device:
            s = torch.ones((), dtype=torch.float32, device=device)
            if self.loss_scaler is not None:
                s = s * self.loss_scaler.inv_scale().to(device)
            if self._clip_coef is not None:
                s = s * self._clip_coef.to(device)
            self._grad_scale_cache = s
        return self._grad_scale_cache

    # ---------------------------------------------------------------- the step
    @torch.no_grad()
    def step(self, closure=None):
        """Classic mode: update every parameter that has a gradient. Fused mode: the updates happened in
        backward; this checks that at most one backward since the last ``step()`` updated, applies the summed
        gradients of an accumulation window that no backward updated (a window cut short, or accumulated for
        global-norm clipping) exactly as classic mode would, and picks up parameters that were unfrozen since
        (their gradient, if any, is applied now)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        engine = self._engine
        if engine is None:
            self._apply_gradients()
            return loss
        engine.check_one_backward_per_step()
        pending = engine.pending_window()
        engine.end_window()
        if pending:
            self._apply_gradients(free=True)
        if engine.unhooked:
            engine.adopt_unfrozen()
            self._finish_step()
        return loss

    def _apply_gradients(self, free: bool = False) -> None:
        """The classic update from ``p.grad`` (``free``: drop each gradient afterwards, as fused mode keeps none)."""
        self._refuse_capture()
        pairs = [(gi, p) for gi, g in enumerate(self.param_groups) for p in g["params"] if p.grad is not None]
        if self.clip_grad_norm is not None and pairs:
            total = self._total_norm([p.grad for _, p in pairs])
            self._clip_coef = (self.clip_grad_norm / (total + 1e-6)).clamp(max=1.0)
        try:
            for gi in sorted({gi for gi, _ in pairs}):
                items = [(p, p.grad) for g_i, p in pairs if g_i == gi]
                for p, _ in items:
                    self._ensure_state(p)
                dispatch.update(self, gi, items)
        finally:
            self._finish_step()
            if free:
                for _, p in pairs:
                    p.grad = None

    def _total_norm(self, grads: list[Tensor]) -> Tensor:
        if any(_dist.is_dtensor(g) for g in grads):
            total = _dist_state.global_norm(grads)
        else:
            dev = grads[0].device
            norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(dev) for g in grads])
            total = torch.linalg.vector_norm(norms)
        if self.loss_scaler is not None:
            total = total * self.loss_scaler.inv_scale().to(total.device)
        return total

    def _finish_step(self) -> None:
        """End of a step (classic) or of a backward (fused): the finite flags, the loss scaler, warnings."""
        oks, self._oks = self._oks, []
        self._clip_coef = None
        self._grad_scale_cache = None
        if oks:
            self._report.account(all_finite(oks))

    @property
    def skipped_updates(self) -> Tensor | None:
        """Updates skipped for a non-finite gradient so far (a device tensor; None before the first step)."""
        return self._report.skipped_updates

    # ------------------------------------------------ lomo-optim compatible API
    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss to call ``backward()`` on: multiplied by the loss scale when fp16 scaling is on."""
        return loss if self.loss_scaler is None else self.loss_scaler.scale_loss(loss)

    def grad_norm(self, loss: Tensor) -> Tensor:
        """First pass of two-pass fused training: the global gradient norm, without updating.

        Runs ``backward(retain_graph=True)`` that only accumulates squared gradient norms (each gradient
        is freed at once). Sets the clip coefficient for the next updating backward when
        ``clip_grad_norm`` is set, and makes that backward skip the whole step, exactly, when the
        norm is not finite. Returns the (unscaled) norm as a 0-d tensor.
        """
        if self._engine is None:
            raise RuntimeError(f"{type(self).__name__}.grad_norm(loss) is the first pass of fused mode; in "
                               "classic mode set clip_grad_norm and call loss.backward(); opt.step()")
        if self._engine.accumulating:
            raise RuntimeError(f"{type(self).__name__}.grad_norm(loss) during gradient accumulation: the norm to clip "
                               "by is the summed gradient's, which exists only at the end of the window; call "
                               "loss.backward() for each micro-batch, then step() clips and updates")
        total = self._engine.norm_pass(loss, lambda x: self.scale_loss(x).backward(retain_graph=True))
        if self.clip_grad_norm is not None:
            self._clip_coef = (self.clip_grad_norm / (total + 1e-6)).clamp(max=1.0)
        self._skip_next = not bool(torch.isfinite(total))
        return total

    def fused_backward(self, loss: Tensor, lr: float | None = None) -> None:
        """``lomo-optim``'s entry point: set ``lr`` on every group (if given), backward, update."""
        if self.accumulation_steps > 1:
            raise RuntimeError(f"{type(self).__name__}.fused_backward(loss) is one optimizer step per call; with "
                               f"accumulation_steps={self.accumulation_steps} call opt.scale_loss(loss).backward() "
                               "for each micro-batch and opt.step() after every K-th")
        if lr is not None:
            check_number("lr", lr, low=0.0)
            for g in self.param_groups:
                g["lr"] = lr
        self._step_backward(loss)

    def _step_backward(self, loss: Tensor) -> None:
        """One backward that is one optimizer step (skipped as a whole after a non-finite two-pass norm)."""
        if self._skip_next:
            self._skip_next = False
            self._clip_coef = None
            self._grad_scale_cache = None
            self._report.account(torch.zeros((), dtype=torch.bool, device=loss.device))
            return
        self.scale_loss(loss).backward()
        self.step()
        if self._engine is None:
            self.zero_grad(set_to_none=True)

    def _micro_batch_backward(self, loss: Tensor, last: bool) -> Tensor | None:
        """The backward of one micro-batch for a framework that knows where its accumulation window ends (the
        Trainer's and accelerate's ``sync_gradients``); the framework calls ``step()`` after the ``last`` one.

        Fused mode: the window's last backward updates (after the two-pass norm when the optimizer clips and the
        window has one micro-batch), the others accumulate; a window of several micro-batches with clipping
        accumulates all of them and ``step()`` clips and updates. Under FSDP2's ``set_requires_gradient_sync(False)``
        the hooks fire only in the last backward, with the reduced sum: the same plan holds. Classic mode: backward.
        Returns the two-pass gradient norm, or None.
        """
        engine = self._engine
        if engine is None:
            self.scale_loss(loss).backward()
            return None
        first = engine.micro_batches == 0
        engine.micro_batches += 1
        engine.plan(update=last, first=first)
        if engine.accumulating:
            self.scale_loss(loss).backward()
            return None
        norm = self.grad_norm(loss) if self.clip_grad_norm is not None else None
        self._step_backward(loss)
        return norm

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        self._report.warn_arrived(block=True)  # a checkpoint does not hide a warning still in flight
        sd = super().state_dict()
        if self.loss_scaler is not None:
            sd["loss_scaler"] = self.loss_scaler.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(self, state_dict)
        state_dict = dict(state_dict)
        scaler = state_dict.pop("loss_scaler", None)
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype (bf16!); our statistics are fp32: restore them
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid not in saved_state or p not in self.state:
                continue
            for k, v in saved_state[pid].items():
                if isinstance(v, Tensor) and k != "step" and self.state[p][k].dtype != v.dtype:
                    self.state[p][k] = v.to(device=p.device, copy=True)
        self._step_cache.clear()
        if self._shard_layouts:
            _dist_state.conform_loaded_state(self)
        if scaler is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(scaler)

    def _state_keys(self, p: Tensor, group: dict[str, Any]) -> list[str]:
        """The keys of ``p``'s state (its state, or that of a meta copy for a frozen parameter)."""
        if p.requires_grad:
            return list(self._ensure_state(p))
        meta = p.detach().to("meta") if not _dist.is_dtensor(p) else torch.empty(p.shape, device="meta")
        return list(self._init_state(meta, group))

    # ---------------------------------------------------------- copies
    def __getstate__(self) -> dict[str, Any]:
        # hooks, caches and in-flight flags belong to this object and its tensors; a copy rebuilds its own
        state = {k: v for k, v in self.__dict__.items() if k in _SAVED}
        state[_COPY] = None if self._engine is None else self._engine.bucket_cap_mb
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A copy (``copy.deepcopy``, ``pickle``) of a fused optimizer is fused on the copied parameters: it
        registers its own hooks on them (and raises if they still belong to a live fused optimizer)."""
        if _COPY not in state:  # torch's load_state_dict replaces state and param_groups through here
            super().__setstate__(state)
            return
        state = dict(state)
        cap = state.pop(_COPY)
        super().__setstate__(state)
        self._init_runtime()
        self._engine = None
        for gi, g in enumerate(self.param_groups):
            for p in g["params"]:
                self._group_index[id(p)] = gi
                self._param_index[id(p)] = len(self._param_index)
                if _dist.is_dtensor(p):
                    self._shard_layouts[id(p)] = _dist.param_layout(p)
        if cap is not None:
            self._engine = FusedEngine(self, cap)
            for g in self.param_groups:
                for p in g["params"]:
                    owner = getattr(p, "_adalomo_fused_owner", None)
                    if owner is not None and owner() is not None and getattr(p, "_post_accumulate_grad_hooks", None):
                        raise RuntimeError(
                            f"a copy of a fused {type(self).__name__} shares its parameters with the original, which "
                            "would then be updated twice per backward; copy the model together with the optimizer "
                            "(copy.deepcopy((model, opt))), or call remove_hooks() on the original first")
                    p._adalomo_fused_owner = None  # a copied tensor may carry the original's owner
                    self._engine.attach(p)


#: what a copy of an optimizer keeps (the rest is rebuilt by ``_init_runtime``)
#: (as in torch, hooks registered on the optimizer are not copied); _COPY marks a copy's state and holds the fused
#: engine's bucket size (None: classic)
_COPY = "_adalomo_copy"
_SAVED = ("defaults", "state", "param_groups", "nonfinite", "loss_scaler", "clip_grad_norm", "sr_seed",
          "allow_unsharded_distributed", "_accumulation_steps", "_setting_names")
