"""Targeted value checks for settings whose mistakes the rest of the suite did not notice: clip_grad_norm with a norm
below the threshold, AdaLomo's clip_grad_value combined with another gradient scale, the group lr as the cap of
Adafactor's relative step, and eps1 with all-zero gradient rows and columns. Each is compared with a float64 value
computed independently (tests/reference.py, or by hand here)."""

from __future__ import annotations

import pytest
import torch
from reference import RefFactored
from test_contract import MODES, Bag, assert_same, snapshot
from torch import nn

from adalomo import Adafactor, AdaLomo, DynamicLossScaler, Lomo

LR = 2**-5
SHAPES = [(4, 6), (5,), (), (2, 3, 5)]


def step(opt, loss) -> None:
    """One step of the documented loop: fused mode with clip_grad_norm takes the norm in a first pass."""
    if opt.fused and opt.clip_grad_norm is not None:
        opt.grad_norm(loss)
    opt.scale_loss(loss).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


# ------------------------------------------------------------------ clip_grad_norm below the threshold
@MODES
@pytest.mark.parametrize("cls, kw", [(Lomo, {}), (AdaLomo, dict(eps=(1e-3, 1e-3)))], ids=["lomo", "adalomo"])
def test_clip_grad_norm_never_scales_small_gradients_up(cls, kw, fused):
    """The clip coefficient is min(1, max_norm / norm): a global norm below max_norm leaves the update as it is
    without clipping. (eps1 = 1e-3 above g^2 makes AdaLomo's update grow with the gradient's scale.)"""
    runs = {}
    for max_norm in (None, 1.0, 0.01):
        model = Bag(SHAPES)
        opt = cls(model.parameters(), lr=LR, fused=fused, clip_grad_norm=max_norm, **kw)
        for t in range(3):
            step(opt, 1e-2 * model.loss(t))  # global gradient norm about 0.1
        runs[max_norm] = snapshot(model)
    for a, b in zip(runs[1.0], runs[None]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0.01], runs[None]))  # the clipping itself acts


