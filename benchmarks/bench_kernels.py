"""Triton kernels on one GPU: correctness against the torch path, then time and bandwidth per kernel.

    PYTHONPATH=src python3 benchmarks/bench_kernels.py --out benchmarks/results/kernels_h100.json

1. correctness: every case of ``tests/test_kernels.py`` (odd shapes, 0-D to 4-D, non-contiguous, bf16/fp16/
   fp32, non-finite gradients, stochastic rounding, the optimizers end to end) on CUDA;
2. the device's copy bandwidth (a large device-to-device copy, bytes read + written) and read bandwidth (a sum);
3. per kernel, for LLaMA shapes: median device time (torch.profiler), the bytes it must move (each input
   read once, each output written once; workspace partials not counted) and the achieved GB/s; per update:
   device time (CUDA events, inputs rotated through more memory than L2 holds), host time to issue it,
   and the torch path for comparison;
4. optionally (``--sweep``) launch geometries (``kernels.set_config``) for the grouped kernels on
   gradient buckets of LLaMA 0.94B/6.7B shapes: per-kernel us and GB/s, the best geometry per bucket.

Prints a short table last; ``--out`` writes everything as JSON (command, date, device).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

SHAPES = {  # name: (shape, count per model) -- LLaMA 0.94B (h=2048) and 6.7B (h=4096)
    "attn 2048x2048": ((2048, 2048), 64),
    "mlp 5504x2048": ((5504, 2048), 32),
    "mlp 2048x5504": ((2048, 5504), 16),
    "embed 32000x2048": ((32000, 2048), 2),
    "attn 4096x4096": ((4096, 4096), 128),
    "mlp 11008x4096": ((11008, 4096), 64),
    "mlp 4096x11008": ((4096, 11008), 32),
    "embed 32000x4096": ((32000, 4096), 2),
    "norm 4096": ((4096,), 65),
}


def _pytest_shim() -> None:
    """tests/test_kernels.py imports pytest for its decorators; the device image may lack it."""
    try:
        import pytest  # noqa: F401
    except ImportError:
        m = types.ModuleType("pytest")
        ident = lambda *a, **k: (lambda f: f)  # noqa: E731
        m.fixture = ident
        m.mark = types.SimpleNamespace(parametrize=ident, skipif=ident)
        m.importorskip = __import__
        sys.modules["pytest"] = m


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        y.copy_(x)
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return 2 * x.numel() / statistics.median(ts) / 1e9


def read_bandwidth() -> float:
    """A large read-only pass (torch's sum of 1 GiB of bf16): what the read-only statistics passes could reach."""
    x = torch.ones(1 << 29, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        x.sum()
    torch.cuda.synchronize()
    ts = []
    for _ in range(10):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        x.sum()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / 1e3)
    return x.numel() * x.element_size() / statistics.median(ts) / 1e9


def _sets(shape, dtype, n_sets, algo):
    from adalomo import functional as F
    out = []
    for _ in range(n_sets):
        p = torch.randn(shape, device="cuda").to(dtype)
        g = torch.randn(shape, device="cuda").to(dtype)
        st = F.init_factored_state(p) if algo != "lomo" else {}
        out.append((p, g, st))
    return out


def _update(algo, p, g, st, sr=True):
    from adalomo import kernels
    gen = kernels.Seed(1) if sr else None  # a device Generator per call would dominate the host time
    if algo == "lomo":
        return kernels.lomo_update_(p, g, lr=1e-3, weight_decay=0.0, clip_grad_value=None, grad_scale=None,
                                    stochastic_rounding=sr, generator=gen)
    return kernels.scaled_rms_update_(p, g, st, rho=1e-3, eps=(1e-30, 1e-3), clip_threshold=1.0, beta2=0.9,
                                      weight_decay=0.0, scale_parameter=True, beta1=None, grad_scale=None,
                                      stochastic_rounding=sr, generator=gen)


def _torch_update(algo, p, g, st):
    from adalomo import functional as F
    os.environ["ADALOMO_DISABLE_TRITON"] = "1"
    try:
        if algo == "lomo":
            return F.lomo_update_(p, g, lr=1e-3)
        return F.scaled_rms_update_(p, g, st, rho=1e-3, eps=(1e-30, 1e-3), clip_threshold=1.0, beta2=0.9,
                                     weight_decay=0.0, scale_parameter=True, beta1=None, grad_scale=None,
                                     stochastic_rounding=False, generator=None)
    finally:
        del os.environ["ADALOMO_DISABLE_TRITON"]


def time_update(algo, shape, dtype=torch.bfloat16, reps=30, torch_path=False, sr=True):
    """Median device ms per update (events, rotated inputs) and host ms to issue one update."""
    nbytes = 2 * torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    n_sets = max(2, min(16, (256 << 20) // max(nbytes, 1) + 1))
    sets = _sets(shape, dtype, n_sets, algo)
    fn = (lambda s: _torch_update(algo, *s)) if torch_path else (lambda s: _update(algo, *s, sr=sr))
    for s in sets[:2]:
        fn(s)
    torch.cuda.synchronize()
    dev, host = [], []
    for i in range(reps):
        s = sets[i % n_sets]
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        fn(s)
        host.append(time.perf_counter() - t0)
        b.record()
        b.synchronize()
        dev.append(a.elapsed_time(b))
    del sets
    torch.cuda.empty_cache()
    return statistics.median(dev), statistics.median(host) * 1e3


def kernel_times(algo, shape, dtype=torch.bfloat16, reps=20, sr=True):
    """Mean device microseconds per kernel of one update (torch.profiler), inputs rotated."""
    from torch.profiler import ProfilerActivity, profile
    nbytes = 2 * torch.Size(shape).numel() * torch.tensor([], dtype=dtype).element_size()
    n_sets = max(2, min(16, (256 << 20) // max(nbytes, 1) + 1))
    sets = _sets(shape, dtype, n_sets, algo)
    for s in sets[:2]:
        _update(algo, *s, sr=sr)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(reps):
            _update(algo, *sets[i % n_sets], sr=sr)
        torch.cuda.synchronize()
    out = {}
    for e in prof.key_averages():
        if not e.key.startswith("grouped_"):
            continue
        total = getattr(e, "device_time_total", None)
        if total is None:
            total = getattr(e, "cuda_time_total", 0.0)
        out[e.key] = total / max(e.count, 1)
    del sets
    torch.cuda.empty_cache()
    return out


def model_step(hidden=2048, inter=5504, layers=16, vocab=32000, reps=5):
    """All parameters of a LLaMA model (bf16): one update of every tensor, one call per tensor (what a fused backward
    with ``bucket_cap_mb=0`` issues, spread over the backward) vs one call for all (classic step). Host and device
    ms."""
    from adalomo import functional as F
    from adalomo import kernels
    shapes = ([(vocab, hidden)] + [(hidden, hidden)] * (4 * layers) + [(inter, hidden)] * (2 * layers)
              + [(hidden, inter)] * layers + [(hidden,)] * (2 * layers + 1) + [(vocab, hidden)])
    ps = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
    gs = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
    sts = [F.init_factored_state(p) for p in ps]
    kw = dict(eps=(1e-30, 1e-3), clip_threshold=1.0, weight_decay=0.0, scale_parameter=True, beta1=None,
              grad_scale=None, stochastic_rounding=True)
    variants = {
        "adalomo per-tensor": lambda: [kernels.scaled_rms_update_(p, g, st, rho=1e-3, beta2=0.9, generator=None,
                                                                  seed=i, **kw)
                                       for i, (p, g, st) in enumerate(zip(ps, gs, sts))],
        "adalomo grouped": lambda: kernels.scaled_rms_update_many_(ps, gs, sts, rhos=[1e-3] * len(ps),
                                                                   beta2s=[0.9] * len(ps), seeds=list(range(len(ps))),
                                                                   **kw),
        "lomo per-tensor": lambda: [kernels.lomo_update_(p, g, lr=1e-4, weight_decay=0.0, clip_grad_value=None,
                                                         grad_scale=None, stochastic_rounding=True, generator=None,
                                                         seed=i) for i, (p, g) in enumerate(zip(ps, gs))],
        "lomo grouped": lambda: kernels.lomo_update_many_(ps, gs, lr=1e-4, weight_decay=0.0, clip_grad_value=None,
                                                          grad_scale=None, stochastic_rounding=True,
                                                          seeds=list(range(len(ps)))),
    }
    out = {}
    n = sum(p.numel() for p in ps)
    for name, fn in variants.items():
        fn()
        torch.cuda.synchronize()
        dev, host = [], []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            b.record()
            b.synchronize()
            dev.append(a.elapsed_time(b))
        bound = n * (12 if name.startswith("adalomo") else 8) / 1e9  # GB per step
        out[name] = {"tensors": len(ps), "params_M": round(n / 1e6, 1), "device_ms": round(statistics.median(dev), 2),
                     "host_ms": round(statistics.median(host) * 1e3, 2), "bytes_GB": round(bound, 2),
                     "GBps": round(bound / (statistics.median(dev) / 1e3))}
        print("model", name, json.dumps(out[name]), flush=True)
    ps.clear()
    gs.clear()
    sts.clear()
    torch.cuda.empty_cache()
    return out


SWEEP = [dict(), dict(max_tm=64), dict(max_tm=128), dict(max_tm=256), dict(max_tm=128, warps_stats=8, warps_usq=8),
         dict(max_tm=128, block_m=16), dict(max_tm=128, block_m=64, warps_stats=8, warps_usq=8),
         dict(max_tm=128, block_m=16, block_n=256), dict(max_tm=128, warps_write=4),
         dict(max_tm=64, block_m=64, block_n=64)]
SWEEP_BUCKETS = {"6.7b mlp": [(11008, 4096)], "6.7b attn x2": [(4096, 4096)] * 2,
                 "0.94b mixed": [(5504, 2048)] * 2 + [(2048, 2048)] * 4,
                 # a 6.7B MLP's three matrices, about one bucket of this version's default (256 MiB)
                 "6.7b mlp x3": [(11008, 4096), (11008, 4096), (4096, 11008)],
                 "0.94b down x2": [(2048, 5504)] * 2, "6.7b embed": [(32000, 4096)]}
# per bf16 element: the statistics (three-pass or ``one_read``) read g and p; the first pass whose name is in the
# kernel's name
_PASS_BYTES = {"stats_one_read": 4, "stats": 4, "rms": 2, "write": 6, "sum": 2}


def grouped_kernel_times(algo, shapes, reps=10):
    """One gradient bucket through the grouped kernels (as fused mode flushes it), bf16: mean device us per
    kernel (torch.profiler; two sets of inputs alternate, each larger than L2), GB/s per pass, their total."""
    from torch.profiler import ProfilerActivity, profile

    from adalomo import functional as F
    from adalomo import kernels
    sets = []
    for _ in range(2):
        ps = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
        gs = [torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes]
        sets.append((ps, gs, [F.init_factored_state(p) for p in ps]))
    kw = dict(weight_decay=0.0, grad_scale=None, stochastic_rounding=True)

    def one(k):
        ps, gs, sts = sets[k % 2]
        if algo == "lomo":
            kernels.lomo_update_many_(ps, gs, lr=1e-4, clip_grad_value=None, seeds=list(range(len(ps))), **kw)
        else:
            kernels.scaled_rms_update_many_(ps, gs, sts, rhos=[1e-3] * len(ps), beta2s=[0.9] * len(ps),
                                            eps=(1e-30, 1e-3), clip_threshold=1.0, scale_parameter=True, beta1=None,
                                            seeds=list(range(len(ps))), **kw)
    for k in range(2):
        one(k)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for k in range(reps):
            one(k)
        torch.cuda.synchronize()
    n = sum(torch.Size(s).numel() for s in shapes)
    out, total = {}, 0.0
    for e in prof.key_averages():
        if not e.key.startswith("grouped_"):
            continue
        us = (getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)) / max(e.count, 1)
        total += us
        kind = next((k for k in _PASS_BYTES if f"_{k}_" in e.key), None)
        out[e.key] = {"us": round(us, 2), "GBps": round(_PASS_BYTES[kind] * n / us / 1e3) if kind else None}
    sets.clear()
    torch.cuda.empty_cache()
    bound = 8 * n / 4e6  # us at 4 TB/s: a read of g, a read and write of p, and (adalomo) one more read of g
    return {"kernels": out, "total_us": round(total, 2), "bound_us_4TBps": round(bound, 2)}


_KERNEL_PASS = {"grouped_factored_stats_kernel": "stats", "grouped_factored_stats_one_read_kernel": "stats_one_read",
                "grouped_vector_stats_kernel": "stats", "grouped_factored_rms_kernel": "usq",
                "grouped_factored_write_kernel": "write", "grouped_vector_write_kernel": "write",
                "grouped_lomo_sum_kernel": "sum", "grouped_lomo_write_kernel": "write"}


def bytes_moved(p: torch.Tensor, g: torch.Tensor, kind: str, *, scale_parameter: bool = True,
                beta1: bool = False) -> dict[str, int]:
    """Device-memory bytes each pass must move for one update (the floor each kernel is timed against): each input
    read once, each output written once. Workspace traffic (partials: ~numel/32 fp32 values, mostly L2-resident) is
    not counted."""
    n = p.numel()
    eg, ep = g.element_size(), p.element_size()
    if kind == "lomo":
        return {"sum": n * eg, "write": n * (eg + 2 * ep)}
    m = 8 * n if beta1 else 0
    if p.dim() >= 2:
        stats = n * (eg + (ep if scale_parameter else 0))
        return {"stats": stats, "stats_one_read": stats, "usq": n * eg, "write": n * (eg + 2 * ep) + m}
    return {"stats": n * (eg + 8 + (ep if scale_parameter else 0)), "write": n * (eg + 2 * ep + 12) + m}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time a few launch configurations")
    ap.add_argument("--sweep-configs", default=None, help="JSON list of set_config changes (default: SWEEP)")
    ap.add_argument("--sr-ablation", action="store_true",
                    help="also time every kernel with stochastic rounding off (the cost of its random bits)")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    args = ap.parse_args()
    _pytest_shim()
    import triton

    from adalomo import kernels

    res = {"command": " ".join(["python3"] + sys.argv), "date": datetime.datetime.now().isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    print(res["device"], "torch", torch.__version__, "triton", triton.__version__, flush=True)

    if not args.skip_correctness:
        import test_kernels as T
        t0 = time.perf_counter()
        verdicts = T.run_cases("cuda", {k: v for k, v in {**T.CASES, **T.GPU_CASES}.items()
                                        if k != "import_is_lazy"})
        bad = {k: v for k, v in verdicts.items() if not k.endswith(":seconds") and v != "ok"}
        n = sum(1 for k in verdicts if not k.endswith(":seconds"))
        print(f"correctness: {n - len(bad)}/{n} cases pass ({time.perf_counter() - t0:.0f} s)", flush=True)
        for k, v in bad.items():
            print(f"  FAIL {k}: {v}", flush=True)
        res["correctness"] = verdicts

    bw = copy_bandwidth()
    res["copy_GBps"] = bw
    print(f"device copy bandwidth: {bw:.0f} GB/s (read + write)", flush=True)
    res["read_GBps"] = read_bandwidth()
    print(f"device read bandwidth: {res['read_GBps']:.0f} GB/s (torch sum, bf16)", flush=True)

    res["model_step_0.94B"] = model_step()

    rows = []
    for name in [s for s in args.shapes.split(",") if s]:
        shape, count = SHAPES[name]
        for algo in ("adalomo", "lomo"):
            p = torch.empty(shape, dtype=torch.bfloat16, device="cuda")
            need = bytes_moved(p, p, "lomo" if algo == "lomo" else "adalomo")
            kt = kernel_times(algo, shape)
            dev_ms, host_ms = time_update(algo, shape)
            torch_ms, torch_host = time_update(algo, shape, torch_path=True)
            per = {}
            for kname, us in kt.items():
                pas = _KERNEL_PASS.get(kname)
                gbps = need[pas] / (us * 1e-6) / 1e9 if pas in need else None
                per[kname] = {"us": round(us, 2), "bytes": need.get(pas), "GBps": None if gbps is None else round(gbps)}
            total = sum(need.values())
            row = {"shape": name, "algo": algo, "numel": p.numel(), "count": count, "update_ms": round(dev_ms, 4),
                   "host_ms": round(host_ms, 4), "bytes": total, "GBps": round(total / (dev_ms * 1e-3) / 1e9),
                   "bound_ms": round(total / (bw * 1e9) * 1e3, 4), "torch_ms": round(torch_ms, 4),
                   "torch_host_ms": round(torch_host, 4), "kernels": per}
            if args.sr_ablation:  # the same kernels with round-to-nearest: what the stochastic rounding's RNG costs
                row["kernels_no_sr_us"] = {k: round(us, 2) for k, us in kernel_times(algo, shape, sr=False).items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del p
    res["rows"] = rows

    # per model: sum over its tensors of the update times (what one fused step adds at most)
    models = {"0.94B": ["attn 2048x2048", "mlp 5504x2048", "mlp 2048x5504", "embed 32000x2048"],
              "6.7B": ["attn 4096x4096", "mlp 11008x4096", "mlp 4096x11008", "embed 32000x4096", "norm 4096"]}
    summary = {}
    for model, names in models.items():
        for algo in ("adalomo", "lomo"):
            sel = [r for r in rows if r["shape"] in names and r["algo"] == algo]
            if len(sel) != len(names):
                continue
            summary[f"{model} {algo}"] = {k: round(sum(r[k] * r["count"] for r in sel), 2)
                                          for k in ("update_ms", "host_ms", "bound_ms", "torch_ms")}
    res["per_model"] = summary

    if args.sweep:  # launch geometries for the grouped kernels that fused mode runs per gradient bucket
        sweep = []
        for v in json.loads(args.sweep_configs) if args.sweep_configs else SWEEP:
            prev = kernels.set_config(**v)
            try:
                r = {"config": v, "buckets": {}}
                for bname, shapes in SWEEP_BUCKETS.items():
                    for algo in ("adalomo", "lomo"):
                        r["buckets"][f"{bname} {algo}"] = grouped_kernel_times(algo, shapes)
                sweep.append(r)
                print("sweep", json.dumps(r), flush=True)
            finally:
                kernels.set_config(**prev)
        res["sweep"] = sweep
        best = {}
        for r in sweep:
            for b, t in r["buckets"].items():
                if b not in best or t["total_us"] < best[b][0]:
                    best[b] = (t["total_us"], r["config"])
        res["sweep_best"] = {b: {"total_us": t, "config": c} for b, (t, c) in best.items()}

    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)

    # ---------------------------------------------------------------- the short table, last
    print("\nper-kernel bandwidth (bf16 params and grads, median of rotated runs; "
          f"copy bandwidth {bw:.0f} GB/s)")
    print(f"{'shape':18s} {'algo':8s} {'update us':>9s} {'bound us':>8s} {'GB/s':>6s} {'host us':>8s} "
          f"{'torch us':>9s}  kernels (us, GB/s)")
    for r in rows:
        ks = " ".join(f"{k.strip('_').replace('_kernel', '')}={v['us']:.0f}/{v['GBps'] or '-'}"
                      for k, v in r["kernels"].items())
        print(f"{r['shape']:18s} {r['algo']:8s} {r['update_ms'] * 1e3:9.1f} {r['bound_ms'] * 1e3:8.1f} "
              f"{r['GBps']:6d} {r['host_ms'] * 1e3:8.1f} {r['torch_ms'] * 1e3:9.1f}  {ks}")
    for k, v in summary.items():
        print(f"per step, {k}: kernels {v['update_ms']:.2f} ms (bound {v['bound_ms']:.2f} ms), host "
              f"{v['host_ms']:.2f} ms, torch path {v['torch_ms']:.2f} ms")
    n_t = res["model_step_0.94B"]["adalomo grouped"]["tensors"]
    print(f"all {n_t} tensors of LLaMA 0.94B (bf16), one update each:")
    for k, v in res["model_step_0.94B"].items():
        print(f"  {k:20s} device {v['device_ms']:7.2f} ms  host {v['host_ms']:7.2f} ms  {v['GBps']} GB/s "
              f"(bound {v['bytes_GB']} GB)")
    _ = kernels


if __name__ == "__main__":
    main()
