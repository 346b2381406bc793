"""The fused engine: each parameter updated inside ``backward()`` the moment its gradient is ready.

One post-accumulate-grad hook per parameter takes the gradient (``p.grad = None`` at once, so no full set of
gradients ever exists) and either updates the tensor now (torch path) or queues it into a bucket of its param
group that is updated by one grouped kernel call once it holds ``bucket_cap_mb`` MiB, and at the end of the
backward. Gradient accumulation (``accumulation_steps=K``): on the first K-1 backwards of a window the hooks
leave each gradient in ``p.grad``, where autograd (or FSDP2) sums the micro-batches; the K-th backward updates
from the sum and frees it, so one set of gradients exists, never two. ``BackwardTracker`` adds what a hook
cannot see on its own: where one backward ends, whether a hook fired twice within one backward (reentrant
checkpointing), and whether the backward started at a loss scaled by torch's ``GradScaler`` (refused before
the first update: those gradients are scaled and cannot be unscaled once consumed). The maths is the
optimizer's; the choice of backend is :mod:`adalomo.optim.dispatch`'s.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import _compat
from ..distributed import state as _dist_state
from . import dispatch

if TYPE_CHECKING:  # pragma: no cover
    from .base import LowMemoryOptimizer

__all__ = ["FusedEngine", "BackwardTracker", "DoubleFiringError", "GradScalerError"]

_MiB = 1048576.0


class DoubleFiringError(RuntimeError):
    pass


class GradScalerError(RuntimeError):
    pass


class FusedEngine:
    """Hooks, buckets and the end of each backward for one optimizer (``fused=True``).

    Parameters frozen when the optimizer is built (or when a hook would be registered) get their hook once
    they require a gradient: the engine looks for them at the end of every backward and in ``step()``; a
    gradient such a parameter received in the meantime is applied then, as classic mode would.
    """

    def __init__(self, opt: LowMemoryOptimizer, bucket_cap_mb: float):
        self.opt = opt
        self.bucket_cap_mb = bucket_cap_mb
        self.tracker = BackwardTracker(self._backward_end, self._backward_abandoned)
        self.mode = "update"  # "norm": the first pass of two-pass clipping (no update)
        self.handles: dict[int, Any] = {}
        self.unhooked: dict[int, Tensor] = {}  # parameters given to the optimizer without a hook yet (frozen)
        self.pending: dict[Any, list[tuple[Tensor, Tensor]]] = {}  # bucket key -> queued (param, grad)
        self.pending_bytes: dict[Any, int] = {}
        self.norm_sq: Tensor | None = None
        self.norm_sq_groups: dict[Any, Tensor] = {}
        self.updating_backwards = 0  # backwards that updated since the last step()
        self.window = 0  # backwards (whose hooks fired) since the last step(): the accumulation window so far
        self.micro_batches = 0  # micro-batches a framework announced since the last step() (LowMemoryOptimizer)
        # this backward's hooks leave the gradient in p.grad (a micro-batch of an accumulation window); read by
        # every hook, so it is a plain attribute, planned at each backward's end and in step()
        self.accumulating = False
        self.ddp_checked = False
        self.plan()
        _watch_grad_scaler()

    # ------------------------------------------------------------------------------------------ hooks
    def attach(self, p: Tensor) -> None:
        """Hook ``p`` (or remember it until it requires a gradient)."""
        if not p.requires_grad:
            self.unhooked[id(p)] = p
            return
        owner = getattr(p, "_adalomo_fused_owner", None)
        if owner is not None and owner() is not None and owner() is not self.opt:
            raise ValueError(f"{type(self.opt).__name__}(fused=True): a parameter of shape {tuple(p.shape)} already "
                             "belongs to another fused optimizer, which would update it a second time; call "
                             "remove_hooks() on the old optimizer first")
        p._adalomo_fused_owner = weakref.ref(self.opt)
        self.handles[id(p)] = p.register_post_accumulate_grad_hook(self.hook)
        self.unhooked.pop(id(p), None)

    def detach(self) -> None:
        for h in self.handles.values():
            h.remove()
        self.handles.clear()
        self.unhooked.clear()
        for g in self.opt.param_groups:
            for p in g["params"]:
                owner = getattr(p, "_adalomo_fused_owner", None)
                if owner is not None and owner() is self.opt:
                    p._adalomo_fused_owner = None
        self.tracker.reset()

    def adopt_unfrozen(self, keep_grads: bool = False) -> None:
        """Hook the parameters that were frozen and now require a gradient; apply (or, in the norm pass, count)
        a gradient they received without a hook, or leave it in ``p.grad`` (``keep_grads``: a backward that
        accumulated)."""
        if not self.unhooked:
            return
        for p in [p for p in self.unhooked.values() if p.requires_grad]:
            self.opt._ensure_state(p)
            self.attach(p)
            if keep_grads:
                continue
            grad, p.grad = p.grad, None
            if grad is None:
                continue
            if self.mode == "norm":
                layouts = self.opt._shard_layouts
                self._add_norm(layouts.get(id(p)) if layouts else None, grad)
            else:
                dispatch.update(self.opt, self.opt._group_index[id(p)], [(p, grad)])

    def hook(self, p: Tensor) -> None:
        # the hot path of fused mode (once per parameter per backward, on the critical path of a backward that is
        # often host-bound): a few attribute and dict look-ups before the gradient is queued
        opt = self.opt
        layout = opt._shard_layouts.get(id(p)) if opt._shard_layouts else None
        if layout is None and not self.ddp_checked:
            _dist_state.check_unsharded(opt, p)
            self.ddp_checked = True
        self.tracker.enter(p)
        if self.accumulating:
            return  # autograd (or FSDP2) adds the next micro-batch's gradient to p.grad
        grad = p.grad
        p.grad = None
        if grad is None:
            return
        if self.mode == "norm":
            self._add_norm(layout, grad)
            return
        cap = self.bucket_cap_mb
        if cap > 0 and dispatch.grouped_fits(opt, p, grad, layout):
            gi = opt._group_index[id(p)]
            if layout is None:
                self._queue(gi, p, grad, grad.nbytes, cap)
            else:  # every rank flushes FSDP2 buckets at the same point: their bytes are global
                dispatch.check_placements(opt, p, grad, layout)
                self._queue((gi, layout.group), p, grad, grad.numel() * grad.element_size(), cap)
            return
        if grad.is_cuda:
            opt._refuse_capture()
        dispatch.update(opt, opt._group_index[id(p)], [(p, grad)])

    def _queue(self, key: Any, p: Tensor, grad: Tensor, nbytes: int, cap: float) -> None:
        opt = self.opt
        if grad.is_sparse or opt.clip_grad_norm is not None:
            opt._check_grad(grad)
        queue = self.pending.get(key)
        if queue is None:
            queue = self.pending[key] = []
        queue.append((p, grad))
        size = self.pending_bytes[key] = self.pending_bytes.get(key, 0) + nbytes
        if size >= cap * _MiB:
            self.flush(key)

    def flush(self, key: Any) -> None:
        """Update the queued tensors of bucket ``key`` (a param group index, or (index, process group) for FSDP2
        parameters) in one grouped call."""
        items = self.pending.pop(key, None)
        self.pending_bytes[key] = 0
        if not items:
            return
        self.opt._refuse_capture()
        dispatch.update_grouped(self.opt, key, items)

    # ------------------------------------------------------------------------------- end of backward
    def _backward_abandoned(self) -> None:
        """A backward raised midway: drop the gradients it queued (those tensors keep their values)."""
        self.pending.clear()
        self.pending_bytes.clear()
        self.ddp_checked = False

    def _backward_end(self) -> None:
        self.ddp_checked = False
        self.adopt_unfrozen(keep_grads=self.accumulating and self.mode == "update")
        if self.mode == "norm":
            return
        self.window += 1
        if self.accumulating:
            self.plan()
            return
        for key in list(self.pending):
            self.flush(key)
        self.updating_backwards += 1
        self.plan()
        self.opt._finish_step()

    # ------------------------------------------------------------------------------- accumulation
    def plan(self, update: bool | None = None, first: bool = True) -> None:
        """Decide whether the next backward updates or accumulates.

        ``update=None``: by count, the ``accumulation_steps``-th backward of the window updates. ``update`` given:
        a framework that knows where its window ends says so for the next backward (``first``: it opens the
        window). Global-norm clipping needs the norm of the summed gradient, which exists only once the window is
        complete: with ``clip_grad_norm`` a window of several backwards accumulates all of them and ``step()``
        clips and updates (as classic mode does).
        """
        opt = self.opt
        if update is None:
            k = opt.accumulation_steps
            update, first = self.window + 1 >= k, self.window % k == 0
        self.accumulating = not update or (opt.clip_grad_norm is not None and not first)

    def pending_window(self) -> bool:
        """Gradients of this window wait in ``p.grad``: no backward of the window updated (it ended early, at a
        ``step()`` before the K-th backward, or every backward accumulated for clipping)."""
        return self.window > 0 and self.updating_backwards == 0

    def end_window(self) -> None:
        self.window = self.micro_batches = self.updating_backwards = 0
        self.plan()

    # ------------------------------------------------------------------------------- two-pass norm
    def _add_norm(self, layout: Any, grad: Tensor) -> None:
        opt = self.opt
        n, grp = _dist_state.local_norm(layout, grad)
        if opt.loss_scaler is not None:
            n = n * opt.loss_scaler.inv_scale().to(n.device)
        sq = n.square()
        if grp is not None:
            prev = self.norm_sq_groups.get(grp)
            self.norm_sq_groups[grp] = sq if prev is None else prev + sq.to(prev.device)
            return
        self.norm_sq = sq if self.norm_sq is None else self.norm_sq + sq.to(self.norm_sq.device)

    def norm_pass(self, loss: Tensor, backward: Callable[[Tensor], None]) -> Tensor:
        """Run ``backward(loss)`` (retaining the graph) with the hooks only summing squared gradient norms;
        returns the global norm (0-d tensor)."""
        self.mode, self.norm_sq, self.norm_sq_groups = "norm", None, {}
        try:
            backward(loss)
        finally:
            self.mode = "update"
        norm_sq = _dist_state.reduce_sq_norms(self.norm_sq, self.norm_sq_groups)
        self.norm_sq, self.norm_sq_groups = None, {}
        return torch.zeros((), device=loss.device) if norm_sq is None else norm_sq.sqrt()

    # ------------------------------------------------------------------------------- step()
    def check_one_backward_per_step(self) -> None:
        """``step()`` in fused mode: at most one backward since the last step() updated; more is gradient
        accumulation done wrong (each micro-batch applied on its own)."""
        n = self.updating_backwards
        if n > 1:
            self.end_window()
            k = self.opt.accumulation_steps
            raise RuntimeError(
                f"{type(self.opt).__name__}(fused=True, accumulation_steps={k}): {n} backward() calls updated the "
                "weights since the last step() (each micro-batch was applied as its own step, not accumulated). "
                f"For gradient accumulation over K micro-batches pass accumulation_steps=K (the K-th backward "
                "updates with the summed gradient) and call step() after every K-th backward, or use fused=False; "
                "without accumulation call step() after every backward.")


# ------------------------------------------------------------------------------------------ backward tracking
class BackwardTracker:
    """Per-backward bookkeeping for fused hooks.

    A backward that raised never reaches its end callback: the next outer backward forgets it
    (``on_abandoned``) instead of waiting for it forever.

    Autograd graph-task ids grow monotonically and a nested (reentrant) backward gets a larger id than
    the backward that contains it. A parameter fired twice within one user backward if it fired

    * in the outer task and again in a nested task while that outer task still runs, or
    * in a nested task with an id above the outer task's id, and then in that outer task, or
    * in two nested tasks of the outer task that is running now.
    """

    def __init__(self, on_backward_end: Callable[[], None], on_abandoned: Callable[[], None] | None = None):
        self._on_end = on_backward_end
        self._on_abandoned = on_abandoned
        self._active: set[int] = set()
        self._outer_of: dict[int, int] = {}
        self._nested_of: dict[int, int] = {}

    def enter(self, p: Tensor) -> None:
        tid = _compat.current_graph_task_id()
        key = id(p)
        if tid in self._active:
            # the running outer backward, already registered (the common case: every hook after the first one
            # of a backward): it is not a nested task, so the stack walk of in_reentrant_backward is not needed
            prev_nested = self._nested_of.get(key)
            if self._outer_of.get(key) == tid or (prev_nested is not None and prev_nested > tid):
                self._double_firing(p)
            self._outer_of[key] = tid
            return
        if _compat.in_reentrant_backward():
            running = max(self._active) if self._active else None
            prev_outer, prev_nested = self._outer_of.get(key), self._nested_of.get(key)
            if (prev_outer is not None and prev_outer in self._active) or (
                    running is not None and prev_nested is not None and prev_nested > running):
                self._double_firing(p)
            self._nested_of[key] = tid
            return
        if tid == _SCALED_TASK[0]:
            self.reset()
            raise GradScalerError(
                "fused optimizer: this backward started from a loss scaled by torch's GradScaler. Fused mode "
                "consumes each gradient inside backward, where GradScaler cannot unscale it or skip the step, so "
                "the scaled gradients would be applied as they are; no weight was changed. Use "
                "loss_scaler=adalomo.DynamicLossScaler() and opt.scale_loss(loss).backward() (or "
                "opt.fused_backward(loss)) instead, or fused=False with GradScaler.")
        prev_nested = self._nested_of.get(key)
        if self._outer_of.get(key) == tid or (prev_nested is not None and prev_nested > tid):
            self._double_firing(p)
        self._outer_of[key] = tid
        if self._active:  # an outer backward that raised before its end: its callback will never run
            self._active.clear()
            if self._on_abandoned is not None:
                self._on_abandoned()
        self._active.add(tid)
        _compat.queue_backward_callback(lambda: self._end(tid))

    def _end(self, tid: int) -> None:
        self._active.discard(tid)
        if not self._active:
            self._on_end()

    def reset(self) -> None:
        self._active.clear()
        self._outer_of.clear()
        self._nested_of.clear()

    def _double_firing(self, p: Tensor) -> None:
        self.reset()
        raise DoubleFiringError(
            f"fused optimizer: the gradient hook of a parameter of shape {tuple(p.shape)} fired twice in one "
            "backward. This happens with reentrant activation checkpointing "
            "(torch.utils.checkpoint(..., use_reentrant=True)) when a weight is used both inside and outside "
            "the checkpointed region: each partial gradient would be applied as a separate update. Use "
            "checkpoint(..., use_reentrant=False) (for Hugging Face models: model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})), or fused=False.")


# ------------------------------------------------------------------------------------------ GradScaler guard
#: the graph task of the last backward that started at a tensor scaled by an enabled torch GradScaler
_SCALED_TASK = [-1]


def _flag_scaled_backward(grad: Tensor) -> None:
    # a hook on the scaled loss itself: it runs first in its backward, before any parameter's hook
    _SCALED_TASK[0] = _compat.current_graph_task_id()


def _mark_scaled(out: Any) -> None:
    if isinstance(out, Tensor):
        if out.requires_grad:
            out.register_hook(_flag_scaled_backward)
    elif isinstance(out, (list, tuple)):
        for o in out:
            _mark_scaled(o)


def _watch_grad_scaler() -> None:
    """Wrap ``torch.amp.GradScaler.scale`` (once per process) so that a backward from a scaled loss is known to
    the fused hooks before they update anything. The wrapper only adds a tensor hook; GradScaler is unchanged."""
    cls = getattr(torch.amp, "GradScaler", None)
    if cls is None or getattr(cls.scale, "_adalomo_watched", False):
        return
    orig = cls.scale

    @functools.wraps(orig)
    def scale(self, outputs):
        out = orig(self, outputs)
        if self.is_enabled():
            _mark_scaled(out)
        return out

    scale._adalomo_watched = True
    cls.scale = scale
