"""Fast paths for the per-tensor updates (Triton on CUDA); the torch code in ``functional`` is the fallback.

``use_triton(*tensors)`` decides per call; the pure-torch path stays the reference on CPU.
"""

from __future__ import annotations

import torch

__all__ = ["use_triton"]


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel should run this update (not yet available: always False)."""
    return False