# ------------------------------------------------------------------ AdaLomo clip_grad_value with another scale
class Linear2(nn.Module):
    """Two tensors and a loss linear in them, so the gradients are the data, exactly (times a power-of-two scale)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, 6, generator=g))
        self.b = nn.Parameter(torch.randn(5, generator=g))

    def grads(self, t: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(100 + t)
        return [torch.randn(p.shape, generator=g) for p in self.parameters()]

    def loss(self, t: int) -> torch.Tensor:
        return sum((p * x).sum() for p, x in zip(self.parameters(), self.grads(t)))


SCALES = {  # case -> optimizer keywords (a fresh loss scaler each time)
    "clip_grad_norm": lambda: dict(clip_grad_norm=0.5),
    "loss_scaler": lambda: dict(loss_scaler=DynamicLossScaler(init_scale=2.0**10)),
    "both": lambda: dict(clip_grad_norm=0.5, loss_scaler=DynamicLossScaler(init_scale=2.0**10)),
}


@MODES
@pytest.mark.parametrize("case", SCALES)
def test_adalomo_clip_grad_value_applies_the_other_scale_once(case, fused):
    """g' = clamp(g * coef, -c, c), then the AdaLomo update: the norm-clip coefficient and the loss scale's inverse
    are applied exactly once, before the value clip (a float64 reference computed here). eps1 = 1e-3, about g'^2,
    makes the update depend on the gradient's scale, which a loss scale applied twice would change."""
    model, clip_value, eps = Linear2(), 0.1, (1e-3, 1e-3)
    kw = SCALES[case]()
    opt = AdaLomo(model.parameters(), lr=LR, eps=eps, clip_grad_value=clip_value, fused=fused, **kw)
    refs = [RefFactored(p, eps=eps) for p in model.parameters()]
    for t in range(3):
        gs = [g.double() for g in model.grads(t)]
        norm = float(torch.sqrt(sum((g * g).sum() for g in gs)))
        coef = min(1.0, kw["clip_grad_norm"] / (norm + 1e-6)) if "clip_grad_norm" in kw else 1.0
        assert coef < 0.5 or "clip_grad_norm" not in kw  # the norm clip binds: applying it twice would show
        for ref, g in zip(refs, gs):
            ref.adalomo_step((g * coef).clamp(-clip_value, clip_value), LR)
        step(opt, model.loss(t))
        for p, ref in zip(model.parameters(), refs):
            torch.testing.assert_close(p.detach().double(), ref.p, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ Adafactor's relative step
def _delta(before, model):
    return [p.detach().double() - b for b, p in zip(before, model.parameters())]


@MODES
def test_adafactor_relative_step_is_capped_by_the_group_lr(fused):
    """relative_step=True: rho_t = min(group lr, 1/sqrt(t)). A group lr of 1e-4 (below 1/sqrt(t)) sets the step, as
    an LR scheduler would."""
    model = Bag([(4, 6), (5,)])
    opt = Adafactor(model.parameters(), fused=fused)
    opt.param_groups[0]["lr"] = 1e-4
    refs = [RefFactored(p) for p in model.parameters()]
    for t in range(3):
        gs = torch.autograd.grad(model.loss(t), list(model.parameters()))
        for ref, g in zip(refs, gs):
            ref.adafactor_step(g, lr=1e-4, relative_step=True)
        before = [p.detach().double() for p in model.parameters()]
        step(opt, model.loss(t))
        # the update (about 1e-4 of the weight) against the reference's, not the weights, which hide it
        for d, ref, b in zip(_delta(before, model), refs, before):
            torch.testing.assert_close(d, ref.p - b, rtol=2e-3, atol=5e-7)
            ref.p = b + d  # continue from the optimizer's own weights


@MODES
def test_adafactor_warmup_init_ignores_the_group_lr(fused):
    """With warmup_init=True rho_t = min(1e-6 t, 1/sqrt(t)), whatever the group lr says (as documented)."""
    runs = []
    for lr in (None, 1e-7, 1.0):  # below and above 1e-6 t
        model = Bag([(4, 6), (5,)])
        opt = Adafactor(model.parameters(), warmup_init=True, fused=fused)
        if lr is not None:
            opt.param_groups[0]["lr"] = lr
        before = snapshot(model)
        for t in range(2):
            step(opt, model.loss(t))
        assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
        runs.append(snapshot(model))
    assert_same(runs[1], runs[0])
    assert_same(runs[2], runs[0])


# ------------------------------------------------------------------ eps1 and all-zero rows and columns
@MODES
@pytest.mark.parametrize("eps1", [1e-30, 1e-3])
@pytest.mark.parametrize("shape", [(5, 7), (2, 4, 6)], ids=["2d", "3d"])
@pytest.mark.parametrize("name", ["adalomo", "adafactor"])
def test_eps1_with_zero_gradient_rows_and_columns_matches_the_reference(name, shape, eps1, fused):
    """Gradients with an all-zero row and an all-zero column in every matrix: the second moment is the EMA of
    g^2 + eps1, so those rows and columns keep a statistic of eps1 (not 0, which would give 0/0). The gradients are
    small (g^2 about eps1 = 1e-3), so that dropping or misplacing eps1 changes the update."""
    g = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.randn(shape, generator=g))
    eps = (eps1, 1e-3)
    opt = AdaLomo([p], lr=LR, eps=eps, fused=fused) if name == "adalomo" else Adafactor([p], eps=eps, fused=fused)
    ref = RefFactored(p, eps=eps)
    for _ in range(3):
        x = torch.randn(shape, generator=g) * 0.03
        x[..., 1, :] = 0
        x[..., :, 2] = 0
        if name == "adalomo":
            ref.adalomo_step(x, LR)
        else:
            ref.adafactor_step(x)
        step(opt, (p * x).sum())
        assert torch.isfinite(p).all()
        torch.testing.assert_close(p.detach().double(), ref.p, rtol=1e-5, atol=1e-6)
