"""Independent float64 references of the algorithms, written from the papers/specification only."""

from __future__ import annotations

import math

import torch


def _rms(x: torch.Tensor) -> float:
    return math.sqrt(float((x * x).mean())) if x.numel() else 0.0


class RefFactored:
    """AdaLomo / Adafactor in float64, one tensor."""

    def __init__(self, p: torch.Tensor, *, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8,
                 weight_decay=0.0, beta1=None):
        self.p = p.detach().double().clone()
        self.eps, self.d, self.decay, self.wd, self.beta1 = eps, clip_threshold, decay_rate, weight_decay, beta1
        self.t = 0
        if self.p.dim() >= 2:
            self.row = torch.zeros(self.p.shape[:-1], dtype=torch.float64)
            self.col = torch.zeros(self.p.shape[:-2] + self.p.shape[-1:], dtype=torch.float64)
        else:
            self.v = torch.zeros(self.p.shape, dtype=torch.float64)
        self.m = torch.zeros_like(self.p) if beta1 is not None else None

    def _u(self, g: torch.Tensor) -> torch.Tensor:
        self.t += 1
        beta2 = 1.0 - self.t ** self.decay
        sq = g * g + self.eps[0]
        if self.p.dim() >= 2:
            self.row = beta2 * self.row + (1 - beta2) * sq.mean(-1)
            self.col = beta2 * self.col + (1 - beta2) * sq.mean(-2)
            v_hat = (self.row / self.row.mean(-1, keepdim=True)).unsqueeze(-1) * self.col.unsqueeze(-2)
        else:
            self.v = beta2 * self.v + (1 - beta2) * sq
            v_hat = self.v
        u = g / v_hat.sqrt()
        return u / max(1.0, _rms(u) / self.d)

    def adalomo_step(self, g: torch.Tensor, lr: float) -> None:
        g = g.double()
        u = self._u(g)
        lr_t = lr * max(self.eps[1], _rms(self.p))
        self.p = self.p * (1 - lr_t * self.wd) - lr_t * u

    def adafactor_step(self, g: torch.Tensor, *, lr=None, relative_step=True, warmup_init=False,
                       scale_parameter=True) -> None:
        g = g.double()
        u = self._u(g)
        t = self.t
        if relative_step:
            rho = min(1e-6 * t if warmup_init else (lr if lr is not None else 1e-2), 1 / math.sqrt(t))
        else:
            rho = lr
        alpha = rho * max(self.eps[1], _rms(self.p)) if scale_parameter else rho
        if self.beta1 is not None:
            self.m = self.beta1 * self.m + (1 - self.beta1) * u
            u = self.m
        self.p = self.p * (1 - self.wd * alpha) - alpha * u


def ref_lomo(p: torch.Tensor, g: torch.Tensor, lr: float, wd: float = 0.0, clip_value=None) -> torch.Tensor:
    p, g = p.double(), g.double()
    if clip_value is not None:
        g = g.clamp(-clip_value, clip_value)
    return p * (1 - lr * wd) - lr * g
