"""Exact gradient accumulation in fused mode (``accumulation_steps=K``) in a plain loop, for every optimizer.

The promise: the classic accumulation loop (K backwards, then ``step()``) gives the same weights in fused mode as in
classic mode, bit for bit, and the same as one step on the K-times larger batch up to fp32 rounding. The
Trainer's and accelerate's accumulation are in test_integrations.py, several processes in
test_trainer_distributed.py.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_contract import MIXED, NAMES, Bag, assert_same, make_opt, snapshot

from adalomo import AdaLomo

K = 4
ROOT = Path(__file__).resolve().parents[1]


def accumulate(name: str, fused: bool, *, k: int = K, windows: int = 3, dtype=torch.float32, big: bool = False,
               window_sizes=None, **overrides):
    """``windows`` optimizer steps of ``k`` micro-batches each (``window_sizes`` overrides per window); ``big``: one
    backward on the mean of the window's losses (the K-times larger batch) instead."""
    model = Bag(MIXED, dtype)
    opt = make_opt(name, model.parameters(), fused, accumulation_steps=k if fused else 1, **overrides)
    t = 0
    for n in window_sizes or [k] * windows:
        if big:
            (sum(model.loss(t + i) for i in range(n)) / n).backward()
        else:
            for i in range(n):
                (model.loss(t + i) / n).backward()
        t += n
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, opt


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_fused_accumulation_equals_classic_bit_for_bit(name, dtype):
    fused, opt = accumulate(name, True, dtype=dtype)
    classic, _ = accumulate(name, False, dtype=dtype)
    assert_same(fused.parameters(), classic.parameters())
    assert all(float(st["step"]) == 3 for st in opt.state.values())  # one optimizer step per window
    assert all(p.grad is None for p in fused.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_accumulation_equals_one_step_on_the_larger_batch(name):
    """K micro-batches of the mean loss give the gradient of the K-times larger batch up to fp32 rounding (the sum is
    formed in another order)."""
    big, _ = accumulate(name, False, big=True)
    for fused in (True, False):
        acc, _ = accumulate(name, fused)
        for a, b in zip(acc.parameters(), big.parameters()):
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("name", ["adalomo", "adapm"])
def test_a_short_window_is_applied_by_step(name):
    """``step()`` after fewer than K backwards (the last window of an epoch) applies the sum, as classic mode does."""
    fused, _ = accumulate(name, True, window_sizes=[4, 2, 3, 1])
    classic, _ = accumulate(name, False, window_sizes=[4, 2, 3, 1])
    assert_same(fused.parameters(), classic.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_clipping_clips_the_summed_gradient(name):
    """With ``clip_grad_norm`` the window accumulates entirely and ``step()`` clips its sum: classic mode's result."""
    fused, _ = accumulate(name, True, clip_grad_norm=0.5)
    classic, _ = accumulate(name, False, clip_grad_norm=0.5)
    assert_same(fused.parameters(), classic.parameters())
    unclipped, _ = accumulate(name, True)
    assert any(not torch.equal(a, b) for a, b in zip(fused.parameters(), unclipped.parameters()))


def test_the_hooks_leave_the_gradient_until_the_last_backward():
    """Backwards 1..K-1 change no weight and leave the summed gradient in p.grad; the K-th updates and frees it."""
    model = Bag(MIXED)
    opt = AdaLomo(model.parameters(), lr=2**-5, fused=True, accumulation_steps=K)
    before = snapshot(model)
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(K - 1):
        model.loss(t).backward()
        for e, g in zip(expected, torch.autograd.grad(model.loss(t), list(model.parameters()))):
            e += g
        assert_same(model.parameters(), before)
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.grad, e)
    model.loss(K - 1).backward()
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), before))
    opt.step()


def test_more_backwards_than_the_window_still_raise_at_step():
    """K+1 backwards with accumulation_steps=K: the (K+1)-th was a second update, and step() says so."""
    model = Bag(MIXED)
    opt = AdaLomo(model.parameters(), lr=2**-5, fused=True, accumulation_steps=2)
    for t in range(3):
        model.loss(t).backward()
    with pytest.raises(RuntimeError, match="accumulation_steps=K"):
        opt.step()
    model.loss(3).backward()  # the window starts again after the error
    model.loss(4).backward()
    opt.step()


def test_misuse_is_refused_with_a_message():
    model = Bag(MIXED)
    for bad in (0, 1.5, True, "4"):
        with pytest.raises(ValueError, match="accumulation_steps"):
            AdaLomo(model.parameters(), fused=True, accumulation_steps=bad)
    opt = AdaLomo(model.parameters(), lr=2**-5, fused=True, accumulation_steps=2, clip_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="step\\(\\) clips"):
        opt.grad_norm(model.loss(0))  # the norm to clip by is the window's sum
    with pytest.raises(RuntimeError, match="one optimizer step per call"):
        opt.fused_backward(model.loss(0))
    opt.accumulation_steps = 1  # settable: the next window plans again
    opt.grad_norm(model.loss(0))
    opt.fused_backward(model.loss(0))


def test_copies_keep_the_setting():
    model = Bag(MIXED)
    opt = AdaLomo(model.parameters(), lr=2**-5, fused=True, accumulation_steps=3)
    model2, opt2 = copy.deepcopy((model, opt))
    assert opt2.accumulation_steps == 3 and opt2.fused
    for m, o in ((model, opt), (model2, opt2)):
        for t in range(3):
            m.loss(t).backward()
        o.step()
    assert_same(model.parameters(), model2.parameters())


def test_classic_mode_ignores_the_setting():
    """Classic mode's step() already ends the window: the same loop gives the same result with or without it."""
    a, _ = accumulate("adalomo", False)
    model = Bag(MIXED)
    opt = make_opt("adalomo", model.parameters(), False, accumulation_steps=K)
    for t in range(3 * K):
        (model.loss(t) / K).backward()
        if (t + 1) % K == 0:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert_same(a.parameters(), model.parameters())


def test_peak_memory_of_accumulation():
    """benchmarks/accumulation_memory.py on a tiny model: fused with K holds one gradient set, as classic with K does
    (no second one), and no more than fused K=1 plus that set."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import accumulation_memory
    finally:
        sys.path.pop(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = {r["row"]: r for r in accumulation_memory.main(["--hidden", "64", "--layers", "2", "--vocab", "512",
                                                                 "--batch", "2", "--seq", "16", "--device", "cpu"])}
    fused1, fused_k, classic_k = rows["fused K=1"], rows[f"fused K={K}"], rows[f"classic K={K}"]
    grads = fused_k["param_mib"]  # one gradient set: the parameters' bytes (fp32)
    assert fused_k["grad_mib"] == pytest.approx(grads)
    assert fused_k["peak_mib"] <= classic_k["peak_mib"] + 1e-6
    assert fused_k["peak_mib"] <= fused1["peak_mib"] + grads + 1e-6
