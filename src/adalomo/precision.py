"""Mixed precision pieces: bf16 stochastic rounding and a device-side dynamic loss scaler.

Both avoid host synchronisation so that a fused-backward step never waits on the GPU.
"""

from __future__ import annotations

import math

import torch

__all__ = ["stochastic_round_to_bf16", "write_back_", "DynamicLossScaler", "sr_generator"]

_LOW16 = -65536  # 0xFFFF0000 as int32: keeps sign, exponent and the 7 bf16 mantissa bits


def stochastic_round_to_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round fp32 ``x`` to bf16 up or down with probability given by the dropped bits (unbiased).

    Adds 16 random bits below the bf16 mantissa, then truncates: a value at fraction f between two
    bf16 neighbours rounds up with probability f, so E[round(x)] = x. inf stays inf and NaN stays NaN.
    """
    return _rounded_bits(x, generator).to(torch.bfloat16)  # exact: the low 16 bits are zero


def _rounded_bits(x: torch.Tensor, generator: torch.Generator | None, scratch: bool = False) -> torch.Tensor:
    """``stochastic_round_to_bf16(x)`` still in fp32 (its low 16 bits zero). ``scratch``: ``x`` may be overwritten
    (an fp32 ``x`` is then rounded in place on CPU, without an int32 temporary)."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        x, scratch = x.float().contiguous(), True
    if generator is not None and not isinstance(generator, torch.Generator):  # a kernels.Seed: same seed, torch bits
        generator = sr_generator(x.device, generator.initial_seed())
    # NaN payloads may lose their mantissa bits to the noise and the mask: keep NaN as NaN. On CPU a sum (a NaN in x
    # makes it NaN) read on the host skips the select, ten times its cost, when there is none.
    keep_nan = x.device.type != "cpu" or bool(x.sum().isnan())
    bits = x.view(torch.int32)
    noise = _random_16_bits(x.shape, x.device, generator)
    out = bits.add_(noise) if scratch and not keep_nan else torch.add(bits, noise)
    del noise  # the generator's words
    out = out.add_(1 << 15).bitwise_and_(_LOW16).view(torch.float32)  # noise + 2^15: uniform in [0, 2^16)
    if keep_nan:
        out = torch.where(torch.isnan(x), x, out, out=out)
    return out


def _random_16_bits(shape: torch.Size, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform int16 values (in [-2^15, 2^15)): four per 64-bit draw of the generator (drawing each value on its
    own costs three times as much on CPU)."""
    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2**63, None, generator=generator)
    return words.view(torch.int16)[:n].view(shape)


def sr_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator seeded from (optimizer seed, parameter, step): resumed runs draw the same bits."""
    g = torch.Generator(device=device)
    g.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
    return g


def write_back_(dst: torch.Tensor, value: torch.Tensor, stochastic_rounding: bool,
                generator: torch.Generator | None = None, scratch: bool = False) -> None:
    """Store the fp32 ``value`` into ``dst`` (any float dtype); bf16 may round stochastically. ``scratch``:
    ``value`` is a temporary that the rounding may overwrite."""
    if dst.dtype == torch.bfloat16 and stochastic_rounding:
        dst.copy_(_rounded_bits(value, generator, scratch))  # exact: the low 16 bits are zero
    else:
        dst.copy_(value)


class DynamicLossScaler:
    """Loss scaling for fp16 in fused mode, kept on the device.

    The optimizer multiplies each gradient by ``1/scale`` inside its hook and ORs a non-finite flag
    into ``found_inf``; ``update()`` (called by the optimizer after each backward) halves the scale on
    overflow and doubles it after ``growth_interval`` clean steps, with tensor ops only.
    """

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 1.0, device: str | torch.device = "cpu"):
        if init_scale <= 0 or growth_factor <= 1 or not 0 < backoff_factor < 1 or growth_interval < 1:
            raise ValueError("DynamicLossScaler: need init_scale > 0, growth_factor > 1, "
                             "0 < backoff_factor < 1 and growth_interval >= 1")
        self.growth_factor = float(growth_factor)
        self.backoff_factor = float(backoff_factor)
        self.growth_interval = int(growth_interval)
        self.min_scale = float(min_scale)
        self._scale = torch.tensor(float(init_scale), dtype=torch.float32, device=device)
        self._growth_tracker = torch.tensor(0, dtype=torch.int32, device=device)
        self.found_inf = torch.zeros((), dtype=torch.bool, device=device)

    def to(self, device) -> DynamicLossScaler:
        self._scale = self._scale.to(device)
        self._growth_tracker = self._growth_tracker.to(device)
        self.found_inf = self.found_inf.to(device)
        return self

    @property
    def scale(self) -> torch.Tensor:
        return self._scale

    def inv_scale(self) -> torch.Tensor:
        return self._scale.reciprocal()

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        if self._scale.device != loss.device:
            self.to(loss.device)
        return loss * self._scale.to(loss.dtype)

    def record(self, finite: torch.Tensor) -> None:
        self.found_inf |= ~finite

    def update(self) -> None:
        """Back off on overflow, grow after a run of clean steps; resets ``found_inf``."""
        inf = self.found_inf
        grown = self._growth_tracker + 1
        grow = grown >= self.growth_interval
        new_scale = torch.where(inf, (self._scale * self.backoff_factor).clamp_min(self.min_scale),
                                torch.where(grow, self._scale * self.growth_factor, self._scale))
        self._scale.copy_(new_scale)
        self._growth_tracker.copy_(torch.where(inf | grow, torch.zeros_like(grown), grown))
        self.found_inf.zero_()

    def state_dict(self) -> dict:
        return {"scale": self._scale.clone(), "growth_tracker": self._growth_tracker.clone(),
                "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "min_scale": self.min_scale}

    def load_state_dict(self, sd: dict) -> None:
        self._scale.copy_(sd["scale"])
        self._growth_tracker.copy_(sd["growth_tracker"])
        self.growth_factor = sd["growth_factor"]
        self.backoff_factor = sd["backoff_factor"]
        self.growth_interval = sd["growth_interval"]
        self.min_scale = sd["min_scale"]
