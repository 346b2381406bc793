"""Which sync-free way of refreshing AdaPM's low-rank basis is fastest at the same quality, and where does the current
refresh's time go?

    PYTHONPATH=src python3 benchmarks/bench_refresh.py --out benchmarks/results/refresh_h100.json
    PYTHONPATH=src python3 benchmarks/bench_refresh.py --device cpu          # dry run, small shapes

Every candidate (``CANDIDATES`` says what each is) keeps the algorithm of ``momentum.orthonormal_basis(g, r, side,
"randomized", generator)``: the same draws from the generator (sketch, then starting vectors), two power iterations,
orthogonal iteration on the small k x k matrix s = b b^T (k = r + 8). They change how it orthonormalises (Householder
QR, a latency-bound cuSOLVER call, against CholeskyQR in float64: a Gram matrix, ``cholesky_ex`` and
``solve_triangular``) and how many steps it takes on s (fewer, or 16 on s^2). With the same steps and the same last
tall basis q they compute the current basis in exact arithmetic and differ from it by rounding only (``vs cur``); a
last basis from CholeskyQR differs from Householder's by column signs, which changes the small iteration's starting
subspace relative to q, as another random start would.

Per shape (default the 0.94B and 6.7B LLaMA matrices, rank 64, side as the library picks it: left when a <= b):

* time: median over ``--iters`` calls after warm-up; on CUDA from CUDA events, once as the calls come (``ms``: the
  host launches while the device waits, as in a training step) and once with the host queued ahead behind a sleep
  kernel (``dev ms``: the device's own time). A breakdown of the current method: its 5 tall QRs, its 32 small QRs,
  and all its matmuls and draws, each timed alone.
* accuracy on synthetic gradients with orthonormal singular vectors (spectrum ``decay``: sigma_i = 1/i over 4r
  directions plus a Gaussian tail at half the last one, sigma_1/sigma_r = r; ``steep``: 1/i^2, sigma_1/sigma_r = r^2;
  ``gap``: 1/i with a halving after the r-th; ``rank16``: rank 16 < r; ``zero``): the energy missed against the
  SVD's, 1 - ||P^T x||^2 / sum_{i<=r} sigma_i^2; the sensitivity, the largest principal angle between the bases of g
  and of g * (1 + 1e-7 noise) (a rounding-level change, as between FSDP2's averaged gradient and one process's);
  the largest principal angle to the current method's basis; on ``gap``, the one to the exact top-r subspace (float64
  ``eigh`` of x x^T: the SVD's left vectors; decay and steep have no gap at r, every method is ~1 from it).
  ``rank16``/``zero``: finite and orthonormal (max |P^T P - I| < 1e-5).
* no host synchronisation: on CUDA under ``torch.cuda.set_sync_debug_mode("error")``; on every device, no aten op
  that reads a value back (the library test's list: item, _local_scalar_dense, lift_fresh, nonzero, svd, eigh);
  determinism: two calls with the same seed give the same bits.

Prints a short table last; ``--out`` writes JSON with the command, date and device.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from adalomo import momentum  # noqa: E402

SHAPES = "5504x2048,2048x5504,2048x2048,11008x4096,4096x4096"
CPU_SHAPES = "768x384,384x768,384x384"
SPECTRA = ("decay", "steep", "gap", "rank16", "zero")
COMPARED_SPECTRA = ("decay", "steep", "gap")  # full-rank: sensitivity and the angle to the current basis

# ============================================================================ candidates (ready for momentum.py)

_U64 = 2.0 ** -53  # float64 unit roundoff
_FLOOR = 1e-200  # keeps the Cholesky factor of an all-zero Gram matrix nonsingular: zero in, zero out, no 0/0


def _cholesky_qr(y: Tensor, shift: Tensor | None = None) -> Tensor:
    """A basis of the range of the m x n (m >= n) ``y`` as y R^-1, R the Cholesky factor of y^T y + ``shift`` (an
    n x n multiple of I; default (m + n) u tr(y^T y) I, u = 2^-53): one pass of shifted CholeskyQR, in y's dtype
    (call it in float64). No QR call, no host synchronisation.

    The range comes out accurate to about u cond(y); the columns orthonormal to about u cond(y)^2, and for directions
    of y with sigma_j^2 below the shift only shortened (sigma_j / sqrt(shift)), not normalised. The shift sits above
    the rounding of y^T y, so that a rank-deficient or all-zero y never breaks the factorisation down (no NaN)."""
    if shift is None:
        g = y.mT @ y
        g.diagonal().add_(torch.trace(g) * ((y.shape[0] + y.shape[1]) * _U64) + _FLOOR)
    else:
        g = torch.addmm(shift, y.mT, y)
    r, _ = torch.linalg.cholesky_ex(g, upper=True)
    return torch.linalg.solve_triangular(r, y, upper=True, left=False)


def orthonormal_columns_householder(y: Tensor) -> Tensor:
    """The current tall step: ``torch.linalg.qr`` (geqrf, orgqr, and R)."""
    return torch.linalg.qr(y)[0]


def orthonormal_columns_geqrf(y: Tensor) -> Tensor:
    """Householder QR without forming R: ``torch.geqrf`` then ``householder_product``."""
    a, tau = torch.geqrf(y)
    return torch.linalg.householder_product(a, tau)


def orthonormal_columns_cholesky(y: Tensor, passes: int = 1) -> Tensor:
    """A basis of the range of a power-iteration matrix y = x z (z orthonormal) by CholeskyQR in float64, returned in
    y's dtype: the replacement for ``torch.linalg.qr(y)[0]`` between power iterations.

    There only the range matters (the next product re-mixes the columns), and since every power iteration is
    re-orthonormalised, cond(y) ~ sigma_1 / sigma_k of x, not the (sigma_1 / sigma_k)^(2q+1) of unstabilised powers:
    one pass keeps the range to u cond(y), far below the float32 rounding of x z. The basis that b = q^T x and
    P = q z are formed with must be orthonormal: Householder, or ``passes=2`` (CholeskyQR2) where cond(y) < 1e7
    and y has full rank."""
    q = y.to(torch.float64)
    for _ in range(passes):
        q = _cholesky_qr(q)
    return q.to(y.dtype)


def leading_subspace_cholesky(b: Tensor, r: int, generator: torch.Generator | None, iters: int = 32,
                              power: int = 1, final_qr: bool = True) -> Tensor:
    """An orthonormal k x r basis of the leading r-dimensional left singular subspace of the small k x n ``b``:
    ``iters`` steps of orthogonal iteration on s = b b^T as ``momentum.leading_subspaces`` (the same starting
    vectors), in float64, each step orthonormalised by two passes of CholeskyQR (CholeskyQR2) instead of a QR.

    Two passes, because s z has cond ~ kappa^2 (kappa = sigma_1 / sigma_r of b), which the Gram matrix squares: one
    pass leaves directions with sigma_j / sigma_1 below ~1e-3 shortened by its shift, step after step, until
    rounding replaces them (at kappa = 4096 the basis then moves by O(1) under a rounding-level change of g, against
    7e-4 for the current float32 QRs). The second pass restores their length: the range is kept to about
    u kappa^2 a step. The shifts are fixed per call (s scaled to trace 1; ||z||_2 <= 3, then <= 1), so a step is a
    matmul, two Gram matrices, two ``cholesky_ex`` and two ``solve_triangular``.

    ``power`` 2 forms s^2 first and takes iters / 2 steps on it: the same subspace in exact arithmetic, half the
    steps. s^2 in float64 carries an error u lambda_1^2, which moves the r-th direction by about
    u kappa^4 / gap against the u32 kappa / gap that b's own float32 rounding causes (u32 = 2^-24, gap the
    relative gap at r): safe for kappa < ~1000, not for steeper spectra (s^4: kappa < ~20).
    ``final_qr``: one Householder QR of the k x r result, so that a rank-deficient b (rank < r: a zero or few-token
    gradient) still gives orthonormal columns; without it those columns come out short."""
    k = b.shape[0]
    b64 = b.to(torch.float64)
    s = b64 @ b64.mT
    s = s / (torch.trace(s) + _FLOOR)  # eigenvalues in [0, 1]: no overflow or underflow in its powers
    for _ in range(power.bit_length() - 1):
        s = s @ s
    eye = torch.eye(r, dtype=torch.float64, device=b.device)
    shift_sz = eye * (9 * (k + r) * _U64 * s.square().sum() + _FLOOR)  # above the rounding of (s z)^T (s z)
    shift_q = eye * ((k + r) * r * _U64)  # and of Q^T Q after the first pass (||Q||_2 <= 1)
    z = torch.randn(k, r, generator=generator, device=b.device, dtype=b.dtype).to(torch.float64) / math.sqrt(k)
    for _ in range(iters // power):
        z = _cholesky_qr(_cholesky_qr(s @ z, shift_sz), shift_q)
    z = z.to(b.dtype)
    return torch.linalg.qr(z)[0] if final_qr else z


def randomized_basis(g: Tensor, r: int, side: str, generator: torch.Generator | None, *, tall=None, last=None,
                     small=None, final_qr: bool = False, oversample: int = 8, power_iters: int = 2) -> Tensor:
    """``momentum.orthonormal_basis(g, r, side, "randomized", generator)`` with its parts swapped: ``tall(y) -> q``
    orthonormalises the power-iteration bases, ``last`` the one b = q^T x and P = q z are formed with (default
    ``tall``), ``small(b, r, generator)`` is the leading-subspace solver; ``final_qr``: one Householder QR of P."""
    tall = tall or orthonormal_columns_householder
    last = last or tall
    small = small or _small_current
    x = g if side == "left" else g.mT
    rows, cols = x.shape
    k = min(r + oversample, rows, cols)
    omega = torch.randn(cols, k, generator=generator, device=x.device, dtype=x.dtype)
    y = x @ omega
    for _ in range(power_iters):
        z = tall(x.mT @ tall(y))
        y = x @ z
    q = last(y)
    p = q @ small(q.mT @ x, r, generator)
    return (torch.linalg.qr(p)[0] if final_qr else p).contiguous()


def _small_current(b: Tensor, r: int, generator: torch.Generator | None) -> Tensor:
    """The library's small step (``momentum.leading_subspaces``) from the small k x n matrix b."""
    z = torch.randn(b.shape[0], r, generator=generator, device=b.device, dtype=b.dtype)
    return momentum.leading_subspaces(b @ b.mT, z)


