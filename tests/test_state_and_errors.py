"""Checkpoint round trips, bad input, non-finite gradients."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from test_fused import TinyNet, _batches, _train
from torch import nn

from adalomo import Adafactor, AdaLomo, DynamicLossScaler, Lomo

MAKERS = {
    "adalomo": lambda ps, fused: AdaLomo(ps, lr=1e-2, fused=fused),
    "adafactor": lambda ps, fused: Adafactor(ps, beta1=0.9, weight_decay=0.01, fused=fused),
    "lomo": lambda ps, fused: Lomo(ps, lr=1e-2, fused=fused),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_is_bit_identical(name, fused, dtype):
    torch.manual_seed(0)
    base = TinyNet().to(dtype)
    batches = _batches(7)
    full = copy.deepcopy(base)
    opt = MAKERS[name](full.parameters(), fused)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    _train(full, opt, batches, sched)

    part = copy.deepcopy(base)
    opt = MAKERS[name](part.parameters(), fused)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    _train(part, opt, batches[:3], sched)
    buf = io.BytesIO()
    torch.save({"model": part.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    opt.remove_hooks()
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)

    resumed = copy.deepcopy(base)
    resumed.load_state_dict(ck["model"])
    opt2 = MAKERS[name](resumed.parameters(), fused)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 2, 0.5)
    opt2.load_state_dict(ck["opt"])
    sched2.load_state_dict(ck["sched"])
    for st in opt2.state.values():  # statistics stay fp32 even for bf16 parameters
        assert all(v.dtype == torch.float32 for v in st.values())
    _train(resumed, opt2, batches[3:], sched2)
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_state_is_created_eagerly():
    model = TinyNet(tie=False)
    opt = AdaLomo(model.parameters())
    sd = opt.state_dict()
    assert len(sd["state"]) == len(list(model.parameters()))
    w = model.head.weight
    assert opt.state[w]["exp_avg_sq_row"].shape == (w.shape[0],)
    assert opt.state[w]["exp_avg_sq_col"].shape == (w.shape[1],)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kw, match", [
    (dict(lr=-1.0), "lr"),
    (dict(lr="big"), "lr"),
    (dict(decay_rate=0.0), "decay_rate"),
    (dict(decay_rate=0.5), "decay_rate"),
    (dict(eps=1e-30), "eps"),
    (dict(eps=(1e-30,)), "eps"),
    (dict(eps=(1e-30, -1.0)), "eps"),
    (dict(clip_threshold=0.0), "clip_threshold"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(nonfinite="ignore"), "nonfinite"),
    (dict(bucket_cap_mb=-1.0), "bucket_cap_mb"),
    (dict(bucket_cap_mb=None), "bucket_cap_mb"),
    (dict(bucket_cap_mb="big"), "auto"),
])
def test_bad_hyper_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        AdaLomo(nn.Linear(2, 2).parameters(), **kw)


def test_bad_hyper_parameters_in_a_group():
    m = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="lr"):
        AdaLomo([{"params": [m.weight]}, {"params": [m.bias], "lr": -1}])


def test_adafactor_lr_and_relative_step_conflict():
    with pytest.raises(ValueError, match="relative_step"):
        Adafactor(nn.Linear(2, 2).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="warmup_init"):
        Adafactor(nn.Linear(2, 2).parameters(), lr=1e-3, relative_step=False, warmup_init=True)


@pytest.mark.parametrize("cls", [AdaLomo, Lomo, Adafactor])
def test_bad_parameter_lists(cls):
    with pytest.raises(ValueError, match="empty parameter list"):
        cls([])
    with pytest.raises(TypeError, match="single Tensor"):
        cls(nn.Parameter(torch.zeros(2)))
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.warns(UserWarning, match="requires_grad=False"):  # accepted, as torch does: unfrozen later
        cls(frozen.parameters())
    leaf = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match="not a leaf"):
        cls([leaf * 2])
    with pytest.raises(ValueError, match="complex"):
        cls([nn.Parameter(torch.zeros(2, dtype=torch.complex64))])
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="twice"):
        cls([p, p])
    with pytest.raises(ValueError, match="twice"):
        cls([{"params": [p]}, {"params": [p]}])


def test_two_fused_optimizers_on_one_parameter():
    m = nn.Linear(2, 2)
    opt = AdaLomo(m.parameters(), fused=True)
    with pytest.raises(ValueError, match="another fused optimizer"):
        Lomo(m.parameters(), fused=True)
    del opt


@pytest.mark.parametrize("fused", [False, True])
def test_sparse_gradients_are_refused(fused):
    emb = nn.Embedding(10, 4, sparse=True)
    opt = AdaLomo(emb.parameters(), fused=fused)
    with pytest.raises(RuntimeError, match="sparse"):
        emb(torch.tensor([1, 2])).sum().backward()
        opt.step()


def test_grad_norm_in_classic_mode_is_an_error():
    m = nn.Linear(2, 2)
    opt = Lomo(m.parameters(), clip_grad_norm=1.0)
    with pytest.raises(RuntimeError, match="classic mode"):
        opt.grad_norm(m(torch.ones(1, 2)).sum())


# ---------------------------------------------------------- non-finite values
class Poison(nn.Module):
    """Two linear layers; the first gets NaN gradients when asked."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x, poison=False):
        h = self.a(x)
        if poison:
            h = h + _nan_grad(h)  # same value, NaN gradient
        return self.b(torch.tanh(h))


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("nan"))


