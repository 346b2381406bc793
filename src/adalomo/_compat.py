"""Every private torch and Triton API that adalomo uses, each behind a version check with a fallback.

A new torch or Triton release that breaks one of these breaks it here, in one place; the fallbacks are the
public (slower) way to do the same thing. ``import adalomo`` never imports Triton: its section imports it inside
the functions.
"""

from __future__ import annotations

import sys
import warnings

import torch

__all__ = ["bump_versions", "raw_stream", "local_tensor", "current_graph_task_id",
           "queue_backward_callback", "in_reentrant_backward", "direct_launch_supported", "direct_launch_ok",
           "launch_compiled"]


# ------------------------------------------------------------------------------------------------ torch
def _increment_version_takes_lists() -> bool:
    """``torch.autograd.graph.increment_version`` takes a list of tensors (torch >= 2.5): one call per bucket."""
    try:
        t = torch.zeros(1)
        v = t._version
        torch.autograd.graph.increment_version([t, t])
        return t._version == v + 2
    except Exception:  # older torch: one tensor per call
        return False


if _increment_version_takes_lists():
    def bump_versions(ts: list[torch.Tensor]) -> None:
        """Bump the version counters of tensors modified in place behind autograd's back (kernels, writes
        through a NumPy view), so that a saved tensor that was modified is detected."""
        torch.autograd.graph.increment_version(ts)
else:  # pragma: no cover - old torch
    def bump_versions(ts: list[torch.Tensor]) -> None:
        for t in ts:
            torch.autograd.graph.increment_version(t)


if hasattr(torch._C, "_cuda_getCurrentRawStream"):
    #: the current CUDA stream of a device as the raw handle a kernel launch takes, without a Stream object
    raw_stream = torch._C._cuda_getCurrentRawStream
else:  # pragma: no cover - a torch without it: the public way (a Stream object per call)
    def raw_stream(device: int) -> int:
        return torch.cuda.current_stream(device).cuda_stream


def local_tensor(t):
    """The local tensor of a DTensor, read from its ``_local_tensor`` (``to_local()`` costs a dispatch per call);
    a plain tensor is returned as it is."""
    loc = getattr(t, "_local_tensor", None)
    if loc is None:
        return t.to_local() if hasattr(t, "to_local") else t
    return loc


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


# ----------------------------------------------------------------------------------------------- Triton
# After the first launch of a kernel variant (Triton compiles it then), adalomo calls the compiled kernel directly
# through ``CompiledKernel.run`` instead of ``JITFunction.run``, whose Python costs several microseconds per launch
# (fused mode launches inside backward, which is host-bound). The call passes what ``JITFunction.run`` passes in
# Triton 3.4 to 3.9; anything else falls back to Triton's own launch path, with a warning.
_MIN_DIRECT = (3, 4)


def direct_launch_supported() -> bool:
    """A Triton whose compiled kernels take the direct call (3.4+: ``triton.knobs`` holds the launch hooks)."""
    try:
        import triton
        from triton import knobs  # noqa: F401

        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except Exception:
        return False
    return (major, minor) >= _MIN_DIRECT


def direct_launch_ok(k, n_args: int, n_ptr: int) -> bool:
    """The compiled kernel ``k`` takes all ``n_args`` declared parameters in order, the ``n_ptr`` pointers first,
    and no launch hook is installed (the direct call runs none): then ``launch_compiled`` may call it."""
    try:
        from triton import knobs
        for h in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook):
            if h is not None and getattr(h, "calls", True):  # an empty HookChain is the default, not a hook
                return False
        names = list(k.src.fn.arg_names)
        sig = k.src.signature
        ptrs = [n for n in names if str(sig.get(n, "")).startswith("*")]
        return len(names) == n_args and ptrs == names[:n_ptr] and callable(k.run)
    except Exception:
        return False


def launch_compiled(k, grid: int, stream: int, args: tuple) -> None:
    """Launch the compiled kernel ``k`` on a 1-D grid: what ``JITFunction.run`` does after its checks."""
    k.run(grid, 1, 1, stream, k.function, k.packed_metadata, None, None, None, *args)


def warn_direct_launch_failed(e: BaseException) -> None:
    warnings.warn(f"adalomo.kernels: calling a compiled kernel directly failed ({e!r}); every launch now goes "
                  "through Triton's own launch path, which costs more host time per launch (fused mode runs them "
                  "inside backward)", RuntimeWarning, stacklevel=3)