def current(g: Tensor, r: int, side: str, generator: torch.Generator | None) -> Tensor:
    return momentum.orthonormal_basis(g, r, side, "randomized", generator)


_part = functools.partial
_tall = dict(tall=orthonormal_columns_cholesky, last=orthonormal_columns_householder)
_small = {"chol": leading_subspace_cholesky, "chol16": _part(leading_subspace_cholesky, iters=16),
          "sq2": _part(leading_subspace_cholesky, power=2)}
_all_chol = dict(tall=orthonormal_columns_cholesky, last=_part(orthonormal_columns_cholesky, passes=2),
                 small=_part(leading_subspace_cholesky, final_qr=False))

def with_kernel(g: Tensor, r: int, side: str, generator: torch.Generator | None) -> Tensor:
    from adalomo import kernels
    return momentum.orthonormal_basis(g, r, side, "randomized", generator, iterate=kernels.orthogonal_iteration)


#: name -> (what it is, fn(g, r, side, generator) -> P); every QR call named is a Householder one
CANDIDATES = {
    "current": ("momentum.orthonormal_basis: 5 tall QRs, 32 fp32 steps with a k x r QR each: 37 QR calls", current),
    "kernel": ("current with the 32 small steps in one Triton launch (kernels.orthogonal_iteration, as AdaPM "
               "refreshes on CUDA): 5 QR calls", with_kernel),
    "geqrf": ("current with the tall QRs as geqrf + householder_product (no R)",
              _part(randomized_basis, tall=orthonormal_columns_geqrf)),
    "small-chol": ("tall as current; small: 32 float64 steps with CholeskyQR2, then one k x r QR: 6 QR calls",
                   _part(randomized_basis, small=_small["chol"])),
    "small-sq2": ("small-chol on s^2: 16 steps (same basis as current in exact arithmetic; kappa < ~1000): 6 QR calls",
                  _part(randomized_basis, small=_small["sq2"])),
    "tall-chol": ("tall: 4 float64 CholeskyQR, the last basis Householder; small as current: 33 QR calls",
                  _part(randomized_basis, **_tall)),
    "chol": ("tall-chol + small-chol: 1 tall and 1 k x r QR call", _part(randomized_basis, **_tall,
                                                                          small=_small["chol"])),
    "chol16": ("chol with 16 steps (another basis than current's; fails the FSDP2 Trainer test): 2 QR calls",
               _part(randomized_basis, **_tall, small=_small["chol16"])),
    "chol-sq2": ("tall-chol + small-sq2: 1 tall and 1 k x r QR call", _part(randomized_basis, **_tall,
                                                                             small=_small["sq2"])),
    "chol-p": ("all CholeskyQR (the last basis CholeskyQR2, small-chol without its QR), then one QR of P (a x r)",
               _part(randomized_basis, **_all_chol, final_qr=True)),
    "chol-noqr": ("chol-p without the QR of P: no QR call; not orthonormal for a rank-deficient gradient",
                  _part(randomized_basis, **_all_chol)),
}