def _nan_grad(h):
    return _NanGrad.apply(h) - h.detach()


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("fused", [False, True])
def test_nan_gradients_never_reach_the_weights(name, fused):
    torch.manual_seed(0)
    m = Poison()
    opt = MAKERS[name](m.parameters(), fused)
    x = torch.randn(3, 4)
    a0 = m.a.weight.detach().clone()
    b0 = m.b.weight.detach().clone()
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        m(x, poison=True).sum().backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    assert torch.equal(m.a.weight, a0)  # the poisoned tensor was skipped
    assert not torch.equal(m.b.weight, b0)  # the healthy one was updated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x).sum().backward()  # and training continues
        opt.step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_warn_mode_never_waits_for_the_gpu(dtype):
    """A fused step on CUDA (kernels, buckets, finite flags, "warn") makes no host synchronisation; the
    warning for a NaN step arrives once its flag has reached the host, at the latest in state_dict()."""
    torch.manual_seed(0)
    m = Poison().to("cuda", dtype)
    opt = AdaLomo(m.parameters(), lr=1e-2, fused=True)
    x = torch.randn(3, 4, device="cuda", dtype=dtype)
    m(x).float().sum().backward()  # warm-up: kernel compilation, allocator
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("error")
        try:
            for poison in (False, True, False):
                m(x, poison=poison).float().sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        opt.state_dict()
    nan_warnings = [w for w in caught if str(w.message).startswith("AdaLomo: a gradient contained NaN or inf")]
    assert len(nan_warnings) == 1, [str(w.message) for w in caught]  # one step had NaN: one warning
    assert int(opt.skipped_updates) == 1 and all(torch.isfinite(p).all() for p in m.parameters())


def test_nonfinite_raise_and_count():
    m = Poison()
    opt = AdaLomo(m.parameters(), fused=True, nonfinite="raise")
    with pytest.raises(FloatingPointError):
        m(torch.randn(2, 4), poison=True).sum().backward()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    opt.remove_hooks()
    m2 = Poison()
    opt = AdaLomo(m2.parameters(), fused=True, nonfinite="count")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m2(torch.randn(2, 4), poison=True).sum().backward()
    assert int(opt.skipped_updates) == 1


