"""The plain training loop's traps for a user coming from AdamW or lomo-optim: each is refused with a message that
says what to do, or documented, instead of training wrong without a word."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import pytest
import torch
from test_contract import MIXED, NAMES, Bag, assert_same, assert_same_tree, make_opt, run, snapshot, train

from adalomo import AdaLomo

README = Path(__file__).resolve().parent.parent / "README.md"


# ------------------------------------------------------------------ gradient accumulation in fused mode
@pytest.mark.parametrize("backwards", [2, 4])
@pytest.mark.parametrize("name", NAMES)
def test_fused_gradient_accumulation_is_refused_at_step(name, backwards):
    """Several backwards before one step() applied each micro-batch as its own update: step() says so and points to
    the accumulation API."""
    model = Bag(MIXED)
    opt = make_opt(name, model.parameters(), fused=True)
    for t in range(backwards):
        model.loss(t).backward()
    with pytest.raises(RuntimeError) as err:
        opt.step()
    msg = str(err.value)
    assert "accumulation_steps=K" in msg and "fused=False" in msg, msg


@pytest.mark.parametrize("name", NAMES)
def test_fused_one_backward_per_step_is_fine(name):
    model = Bag(MIXED)
    opt = make_opt(name, model.parameters(), fused=True)
    train(model, opt, 3)


@pytest.mark.parametrize("name", NAMES)
def test_grad_norm_pass_is_not_an_updating_backward(name):
    """Two-pass clipping: ``opt.grad_norm(loss)`` then ``loss.backward()`` is one step, not accumulation."""
    model = Bag(MIXED)
    opt = make_opt(name, model.parameters(), fused=True, clip_grad_norm=1.0)
    for t in range(3):
        loss = model.loss(t)
        opt.grad_norm(loss)
        loss.backward()
        opt.step()
    assert all(float(st["step"]) == 3 for st in opt.state.values())


# ------------------------------------------------------------------ torch's clip_grad_norm_ after a fused backward
def test_readme_says_torch_clip_grad_norm_does_not_see_fused_gradients():
    """After a fused backward the gradients are gone, so ``torch.nn.utils.clip_grad_norm_`` returns 0 and clips
    nothing: the README says so next to fused mode."""
    paragraphs = re.split(r"\n\s*\n", README.read_text())
    assert any("clip_grad_norm_" in p and "fused" in p for p in paragraphs)


# ------------------------------------------------------------------ torch's GradScaler
@pytest.mark.parametrize("name", NAMES)
def test_torch_grad_scaler_is_refused_before_any_update(name):
    model = Bag(MIXED)
    make_opt(name, model.parameters(), fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"adalomo\.DynamicLossScaler"):
        scaler.scale(model.loss(0)).backward()
    assert_same(model.parameters(), before)


# ------------------------------------------------------------------ load_state_dict of a wrong state dict
def _adamw(good, model):
    adamw = torch.optim.AdamW(model.parameters())
    train(model, adamw, 1)
    return adamw.state_dict()


def _missing_state_key(good, model):
    bad = copy.deepcopy(good)
    last = bad["state"][max(bad["state"])]  # the last parameter's: a loader that checks as it goes has loaded others
    del last[sorted(k for k in last if k != "step")[-1] if len(last) > 1 else "step"]
    return bad


def _missing_group_key(good, model):
    bad = copy.deepcopy(good)
    del bad["param_groups"][0]["weight_decay"]
    return bad


WRONG = {"adamw": _adamw, "missing_state_key": _missing_state_key, "missing_group_key": _missing_group_key}


@pytest.mark.parametrize("wrong", WRONG)
@pytest.mark.parametrize("fused", [False, True], ids=["classic", "fused"])
@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_rejects_a_wrong_state_dict(name, fused, wrong):
    """A one-line ValueError, and nothing half-loaded: the optimizer is as before and still trains."""
    _, trained = run(name, False, torch.float32, MIXED)  # two steps: its state differs from a fresh optimizer's
    bad = WRONG[wrong](trained.state_dict(), Bag(MIXED))
    bad["param_groups"][0]["lr"] = 0.5  # a loader that copies groups first would leave this behind
    model = Bag(MIXED)
    opt = make_opt(name, model.parameters(), fused)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(bad)
    assert "\n" not in str(err.value).strip(), str(err.value)
    assert_same_tree(opt.state_dict(), before)
    ref = Bag(MIXED)
    train(ref, make_opt(name, ref.parameters(), fused), 1)
    train(model, opt, 1)
    assert_same(model.parameters(), ref.parameters())


# ------------------------------------------------------------------ lomo-optim habits
@pytest.mark.parametrize("fused", [False, True], ids=["classic", "fused"])
def test_adalomo_with_a_tiny_lr_warns_that_lr_is_relative(fused):
    with pytest.warns((UserWarning, RuntimeWarning)) as record:
        AdaLomo(Bag(MIXED).parameters(), lr=2e-5, fused=fused)
    assert any("relative" in str(w.message) and "RMS" in str(w.message) for w in record), [str(w.message) for w in
                                                                                          record]


@pytest.mark.parametrize("lr", [1e-3, 1e-2])
def test_adalomo_with_a_usual_lr_does_not_warn(lr):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaLomo(Bag(MIXED).parameters(), lr=lr)
