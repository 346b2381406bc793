"""Triton kernels (``adalomo.kernels``) against the torch path of ``adalomo.functional`` and a float64 reference.

On CPU the kernels run through Triton's interpreter in ONE subprocess (``python tests/test_kernels.py``
runs every case with ``ADALOMO_TRITON_INTERPRET=1`` and prints a JSON verdict per case), so that the
interpreter mode never leaks into the pytest process. With CUDA the same cases also run in-process on
the GPU, plus larger odd shapes. Known interpreter difference: its fp32 -> bf16 cast truncates where the
GPU rounds to nearest even, so bf16/fp16 parameters are compared within one unit in the last place.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from kernel_cases import interpreter_results, run_cases  # noqa: E402
from reference import RefFactored, ref_lomo  # noqa: E402

from adalomo import functional as F  # noqa: E402
from adalomo import kernels  # noqa: E402

EPS = (1e-30, 1e-3)


# ------------------------------------------------------------------------------------------- helpers
class _TorchPath:
    """Run the functional torch path (the Triton kernels disabled) inside the block."""

    def __enter__(self):
        self.prev = os.environ.get("ADALOMO_DISABLE_TRITON")
        os.environ["ADALOMO_DISABLE_TRITON"] = "1"

    def __exit__(self, *exc):
        if self.prev is None:
            os.environ.pop("ADALOMO_DISABLE_TRITON", None)
        else:
            os.environ["ADALOMO_DISABLE_TRITON"] = self.prev


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at the magnitude of ``x`` (fp32 tensor)."""
    mant = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(2.0 ** -14)))
    return torch.pow(2.0, e - mant)