# --------------------------------------------------------------- fp16 scaling
def test_fp16_loss_scaler_backs_off_and_skips_overflow():
    torch.manual_seed(0)
    m = nn.Linear(8, 8).half()
    scaler = DynamicLossScaler(init_scale=2.0**40, growth_interval=2)
    opt = AdaLomo(m.parameters(), lr=1e-2, fused=True, loss_scaler=scaler)
    x = torch.randn(4, 8).half()
    w0 = m.weight.detach().clone()
    opt.fused_backward(m(x).float().pow(2).mean())  # 2^40 * grad overflows fp16
    assert torch.equal(m.weight, w0)
    assert float(scaler.scale) == 2.0**39
    for _ in range(40):
        opt.fused_backward(m(x).float().pow(2).mean())
    assert torch.isfinite(m.weight).all()
    assert not torch.equal(m.weight, w0)
    assert float(scaler.scale) < 2.0**20


def test_fp16_two_pass_skips_whole_step_exactly():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).half()
    scaler = DynamicLossScaler(init_scale=2.0**40)
    opt = Lomo(m.parameters(), lr=1e-2, fused=True, loss_scaler=scaler, clip_grad_norm=1.0)
    x = torch.randn(4, 8).half()
    before = [p.detach().clone() for p in m.parameters()]
    loss = m(x).float().pow(2).mean()
    norm = opt.grad_norm(loss)
    assert not torch.isfinite(norm)
    opt.fused_backward(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(opt.state[p]["step"].item() == 0 for p in m.parameters())
    assert float(scaler.scale) == 2.0**39
    scaler.load_state_dict({**scaler.state_dict(), "scale": torch.tensor(256.0)})
    loss = m(x).float().pow(2).mean()
    assert torch.isfinite(opt.grad_norm(loss))
    opt.fused_backward(loss)
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_loss_scaler_state_round_trips():
    m = nn.Linear(2, 2)
    opt = AdaLomo(m.parameters(), loss_scaler=DynamicLossScaler(init_scale=128.0))
    sd = opt.state_dict()
    opt2 = AdaLomo(m.parameters(), loss_scaler=DynamicLossScaler(init_scale=1.0))
    opt2.load_state_dict(sd)
    assert float(opt2.loss_scaler.scale) == 128.0


def test_auto_bucket_cap():
    """``bucket_cap_mb="auto"`` (default): 15% of the trainable bytes within [64, 256] MiB (frozen ones excluded)."""
    from adalomo.optim.base import auto_bucket_cap_mb

    def bf16(n, grad=True):
        return torch.empty(int(n), dtype=torch.bfloat16, device="meta").requires_grad_(grad)
    assert auto_bucket_cap_mb([bf16(0.94e9)]) == 256.0
    assert auto_bucket_cap_mb([bf16(6.74e9)]) == 256.0
    assert auto_bucket_cap_mb([bf16(0.1e9), bf16(0.2e9)]) == pytest.approx(0.3e9 * 2 * 0.15 / 2**20)
    assert auto_bucket_cap_mb([bf16(0.3e9), bf16(50e9, grad=False)]) == pytest.approx(85.8306884765625)
    assert auto_bucket_cap_mb([bf16(0.1e9)]) == 64.0
    assert AdaLomo(nn.Linear(2, 2).parameters(), fused=True).bucket_cap_mb == 64.0
    assert AdaLomo(nn.Linear(2, 2).parameters(), fused=True, bucket_cap_mb=8).bucket_cap_mb == 8.0


def test_cuda_graph_capture_is_refused_with_a_clear_error(monkeypatch):
    """Capturing the update in a CUDA graph would replay the captured step's host-computed values: refused at the
    first update inside a capture, in classic step() and in fused mode's bucket flush (CPU stand-in for capture)."""
    from adalomo.optim import base
    assert base._capturing() is False  # no capture here (and no CUDA needed to ask)
    m = nn.Linear(3, 2)
    m(torch.randn(4, 3)).sum().backward()
    opt = AdaLomo(m.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in m.parameters()]
    monkeypatch.setattr(base, "_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="CUDA graph is being captured.*fused=False"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters())), "a refused step changed parameters"
    fused = AdaLomo(m.parameters(), lr=1e-2, fused=True)
    fused._engine.pending[0] = [(m.weight, torch.ones_like(m.weight))]
    with pytest.raises(RuntimeError, match="CUDA graph"):
        fused._engine.flush(0)
    monkeypatch.setattr(base, "_capturing", lambda: False)
    opt.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