# ============================================================================ measurement


def side_of(shape) -> str:
    return "left" if shape[0] <= shape[1] else "right"


def make_x(rows: int, cols: int, spectrum: str, r: int, dev: str, seed: int = 0) -> Tensor:
    """A fp32 rows x cols (rows <= cols) matrix with orthonormal singular vectors and the named spectrum."""
    gen = torch.Generator(device=dev).manual_seed(seed)
    f64 = dict(dtype=torch.float64, device=dev)
    if spectrum == "zero":
        return torch.zeros(rows, cols, device=dev)
    m = min(16 if spectrum == "rank16" else 4 * r, rows)
    i = torch.arange(1, m + 1, **f64)
    sigma = {"decay": 1 / i, "steep": 1 / i**2, "gap": torch.where(i <= r, 1 / i, 0.5 / i), "rank16": 1 / i}[spectrum]
    a = torch.linalg.qr(torch.randn(rows, m, generator=gen, **f64))[0]
    b = torch.linalg.qr(torch.randn(cols, m, generator=gen, **f64))[0]
    x = (a * sigma) @ b.mT
    if spectrum != "rank16":  # a Gaussian tail at half the last sigma (its top singular value ~ sqrt(rows)+sqrt(cols))
        x += (0.5 * float(sigma[-1]) / (math.sqrt(rows) + math.sqrt(cols))) * torch.randn(rows, cols, generator=gen,
                                                                                             **f64)
    return x.float()


