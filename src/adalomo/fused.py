"""Fused backward: update each parameter the moment its gradient is accumulated, then free it.

One post-accumulate-grad hook per parameter (``Tensor.register_post_accumulate_grad_hook``) calls the
optimizer's per-tensor update and sets ``p.grad = None``, so no full set of gradients ever exists.
``BackwardTracker`` adds the two things a hook cannot see on its own: where one backward ends (to
run the optimizer's end-of-backward work once) and whether a hook fired twice within one backward,
which reentrant activation checkpointing causes and which would make a non-linear update wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

__all__ = ["BackwardTracker", "DoubleFiringError", "in_reentrant_backward"]


class DoubleFiringError(RuntimeError):
    pass


def _reentrant_codes() -> tuple:
    codes = []
    try:
        from torch.utils.checkpoint import CheckpointFunction

        codes.append(CheckpointFunction.backward.__code__)
    except (ImportError, AttributeError):  # pragma: no cover - very old or very new torch
        pass
    return tuple(codes)


_REENTRANT_CODES = _reentrant_codes()


def in_reentrant_backward() -> bool:
    """True inside the nested backward that reentrant checkpointing runs (``use_reentrant=True``)."""
    f = sys._getframe(1)
    while f is not None:
        if f.f_code in _REENTRANT_CODES:
            return True
        f = f.f_back
    return False


def _graph_task_id() -> int:
    return int(torch._C._current_graph_task_id())


_current_graph_task_id = torch._C._current_graph_task_id  # an int already; bound once (once per hook)


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

    def enter(self, p: torch.Tensor) -> None:
        tid = _current_graph_task_id()
        key = id(p)
        if tid in self._active:
            # the running outer backward, already registered (the common case: every hook after the first one
            # of a backward): it is not a nested task, so the stack walk of in_reentrant_backward is not needed
            prev_nested = self._nested_of.get(key)
            if self._outer_of.get(key) == tid or (prev_nested is not None and prev_nested > tid):
                self._double_firing(p)
            self._outer_of[key] = tid
            return
        if in_reentrant_backward():
            running = max(self._active) if self._active else None
            prev_outer, prev_nested = self._outer_of.get(key), self._nested_of.get(key)
            if (prev_outer is not None and prev_outer in self._active) or (
                    running is not None and prev_nested is not None and prev_nested > running):
                self._double_firing(p)
            self._nested_of[key] = tid
            return
        prev_nested = self._nested_of.get(key)
        if self._outer_of.get(key) == tid or (prev_nested is not None and prev_nested > tid):
            self._double_firing(p)
        self._outer_of[key] = tid
        if tid not in self._active:
            if self._active:  # an outer backward that raised before its end: its callback will never run
                self._active.clear()
                if self._on_abandoned is not None:
                    self._on_abandoned()
            self._active.add(tid)
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end(tid))

    def _end(self, tid: int) -> None:
        self._active.discard(tid)
        if not self._active:
            self._on_end()

    def reset(self) -> None:
        self._active.clear()
        self._outer_of.clear()
        self._nested_of.clear()

    def _double_firing(self, p: torch.Tensor) -> None:
        self.reset()
        raise DoubleFiringError(
            f"fused optimizer: the gradient hook of a parameter of shape {tuple(p.shape)} fired twice in one "
            "backward. This happens with reentrant activation checkpointing "
            "(torch.utils.checkpoint(..., use_reentrant=True)) when a weight is used both inside and outside "
            "the checkpointed region: each partial gradient would be applied as a separate update. Use "
            "checkpoint(..., use_reentrant=False) (for Hugging Face models: model.gradient_checkpointing_enable("
            "gradient_checkpointing_kwargs={'use_reentrant': False})), or fused=False.")