def _check_ulps(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str, before: torch.Tensor) -> None:
    """``a`` (kernel) and ``b`` (torch path), computed from the same parameters ``before``, agree elementwise
    within 1e-5 of the largest update (fp32 sums run in another order) plus 2 units in the last place of
    ``dtype`` at the magnitude of the terms (either side of a rounding boundary; fused multiply-adds; the
    interpreter truncates where the GPU rounds to nearest)."""
    a, b, before = a.float(), b.float(), before.float()
    mag = torch.maximum(torch.maximum(a.abs(), b.abs()), before.abs())
    tol = 2 * _ulp(mag, dtype) + 1e-5 * (b - before).abs().max()
    diff = (a - b).abs()
    bad = diff > tol
    if bool(bad.any()):
        x, y, t = float(a[bad][0]), float(b[bad][0]), float(tol[bad][0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements differ by more than allowed, e.g. {x:.8g} vs {y:.8g} "
                             f"(tolerance {t:.3g})")


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of ``t`` in a tensor with another memory layout (same shape)."""
    if layout == "contig" or t.dim() == 0:
        return t.clone()
    if layout == "transposed":  # last two dims swapped in memory
        if t.dim() == 1:
            return t.repeat_interleave(2)[::2]  # stride 2
        return t.transpose(-1, -2).clone(memory_format=torch.contiguous_format).transpose(-1, -2)
    if layout == "sliced":  # rows padded: inner stride 1, leading strides larger than the shape
        big = torch.zeros(t.shape[:-1] + (t.shape[-1] + 3,), dtype=t.dtype, device=t.device)
        out = big[..., 1:1 + t.shape[-1]]
        out.copy_(t)
        return out
    if layout == "unmergeable":  # leading dims that cannot be merged into one batch stride
        assert t.dim() >= 3
        big = torch.zeros((t.shape[0], 2 * t.shape[1]) + t.shape[2:], dtype=t.dtype, device=t.device)
        out = big[:, ::2]
        out.copy_(t)
        return out
    raise ValueError(layout)


def _rand(shape, gen: torch.Generator, device: str, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    return (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dtype)


def _state(p: torch.Tensor, beta1) -> dict:
    st = {"step": torch.tensor(0.0), **F.init_factored_state(p)}
    if beta1 is not None:
        st["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    return st


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    a, b = a.double().cpu(), b.double().cpu()
    err = float((a - b).norm() / b.norm().clamp_min(1e-300))
    assert math.isfinite(err) and err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


# --------------------------------------------------------------------------------------------- cases
def check_scaled(device: str, shape, dtype=torch.float32, *, g_layout="contig", p_layout="contig", steps=2,
                 beta1=None, wd=0.0, grad_scale=None, scale_parameter=True, rho=0.05, clip_threshold=1.0,
                 g_dtype=None, seed=0) -> None:
    """The AdaLomo/Adafactor core: kernel vs torch path (same dtype) vs float64 (``RefFactored``)."""
    gen = torch.Generator().manual_seed(seed)
    p0 = _rand(shape, gen, device, dtype)
    p_k, p_t = _layout(p0, p_layout), _layout(p0, p_layout)
    st_k, st_t = _state(p0, beta1), _state(p0, beta1)
    ref = RefFactored(p0.float().cpu(), eps=EPS, clip_threshold=clip_threshold, weight_decay=wd, beta1=beta1)
    scale_t = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float32, device=device)
    for t in range(1, steps + 1):
        g0 = _rand(shape, gen, device, g_dtype or dtype, scale=float(t))
        g = _layout(g0, g_layout)
        beta2 = F.beta2_at(float(t), -0.8)
        kw = dict(rho=rho, eps=EPS, clip_threshold=clip_threshold, beta2=beta2, weight_decay=wd,
                  scale_parameter=scale_parameter, beta1=beta1, grad_scale=scale_t, stochastic_rounding=False,
                  generator=None)
        assert kernels.use_triton(p_k, g), "use_triton() refused the kernels"
        p_t.copy_(p_k)  # each step from the same parameters: rounding differences do not accumulate
        p_prev = p_k.float().clone()
        ok_k = kernels.scaled_rms_update_(p_k, g, st_k, **kw)
        with _TorchPath():
            assert not kernels.use_triton(p_t, g)
            ok_t = F.scaled_rms_update_(p_t, g, st_t, **kw)
        assert ok_k.dtype == torch.bool and ok_k.dim() == 0 and ok_k.device == p_k.device
        assert bool(ok_k) and bool(ok_t)
        g_ref = g0.float().cpu() * (1.0 if grad_scale is None else grad_scale)
        ref.adafactor_step(g_ref, lr=rho, relative_step=False, scale_parameter=scale_parameter)
        # statistics: fp32 sums in a different order
        for k in st_t:
            if k != "step":
                _close(st_k[k], st_t[k], 1e-5, f"state {k} vs torch")
        if p0.dim() >= 2:
            _close(st_k["exp_avg_sq_row"], ref.row, 1e-5, "row vs float64")
            _close(st_k["exp_avg_sq_col"], ref.col, 1e-5, "col vs float64")
        else:
            _close(st_k["exp_avg_sq"], ref.v, 1e-5, "v vs float64")
        # parameters: within one unit in the last place of the torch path, and near float64
        _check_ulps(p_k, p_t, dtype, "p vs torch", p_prev)
        if dtype == torch.float32:  # 1e-5, or what p's own fp32 rounding allows when the update is small next to p
            d_t = (p_t - p_prev).double().norm().clamp_min(1e-300)
            floor = 2 * torch.finfo(torch.float32).eps * float(p_prev.double().norm() / d_t)
            _close(p_k - p_prev, p_t - p_prev, max(1e-5, floor), "update vs torch")
        if dtype == torch.float32:
            _close(p_k - p0, ref.p - p0.double().cpu(), 1e-4, "update vs float64")
        else:
            _close(p_k - p0, ref.p - p0.double().cpu(), 0.1, "update vs float64 (low precision)")
        # the parameter keeps its layout (written in place)
        assert p_k.stride() == p_t.stride()


def check_nonfinite(device: str, shape, dtype=torch.float32, *, bad=float("nan"), beta1=None) -> None:
    gen = torch.Generator().manual_seed(1)
    p = _rand(shape, gen, device, dtype)
    st = _state(p, beta1)
    g = _rand(shape, gen, device, dtype)
    kw = dict(rho=0.05, eps=EPS, clip_threshold=1.0, weight_decay=0.1, scale_parameter=True, beta1=beta1,
              grad_scale=None, stochastic_rounding=False, generator=None)
    kernels.scaled_rms_update_(p, g, st, beta2=0.0, **kw)  # a first, finite step
    p_before = p.clone()
    st_before = {k: v.clone() for k, v in st.items()}
    g.view(-1)[g.numel() // 2] = bad
    ok = kernels.scaled_rms_update_(p, g, st, beta2=0.5, **kw)
    assert not bool(ok)
    assert torch.equal(p, p_before), "p changed although the gradient was not finite"
    for k in st:
        assert torch.equal(st[k], st_before[k]), f"state {k} changed although the gradient was not finite"
    # LOMO too
    ok = kernels.lomo_update_(p, g, lr=0.1, weight_decay=0.1, clip_grad_value=None, grad_scale=None,
                              stochastic_rounding=False, generator=None)
    assert not bool(ok) and torch.equal(p, p_before)


def check_lomo(device: str, shape, dtype=torch.float32, *, g_layout="contig", p_layout="contig", wd=0.0,
               clip=None, grad_scale=None, seed=0) -> None:
    gen = torch.Generator().manual_seed(seed)
    p0 = _rand(shape, gen, device, dtype)
    g0 = _rand(shape, gen, device, dtype)
    p_k, p_t, g = _layout(p0, p_layout), _layout(p0, p_layout), _layout(g0, g_layout)
    scale_t = None if grad_scale is None else torch.tensor(grad_scale, dtype=torch.float32, device=device)
    kw = dict(lr=0.05, weight_decay=wd, clip_grad_value=clip, grad_scale=scale_t, stochastic_rounding=False,
              generator=None)
    assert kernels.use_triton(p_k, g)
    ok = kernels.lomo_update_(p_k, g, **kw)
    with _TorchPath():
        F.lomo_update_(p_t, g, **kw)
    assert bool(ok)
    _check_ulps(p_k, p_t, dtype, "lomo vs torch", p0)
    g_ref = g0.float().cpu() * (1.0 if grad_scale is None else grad_scale)
    ref = ref_lomo(p0.float().cpu(), g_ref, 0.05, wd, clip)
    _close(p_k - p0, ref - p0.double().cpu(), 1e-5 if dtype == torch.float32 else 0.1, "lomo update vs float64")


def check_stochastic_rounding(device: str, shape=(48, 160), lomo=False) -> None:
    """bf16 + SR: every element is one of the two bf16 neighbours of the fp32 result, without bias."""
    gen = torch.Generator().manual_seed(3)
    p0 = _rand(shape, gen, device, torch.bfloat16)
    g = _rand(shape, gen, device, torch.bfloat16)
    p_sr, p32 = p0.clone(), p0.float()
    st_sr, st_32 = _state(p0, None), _state(p0, None)
    sr_gen = torch.Generator(device=device).manual_seed(1234)
    if lomo:
        kw = dict(lr=1e-3, weight_decay=0.0, clip_grad_value=None, grad_scale=None)
        kernels.lomo_update_(p_sr, g, stochastic_rounding=True, generator=sr_gen, **kw)
        kernels.lomo_update_(p32, g, stochastic_rounding=False, generator=None, **kw)
    else:
        kw = dict(rho=1e-3, eps=EPS, clip_threshold=1.0, beta2=0.0, weight_decay=0.0, scale_parameter=True,
                  beta1=None, grad_scale=None)
        kernels.scaled_rms_update_(p_sr, g, st_sr, stochastic_rounding=True, generator=sr_gen, **kw)
        kernels.scaled_rms_update_(p32, g, st_32, stochastic_rounding=False, generator=None, **kw)
    x = p32.cpu()
    y = p_sr.float().cpu()
    lo = x.to(torch.bfloat16).float()  # truncation or RNE: one neighbour; the other is one ulp away
    ulp = _ulp(x, torch.bfloat16)
    assert bool(((y - x).abs() < ulp * 1.001).all()), "SR result is not a bf16 neighbour of the fp32 value"
    frac = ((y - x) / ulp)
    assert abs(float(frac.mean())) < 0.05, f"stochastic rounding is biased: mean offset {float(frac.mean()):.3f} ulp"
    changed = (y != p0.float().cpu()).float().mean()
    assert float(changed) > 0.02, "SR never moved the parameters (the update was rounded away)"
    assert torch.isfinite(lo).all()


def check_sr_bits(device: str, n: int = 1 << 16) -> None:
    """Stochastic rounding's random bits (the keyed hash): uniform over 16 bits, each bit balanced, no correlation
    between neighbours or between two seeds (bounds ~5 standard deviations for n samples)."""
    from adalomo.kernels.common import sr_bits
    a = sr_bits(n, 12345, device).cpu().long()
    b = sr_bits(n, 12346, device).cpu().long()
    assert int(a.min()) >= 0 and int(a.max()) < 1 << 16, "noise is not 16 bits"
    sd = 5 / math.sqrt(n)
    bits = torch.stack([(a >> k) & 1 for k in range(16)]).double().mean(1)
    assert float((bits - 0.5).abs().max()) < 0.5 * sd, f"unbalanced bits: {bits.tolist()}"
    counts = torch.bincount(a >> 8, minlength=256).double()
    chi2 = float(((counts - n / 256) ** 2 / (n / 256)).sum())  # 255 degrees of freedom: mean 255, sd 22.6
    assert chi2 < 255 + 5 * 22.6, f"256-bin chi-square {chi2:.0f}"

    def corr(x, y):
        x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
        return float((x * y).sum() / (x.norm() * y.norm()))

    assert abs(corr(a[1:], a[:-1])) < sd, "neighbouring elements' bits are correlated"
    assert abs(corr(a, b)) < sd, "two seeds draw correlated bits"
    assert float((a == b).double().mean()) < 1e-3, "two seeds draw the same bits"


def check_optimizer_fused(device: str) -> None:
    """The optimizers end to end (fused hooks -> functional -> kernels) against the torch path."""
    from adalomo import Adafactor, AdaLomo, Lomo

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.LayerNorm(17), torch.nn.Linear(17, 5)).to(device)

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 13, generator=gen).to(device) for _ in range(3)]
    makers = {"adalomo": lambda ps: AdaLomo(ps, lr=1e-2, fused=True, weight_decay=0.01),
              "adafactor": lambda ps: Adafactor(ps, beta1=0.9, fused=False),
              "lomo": lambda ps: Lomo(ps, lr=1e-2, fused=True, clip_grad_value=0.5)}
    for name, make in makers.items():
        out = {}
        for path in ("triton", "torch"):
            m = model()
            opt = make(m.parameters())
            ctx = _TorchPath() if path == "torch" else _NoCtx()
            with ctx:
                for x in xs:
                    loss = m(x).square().mean()
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            out[path] = torch.cat([p.detach().flatten() for p in m.parameters()])
        _close(out["triton"], out["torch"], 1e-5, f"{name}: parameters after 3 steps")


def check_fused_buckets(device: str) -> None:
    """Fused mode's gradient buckets and per-tensor updates (the grouped kernels with one tensor): bit-identical to
    classic mode's grouped step(), with several flushes per backward (bf16 with SR and fp32)."""
    from adalomo import Adafactor, AdaLomo, Lomo

    makers = {"adalomo": lambda ps, **kw: AdaLomo(ps, lr=1e-2, weight_decay=0.01, **kw),
              "adafactor": lambda ps, **kw: Adafactor(ps, beta1=0.9, **kw),
              "lomo": lambda ps, **kw: Lomo(ps, lr=1e-2, clip_grad_value=0.5, **kw)}
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(6, 13, generator=gen).to(device) for _ in range(3)]
    for dtype in (torch.float32, torch.bfloat16):
        cap = 175 * torch.tensor([], dtype=dtype).element_size() / 2**20  # two flushes per backward here
        modes = {"classic": dict(fused=False), "bucketed": dict(fused=True, bucket_cap_mb=cap),
                 "per_tensor": dict(fused=True, bucket_cap_mb=0)}
        for name, make in makers.items():
            out, flushes = {}, {}
            for mode, kw in modes.items():
                torch.manual_seed(0)
                m = torch.nn.Sequential(torch.nn.Linear(13, 17), torch.nn.LayerNorm(17), torch.nn.Linear(17, 9),
                                        torch.nn.Tanh(), torch.nn.Linear(9, 5)).to(device, dtype)
                opt = make(m.parameters(), **kw)
                sizes = []

                engine = opt._engine

                def flush(key, orig=engine.flush if engine else None, engine=engine, sizes=sizes):
                    sizes.append(engine.pending_bytes.get(key, 0))
                    orig(key)
                if engine is not None:
                    engine.flush = flush
                for x in xs:
                    m(x.to(dtype)).float().square().mean().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                out[mode] = torch.cat([p.detach().float().flatten() for p in m.parameters()])
                flushes[mode] = [s for s in sizes if s]
            what = f"{name} {dtype}"
            assert len(flushes["bucketed"]) >= 2 * len(xs), f"{what}: expected several flushes, got {flushes}"
            biggest = max(p.numel() for p in m.parameters()) * torch.tensor([], dtype=dtype).element_size()
            assert max(flushes["bucketed"]) < cap * 2**20 + biggest, f"{what}: a bucket held too much"
            assert torch.equal(out["bucketed"], out["classic"]), f"{what}: bucketed fused != classic grouped step"
            assert torch.equal(out["per_tensor"], out["classic"]), f"{what}: per-tensor fused != classic grouped step"