def exact_top(x: Tensor, r: int, vectors: bool) -> tuple[Tensor | None, float]:
    """(the top-r left singular vectors of x in float64 if ``vectors``, the sum of its top-r sigma^2): from the float64
    eigendecomposition of x x^T (the SVD's left vectors and squared values; its error, u sigma_1^2, is far below
    what the comparisons resolve)."""
    x64 = x.double()
    a = x64 @ x64.mT
    if not vectors:
        return None, float(torch.linalg.eigvalsh(a)[-r:].clamp_min(0).sum())
    w, v = torch.linalg.eigh(a)
    return v[:, -r:], float(w[-r:].clamp_min(0).sum())


def _orth(p: Tensor) -> Tensor:
    return torch.linalg.qr(p.double())[0]


def sin_angle(p: Tensor, u: Tensor) -> float:
    """The sine of the largest principal angle between range(p) and range(u) (both orthonormalised in float64)."""
    p, u = _orth(p), _orth(u)
    e = p - u @ (u.mT @ p)
    return float(torch.linalg.eigvalsh(e.mT @ e)[-1].clamp_min(0).sqrt())


def basis(fn, g: Tensor, r: int, seed: int = 1) -> Tensor:
    gen = torch.Generator(device=g.device).manual_seed(seed)
    return fn(g, r, side_of(g.shape), gen)


