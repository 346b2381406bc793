"""Fused-backward mode: same result as classic, one live gradient at a time, schedulers, hooks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from adalomo import Adafactor, AdaLomo, Lomo
from adalomo.optim.engine import DoubleFiringError

OPTIMIZERS = {
    "adalomo": lambda ps, fused: AdaLomo(ps, lr=1e-2, weight_decay=0.01, fused=fused),
    "adafactor": lambda ps, fused: Adafactor(ps, beta1=0.9, fused=fused),
    "adafactor-lr": lambda ps, fused: Adafactor(ps, lr=1e-2, relative_step=False, fused=fused),
    "lomo": lambda ps, fused: Lomo(ps, lr=1e-2, clip_grad_value=1.0, fused=fused),
}


class TinyNet(nn.Module):
    """Embedding + LSTM + MLP head whose decoder is tied to the embedding."""

    def __init__(self, vocab=23, dim=12, tie=True):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 17), nn.GELU(), nn.Linear(17, dim))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, x):
        h, _ = self.lstm(self.emb(x))
        return self.head(self.norm(h + self.mlp(h)))


def _batches(n, vocab=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (3, 6), generator=g) for _ in range(n)]


def _loss(model, x):
    logits = model(x[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))


def _train(model, opt, batches, sched=None):
    losses = []
    for x in batches:
        loss = _loss(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_equals_classic(name):
    torch.manual_seed(0)
    base = TinyNet()
    batches = _batches(6)
    results = []
    for fused in (False, True):
        model = copy.deepcopy(base)
        opt = OPTIMIZERS[name](model.parameters(), fused)
        losses = _train(model, opt, batches)
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
        assert all(p.grad is None for p in model.parameters())
    (l1, p1), (l2, p2) = results
    assert l1 == l2
    for a, b in zip(p1, p2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(p1, base.parameters()))  # it did train


def test_tied_weight_updated_once_with_full_gradient():
    torch.manual_seed(0)
    model = TinyNet()
    ref = copy.deepcopy(model)
    calls = []
    model.emb.weight.register_post_accumulate_grad_hook(lambda p: calls.append(p.grad.clone()))
    opt = AdaLomo(model.parameters(), lr=1e-2, fused=True)
    x = _batches(1)[0]
    _loss(model, x).backward()
    assert len(calls) == 1  # one firing, after both uses accumulated
    _loss(ref, x).backward()
    torch.testing.assert_close(calls[0], ref.emb.weight.grad)
    assert opt.state[model.emb.weight]["step"].item() == 1


def test_at_most_one_live_gradient_during_backward():
    torch.manual_seed(0)
    model = TinyNet(tie=False)
    params = list(model.parameters())
    live = []
    for p in params:  # registered before the optimizer's hooks, so they run first
        p.register_post_accumulate_grad_hook(lambda p: live.append(sum(q.grad is not None for q in params)))
    AdaLomo(params, lr=1e-2, fused=True)
    _loss(model, _batches(1)[0]).backward()
    assert len(live) == len(params)
    assert max(live) == 1
    assert all(p.grad is None for p in params)


def test_frozen_and_unused_parameters_are_left_alone():
    torch.manual_seed(0)
    model = TinyNet(tie=False)
    model.norm.weight.requires_grad_(False)
    unused = nn.Parameter(torch.randn(4, 4))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    u0 = unused.detach().clone()
    opt = AdaLomo(list(model.parameters()) + [unused], lr=1e-2, fused=True)
    _train(model, opt, _batches(2))
    assert torch.equal(model.norm.weight, before["norm.weight"])
    assert torch.equal(unused, u0)
    assert opt.state[unused]["step"].item() == 0
    assert model.norm.weight not in opt.state
    assert not torch.equal(model.head.weight, before["head.weight"])


@pytest.mark.parametrize("fused", [False, True])
def test_lr_scheduler_takes_effect(fused):
    torch.manual_seed(0)
    model = TinyNet()
    opt = AdaLomo(model.parameters(), lr=1e-2, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 2 else 0.0)
    batches = _batches(5)
    _train(model, opt, batches[:2], sched)
    frozen = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, batches[2:], sched)  # lr is 0 from now on
    for a, b in zip(frozen, model.parameters()):
        assert torch.equal(a, b)


def test_remove_hooks_switches_to_classic():
    torch.manual_seed(0)
    model = TinyNet()
    opt = AdaLomo(model.parameters(), lr=1e-2, fused=True)
    opt.remove_hooks()
    assert not opt.fused
    x = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, x).backward()
    assert all(p.grad is not None for p in model.parameters())  # no hook consumed them
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    AdaLomo(model.parameters(), lr=1e-2, fused=True)  # another fused optimizer may now own them


def test_each_backward_is_a_step_in_fused_mode():
    """Gradient accumulation is impossible in fused mode: two backwards are two updates."""
    torch.manual_seed(0)
    model = TinyNet()
    opt = Lomo(model.parameters(), lr=1e-2, fused=True)
    x = _batches(1)[0]
    _loss(model, x).backward()
    _loss(model, x).backward()
    assert all(opt.state[p]["step"].item() == 2 for p in model.parameters())


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 5)

    def forward(self, x, reentrant):
        y = checkpoint(lambda t: torch.tanh(self.lin(t)), x, use_reentrant=reentrant)
        return self.lin(y)


@pytest.mark.parametrize("outside_first", [False, True])
def test_reentrant_checkpoint_double_firing_raises(outside_first):
    torch.manual_seed(0)
    model = Shared()
    AdaLomo(model.parameters(), lr=1e-2, fused=True)
    x = torch.randn(3, 5, requires_grad=True)
    if outside_first:  # weight used outside, then inside the checkpointed region
        def f(x):
            return checkpoint(lambda t: torch.tanh(model.lin(t)), model.lin(x), use_reentrant=True).sum()
    else:
        def f(x):
            return model(x, True).sum()
    # loud either way: our check, or autograd noticing the weight changed under a saved tensor
    with pytest.raises(RuntimeError, match="use_reentrant=False|modified by an inplace") as info:
        f(x).backward()
    if not outside_first:
        assert info.type is DoubleFiringError


def test_non_reentrant_checkpoint_is_exact():
    torch.manual_seed(0)
    m1 = Shared()
    m2 = copy.deepcopy(m1)
    o1 = AdaLomo(m1.parameters(), lr=1e-2, fused=True)
    o2 = AdaLomo(m2.parameters(), lr=1e-2, fused=False)
    x = torch.randn(3, 5)
    for _ in range(3):
        m1(x, False).square().sum().backward()
        o1.step()
        m2(x, False).square().sum().backward()
        o2.step()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # and normal backwards after a reentrant-free run keep working (no stale bookkeeping)
    for _ in range(2):
        m1(x, False).sum().backward()


@pytest.mark.parametrize("name", ["lomo", "adalomo"])
def test_two_pass_clipping_equals_classic(name):
    torch.manual_seed(0)
    base = TinyNet()
    batches = _batches(4)
    make = {"lomo": lambda ps, f: Lomo(ps, lr=5e-2, clip_grad_norm=0.5, fused=f),
            "adalomo": lambda ps, f: AdaLomo(ps, lr=1e-2, clip_grad_norm=0.5, fused=f)}[name]
    m1, m2 = copy.deepcopy(base), copy.deepcopy(base)
    o1, o2 = make(m1.parameters(), True), make(m2.parameters(), False)
    for x in batches:
        loss = _loss(m1, x)
        norm = o1.grad_norm(loss)
        o1.fused_backward(loss)
        loss2 = _loss(m2, x)
        loss2.backward()
        ref_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m2.parameters()]))
        torch.testing.assert_close(norm, ref_norm)
        o2.step()
        o2.zero_grad()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clip_grad_norm_without_first_pass_is_an_error():
    model = TinyNet()
    AdaLomo(model.parameters(), lr=1e-2, clip_grad_norm=1.0, fused=True)
    with pytest.raises(RuntimeError, match="grad_norm"):
        _loss(model, _batches(1)[0]).backward()


def test_fused_backward_sets_lr_like_lomo_optim():
    torch.manual_seed(0)
    model = TinyNet()
    opt = Lomo(model.parameters(), lr=1.0, fused=True)
    before = [p.detach().clone() for p in model.parameters()]
    opt.fused_backward(_loss(model, _batches(1)[0]), lr=0.0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _Boom(torch.autograd.Function):
    """Identity whose backward raises: a backward that fails after some hooks have fired."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("boom")


def test_a_failed_backward_does_not_stall_later_steps():
    """The end-of-backward callback of a backward that raised never runs; the next backward must still end
    its step (accounting, bucket flushes) and must not apply gradients queued by the failed one."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(4, 6), nn.Linear(6, 3)
    opt = AdaLomo([*lin1.parameters(), *lin2.parameters()], lr=1e-2, fused=True, nonfinite="count")
    x = torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="boom"):
        lin2(_Boom.apply(lin1(x))).sum().backward()  # lin2's hooks fire, then the backward dies
    opt._engine.pending[0] = [(lin1.weight, torch.full_like(lin1.weight, 1e3))]  # as if queued by the failed backward
    before = lin1.weight.detach().clone()
    lin2(lin1(x)).sum().mul(float("nan")).backward()  # non-finite: nothing changes, the step is counted
    assert opt.skipped_updates is not None and int(opt.skipped_updates) == 1, "the step did not end"
    assert torch.equal(lin1.weight, before), "a gradient queued by the failed backward was applied"
    assert not opt._engine.pending
