"""Probe: can AdaLomo's statistics and RMS(u) passes share ONE read of the gradient? (GPU, Triton)

    python3 benchmarks/probe_one_read_stats.py --out benchmarks/results/probe_one_read.json

Today a factored update reads g three times (statistics, RMS(u), write): 10 of its 10 bytes per bf16 parameter at
6.7B go to 3 reads of g and a read and write of p. RMS(u) needs every row and column factor of *this* step, but

    sum_ij u_ij^2 = sum_ij g_ij^2 S / (r_i c_j) = S * sum_j W_j / c_j,   W_j = sum_i g_ij^2 / r_i

and r_i (a row's new factor) is known once its row is read. A program that owns whole rows (the row in one tile,
column sums C_j and weighted sums W_j accumulated in registers over its rows, one partial row of each per program)
yields C, W and r in one read; a finalize then has c and sum u^2 without reading g again: 8 bytes per parameter.

This probe times that kernel (persistent programs, whole rows per tile) against the grouped statistics + RMS(u)
kernels of this version on the same tensors (``bench_kernels.grouped_kernel_times``; two inputs alternate, each
larger than L2), checks sum u^2 against a float64 reference, and prints a table last. It decides whether the
redesign is worth it; nothing of the library uses it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

SHAPES = [(11008, 4096), (4096, 11008), (4096, 4096), (32000, 4096)]


def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def one_read_stats(g_ptr, rold_ptr, rnew_ptr, cpart_ptr, wpart_ptr, M, N, rows_per_prog, beta2, eps1,
                       BLOCK_M: tl.constexpr, N_POW2: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, N_POW2)
        cmask = cols < N
        lrows = tl.arange(0, BLOCK_M)
        c_acc = tl.zeros([N_POW2], dtype=tl.float32)
        w_acc = tl.zeros([N_POW2], dtype=tl.float32)
        r0 = pid * rows_per_prog
        for m0 in range(0, rows_per_prog, BLOCK_M):
            rows = r0 + m0 + lrows
            rmask = (rows < M) & (m0 + lrows < rows_per_prog)
            mask = rmask[:, None] & cmask[None, :]
            g = tl.load(g_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
            g = g.to(tl.float32)
            g2 = g * g
            a = tl.where(mask, g2 + eps1, 0.0)
            r = beta2 * tl.load(rold_ptr + rows, mask=rmask, other=1.0) + (1.0 - beta2) * (tl.sum(a, axis=1) / N)
            tl.store(rnew_ptr + rows, r, mask=rmask)
            c_acc += tl.sum(a, axis=0)
            w_acc += tl.sum(g2 / r[:, None], axis=0)
        tl.store(cpart_ptr + pid.to(tl.int64) * N + cols, c_acc, mask=cmask)
        tl.store(wpart_ptr + pid.to(tl.int64) * N + cols, w_acc, mask=cmask)

    return one_read_stats


def run_probe(shape, block_m, n_prog, warps, kern, check=False):
    import triton
    from torch.profiler import ProfilerActivity, profile
    M, N = shape
    sets = [torch.randn(shape, device="cuda").to(torch.bfloat16) for _ in range(2)]
    rold = torch.rand(M, device="cuda") + 0.5
    cold = torch.rand(N, device="cuda") + 0.5
    rnew = torch.empty(M, device="cuda")
    rpp = -(-M // n_prog)
    n_prog = -(-M // rpp)
    cpart = torch.empty(n_prog, N, device="cuda")
    wpart = torch.empty(n_prog, N, device="cuda")
    beta2, eps1 = 0.9, 1e-30

    def one(k):
        kern[(n_prog,)](sets[k % 2], rold, rnew, cpart, wpart, M, N, rpp, beta2, eps1, BLOCK_M=block_m,
                        N_POW2=triton.next_power_of_2(N), num_warps=warps)
    for k in range(3):
        one(k)
    torch.cuda.synchronize()
    err = None
    if check:  # sum u^2 from (r, C, W) against float64 on the last input
        one(1)
        c = beta2 * cold.double() + (1 - beta2) * cpart.double().sum(0) / M
        usq = rnew.double().sum() * (wpart.double().sum(0) / c).sum()
        g = sets[1].double()
        r_ref = beta2 * rold.double() + (1 - beta2) * (g * g + eps1).mean(1)
        c_ref = beta2 * cold.double() + (1 - beta2) * (g * g + eps1).mean(0)
        usq_ref = (g * g * r_ref.sum() / (r_ref[:, None] * c_ref[None, :])).sum()
        err = abs(float(usq / usq_ref) - 1.0)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(20):
            one(k)
        torch.cuda.synchronize()
    us = None
    for e in prof.key_averages():
        if "one_read_stats" in e.key:
            us = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) / max(e.count, 1)
    sets.clear()
    torch.cuda.empty_cache()
    gbytes = 2 * M * N
    return {"shape": list(shape), "block_m": block_m, "programs": n_prog, "warps": warps, "us": round(us, 2),
            "GBps_g": round(gbytes / us / 1e3), "partials_MB": round(2 * n_prog * N * 4 / 1e6, 2),
            **({"usq_rel_err": err} if err is not None else {})}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from bench_kernels import grouped_kernel_times
    kern = _kernel()
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    res = {"command": "python3 " + " ".join(sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(0), "sms": sm, "current": {}, "probe": []}
    for shape in SHAPES:
        cur = grouped_kernel_times("adalomo", [shape])["kernels"]
        res["current"][f"{shape[0]}x{shape[1]}"] = cur
        print("current", shape, json.dumps(cur), flush=True)
        n_pow2 = 1 << (shape[1] - 1).bit_length()
        for block_m in ([1, 2] if n_pow2 > 8192 else [2, 4, 8]):
            for mult in (1, 2, 4):
                for warps in (8, 16):
                    try:
                        r = run_probe(shape, block_m, sm * mult, warps, kern, check=(mult == 1 and warps == 8))
                    except Exception as e:  # a config that does not compile or fit
                        r = {"shape": list(shape), "block_m": block_m, "programs": sm * mult, "warps": warps,
                             "error": f"{type(e).__name__}: {str(e)[:200]}"}
                    res["probe"].append(r)
                    print("probe", json.dumps(r), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print("\none read (probe, best config) against statistics + RMS(u) today (us per tensor, bf16 g)")
    print(f"{'shape':>12s} {'stats+fin+usq us':>17s} {'probe us':>9s} {'GB/s of g':>10s} {'config':>22s} "
          f"{'rel err':>9s}")
    for key, cur in res["current"].items():
        today = sum(v["us"] for k, v in cur.items() if any(s in k for s in ("stats", "finalize", "usq")))
        ok = [r for r in res["probe"] if "us" in r and f"{r['shape'][0]}x{r['shape'][1]}" == key]
        if not ok:
            print(f"{key:>12s} {today:17.1f} {'-':>9s}")
            continue
        best = min(ok, key=lambda r: r["us"])
        errs = [r["usq_rel_err"] for r in ok if "usq_rel_err" in r]
        print(f"{key:>12s} {today:17.1f} {best['us']:9.1f} {best['GBps_g']:10d} "
              f"{'m{} p{} w{}'.format(best['block_m'], best['programs'], best['warps']):>22s} "
              f"{max(errs) if errs else float('nan'):9.1e}")


if __name__ == "__main__":
    main()
