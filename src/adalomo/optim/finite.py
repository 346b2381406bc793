"""What a step did with non-finite gradients: the device-side finite flags of its updates, reported without
making the step wait for the device.

Every update returns a 0-d bool "the gradient was finite" (a tensor whose gradient was not is left unchanged).
At the end of a step (classic) or of a backward (fused) the flags are ANDed on the device; then, by the
optimizer's ``nonfinite`` mode: ``"warn"`` copies the flag to pinned host memory and warns once it has arrived (a
step or so later; at the latest in ``state_dict()``), ``"raise"`` waits and raises, ``"count"`` only counts. A
``DynamicLossScaler`` takes the flag instead (it backs off and skips).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["FiniteReport", "all_finite"]

NONFINITE_MODES = ("warn", "raise", "count")


class FiniteReport:
    """The finite flags of one optimizer's steps: counted in ``skipped_updates``, warned, raised or scaled (by the
    optimizer's ``nonfinite`` and ``loss_scaler``, read at each step)."""

    def __init__(self, opt: Any):
        self.opt = opt
        self.skipped_updates: Tensor | None = None
        self._in_flight: list[tuple[Tensor, Any]] = []  # "warn" mode: (host flag, CUDA event or None)

    def account(self, ok_all: Tensor) -> None:
        """One step's AND of the finite flags (a 0-d bool device tensor)."""
        bad = (~ok_all).to(torch.int64)
        self.skipped_updates = bad if self.skipped_updates is None else self.skipped_updates + bad.to(
            self.skipped_updates.device)
        scaler, mode = self.opt.loss_scaler, self.opt.nonfinite
        if scaler is not None:
            scaler.record(ok_all.to(scaler.found_inf.device))
            scaler.update()
            return
        if mode == "count":
            return
        if mode == "raise":
            if not bool(ok_all):
                raise FloatingPointError(self.message())
            return
        self._in_flight.append(_host_copy(ok_all))  # "warn": read when it has arrived, never wait
        self.warn_arrived(block=False)

    def warn_arrived(self, block: bool) -> None:
        """Warn for each finished step whose finite flag was False; ``block`` waits for the ones in flight."""
        for flag in _arrived(self._in_flight, block):
            if not bool(flag):
                warnings.warn(self.message(), RuntimeWarning, stacklevel=4)

    def message(self) -> str:
        return (f"{type(self.opt).__name__}: a gradient contained NaN or inf; the tensors concerned were left "
                "unchanged that step (weights stay finite). Lower the learning rate, check the loss, or use "
                "bf16/fp32 (fp16 needs loss_scaler=adalomo.DynamicLossScaler()).")


def all_finite(oks: list[Tensor]) -> Tensor:
    """``all`` over the finite flags of a step (0-d bool tensors; on several devices under model parallelism)."""
    if len(oks) == 1:
        return oks[0]
    dev = oks[0].device
    if all(o.device == dev for o in oks):
        return torch.stack(oks).all()
    return torch.stack([o.to(dev) for o in oks]).all()


def _arrived(flights: list[tuple[Tensor, Any]], block: bool):
    """The host flags of ``_host_copy`` that have arrived, oldest first, each taken off ``flights`` (``block``: all
    of them, waiting; more than 64 in flight: the oldest anyway)."""
    while flights and (block or len(flights) > 64 or flights[0][1] is None or flights[0][1].query()):
        flag, event = flights.pop(0)
        if event is not None:
            event.synchronize()
        yield flag


def _host_copy(flag: Tensor) -> tuple[Tensor, Any]:
    """A host copy of a 0-d device flag without waiting for it: (pinned tensor, CUDA event), or (flag, None)."""
    if flag.device.type != "cuda":
        return flag.cpu(), None
    host = torch.empty((), dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event