def check_torch_path_optimizer_on_kernel_device(device: str) -> None:
    """AdaPM has no kernels: on a device where they run, its bf16 updates take the torch path with the
    seed the base hands out (this once crashed on CUDA)."""
    from adalomo import AdaPM
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(8, 12), torch.nn.Linear(12, 3)).to(device, torch.bfloat16)
    before = [p.detach().clone() for p in m.parameters()]
    opt = AdaPM(m.named_parameters(), lr=1e-2, rank=2, second_moment="factored", fused=True)
    for _ in range(2):
        m(torch.randn(5, 8, device=device, dtype=torch.bfloat16)).float().square().mean().backward()
    assert all(not torch.equal(a, b) for a, b in zip(before, m.parameters())), "AdaPM did not update"
    assert opt.skipped_updates is None or int(opt.skipped_updates) == 0


class _NoCtx:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def check_seed_and_ok_into(device: str) -> None:
    """The one-tensor updates' ``seed`` (same bits as a generator with that initial seed) and ``ok_into`` (the flag
    ANDed in) arguments."""
    gen = torch.Generator().manual_seed(5)
    p = _rand((9, 33), gen, device, torch.bfloat16)
    g = _rand((9, 33), gen, device, torch.bfloat16)
    acc = torch.ones((), dtype=torch.bool, device=device)
    kw = dict(rho=0.1, eps=EPS, clip_threshold=1.0, beta2=0.0, weight_decay=0.0, scale_parameter=True, beta1=None,
              grad_scale=None, stochastic_rounding=True, generator=None)
    p1, p2, st1, st2 = p.clone(), p.clone(), _state(p, None), _state(p, None)
    ok = kernels.scaled_rms_update_(p1, g, st1, seed=77, ok_into=acc, **kw)
    assert bool(ok) and bool(acc)
    kernels.scaled_rms_update_(p2, g, st2, **{**kw, "generator": _Seed(77)})
    assert torch.equal(p1, p2), "seed=s and a generator whose initial_seed() is s must round alike"
    g_bad = g.clone()
    g_bad[3, 3] = float("nan")
    ok = kernels.lomo_update_(p1, g_bad, lr=0.1, weight_decay=0.0, clip_grad_value=None, grad_scale=None,
                              stochastic_rounding=False, generator=None, ok_into=acc)
    assert not bool(ok) and not bool(acc), "ok_into must AND the flag in"
    ok = kernels.scaled_rms_update_(p1, g, st1, ok_into=acc, **kw)
    assert bool(ok) and not bool(acc), "a later finite update must not reset the accumulated flag"


