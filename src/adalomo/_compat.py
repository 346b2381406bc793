"""Every private torch API that adalomo relies on, in one place, each checked once with a fallback or a clear
error. Anything private that changes between torch releases breaks here first (tests/test_compat.py).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["current_graph_task_id", "queue_backward_callback", "in_reentrant_backward"]

# ------------------------------------------------------------------------------------------ torch autograd
#: the id of the autograd graph task running now (grows monotonically; a nested backward gets a larger one).
#: Fused hooks use it to tell where one user backward ends and whether a hook fired twice within it.
current_graph_task_id = torch._C._current_graph_task_id


def queue_backward_callback(fn) -> None:
    """Run ``fn()`` once the running backward has finished (inside it, after the last hook)."""
    torch.autograd.Variable._execution_engine.queue_callback(fn)


def _reentrant_codes() -> tuple:
    codes = []
    try:
        from torch.utils.checkpoint import CheckpointFunction

        codes.append(CheckpointFunction.backward.__code__)
    except (ImportError, AttributeError):  # pragma: no cover - a torch without reentrant checkpointing
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
