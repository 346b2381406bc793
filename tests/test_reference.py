"""Each optimizer against the float64 reference, step by step, on random shapes and param groups."""

from __future__ import annotations

import pytest
import torch
from reference import RefFactored, ref_lomo

from adalomo import Adafactor, AdaLomo, Lomo

SHAPES = [(), (7,), (1,), (5, 3), (8, 8), (1, 9), (9, 1), (3, 4, 5), (4, 3, 3, 3), (13, 17)]
STEPS = 24


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g) * 0.5) for s in SHAPES]


def _grads(params, step, seed=1):
    g = torch.Generator().manual_seed(seed * 1000 + step)
    # different scales per tensor and step, some small entries: exercises eps and clipping
    return [torch.randn(p.shape, generator=g) * (0.1 + i * 0.3) * (1 + step % 3) for i, p in enumerate(params)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def _run(opt, params, refs, step_ref, steps=STEPS):
    for t in range(steps):
        gs = _grads(params, t)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        opt.zero_grad()
        for r, g in zip(refs, gs):
            step_ref(r, g)
        for p, r in zip(params, refs):
            assert torch.isfinite(p).all()
            assert _rel(p.detach(), r.p) < 2e-5, (p.shape, t)


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_adalomo_matches_reference(wd):
    params = _params()
    a, b = params[: len(params) // 2], params[len(params) // 2:]
    opt = AdaLomo([{"params": a}, {"params": b, "lr": 3e-2, "clip_threshold": 0.5}], lr=1e-2, weight_decay=wd)
    refs = [RefFactored(p, weight_decay=wd) for p in a] + [RefFactored(p, weight_decay=wd, clip_threshold=0.5)
                                                          for p in b]
    for r, lr in zip(refs, [1e-2] * len(a) + [3e-2] * len(b)):
        r.lr = lr
    step_ref = lambda r, g: r.adalomo_step(g, r.lr)
    _run(opt, params, refs, step_ref)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(beta1=0.9, weight_decay=0.05),
    dict(warmup_init=True),
    dict(lr=1e-2, relative_step=False, scale_parameter=False, beta1=0.8),
    dict(lr=5e-3, relative_step=False, clip_threshold=0.7),
])
def test_adafactor_matches_reference(kw):
    params = _params(3)
    opt = Adafactor(params, **kw)
    beta1 = kw.get("beta1")
    refs = [RefFactored(p, weight_decay=kw.get("weight_decay", 0.0), beta1=beta1,
                        clip_threshold=kw.get("clip_threshold", 1.0)) for p in params]
    step_kw = {k: kw[k] for k in ("lr", "relative_step", "warmup_init", "scale_parameter") if k in kw}
    _run(opt, params, refs, lambda r, g: r.adafactor_step(g, **step_kw))


@pytest.mark.parametrize("kw", [dict(lr=1e-2), dict(lr=2e-2, weight_decay=0.1, clip_grad_value=0.3)])
def test_lomo_matches_reference(kw):
    params = _params(5)
    opt = Lomo(params, **kw)
    ref = [p.detach().double().clone() for p in params]
    for t in range(STEPS):
        gs = _grads(params, t)
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        ref = [ref_lomo(r, g, kw["lr"], kw.get("weight_decay", 0.0), kw.get("clip_grad_value")) for r, g in
               zip(ref, gs)]
        for p, r in zip(params, ref):
            assert _rel(p.detach(), r) < 1e-6


def test_adafactor_matches_transformers_without_momentum():
    tf = pytest.importorskip("transformers.optimization")
    for kw in (dict(), dict(lr=1e-2, relative_step=False, scale_parameter=False, weight_decay=0.01)):
        ours, theirs = _params(7), _params(7)
        o1, o2 = Adafactor(ours, **kw), tf.Adafactor(theirs, **kw)
        for t in range(10):
            for p1, p2, g in zip(ours, theirs, _grads(ours, t)):
                p1.grad, p2.grad = g.clone(), g.clone()
            o1.step()
            o2.step()
        for p1, p2 in zip(ours, theirs):
            torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-7)


def test_bf16_params_follow_fp32_update():
    """bf16 weights: fp32 maths, one rounding at write-back (nearest when SR is off)."""
    p32 = _params(9)
    p16 = [torch.nn.Parameter(p.detach().bfloat16()) for p in p32]
    ref = [torch.nn.Parameter(p.detach().float()) for p in p16]
    o16 = AdaLomo(p16, lr=1e-2, stochastic_rounding=False)
    oref = AdaLomo(ref, lr=1e-2)
    gs = _grads(p16, 0)
    for a, b, g in zip(p16, ref, gs):
        a.grad, b.grad = g.bfloat16(), g.bfloat16().float()
    o16.step()
    oref.step()
    for a, b in zip(p16, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.detach().bfloat16().float(), rtol=0, atol=0)
        assert o16.state[a]["exp_avg_sq" if a.dim() < 2 else "exp_avg_sq_row"].dtype == torch.float32


@pytest.mark.parametrize("make", [lambda ps: AdaLomo(ps, lr=2e-2, weight_decay=0.1),
                                  lambda ps: Adafactor(ps, beta1=0.9, weight_decay=0.05)])
def test_row_blocks_match_reference(monkeypatch, make):
    """Matrices larger than a row block (sum(u^2) from g^2 recomputed per block, the update block by block)
    follow the float64 reference like whole ones."""
    from adalomo import functional as F

    monkeypatch.setattr(F, "BLOCK_NUMEL", 40)  # (13, 17): 6 blocks of 2 rows and one of 1; (9, 1) stays whole
    params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)) * 0.5)
              for i, s in enumerate([(13, 17), (9, 1), (7,)])]
    opt = make(params)
    beta1 = opt.param_groups[0].get("beta1")
    wd = opt.param_groups[0]["weight_decay"]
    refs = [RefFactored(p, weight_decay=wd, beta1=beta1) for p in params]
    step_ref = (lambda r, g: r.adalomo_step(g, 2e-2)) if beta1 is None else (lambda r, g: r.adafactor_step(g))
    _run(opt, params, refs, step_ref, steps=8)
