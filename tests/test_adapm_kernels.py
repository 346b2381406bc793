"""AdaPM's Triton kernels (``adalomo.kernels.adapm``) against the float64 reference and the torch path.

As in ``tests/test_kernels.py``, on CPU the kernels run through Triton's interpreter in ONE subprocess
(``python tests/test_adapm_kernels.py`` runs every case with ``ADALOMO_TRITON_INTERPRET=1`` and prints a JSON verdict
per case); with CUDA the same cases also run in-process on the GPU. Every case also checks that the matrices really
went through the kernels (``_update_many``), not the torch path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from kernel_cases import interpreter_results, run_cases  # noqa: E402
from test_adapm import RefAdaPM, _planted_grads  # noqa: E402

from adalomo import DynamicLossScaler, kernels  # noqa: E402
from adalomo.optim.adapm import AdaPM, SplitMomentum  # noqa: E402

KINDS = {"none": "none", "full": "full", "low_rank": "low_rank",
         "split_cols": SplitMomentum(-1, ("low_rank", "low_rank", "full")),
         "split_rows": SplitMomentum(0, ("full", "none", "low_rank"))}
SHAPES = [(12, 48), (48, 12)]  # the basis on the left and on the right side


class _Counted:
    """Count the tensors updated by the kernels inside the block."""

    def __enter__(self):
        self.orig, self.n = kernels.adapm_update_many_, 0

        def counted(ps, *a, **k):
            self.n += len(ps)
            return self.orig(ps, *a, **k)
        kernels.adapm_update_many_ = counted
        return self

    def __exit__(self, *exc):
        kernels.adapm_update_many_ = self.orig


class _TorchPath:
    def __enter__(self):
        os.environ["ADALOMO_DISABLE_TRITON"] = "1"

    def __exit__(self, *exc):
        os.environ.pop("ADALOMO_DISABLE_TRITON", None)


def _close(a, b, rtol, atol, what):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    err = (a - b).abs()
    tol = atol + rtol * b.abs()
    assert bool((err <= tol).all()), f"{what}: max abs error {float(err.max()):.3g} (tolerance {atol:g} + {rtol:g}|x|)"


def _train(device, kind, second, *, dtype=torch.float32, steps=9, seed=0, torch_path=False, shapes=None, **kw):
    """AdaPM on two matrices (basis left and right), a 1-D and a 0-D tensor (or ``shapes``), classic mode; returns
    (params, kernel calls)."""
    torch.manual_seed(seed)
    ps = [nn.Parameter(torch.randn(s).to(device, dtype)) for s in (shapes or SHAPES + [(5,), ()])]
    opt = AdaPM([{"params": ps, "momentum": KINDS[kind]}], lr=1e-2, rank=3, update_proj_gap=4,
                second_moment=second, **kw)
    gen = torch.Generator().manual_seed(seed + 1)
    with (_TorchPath() if torch_path else _Counted()) as c:
        for _ in range(steps):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
            opt.step()
    return ps, (0 if torch_path else c.n)


# --------------------------------------------------------------------------------------------- cases
def check_reference(device: str, kind: str, second: str) -> None:
    """fp32, 10 steps with basis refreshes at steps 1, 5 and 9: the kernels against the float64 reference
    (svd basis), tensor by tensor (two matrices and a 1-D tensor)."""
    steps, gap, lr, wd = 10, 4, 1e-2, 0.1
    params, refs, grads = [], [], []
    for i, shape in enumerate(SHAPES + [(9,)]):  # and a 1-D tensor (one row; low-rank means full there)
        params.append(nn.Parameter(torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(device)))
        k = kind if (kind != "low_rank" or len(shape) == 2) else "full"
        refs.append(RefAdaPM(params[-1].cpu(), k, lr=lr, wd=wd, rank=3, gap=gap, second=second))
        grads.append(_planted_grads(shape, steps, 100 + i))
    opt = AdaPM([{"params": params, "momentum": kind}], lr=lr, weight_decay=wd, rank=3, update_proj_gap=gap,
                second_moment=second, proj_method="svd")
    with _Counted() as c:
        for t in range(steps):
            for p, ref, gs in zip(params, refs, grads):
                p.grad = gs[t].float().to(device)
                ref.step(gs[t])
            opt.step()
    assert c.n == steps * len(params), f"the kernels updated {c.n} matrices, expected {steps * len(params)}"
    for p, ref in zip(params, refs):
        _close(p, ref.p, 1e-5, 2e-5, f"{kind}/{second} {tuple(p.shape)} vs float64")


def check_torch_path(device: str, kind: str, second: str, dtype=torch.float32, **kw) -> None:
    """The kernels against the torch path (same basis function, randomized), every kind incl. SplitMomentum."""
    a, n = _train(device, kind, second, dtype=dtype, **kw)
    b, _ = _train(device, kind, second, dtype=dtype, torch_path=True, **kw)
    assert n == 9 * (len(SHAPES) + 2), f"the kernels updated {n} tensors"
    rtol, atol = (2e-5, 2e-6) if dtype == torch.float32 else (3e-2, 3e-2)
    for x, y in zip(a, b):
        assert x.dtype == dtype
        _close(x.float(), y.float(), rtol, atol, f"{kind}/{second} {dtype} {kw} {tuple(x.shape)} vs torch path")


#: matrices of several sizes: more than one wave, and waves of several matrices with low-rank chunks
WAVE_SHAPES = [(36, 48), (30, 48), (12, 24), (24, 12), (5,), (12, 18), ()]


def check_waves(device: str, kind: str, second: str) -> None:
    """Several tensors with low-rank chunks in one wave (one launch per pass for all of them, their lifts alive
    together), and several waves: the kernels against the torch path."""
    from adalomo.kernels import adapm as K
    K._PLANS.clear()
    a, n = _train(device, kind, second, shapes=WAVE_SHAPES, relative_lr=second == "factored", weight_decay=0.1)
    b, _ = _train(device, kind, second, shapes=WAVE_SHAPES, torch_path=True, relative_lr=second == "factored",
                  weight_decay=0.1)
    assert n == 9 * len(WAVE_SHAPES), f"the kernels updated {n} tensors"
    # Adam's u = m_hat / sqrt(v_hat) magnifies the lift's rounding (bf16 pieces vs one fp32 matmul) where |g| is
    # small: up to ~4e-5 on these shapes, the same before the waves; a wrong pointer or offset moves p by ~0.1
    rtol, atol = (2e-5, 2e-6) if second == "factored" else (1e-4, 1e-4)
    for x, y in zip(a, b):
        _close(x, y, rtol, atol, f"waves {kind}/{second} {tuple(x.shape)} vs torch path")
    (plan,) = K._PLANS.values()
    waves = [w.tensors for w in plan.waves]
    low = [sum(c.lift >= 0 for c in w.chunks) for w in plan.waves]
    assert len(waves) >= 2 and max(low) >= 2, f"waves {waves}, low-rank chunks per wave {low}"


def check_lockstep(device: str, kind: str, second: str, dtype: torch.dtype) -> None:
    """bf16/fp16 parameters (fp32 state), rounding to nearest: each step of the kernels from the torch path's
    parameters and state lands within 2 units in the last place of the torch path's result (the interpreter
    truncates where the GPU rounds; fp32 sums in another order may cross a rounding boundary)."""
    mant = {torch.bfloat16: 7, torch.float16: 10}[dtype]
    torch.manual_seed(0)
    runs = []
    for _ in range(2):
        ps = [nn.Parameter(torch.randn(s).to(device, dtype)) for s in SHAPES]
        runs.append((ps, AdaPM([{"params": ps, "momentum": KINDS[kind]}], lr=1e-2, rank=3, update_proj_gap=3,
                               weight_decay=0.1, second_moment=second, stochastic_rounding=False)))
        torch.manual_seed(0)
    (pk, ok_), (pt, ot) = runs
    gen = torch.Generator().manual_seed(1)
    for t in range(5):
        for a, b in zip(pk, pt):
            a.grad = torch.randn(a.shape, generator=gen).to(device, dtype)
            b.grad = a.grad.clone()
        before = [b.detach().float().clone() for b in pt]
        with _Counted() as c:
            ok_.step()
        with _TorchPath():
            ot.step()
        assert c.n == len(SHAPES)
        for a, b, b0 in zip(pk, pt, before):
            a, b = a.detach().float(), b.detach().float()
            mag = torch.maximum(a.abs(), b.abs()).clamp_min(2.0 ** -14)
            tol = 2 * torch.pow(2.0, torch.floor(torch.log2(mag)) - mant) + 1e-5 * (b - b0).abs().max()
            bad = (a - b).abs() > tol
            assert not bool(bad.any()), f"{kind}/{second} {dtype} step {t + 1}: {int(bad.sum())} elements off"
        with torch.no_grad():  # the next step starts from the same point
            for a, b in zip(pk, pt):
                b.copy_(a)
                for k, v in ok_.state[a].items():
                    ot.state[b][k].copy_(v)


def check_loss_scaler(device: str, second: str) -> None:
    """grad_scale (DynamicLossScaler's 1/scale) is applied in the kernels as in the torch path."""
    out = []
    for torch_path in (False, True):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s).to(device)) for s in SHAPES]
        opt = AdaPM([{"params": [p], "momentum": KINDS["split_cols"] if i == 0 else "low_rank"}
                     for i, p in enumerate(ps)], lr=1e-2, rank=3, update_proj_gap=3, second_moment=second,
                    loss_scaler=DynamicLossScaler(init_scale=1024.0, growth_interval=1000))
        gen = torch.Generator().manual_seed(1)
        with _TorchPath() if torch_path else _Counted():
            for _ in range(5):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=gen).to(device) * 1024.0
                opt.step()
        out.append(ps)
    for x, y in zip(*out):
        _close(x, y, 2e-5, 1e-5, f"{second} loss scaler")