def _median_time(fn, cuda: bool, iters: int, warmup: int, ahead: bool = False) -> float:
    """Median seconds per call. CUDA: events around each call; ``ahead``: the host queues every call behind a sleep
    kernel first, so the events time the device alone."""
    for _ in range(warmup):
        fn()
    if not cuda:
        ts = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    torch.cuda.synchronize()
    if ahead:
        torch.cuda._sleep(int(_CYCLES_PER_S * max(0.05, 2 * iters * _median_time(fn, cuda, 3, 0))))
    for e0, e1 in events:
        e0.record()
        fn()
        e1.record()
    torch.cuda.synchronize()
    return statistics.median(e0.elapsed_time(e1) for e0, e1 in events) / 1e3


_CYCLES_PER_S = 1.5e9


def _calibrate_sleep() -> None:
    global _CYCLES_PER_S
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    e0.record()
    torch.cuda._sleep(10**7)
    e1.record()
    torch.cuda.synchronize()
    _CYCLES_PER_S = 10**7 / (e0.elapsed_time(e1) / 1e3)


_READ_BACK = ("_local_scalar_dense", "lift_fresh", "svd", "eigh", "eig.", "item", "nonzero")


def host_reads(fn) -> str:
    """'no', or what reads back: aten ops from the library test's list; on CUDA also the sync debug mode."""
    from torch.utils._python_dispatch import TorchDispatchMode
    seen: set[str] = set()

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.add(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    bad = sorted(s for s in seen if any(k in s for k in _READ_BACK))
    if bad:
        return "ops: " + ",".join(bad)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            fn()
        except RuntimeError as e:
            return "sync: " + str(e).splitlines()[0][:120]
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return "no"


def breakdown(g: Tensor, r: int, cuda: bool, iters: int, warmup: int, oversample: int = 8) -> dict:
    """Times of the current method's parts, each alone: its 5 tall QRs, its 32 small QRs, its matmuls and draws."""
    x = g if side_of(g.shape) == "left" else g.mT
    gen = torch.Generator(device=g.device)
    k = min(r + oversample, *x.shape)
    draw = lambda *size: torch.randn(*size, generator=gen, device=x.device)  # noqa: E731
    qr = lambda y: torch.linalg.qr(y)[0]  # noqa: E731
    gen.manual_seed(1)
    tall_in = [x @ draw(x.shape[1], k)]
    tall_out = [qr(tall_in[0])]
    for i in range(4):
        tall_in.append(x.mT @ tall_out[-1] if i % 2 == 0 else x @ tall_out[-1])
        tall_out.append(qr(tall_in[-1]))
    b = tall_out[-1].mT @ x
    s = b @ b.mT
    small_out = [draw(k, r)]
    small_in = []
    for _ in range(32):
        small_in.append(s @ small_out[-1])
        small_out.append(qr(small_in[-1]))

    def matmuls():
        gen.manual_seed(1)
        x @ draw(x.shape[1], k)
        for i in range(4):
            x.mT @ tall_out[i] if i % 2 == 0 else x @ tall_out[i]
        bb = tall_out[-1].mT @ x
        ss = bb @ bb.mT
        draw(k, r)
        for z in small_out[:-1]:
            ss @ z
        return tall_out[-1] @ small_out[-1]

    parts = {"tall QRs (5)": lambda: [qr(y) for y in tall_in],
             "small QRs (32)": lambda: [qr(y) for y in small_in],
             "matmuls + draws": matmuls}
    out = {name: _median_time(f, cuda, iters, warmup) * 1e3 for name, f in parts.items()}
    out["total"] = _median_time(lambda: basis(current, g, r), cuda, iters, warmup) * 1e3
    return out


def measure(name: str, fn, g: Tensor, r: int, refs: dict, cuda: bool, iters: int, warmup: int,
            currents: dict) -> dict:
    row = {"candidate": name, "shape": "x".join(map(str, g.shape)), "side": side_of(g.shape)}
    timed = lambda: basis(fn, refs["decay"]["g"], r)  # noqa: E731
    row["ms"] = _median_time(timed, cuda, iters, warmup) * 1e3
    if cuda:
        row["dev_ms"] = _median_time(timed, cuda, iters, warmup, ahead=True) * 1e3
    row["host_reads"] = host_reads(timed)
    row["deterministic"] = bool(torch.equal(timed(), timed()))
    for spectrum, ref in refs.items():
        p = basis(fn, ref["g"], r)
        x = ref["g"] if row["side"] == "left" else ref["g"].mT
        acc = {"finite": bool(torch.isfinite(p).all()),
               "orth": float((p.double().mT @ p.double() - torch.eye(r, dtype=torch.float64, device=p.device))
                             .abs().max())}
        if acc["finite"] and spectrum != "zero":
            acc["missed_energy"] = 1 - float((_orth(p).mT @ x.double()).square().sum()) / ref["energy"]
            if ref["u"] is not None:
                acc["sin_exact"] = sin_angle(p, ref["u"])
            if spectrum in COMPARED_SPECTRA:
                acc["sensitivity"] = sin_angle(p, basis(fn, ref["g_noisy"], r))
                if name == "current":
                    currents[spectrum] = p
                else:
                    acc["sin_current"] = sin_angle(p, currents[spectrum])
        row[spectrum] = acc
    return row


def references(shape, spectra, r: int, dev: str, cache: dict) -> dict:
    """Per spectrum: g of ``shape`` (x = its rows <= cols view is shared with the transposed shape), a rounding-level
    perturbation of it, the exact top-r basis of x and its energy."""
    rows, cols = sorted(shape)
    out = {}
    for spectrum in spectra:
        key = (rows, cols, spectrum)
        if key not in cache:
            x = make_x(rows, cols, spectrum, r, dev)
            noise = torch.randn(x.shape, generator=torch.Generator(device=dev).manual_seed(7), device=dev)
            # rank16 (rank <= r) and zero: the top-r energy is all of it; only gap has a top-r subspace that the
            # range finder resolves (decay and steep: no gap at r, every method's largest angle to it is ~1)
            u, energy = (exact_top(x, r, spectrum == "gap") if spectrum in COMPARED_SPECTRA
                         else (None, float(x.double().square().sum())))
            cache[key] = (x, x * (1 + 1e-7 * noise), u, energy)
        x, xn, u, energy = cache[key]
        to_g = (lambda t: t) if side_of(shape) == "left" else (lambda t: t.mT.contiguous())
        out[spectrum] = {"g": to_g(x), "g_noisy": to_g(xn), "u": u, "energy": energy}
    return out


def _fmt(v, spec: str = ".1e") -> str:
    return "-" if v is None else format(v, spec)


def print_tables(res: dict) -> None:
    rows, names = res["rows"], list(dict.fromkeys(r["candidate"] for r in res["rows"]))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    by = {(r["candidate"], r["shape"]): r for r in rows}
    cuda = "dev_ms" in rows[0]
    print(f"\n{res['device']}; rank {res['rank']}; torch {res['torch']}; median of {res['iters']} calls")
    print("time per refresh, ms" + ("  (dev: host queued ahead, the device's own time)" if cuda else ""))
    head = "".join(f"{s:>13s}" + (f"{'dev':>7s}" if cuda else "") for s in shapes)
    print(f"{'candidate':12s}{head}{'speedup':>9s}")
    for n in names:
        cells = "".join(f"{by[n, s]['ms']:13.2f}" + (f"{by[n, s]['dev_ms']:7.2f}" if cuda else "") for s in shapes)
        speed = statistics.geometric_mean(by["current", s]["ms"] / by[n, s]["ms"] for s in shapes)
        print(f"{n:12s}{cells}{speed:8.2f}x")
    for s in shapes:
        bd = res["breakdown"].get(s)
        if bd:
            print(f"current's parts at {s}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in bd.items()))
    print("\naccuracy, worst over shapes (sin: largest principal angle; sens: between g and g*(1+1e-7 noise); "
          "missed: energy missed against the SVD's)")
    cols = [("decay", "missed_energy"), ("decay", "sensitivity"), ("decay", "sin_current"),
            ("steep", "missed_energy"), ("steep", "sensitivity"), ("steep", "sin_current"), ("gap", "sin_exact"),
            ("gap", "sensitivity")]
    label = {"sin_exact": "sin", "missed_energy": "missed", "sensitivity": "sens", "sin_current": "vs cur"}
    print(f"{'candidate':12s}" + "".join(f"{sp + ' ' + label[k]:>13s}" for sp, k in cols)
          + f"{'rank16/zero':>13s}{'reads':>6s}{'det':>4s}")
    for n in names:
        cells = ""
        for sp, k in cols:
            vals = [by[n, s][sp].get(k) for s in shapes]
            vals = [v for v in vals if v is not None]
            cells += f"{_fmt(max(vals, key=abs) if vals else None):>13s}"
        robust = all(by[n, s][sp]["finite"] and by[n, s][sp]["orth"] < 1e-5 for s in shapes
                     for sp in ("rank16", "zero") if sp in by[n, s])
        reads = all(by[n, s]["host_reads"] == "no" for s in shapes)
        det = all(by[n, s]["deterministic"] for s in shapes)
        print(f"{n:12s}{cells}{'ok' if robust else 'FAIL':>13s}{'no' if reads else 'YES':>6s}"
              f"{'y' if det else 'n':>4s}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default=None, help=f"comma-separated AxB (default {SHAPES}; on cpu {CPU_SHAPES})")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--iters", type=int, default=None, help="timed calls per measurement (default 10; cpu 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated names")
    ap.add_argument("--spectra", default=",".join(SPECTRA))
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for a dry run")
    shapes = [tuple(int(v) for v in s.split("x")) for s in (args.shapes or (SHAPES if cuda else CPU_SHAPES)).split(",")]
    iters = args.iters or (10 if cuda else 5)
    names = args.candidates.split(",")
    if names[0] != "current":
        names = ["current"] + [n for n in names if n != "current"]
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        sys.exit(f"unknown candidates {unknown}; choose from {list(CANDIDATES)}")
    spectra = args.spectra.split(",")
    if "decay" not in spectra:
        sys.exit("--spectra must include decay (the timings run on it)")
    if cuda:
        _calibrate_sleep()
    t_start = time.perf_counter()
    cache, rows, parts = {}, [], {}
    for shape in shapes:
        refs = references(shape, spectra, args.rank, args.device, cache)
        currents = {}
        for name in names:
            row = measure(name, CANDIDATES[name][1], refs["decay"]["g"], args.rank, refs, cuda, iters,
                          args.warmup, currents)
            rows.append(row)
            print(json.dumps(row), flush=True)
        parts["x".join(map(str, shape))] = breakdown(refs["decay"]["g"], args.rank, cuda, iters, args.warmup)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    res = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
           "torch": torch.__version__, "rank": args.rank, "iters": iters,
           "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
           "linalg_library": str(torch.backends.cuda.preferred_linalg_library()) if cuda else "",
           "seconds": round(time.perf_counter() - t_start, 1),
           "candidates": {n: CANDIDATES[n][0] for n in names}, "breakdown": parts, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print_tables(res)
    print(f"({res['seconds']} s)")


if __name__ == "__main__":
    main()