def check_many(device: str, lomo: bool = False) -> None:
    """The grouped (multi-tensor) launches of the classic step against the per-tensor torch path."""
    gen = torch.Generator().manual_seed(11)
    specs = [((37, 53), torch.float32, "contig"), ((16, 130), torch.bfloat16, "contig"), ((33, 20), torch.float32,
             "transposed"), ((2, 9, 33), torch.float32, "contig"), ((21, 45), torch.float32, "sliced"),
             ((70,), torch.float32, "contig"), ((37,), torch.bfloat16, "transposed"), ((), torch.float32, "contig"),
             ((2, 3, 5, 6), torch.float32, "unmergeable"), ((19, 30), torch.bfloat16, "contig")]
    ps = [_layout(_rand(s, gen, device, dt), lay) for s, dt, lay in specs]
    beta1 = None if lomo else 0.9
    sts = [_state(p, beta1) for p in ps]
    strides = [p.stride() for p in ps]
    scale = torch.tensor(0.37, device=device)  # not a power of two (see lomo_2d_scaled_noclip)
    for step in (1, 2):
        gs = [_layout(_rand(s, gen, device, dt), lay) for s, dt, lay in specs]
        gs[-1][4, 4] = float("nan")  # one bad tensor: left alone, the others updated
        p_before = [p.clone() for p in ps]
        st_before = [{k: v.clone() for k, v in st.items()} for st in sts]
        rhos = [0.05 + 0.01 * i for i in range(len(specs))]
        betas = [F.beta2_at(float(step), -0.8)] * len(specs)
        lr, wd = 0.05 * step, 0.1 / step  # another lr and weight decay at each call (they travel in the metadata)
        if lomo:
            ok = kernels.lomo_update_many_(ps, gs, lr=lr, weight_decay=wd, clip_grad_value=0.8, grad_scale=scale,
                                           stochastic_rounding=False, seeds=[0] * len(specs))
        else:
            ok = kernels.scaled_rms_update_many_(ps, gs, sts, rhos=rhos, beta2s=betas, eps=EPS, clip_threshold=1.0,
                                                 weight_decay=0.1, scale_parameter=True, beta1=beta1,
                                                 grad_scale=scale, stochastic_rounding=False, seeds=[0] * len(specs))
        assert ok.dtype == torch.bool and ok.dim() == 0 and not bool(ok)
        assert torch.equal(ps[-1], p_before[-1]), "the tensor with a NaN gradient changed"
        for i in range(len(specs)):
            p_t = _layout(p_before[i], specs[i][2])
            st_t = st_before[i]
            with _TorchPath():
                if lomo:
                    F.lomo_update_(p_t, gs[i], lr=lr, weight_decay=wd, clip_grad_value=0.8, grad_scale=scale)
                else:
                    F.scaled_rms_update_(p_t, gs[i], st_t, rho=rhos[i], eps=EPS, clip_threshold=1.0, beta2=betas[i],
                                          weight_decay=0.1, scale_parameter=True, beta1=beta1, grad_scale=scale,
                                          stochastic_rounding=False, generator=None)
            what = f"many[{i}] {specs[i][:2]} step {step}"
            _check_ulps(ps[i], p_t, specs[i][1], what, p_before[i])
            assert ps[i].stride() == strides[i], "the parameter must be updated in place"
            for k in st_t:
                if k != "step":
                    _close(sts[i][k], st_t[k], 1e-5, f"{what} state {k}")