def check_fused_equals_classic(device: str, dtype: torch.dtype, second: str) -> None:
    """Fused mode (buckets with several flushes, and one tensor per update) == classic step(), bit for bit, with the
    default policy (no momentum, full, low-rank and split chunks) and bf16 stochastic rounding."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.v_proj = nn.Linear(16, 16), nn.Linear(16, 32)
            self.o_proj, self.qkv_proj = nn.Linear(32, 16), nn.Linear(16, 48, bias=False)
            self.norm = nn.LayerNorm(48)

        def forward(self, x):
            h = self.o_proj(torch.tanh(self.v_proj(self.q_proj(x))))
            return self.norm(self.qkv_proj(h))

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(4, 16, generator=gen).to(device, dtype) for _ in range(5)]
    modes = {"classic": dict(fused=False), "bucketed": dict(fused=True, bucket_cap_mb=1500 * 4 / 2**20),
             "per_tensor": dict(fused=True, bucket_cap_mb=0)}
    out = {}
    for mode, kw in modes.items():
        torch.manual_seed(0)
        m = Block().to(device, dtype)
        opt = AdaPM(m.named_parameters(), lr=1e-2, rank=2, update_proj_gap=2, second_moment=second,
                    weight_decay=0.01, **kw)
        assert opt.momentum_kind(m.qkv_proj.weight) == SplitMomentum(0, ("low_rank", "low_rank", "full"))
        with _Counted() as c:
            for x in xs:
                m(x).float().square().mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        assert c.n == 9 * len(xs), f"{mode}: the kernels updated {c.n} tensors"
        out[mode] = [p.detach().clone() for p in m.parameters()] + [
            v.clone() for st in opt.state.values() for v in st.values()]
    for mode in ("bucketed", "per_tensor"):
        for x, y in zip(out[mode], out["classic"]):
            assert torch.equal(x, y), f"{dtype} {second}: {mode} fused != classic"


def check_nonfinite(device: str, second: str) -> None:
    """A matrix with a NaN gradient keeps its weights and state; the others are updated. Low-rank momentum with a
    basis refresh at every step: the refresh of that matrix is not taken either, nor does it touch its gradient."""
    for kind in ("full", "low_rank"):
        torch.manual_seed(0)
        ps = [nn.Parameter(torch.randn(s).to(device)) for s in SHAPES]
        opt = AdaPM([{"params": ps, "momentum": kind}], lr=1e-2, second_moment=second, nonfinite="count", rank=3,
                    update_proj_gap=1)
        for p in ps:
            p.grad = torch.randn(p.shape).to(device)
        opt.step()
        before = [p.detach().clone() for p in ps] + [v.clone() for k, v in opt.state[ps[0]].items() if k != "step"]
        ps[0].grad = torch.randn(ps[0].shape).to(device)
        ps[0].grad[3, 5] = float("nan")
        grad0 = ps[0].grad.clone()
        ps[1].grad = torch.randn(ps[1].shape).to(device)
        with _Counted() as c:
            opt.step()
        assert c.n == 2
        after = [p.detach() for p in ps] + [v for k, v in opt.state[ps[0]].items() if k != "step"]
        assert torch.equal(after[0], before[0]) and not torch.equal(after[1], before[1]), kind
        assert len(after) == len(before) and all(torch.equal(x, y) for x, y in zip(after[2:], before[2:])), kind
        assert bool(((ps[0].grad == grad0) | (ps[0].grad.isnan() & grad0.isnan())).all()), f"{kind}: gradient changed"
        assert int(opt.skipped_updates) == 1


def _pieces_sum(x: torch.Tensor, pattern, axis: int) -> torch.Tensor:
    """The sum of the distinct pieces in blocks of ``x`` (laid out along ``axis`` in the order ``pattern``)."""
    blocks = x.double().chunk(len(pattern), axis)
    return sum(blocks[pattern.index(i)] for i in sorted(set(pattern)))


def check_products(device: str) -> None:
    """The rank-r products from bfloat16 pieces (``kernels.products``): the pieces of an fp32 matrix sum to it; the
    projection P^T g / g P of a strided bf16, fp16 or fp32 gradient (its three blocks summed) and the lift A @ B,
    against float64 to fp32 accuracy."""
    from adalomo.kernels import products as KP
    from adalomo.kernels.launch import LaunchContext
    gen = torch.Generator().manual_seed(0)
    for shape, side, r in (((520, 600), "left", 5), ((600, 520), "right", 20), ((40, 90), "left", 3)):
        a, b = shape
        P = torch.linalg.qr(torch.randn(a if side == "left" else b, r, generator=gen))[0].to(device)
        ctx = LaunchContext(P)
        run = (ctx.stream, ctx.device, None)
        Pc = KP.pieces(P, KP.PROJECT, run)
        _close(_pieces_sum(Pc, KP.PROJECT, 1), P, 0, 1e-7 * float(P.abs().max()), f"pieces of P {tuple(P.shape)}")
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            big = torch.randn(a, b + 7, generator=gen).to(device, dtype)
            g = big[:, 3:3 + b]  # rows padded: a strided view
            out = KP.project(g, Pc, side, run)
            got = out.view(3, r, b).sum(0) if side == "left" else out.view(a, 3, r).sum(1)
            want = P.double().mT @ g.double() if side == "left" else g.double() @ P.double()
            _close(got, want, 0, 3e-6 * float(want.abs().max()), f"projection {shape} {side} {dtype}")
        A = torch.randn(a, r, generator=gen).to(device) * 3
        B = torch.randn(b, r, generator=gen).to(device).mT  # a transposed view
        got = KP.lift(KP.pieces(A, KP.LIFT_A, run), KP.pieces(B.mT, KP.LIFT_B, run).mT)
        want = A.double() @ B.double()
        _close(got, want, 0, 3e-6 * float(want.abs().max()), f"lift {shape}")


def check_small_momentum(device: str) -> None:
    """The low-rank chunk's small momentum kernel: the projection's blocks summed (both layouts) times the gradient's
    scale, M updated only where the momentum's finite flag holds, C = M / (1 - beta1^t) - pg written as pieces."""
    from adalomo.kernels import adapm as K
    from adalomo.kernels import products as KP
    from adalomo.kernels.launch import LaunchContext
    gen = torch.Generator().manual_seed(0)
    for scale, shape, finite, left in ((None, (5, 300), True, True), (0.25, (70, 20), True, False),
                                       (2.0, (4, 33), False, True)):
        rows, cols = shape
        blocks = torch.randn(3, rows, cols, generator=gen).to(device)
        parts = blocks.reshape(3 * rows, cols) if left else blocks.permute(1, 0, 2).reshape(rows, 3 * cols)
        layout = (rows * cols, 0, rows * cols) if left else (cols, 3 * cols, cols)
        m0 = torch.randn(shape, generator=gen).to(device)
        m = m0.clone()
        cp = torch.empty(rows, 6 * cols, dtype=torch.bfloat16, device=device)
        flags = torch.tensor([int(finite), 1], dtype=torch.int32, device=device)
        s_t = flags if scale is None else torch.full((), scale, device=device)
        order = KP.LIFT_B if left else KP.LIFT_A
        ctx = LaunchContext(m)
        K.momentum(K.cdiv(m.numel(), 128), (parts, m, cp, s_t, flags, m.numel(), *layout, 0.9, 1 - 0.9 ** 3),
                   (3, scale is not None, KP.pack(order), 128), 4, (ctx.stream, ctx.device, None))
        pg = blocks.sum(0) * (scale or 1.0)
        want_m = torch.lerp(pg, m0, 0.9) if finite else m0
        _close(m, want_m, 1e-6, 1e-6, f"small momentum M {shape}")
        c = _pieces_sum(cp.view(6 * rows, cols), order, 0) if left else _pieces_sum(cp, order, 1)
        _close(c, want_m / (1 - 0.9 ** 3) - pg, 1e-6, 1e-6, f"small momentum C {shape}")


