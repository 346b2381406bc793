"""bf16 stochastic rounding: unbiased, and it keeps pure-bf16 training close to fp32."""

from __future__ import annotations

import torch

from adalomo import AdaLomo, Lomo
from adalomo.precision import stochastic_round_to_bf16


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g)
    lo = base.bfloat16().float()
    # values strictly between two bf16 neighbours, at various fractions
    spacing = (torch.nextafter(lo.bfloat16(), torch.tensor(float("inf")).bfloat16()).float() - lo).abs()
    frac = torch.rand(64, generator=g)
    x = lo + frac * spacing
    n = 4000
    samples = stochastic_round_to_bf16(x.expand(n, 64).contiguous(), g).float()
    # every sample is one of the two neighbours
    assert torch.all((samples == lo) | (samples == lo + spacing))
    mean = samples.mean(0)
    err = (mean - x).abs() / spacing
    assert err.max() < 0.05  # 4000 draws: std of the mean fraction <= 0.008
    # round-to-nearest is biased by up to half a spacing on the same inputs
    rtn_err = (x.bfloat16().float() - x).abs() / spacing
    assert rtn_err.max() > 0.3


def test_stochastic_rounding_special_values():
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1.0, -2.5, 3.0e38])
    y = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert y[0] == 0 and y[1] == 0 and y[2] == float("inf") and y[3] == -float("inf")
    assert torch.isnan(y[4])
    assert y[5] == 1.0 and y[6] == -2.5
    assert torch.isfinite(y[7]) or y[7] == float("inf")


def _train_regression(dtype, sr, steps=400, opt_cls=Lomo, lr=2e-3):
    torch.manual_seed(0)
    w_true = torch.randn(16, 16)
    w = torch.nn.Parameter((torch.randn(16, 16) * 0.1 + 4.0).to(dtype))  # large weights: small relative updates
    opt = opt_cls([w], lr=lr, stochastic_rounding=sr)
    g = torch.Generator().manual_seed(1)
    traj = []
    for _ in range(steps):
        x = torch.randn(32, 16, generator=g)
        loss = ((x @ w.float().T - x @ w_true.T) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        traj.append(w.detach().float().clone())
    return traj


def test_bf16_with_stochastic_rounding_tracks_fp32_better():
    ref = _train_regression(torch.float32, False)
    rtn = _train_regression(torch.bfloat16, False)
    sr = _train_regression(torch.bfloat16, True)
    dist_rtn = (rtn[-1] - ref[-1]).norm() / ref[-1].norm()
    dist_sr = (sr[-1] - ref[-1]).norm() / ref[-1].norm()
    assert dist_sr < 0.5 * dist_rtn, (float(dist_sr), float(dist_rtn))


def test_bf16_adalomo_defaults_to_stochastic_rounding_and_is_reproducible():
    a = _train_regression(torch.bfloat16, None, steps=30, opt_cls=AdaLomo, lr=1e-3)
    b = _train_regression(torch.bfloat16, None, steps=30, opt_cls=AdaLomo, lr=1e-3)
    n = _train_regression(torch.bfloat16, False, steps=30, opt_cls=AdaLomo, lr=1e-3)
    assert torch.equal(a[-1], b[-1])  # seeded per (parameter, step): runs repeat exactly
    assert not torch.equal(a[-1], n[-1])  # and it is on by default for bf16


def test_write_back_accepts_a_kernel_seed():
    """The optimizers hand a ``kernels.Seed`` to updates that end up on the torch path (e.g. AdaPM on CUDA)."""
    from adalomo import kernels
    from adalomo.precision import sr_generator, write_back_

    value = torch.randn(33, 17) * 1e-2
    a, b = torch.empty(33, 17, dtype=torch.bfloat16), torch.empty(33, 17, dtype=torch.bfloat16)
    write_back_(a, value, True, kernels.Seed(12345))
    write_back_(b, value, True, sr_generator(torch.device("cpu"), 12345))
    assert torch.equal(a, b)
    write_back_(b, value, True, kernels.Seed(54321))
    assert not torch.equal(a, b), "another seed must draw other rounding bits"


def test_stochastic_rounding_keeps_nan_payloads():
    """A NaN whose payload sits only in the 16 bits below bf16's mantissa stays NaN (the noise and the mask alone
    would turn it into inf or a number), also among finite values and through ``write_back_``."""
    from adalomo.precision import write_back_

    low_nan = torch.tensor([0x7F800001, -0x007FFFFF], dtype=torch.int32).view(torch.float32)  # +NaN, -NaN
    x = torch.cat([torch.randn(1000), low_nan, torch.randn(1000)])
    for seed in range(8):
        y = stochastic_round_to_bf16(x, torch.Generator().manual_seed(seed))
        assert torch.isnan(y[1000:1002]).all() and torch.isfinite(y[:1000]).all()
        dst = torch.empty(x.shape, dtype=torch.bfloat16)
        write_back_(dst, x, True, torch.Generator().manual_seed(seed))
        assert torch.isnan(dst[1000:1002]).all() and torch.isfinite(dst[:1000]).all()


def test_rounding_noise_uses_every_bit_of_each_draw():
    """Four 16-bit values come from each 64-bit draw: every bit of every one of the four is a fair coin."""
    from adalomo.precision import _random_16_bits

    noise = _random_16_bits(torch.Size([4 * 20000]), torch.device("cpu"), torch.Generator().manual_seed(0))
    assert noise.dtype == torch.int16
    noise = noise.to(torch.int32) + (1 << 15)  # as the rounding adds it
    for k in range(4):  # the k-th value of each draw
        bits = torch.stack([(noise[k::4] >> b) & 1 for b in range(16)]).float().mean(1)
        assert (bits - 0.5).abs().max() < 0.02, (k, bits)