def check_one_read(device: str) -> None:
    """``one_read``: the statistics and RMS(u) from one read of g (``grouped_factored_stats_one_read_kernel``) give
    the updates of the three passes within rounding, in one call with matrices too wide for it (three passes, another
    group), with a gradient scale, a non-finite gradient and several row tiles per program."""
    from adalomo.kernels import updates
    gen = torch.Generator().manual_seed(5)
    specs = [((37, 53), torch.float32), ((16, 130), torch.bfloat16), ((2, 9, 33), torch.float32),
             ((300, 3), torch.float32), ((5, 70), torch.bfloat16), ((1, 77), torch.float32)]
    init = [_rand(s, gen, device, dt) for s, dt in specs]
    grads = [[_rand(s, gen, device, dt) * (1 + 2 * i) for s, dt in specs] for i in range(3)]
    grads[1][2][1, 4, 7] = float("inf")  # step 2: that tensor is left alone, the others updated
    scale = torch.tensor(0.37, device=device)

    def run(cfg: dict):
        prev = kernels.set_config(**cfg)
        try:
            ps = [p.clone() for p in init]
            sts = [_state(p, None) for p in ps]
            for step, gs in enumerate(grads):
                ok = kernels.scaled_rms_update_many_(ps, gs, sts, rhos=[0.05] * len(ps),
                                                     beta2s=[F.beta2_at(step + 1.0, -0.8)] * len(ps), eps=EPS,
                                                     clip_threshold=0.7, weight_decay=0.1, scale_parameter=True,
                                                     beta1=None, grad_scale=scale, stochastic_rounding=False,
                                                     seeds=[0] * len(ps))
                assert bool(ok) == (step != 1), f"step {step}: finite flag {bool(ok)}"
            plans = [gp for plan in updates._PLANS.values() for gp in plan.groups if gp.fac]
            return ps, sts, {gp.nb for gp in plans}
        finally:
            kernels.set_config(**prev)

    base, base_st, nbs = run(dict(one_read=False))
    assert nbs == {0}, nbs
    _one_read_fused_equals_classic(device, gen)
    for cfg in (dict(one_read_max_n=64), dict(one_read_max_n=64, one_read_tm=2, one_read_elems=64)):
        updates._PLANS.clear()
        ps, sts, nbs = run(cfg)
        assert 64 in nbs and 0 in nbs, f"{cfg}: expected one-read and three-pass groups, got tile widths {nbs}"
        for i, (s, dt) in enumerate(specs):
            what = f"one_read {cfg} {s}"
            _check_ulps(ps[i], base[i], dt, what, init[i])
            for k in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
                if k in sts[i]:
                    _close(sts[i][k], base_st[i][k], 1e-5, f"{what} state {k}")


def _one_read_fused_equals_classic(device: str, gen: torch.Generator) -> None:
    """Fused buckets (a matrix or two each) and the classic step's one group sum alike: bit-identical, with several
    programs per matrix (its geometry depends on its shape alone; one row per tile, so that a geometry that followed
    the group's size would give these matrices another number of programs)."""
    from adalomo import AdaLomo
    from adalomo.kernels import factored, one_read
    prev = kernels.set_config(one_read_tm=2, one_read_elems=16)
    try:
        out = {}
        xs = [torch.randn(8, 13, generator=gen).to(device) for _ in range(3)]  # fp32: every last bit kept
        for mode in ("classic", "fused"):
            torch.manual_seed(0)
            # 100x40 and 90x60: one group (tile width 64) in the classic step, a bucket each when fused
            m = torch.nn.Sequential(torch.nn.Linear(13, 40), torch.nn.Tanh(), torch.nn.Linear(40, 100),
                                    torch.nn.Tanh(), torch.nn.Linear(100, 60), torch.nn.Tanh(),
                                    torch.nn.Linear(60, 90), torch.nn.Tanh(), torch.nn.Linear(90, 5)).to(device)
            opt = AdaLomo(m.parameters(), lr=1e-2, fused=mode == "fused", bucket_cap_mb=6000 / 2**20)
            for x in xs:
                m(x).float().square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            out[mode] = torch.cat([p.detach().float().flatten() for p in m.parameters()])
        geo = one_read.geometry(factored.geometry(1, 70, 40, 128), 1, 70, 40, 64)
        assert geo["TM1"] == 2 and geo["RPP1"] < 70, geo
        assert torch.equal(out["fused"], out["classic"]), "one_read: fused buckets and the classic step differ"
    finally:
        kernels.set_config(**prev)


class _Seed:
    """What the kernels need of a generator: its initial seed (no device generator has to be created)."""

    def __init__(self, s: int):
        self.s = s

    def initial_seed(self) -> int:
        return self.s