def check_no_sync(device: str) -> None:
    """A kernel step with a basis refresh (randomized, the default) reads nothing back from the device and makes no
    tensor from host data (on CUDA both wait for the device), and calls no factorisation that does (svd, eigh)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func))
            return func(*args, **(kwargs or {}))

    from adalomo.kernels import adapm as K
    orig = K.adapm_update_many_

    def recorded(*a, **k):
        with Record():
            return orig(*a, **k)
    K.adapm_update_many_ = recorded
    try:
        for second in ("adam", "factored"):
            ps, n = _train(device, "split_cols", second, steps=5, relative_lr=True)
            assert n == 20
    finally:
        K.adapm_update_many_ = orig
    assert "aten.linalg_qr.default" in seen, "no refresh was recorded"
    syncing = {s for s in seen if any(k in s for k in ("_local_scalar_dense", "lift_fresh", "svd", "eigh", "eig.",
                                                        "item", "nonzero"))}
    assert not syncing, f"a kernel step waits for the device: {syncing}"


def _qr_steps(s: torch.Tensor, z: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        z, _ = torch.linalg.qr(s @ z)
    return z


def check_orthogonal_iteration(device: str) -> None:
    """``kernels.orthogonal_iteration`` (the refresh's small steps in one launch) against torch's QR steps: the same Q
    to rounding for a full-rank s (LAPACK's sign convention), a batch, orthonormal columns spanning s's range when s
    has rank < r, e_j for s = 0; not taken above ``subspace.MAX_K``."""
    from adalomo.kernels import subspace
    gen = torch.Generator().manual_seed(7)
    for k, r, iters in ((11, 3, 4), (24, 16, 3), (40, 33, 2)):
        b = torch.randn(k, 3 * k, generator=gen) * torch.logspace(0, -2, k)[:, None]
        s, z = (b @ b.mT).to(device), torch.randn(k, r, generator=gen).to(device)
        _close(kernels.orthogonal_iteration(s, z, iters), _qr_steps(s, z, iters), 0, 2e-5, f"k={k} r={r} vs torch")
    sb = torch.stack([(lambda x: x @ x.mT)(torch.randn(9, 20, generator=gen)) for _ in range(3)]).to(device)
    zb = torch.randn(3, 9, 5, generator=gen).to(device)
    got = kernels.orthogonal_iteration(sb, zb, 5)
    for i in range(3):
        _close(got[i], _qr_steps(sb[i], zb[i], 5), 0, 2e-5, f"batch member {i}")
    k, r = 10, 6
    b = torch.randn(k, 2, generator=gen).to(device)
    got = kernels.orthogonal_iteration(b @ b.mT, torch.randn(k, r, generator=gen).to(device), 3)
    _close(got.mT @ got, torch.eye(r, device=device), 0, 1e-6, "rank 2 < r: orthonormal")
    u = torch.linalg.svd(b.cpu())[0][:, :2]
    _close(got[:, :2] @ got[:, :2].mT, (u @ u.mT).to(device), 0, 1e-6, "rank 2 < r: the range first")
    got = kernels.orthogonal_iteration(torch.zeros(k, k, device=device), torch.randn(k, r, generator=gen).to(device), 3)
    _close(got, torch.eye(k, r, device=device), 0, 0, "s = 0: e_j")
    big = subspace.MAX_K + 1
    assert kernels.orthogonal_iteration(torch.eye(big, device=device), torch.ones(big, 2, device=device), 1) is None


def check_refresh_kernel(device: str) -> None:
    """AdaPM's randomized basis with the small steps in the kernel (what the optimizer uses where the kernels run)
    spans torch's to rounding, both sides."""
    from adalomo import momentum as Mo
    gen = torch.Generator().manual_seed(3)
    for shape, r in (((40, 96), 16), ((96, 40), 24)):
        g = (torch.randn(shape[0], 8, generator=gen) @ torch.randn(8, shape[1], generator=gen) * 3
             + torch.randn(shape, generator=gen) * torch.logspace(0, -2, shape[1])).to(device)
        side = "left" if shape[0] <= shape[1] else "right"
        got, want = (Mo.orthonormal_basis(g, r, side, generator=torch.Generator(device).manual_seed(1), iterate=it)
                     for it in (kernels.orthogonal_iteration, None))
        _close(got @ got.mT, want @ want.mT, 0, 1e-5, f"{shape} basis: the kernel's vs torch's subspace")


def check_launch_keys(device: str) -> None:
    """The launch-cache keys that a cached plan hands the launcher (``launch.keyed_launch``: the dtype and alignment
    of each pointer argument, read at the plan's first use) are those of the arguments of every later launch, as
    what changes between steps changes: the tensor's place in the bucket (its finite flags' alignment), a loss
    scale, a basis refresh, SplitMomentum chunks, the gradient's strides. Under the interpreter a launch passes no key,
    so a fake stream makes the plans record theirs; each launch is checked against its own arguments."""
    if device != "cpu":  # on CUDA the keys are real; this check needs the interpreter's fake stream
        return
    from adalomo.kernels import adapm as K
    from adalomo.kernels import launch as L

    checked = [0]
    orig_call, orig_ctx = L.Launcher.__call__, K.LaunchContext

    def call(self, grid, args, consts, num_warps, run, maxnreg=None):
        stream, dev, key = run
        if key is not None and key[0] == "grk":  # a grouped launch: metadata, program map (and the scale)
            ptrs = args[:self.n_ptr]
            got = tuple((a.dtype, a.data_ptr() % 16 == 0) for a in ptrs)
            want = ((torch.int64, True), (torch.float32, True), (torch.int32, True)) + ((key[2], key[3]),) * (
                len(ptrs) - 3)
            assert got == want, f"{self.fn.__name__}: grouped launch key {key} but the arguments have {got}"
            checked[0] += 1
        elif key is not None:
            want = (dev,) + tuple((a.dtype, a.data_ptr() % 16 == 0) for a in args[:self.n_ptr])
            assert key == want, f"{self.fn.__name__}: cached launch key {key} but the arguments have {want}"
            checked[0] += 1
        return orig_call(self, grid, args, consts, num_warps, (None, -1, None), maxnreg)

    class FakeStream:
        def __init__(self, t):
            self.device, self.stream = -1, 1

    L.Launcher.__call__, K.LaunchContext = call, FakeStream
    try:
        for kind in ("split_cols", "low_rank"):
            for second in ("adam", "factored"):
                for dtype, scaler in ((torch.float32, None), (torch.bfloat16, None),
                                      (torch.float32, DynamicLossScaler(init_scale=4.0, growth_interval=2))):
                    torch.manual_seed(0)
                    ps = [nn.Parameter(torch.randn(s, device=device, dtype=dtype)) for s in SHAPES + [(7,)]]
                    opt = AdaPM([{"params": ps, "momentum": KINDS[kind]}], lr=1e-2, rank=3, update_proj_gap=3,
                                second_moment=second, relative_lr=second == "factored", loss_scaler=scaler)
                    for t in range(7):
                        for i, p in enumerate(ps):  # from step 3 the first tensor sits out every other step
                            skip = i == 0 and t >= 3 and t % 2
                            p.grad = None if skip else torch.randn(p.shape, device=device, dtype=dtype)
                        if t == 5:  # a transposed gradient: other strides, another plan
                            ps[1].grad = ps[1].grad.mT.contiguous().mT
                        opt.step()
    finally:
        L.Launcher.__call__, K.LaunchContext = orig_call, orig_ctx
        K._PLANS.clear()
    assert checked[0] > 100, f"only {checked[0]} keyed launches were checked"


CASES: dict[str, Callable[[str], None]] = {}
for _second in ("adam", "factored"):
    for _kind in ("none", "full", "low_rank"):
        CASES[f"reference_{_kind}_{_second}"] = lambda d, k=_kind, s=_second: check_reference(d, k, s)
    for _kind in KINDS:
        CASES[f"torch_path_{_kind}_{_second}"] = lambda d, k=_kind, s=_second: check_torch_path(d, k, s)
    for _dt in (torch.bfloat16, torch.float16):
        CASES[f"lockstep_{str(_dt)[6:]}_{_second}"] = lambda d, s=_second, dt=_dt: check_lockstep(
            d, "split_rows", s, dt)
    CASES[f"loss_scaler_{_second}"] = lambda d, s=_second: check_loss_scaler(d, s)
    CASES[f"fused_equals_classic_fp32_{_second}"] = lambda d, s=_second: check_fused_equals_classic(
        d, torch.float32, s)
    CASES[f"fused_equals_classic_bf16_sr_{_second}"] = lambda d, s=_second: check_fused_equals_classic(
        d, torch.bfloat16, s)
    CASES[f"nonfinite_{_second}"] = lambda d, s=_second: check_nonfinite(d, s)
for _second in ("adam", "factored"):
    for _kind in ("low_rank", "split_cols", "split_rows"):
        CASES[f"waves_{_kind}_{_second}"] = lambda d, k=_kind, s=_second: check_waves(d, k, s)
CASES["options_factored"] = lambda d: check_torch_path(d, "split_cols", "factored", weight_decay=0.1,
                                                       relative_lr=True, decay_rate=-0.8, clip_threshold=0.5,
                                                       betas=(0.8, 0.99))
CASES["options_factored_no_clip_no_fill"] = lambda d: check_torch_path(d, "split_rows", "factored", clip_threshold=None,
                                                                       refresh_fill=False, weight_decay=0.1)
CASES["options_adam"] = lambda d: check_torch_path(d, "split_cols", "adam", weight_decay=0.1, decay_rate=-0.8,
                                                   betas=(0.0, 0.95), eps=1e-6)
CASES["bf16_stochastic_rounding"] = lambda d: check_torch_path(d, "full", "factored", torch.bfloat16)
CASES["no_sync"] = check_no_sync
CASES["products"] = check_products
CASES["small_momentum"] = check_small_momentum
CASES["launch_keys"] = check_launch_keys
CASES["orthogonal_iteration"] = check_orthogonal_iteration
CASES["refresh_kernel"] = check_refresh_kernel


# --------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def interpreter_run() -> dict[str, str]:
    pytest.importorskip("triton")
    return interpreter_results(__file__, timeout=900)


@pytest.mark.parametrize("name", list(CASES))
def test_interpreter(interpreter_run, name):
    assert interpreter_run[name] == "ok", interpreter_run[name]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", list(CASES))
def test_cuda(name):
    pytest.importorskip("triton")
    CASES[name]("cuda")


_SM90_FLOATS = ("beta1", "bc1", "beta2", "bc2", "eps", "sbc2", "eps1", "lr", "weight_decay", "numel_f", "sqrt_numel",
                "clip_threshold")


def _sm90_variants(tl):
    """AdaPM's kernels in the variants the optimizer launches (bf16 p and g): every momentum code, both second
    moments, stochastic rounding on and off; the pieces of a lift's operand."""
    from adalomo.kernels import adapm as K
    from adalomo.kernels.config import CONFIG as C
    from adalomo.kernels.config import next_pow2
    tile = dict(ALIGN=True, G_UNIT=True, BLOCK_M=C["block_m"], BLOCK_N=C["block_n"], G_DT=tl.bfloat16)
    out = [("adapm_stats", K.adapm_stats_kernel,
            dict(tile, HAS_SCALE=True, FACTORED=True, PSQ=True, P_UNIT=True, P_DT=tl.bfloat16), K.WARPS, True),
            ("adapm_finalize", K.adapm_finalize_kernel, dict(BLOCK=K._FINISH_BLOCK), 4, False),
            ("adapm_factors", K.adapm_factors_kernel, dict(FACTORED=True, BLOCK=K._FINISH_BLOCK, FB=64), 4, False)]
    from adalomo.kernels import products as KP
    out.append(("adapm_pieces", KP.adapm_pieces_kernel,
                dict(PATTERN=KP.pack(KP.PROJECT + KP.LIFT_A), K=9, BLOCK_R=KP._BLOCK[0], BLOCK_C=KP._BLOCK[1]), 4,
                True))
    out.append(("adapm_momentum", K.adapm_momentum_kernel,
                dict(N_PARTS=3, HAS_SCALE=True, C_PATTERN=KP.pack(KP.LIFT_B), BLOCK=K._MOMENTUM_BLOCK), 4, False))
    from adalomo.kernels import subspace as KS
    for k, r in ((72, 64), (11, 3)):  # the refresh's small steps at the default rank and at a small one
        kp, rp = max(16, next_pow2(k)), max(16, next_pow2(r))
        out.append((f"orthogonal_iteration_{kp}x{rp}", KS.orthogonal_iteration_kernel, dict(KP=kp, RP=rp),
                    KS._warps(kp * rp), False))
    for mom in (0, 1, 2):
        out.append((f"adapm_usq_{mom}", K.adapm_usq_kernel, dict(tile, HAS_SCALE=False, MOM=mom), K.WARPS, True))
        for adam in (True, False):
            for sr in (True, False):
                out.append((f"adapm_write_{mom}_{'adam' if adam else 'factored'}{'' if sr else '_nosr'}",
                            K.adapm_write_kernel, dict(tile, HAS_SCALE=False, MOM=mom, ADAM=adam, M_STORED=not adam,
                                                       HAS_WD=True, HAS_USQ=not adam, PSQ=not adam, SR=sr,
                                                       P_UNIT=True, P_DT=tl.bfloat16), K.WARPS, True))
    return out


def test_kernels_compile_for_sm90():
    """The kernels compile for a Hopper GPU (Triton's compiler and ptxas on CPU, as ``test_kernels_sm90.py`` does):
    the interpreter never lowers ``tl.dot`` or the barriers; no register spills in the streaming passes."""
    import test_kernels_sm90 as S
    why = S._toolchain_missing()
    if why:
        pytest.skip(why)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADALOMO_TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), HERE])
    code = ("import json, test_kernels_sm90 as S, test_adapm_kernels as T; "
            "print(json.dumps(S._compile_all(T._sm90_variants, T._SM90_FLOATS)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900,
                          cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = {k: v for k, v in json.loads(lines[-1]).items() if not k.startswith("_")}
    failed = {k: v["error"] for k, v in res.items() if not v["ok"]}
    assert not failed, failed
    spilled = {k: v["spills"] for k, v in res.items() if v["streaming"] and v["spills"]}
    assert not spilled, f"register spills (local memory) in streaming kernels: {spilled}"


def test_integer_arguments_are_not_specialised():
    """No integer argument of a kernel that ``launch.Launcher`` launches (AdaPM's and the others) is specialised by
    Triton: the Launcher calls a variant's compiled kernel directly for any later values, so one compiled for a value
    of 1 or a multiple of 16 would run wrongly on another (AdaPM's momentum kernel's row length is r or r x b: it
    varies between matrices)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "ADALOMO_TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "src"), HERE])
    code = ("import json, test_kernels_sm90 as S, test_adapm_kernels as T\n"
            "from adalomo.kernels import adapm, factored, grouped, lomo, one_read, products, sharded, updates, vector\n"
            "from adalomo.kernels.launch import Launcher\n"
            "floats = set(S._FLOATS) | set(T._SM90_FLOATS)\n"
            "mods = (adapm, factored, grouped, lomo, one_read, products, sharded, updates, vector)\n"
            "bad = [(L.fn.__name__, p.name) for m in mods for L in vars(m).values()\n"
            "       if isinstance(L, Launcher) for p in L.fn.params if not p.is_constexpr\n"
            "       and not p.name.endswith('_ptr') and p.name not in floats and not p.do_not_specialize]\n"
            "print(json.dumps(bad))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_which_tensors_take_the_kernels():
    """Tensors of up to two dims with fp32 contiguous state take the kernels (``_grouped_takes``); more dims keep the
    torch path."""
    ps = [nn.Parameter(torch.zeros(4, 6)), nn.Parameter(torch.zeros(6)), nn.Parameter(torch.zeros(())),
          nn.Parameter(torch.zeros(2, 3, 4))]
    opt = AdaPM(ps, momentum_policy="low_rank", second_moment="factored")
    assert [opt._grouped_takes(p) for p in ps] == [True, True, True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("second", ["adam", "factored"])
def test_cuda_fused_steps_with_refresh_never_wait_for_the_gpu(second):
    """On a GPU, fused AdaPM steps (every momentum kind, a basis refresh every other step, bf16 with stochastic
    rounding) run under ``torch.cuda.set_sync_debug_mode("error")``: nothing waits for the device."""
    pytest.importorskip("triton")
    torch.manual_seed(0)
    m = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "v_proj": nn.Linear(64, 64), "o_proj": nn.Linear(64, 64),
                       "qkv_proj": nn.Linear(64, 192)}).to("cuda", torch.bfloat16)
    opt = AdaPM(m.named_parameters(), lr=1e-3, rank=8, update_proj_gap=2, second_moment=second, fused=True,
                relative_lr=True)
    assert opt.momentum_kind(m["qkv_proj"].weight) == SplitMomentum(0, ("low_rank", "low_rank", "full"))
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        h = m["o_proj"](m["v_proj"](m["q_proj"](x)))
        m["qkv_proj"](h).float().square().mean().backward()
    step()  # warm-up: kernel compilation, allocator, step counters cached
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in m.parameters())


if __name__ == "__main__":
    # the interpreter run; also usable on a GPU machine: python tests/test_adapm_kernels.py cuda [case,case]
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    if dev == "cpu":
        os.environ["ADALOMO_TRITON_INTERPRET"] = "1"
        os.environ["TRITON_INTERPRET"] = "1"
    torch.set_num_threads(1)
    cases = CASES if len(sys.argv) <= 2 else {k: CASES[k] for k in sys.argv[2].split(",")}
    print(json.dumps(run_cases(dev, cases)))
    sys.exit(0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["low_rank", "split"])
def test_cuda_update_temporaries_as_the_memory_planner_counts(kind):
    """On a GPU the memory that one AdaPM update allocates at its peak (classic step, bf16, factored v) is the fp32
    lifts of its low-rank chunks (a basis refresh's gradient copy takes a lift's place), at most what the memory
    planner counts as its temporaries (``memory._adapm_kernel_update_bytes``), within the small data it leaves to the
    overhead (partial sums, the rank-r pieces and momentum temporaries: a few r x n)."""
    pytest.importorskip("triton")
    from adalomo import memory as Mem
    a, b, r = 1536, 1152, 32
    policy = SplitMomentum(-1, ("low_rank", "low_rank", "full")) if kind == "split" else "low_rank"
    small = 64 * r * (a + b) * 4  # generous for the r x n temporaries and the partial sums
    for gap, what in ((1, "refresh"), (10**9, "steady")):
        p = nn.Parameter(torch.randn(a, b, device="cuda", dtype=torch.bfloat16))
        opt = AdaPM([p], momentum_policy=lambda name, t: policy, rank=r, second_moment="factored",
                    update_proj_gap=gap)
        for _ in range(3):  # the first step refreshes the basis (both settings)
            p.grad = torch.randn_like(p)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt.step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
        planned = Mem._adapm_kernel_update_bytes(p.shape, opt.momentum_kind(p))
        lifts = 4 * p.numel() * (2 if kind == "split" else 3) // 3  # the low-rank chunks' share of the matrix
        assert lifts - small <= peak <= planned + small, f"{kind} {what}: peak {peak} bytes, lifts {lifts}, " \
                                                         f"planned {planned}"