def check_import_is_lazy(device: str) -> None:
    code = ("import sys, torch, adalomo; from adalomo import kernels; "
            "assert not kernels.use_triton(torch.zeros(3), torch.zeros(3)); "
            "assert 'triton' not in sys.modules, 'import adalomo imported triton'")
    env = {k: v for k, v in os.environ.items() if k not in ("ADALOMO_TRITON_INTERPRET", "TRITON_INTERPRET")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def check_one_read_psq(device: str) -> None:
    """The one-read statistics pass sums p^2 itself (no three-pass statistics launch for those groups): the torch
    path's updates for one-read and three-pass groups, odd layouts, several programs per matrix; fused buckets
    bit-identical to the classic step."""
    from adalomo.kernels import factored
    launched = []
    stats = factored.grouped_stats

    def counting(grid, args, consts, *rest, **kw):
        launched.append(consts)
        return stats(grid, args, consts, *rest, **kw)

    factored.grouped_stats = counting
    try:
        for cfg in ({}, dict(one_read_tm=2, one_read_elems=64), dict(one_read_max_n=64)):
            prev_cfg = kernels.set_config(**cfg)
            try:
                launched.clear()
                check_scaled(device, (37, 53), torch.bfloat16, rho=0.2, steps=2)
                check_scaled(device, (21, 45), p_layout="sliced", g_layout="transposed", steps=2)
                check_scaled(device, (2, 70, 9), beta1=0.9, steps=2)
                assert not launched, f"{cfg}: the three-pass statistics ran for one-read matrices"
                check_scaled(device, (5, 90), wd=0.1, steps=2)  # three passes with one_read_max_n=64
                assert bool(launched) == ("one_read_max_n" in cfg), f"{cfg}: three-pass launches {launched}"
                check_many(device)
            finally:
                kernels.set_config(**prev_cfg)
        _one_read_fused_equals_classic(device, torch.Generator().manual_seed(5))
    finally:
        factored.grouped_stats = stats


def check_psq_after_data_edit(device: str) -> None:
    """A change of p through ``p.data`` (its version counter does not move) between two steps gives exactly the
    right next step: three grouped steps (one-read and three-pass matrices, a vector), each equal to the torch path's
    from the same p and state. (A step sized by a stale sum of p^2, such as one carried from the previous write,
    fails it at step 3.)"""
    gen = torch.Generator().manual_seed(8)
    specs = [((37, 53), torch.float32), ((16, 130), torch.bfloat16), ((5, 90), torch.float32), ((70,), torch.float32)]
    ps = [_rand(s, gen, device, dt) for s, dt in specs]
    sts = [_state(p, None) for p in ps]
    prev = kernels.set_config(one_read_max_n=64)  # (5, 90): three passes
    try:
        for step in (1, 2, 3):
            if step == 3:
                for p in ps:
                    p.data.mul_(1.5)
            gs = [_rand(s, gen, device, dt) for s, dt in specs]
            p_before = [p.clone() for p in ps]
            st_before = [{k: v.clone() for k, v in st.items()} for st in sts]
            kw = dict(eps=EPS, clip_threshold=1.0, weight_decay=0.1, scale_parameter=True, beta1=None,
                      grad_scale=None, stochastic_rounding=False)
            kernels.scaled_rms_update_many_(ps, gs, sts, rhos=[0.2] * len(ps), beta2s=[F.beta2_at(step, -0.8)] * 4,
                                            seeds=[0] * len(ps), **kw)
            for i, (s, dt) in enumerate(specs):
                p_t = p_before[i].clone()
                with _TorchPath():
                    F.scaled_rms_update_(p_t, gs[i], st_before[i], rho=0.2, beta2=F.beta2_at(step, -0.8),
                                         generator=None, **kw)
                _check_ulps(ps[i], p_t, dt, f"{s} step {step}", p_before[i])
    finally:
        kernels.set_config(**prev)


def check_other_configs(device: str) -> None:
    """Other launch geometries (``set_config``: tile sizes, many row groups, warps) compute the same updates,
    per tensor and grouped; bad settings are refused with the known keys named."""
    from adalomo.kernels.config import pipeline_depth_for
    for bad in (dict(block_m=48), dict(max_tm=0), dict(warps_usq=64), dict(nonsense=1), dict(pipeline_depth=0),
                dict(pipeline_depth=9), dict(one_read="yes"), dict(one_read_max_n=100),
                dict(one_read_tm=0), dict(warps_one_read=3)):
        try:
            kernels.set_config(**bad)
        except ValueError:
            continue
        raise AssertionError(f"set_config accepted {bad}")
    # pipelined loops keep stages - 1 tiles per loaded tensor in shared memory: fewer stages for large tiles
    assert pipeline_depth_for(3, 32, 128, torch.bfloat16, torch.bfloat16) == 3
    assert pipeline_depth_for(8, 64, 256, torch.bfloat16, torch.bfloat16) == 2
    assert pipeline_depth_for(3, 64, 256, torch.float32, torch.float32) == 1
    assert pipeline_depth_for(1, 8, 8, torch.bfloat16) == 1
    # several row tiles per program (max_tm=2) and one (max_tm=256 on these shapes)
    for cfg in (dict(block_m=16, block_n=64, max_tm=256, warps_stats=8, warps_usq=8, warps_write=4),
                dict(block_m=64, block_n=256, max_tm=2),
                # software-pipelined row loops (cp.async on a GPU; the same loop, unprefetched, in the interpreter)
                dict(block_m=16, max_tm=2, pipeline_depth=3), dict(pipeline_depth=4),
                # the statistics in three passes; one read with several row tiles per program and small tiles
                dict(one_read=False), dict(one_read_tm=2, one_read_elems=256, warps_one_read=4)):
        prev = kernels.set_config(**cfg)
        try:
            check_scaled(device, (37, 53), torch.bfloat16, rho=0.2, steps=2)
            check_scaled(device, (2, 70, 9), beta1=0.9, steps=2)
            check_scaled(device, (150, 20), steps=1)  # with max_tm=2: several row tiles per program
            check_lomo(device, (45, 31), torch.bfloat16, wd=0.1)
            check_many(device)
            check_many(device, lomo=True)
        finally:
            kernels.set_config(**prev)


CASES: dict[str, Callable[[str], None]] = {
    "import_is_lazy": check_import_is_lazy,
    "fac2d_fp32": lambda d: check_scaled(d, (37, 53)),
    "fac2d_bf16_scale_wd": lambda d: check_scaled(d, (37, 53), torch.bfloat16, grad_scale=0.5, wd=0.1, rho=0.2),
    "fac2d_fp16_noscaleparam": lambda d: check_scaled(d, (19, 130), torch.float16, scale_parameter=False, rho=0.01),
    "fac2d_fp32_beta1_clip": lambda d: check_scaled(d, (40, 9), beta1=0.9, wd=0.05, clip_threshold=0.5, steps=3),
    "fac2d_g_transposed": lambda d: check_scaled(d, (33, 70), g_layout="transposed"),
    "fac2d_p_sliced_bf16g": lambda d: check_scaled(d, (21, 45), p_layout="sliced", g_layout="sliced",
                                                   g_dtype=torch.bfloat16),
    "fac3d_bf16": lambda d: check_scaled(d, (3, 9, 33), torch.bfloat16, rho=0.2),
    "fac4d_fp32": lambda d: check_scaled(d, (2, 3, 7, 20), beta1=0.5),
    "fac4d_unmergeable": lambda d: check_scaled(d, (2, 3, 5, 6), g_layout="unmergeable", p_layout="unmergeable"),
    "fac_tall_skinny": lambda d: check_scaled(d, (300, 3), steps=1),
    "fac_row_vector": lambda d: check_scaled(d, (1, 77), steps=1),
    "vec1d_fp32": lambda d: check_scaled(d, (70,), beta1=0.9, wd=0.1),
    "vec1d_bf16_strided": lambda d: check_scaled(d, (37,), torch.bfloat16, g_layout="transposed", rho=0.2),
    "vec0d": lambda d: check_scaled(d, (), steps=3),
    "nonfinite_nan_2d": lambda d: check_nonfinite(d, (17, 23)),
    "nonfinite_inf_1d_beta1": lambda d: check_nonfinite(d, (29,), bad=float("inf"), beta1=0.9),
    "nonfinite_bf16_3d": lambda d: check_nonfinite(d, (2, 5, 11), torch.bfloat16, bad=-float("inf")),
    "lomo_2d_bf16": lambda d: check_lomo(d, (37, 53), torch.bfloat16),
    "lomo_2d_fp32_all": lambda d: check_lomo(d, (20, 31), wd=0.1, clip=0.5, grad_scale=0.2718),
    # a scale that is not a power of two: the product is inexact (an FMA-contracted finite test once failed on CUDA)
    "lomo_2d_scaled_noclip": lambda d: check_lomo(d, (37, 29), grad_scale=0.37),
    "lomo_1d_fp16_strided": lambda d: check_lomo(d, (45,), torch.float16, g_layout="transposed", wd=0.01),
    "lomo_3d_unmergeable": lambda d: check_lomo(d, (2, 4, 3, 5), g_layout="unmergeable", p_layout="unmergeable"),
    "sr_bf16_adalomo": lambda d: check_stochastic_rounding(d),
    "sr_bf16_lomo": lambda d: check_stochastic_rounding(d, lomo=True),
    "sr_bits": check_sr_bits,
    "optimizers_end_to_end": check_optimizer_fused,
    "seed_and_ok_into": check_seed_and_ok_into,
    "fused_buckets": check_fused_buckets,
    "adapm_bf16_torch_path": check_torch_path_optimizer_on_kernel_device,
    "many_scaled": check_many,
    "many_lomo": lambda d: check_many(d, lomo=True),
    "other_configs": check_other_configs,
    "one_read": check_one_read,
    "one_read_psq": check_one_read_psq,
    "psq_after_data_edit": check_psq_after_data_edit,
}

def check_fast_launch_used(device: str) -> None:
    """On a GPU with Triton >= 3.4 the second launch of a kernel variant must bypass JITFunction.run."""
    from adalomo.kernels import factored, grouped, launch
    if not launch._DIRECT:
        return
    for _ in range(2):
        check_scaled(device, (64, 96), torch.bfloat16, steps=1)
    assert launch._DIRECT and factored.grouped_write.cache and grouped.finish.cache, \
        "the direct launch path is not in use"
    before = launch.JIT_LAUNCHES[0]
    check_scaled(device, (64, 96), torch.bfloat16, steps=1)  # the same variants again: no launch through Triton's
    assert launch.JIT_LAUNCHES[0] == before, \
        f"{launch.JIT_LAUNCHES[0] - before} launches went through Triton's Python path"


# larger odd shapes: on the GPU only (the interpreter is too slow for them)
GPU_CASES: dict[str, Callable[[str], None]] = {
    "gpu_fac_big_bf16": lambda d: check_scaled(d, (1031, 2053), torch.bfloat16, rho=0.2, grad_scale=0.5),
    "gpu_fac_big_fp32_beta1": lambda d: check_scaled(d, (777, 4099), beta1=0.9, wd=0.1),
    "gpu_fac_wide": lambda d: check_scaled(d, (64, 40000), torch.bfloat16, rho=0.2),
    "gpu_fac_tall": lambda d: check_scaled(d, (33001, 65), torch.float16, rho=0.01, scale_parameter=False),
    "gpu_fac_3d_transposed": lambda d: check_scaled(d, (6, 301, 257), g_layout="transposed"),
    "gpu_vec_big": lambda d: check_scaled(d, (300007,), torch.bfloat16, rho=0.2),
    "gpu_lomo_big": lambda d: check_lomo(d, (1025, 3001), torch.bfloat16, wd=0.1, clip=1.0),
    "gpu_sr_big": lambda d: check_stochastic_rounding(d, (512, 1000)),
    "gpu_fast_launch_used": check_fast_launch_used,
}


# --------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def interpreter_run() -> dict[str, str]:
    pytest.importorskip("triton")
    return interpreter_results(__file__, timeout=600)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter(interpreter_run, name):
    assert interpreter_run[name] == "ok", interpreter_run[name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", [n for n in list(CASES) + list(GPU_CASES) if n != "import_is_lazy"])
def test_cuda(name):
    pytest.importorskip("triton")
    {**CASES, **GPU_CASES}[name]("cuda")


def test_use_triton_rules(monkeypatch):
    cpu = torch.zeros(4, 4)
    monkeypatch.delenv("ADALOMO_TRITON_INTERPRET", raising=False)
    assert not kernels.use_triton(cpu, cpu)  # CPU without the interpreter flag: torch path, triton not imported
    assert not kernels.use_triton()
    assert not kernels.use_triton(torch.zeros(2, device="meta"))
    monkeypatch.setenv("ADALOMO_DISABLE_TRITON", "1")
    assert not kernels.use_triton(cpu, cpu)
    if torch.cuda.is_available():
        assert not kernels.use_triton(cpu.cuda(), cpu.cuda())
        monkeypatch.delenv("ADALOMO_DISABLE_TRITON")
        assert not kernels.use_triton(cpu.double().cuda(), cpu.double().cuda())
        assert not kernels.use_triton(torch.zeros(0, 3, device="cuda"))


def test_matrix_geometry_depends_on_its_shape_alone():
    """A matrix's finalize block (how its row and column sums are blocked, hence their rounding) is a function of its
    shape, not of the group it is launched with: a matrix wider than 128K columns (a larger finalize block) shares no
    group with narrower ones, so that a fused bucket without it and the classic step's group with it sum alike."""
    pytest.importorskip("triton")
    from adalomo.kernels import config, updates
    shapes = [(4, 9008), (2, 140000), (3, 9008)]  # three-pass statistics (rows wider than one_read's tiles), aligned
    ps = [torch.zeros(s) for s in shapes]
    sts = [F.init_factored_state(p) for p in ps]
    plan = updates._build_scaled_plan(ps, [torch.zeros_like(p) for p in ps], sts, False, torch.device("cpu"))
    blocks = {tuple(gp.idx): gp.fb for gp in plan.groups}
    assert blocks == {(0, 2): config.fin_block(4, 9008), (1,): config.fin_block(2, 140000)}, blocks
    assert config.fin_block(2, 140000) > config.fin_block(4, 9008)


def test_direct_launch_cache(monkeypatch):
    """The launch cache (no GPU needed): first launch through Triton, later ones direct, a new variant
    for another alignment or constexpr; nothing cached when a launch hook is installed."""
    pytest.importorskip("triton")
    from adalomo.kernels import launch as L

    class FakeCompiled:
        function, packed_metadata = "fn", "md"

        def __init__(self, names):
            sig = {"a_ptr": "*fp32", "b_ptr": "*bf16", "n": "i32", "C": "constexpr"}
            self.src = type("S", (), {"fn": type("F", (), {"arg_names": names})(), "signature": sig})()
            self.calls = []

        def run(self, *a):
            self.calls.append(a)

    class FakeFn:
        arg_names = ["a_ptr", "b_ptr", "n", "C"]

        def __init__(self):
            self.slow = 0

        def __getitem__(self, grid):
            def launch(*args, **kw):
                self.slow += 1
                return FakeCompiled(self.arg_names)
            return launch

    fn = FakeFn()
    launcher = L.Launcher(fn, "C")
    monkeypatch.setattr(L, "_DIRECT", True)
    monkeypatch.setattr(L, "JIT_LAUNCHES", [0])
    a, b = torch.zeros(8), torch.zeros(8, dtype=torch.bfloat16)
    run = (123, 0, None)  # stream, device, no key: the pointers' dtypes and alignment are read
    launcher(4, (a, b, 8), (True,), 4, run)
    assert fn.slow == 1 and len(launcher.cache) == 1
    launcher(4, (a, b, 8), (True,), 4, run)
    k = next(iter(launcher.cache.values()))
    assert fn.slow == 1 and k.calls == [(4, 1, 1, 123, "fn", "md", None, None, None, a, b, 8, True)]
    launcher(4, (a, b[1:], 8), (True,), 4, run)  # b no longer 16-byte aligned: another variant
    launcher(4, (a, b, 8), (False,), 4, run)  # another constexpr
    assert fn.slow == 3 and len(launcher.cache) == 3
    keyed = (123, 0, ("grk", 0, torch.float32, True))  # the caller vouches for the pointers (grouped launches)
    launcher(4, (a, b, 8), (True,), 4, keyed)
    launcher(4, (a, b, 8), (True,), 4, keyed)
    assert fn.slow == 4 and len(launcher.cache) == 4
    launcher(4, (a, b, 8), (True,), 4, (None, -1, None))  # interpreter / no stream: always Triton's path
    assert fn.slow == 5 and L.JIT_LAUNCHES == [5], "JIT_LAUNCHES counts exactly the launches through Triton"
    def broken(*a):
        raise TypeError("another Triton's launcher signature")
    k.run = broken  # a direct call that fails: back to Triton's path for good, and said so
    with pytest.warns(RuntimeWarning, match="Triton's own launch path"):
        launcher(4, (a, b, 8), (True,), 4, run)
    assert L._DIRECT is False and fn.slow == 6 and L.JIT_LAUNCHES == [6]
    monkeypatch.setattr(L, "_DIRECT", True)
    from triton import knobs
    hook = lambda *a: None  # noqa: E731
    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", hook)
    launcher2 = L.Launcher(fn, "C")
    launcher2(4, (a, b, 8), (True,), 4, run)
    assert not launcher2.cache, "a launch hook must keep launches on Triton's path"


def test_public_set_config(monkeypatch):
    """``adalomo.kernels.set_config``: the documented way to change a kernel setting (e.g. turn ``one_read`` off);
    it returns what it changed, refuses unknown keys, and says so when there are no kernels to configure."""
    pytest.importorskip("triton")
    from adalomo.kernels.config import CONFIG
    assert CONFIG["one_read"] and CONFIG["pipeline_depth"] == 3  # the defaults the README's tables were run at
    prev = kernels.set_config(one_read=False)
    try:
        assert prev == {"one_read": True} and not CONFIG["one_read"]
        with pytest.raises(ValueError, match="known:"):
            kernels.set_config(one_raed=True)
    finally:
        kernels.set_config(**prev)
    assert CONFIG["one_read"]
    monkeypatch.setattr(kernels, "_load", lambda interpret: None)
    with pytest.raises(RuntimeError, match="not available"):
        kernels.set_config(one_read=False)


if __name__ == "__main__":
    # the interpreter run (see the module docstring); also usable on a GPU machine: python tests/test_kernels.py cuda
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    if dev == "cpu":
        os.environ["ADALOMO_TRITON_INTERPRET"] = "1"
        os.environ["TRITON_INTERPRET"] = "1"
    cases = CASES if dev == "cpu" else {**CASES, **GPU_CASES}
    if len(sys.argv) > 2:  # a comma-separated subset
        cases = {k: cases[k] for k in sys.argv[2].split(",")}
    res = run_cases(dev, cases)
    bad = {k: v for k, v in res.items() if not k.endswith(":seconds") and v != "ok"}
    print(json.dumps(res))
    sys.exit(0)
