"""Where a training step's time goes: torch.profiler over a few steps of one optimizer row of bench_gpu.py.

    PYTHONPATH=src python3 benchmarks/profile_step.py --row adalomo_fused --config 0.94b

Prints the host-side ops that take the most time, the GPU busy time against the wall time of the step
(idle GPU = the host is the bottleneck), and how often the host waited for the device.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_gpu  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", default="adalomo_fused")
    ap.add_argument("--config", default="0.94b", choices=sorted(bench_gpu.CONFIGS))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cfg = bench_gpu.CONFIGS[args.config]
    model = bench_gpu._build(cfg)
    params = list(model.parameters())
    x = torch.randint(0, cfg.get("vocab", 32000), (cfg["batch"], cfg["seq"]), device="cuda")
    opt, fused, _, _ = bench_gpu._optimizer(args.row, model, params, cuda=True)

    def step():
        bench_gpu._loss(model, x).backward()
        if opt is not None and not fused:
            opt.step()
            opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    plain = (time.perf_counter() - t0) / args.steps
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / args.steps
    ka = prof.key_averages()
    # the kernels themselves (device events); an op's self device time repeats its kernels' (torch's table total
    # sums the device events alone too)
    gpu_us = sum(e.self_device_time_total for e in ka if e.device_type != DeviceType.CPU) / args.steps
    waits = {e.key: e.count // args.steps for e in ka
             if any(s in e.key for s in ("Synchronize", "cudaMemcpy", "cudaHostAlloc", "cudaMalloc"))}
    ours = ("_fac", "_vec", "_finish", "_lomo", "_sum", "_g_", "adapm_")  # the Triton kernels of adalomo.kernels
    opt_us = sum(e.self_device_time_total for e in ka if e.key.startswith(ours)) / args.steps
    summary = {"row": args.row, "config": args.config, "wall_ms": round(plain * 1e3, 2),
               "wall_profiled_ms": round(wall * 1e3, 2),
               "gpu_busy_ms": round(gpu_us / 1e3, 2), "optimizer_kernels_ms": round(opt_us / 1e3, 2),
               "host_waits_per_step": waits}
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    print(ka.table(sort_by="self_device_time_total", row_limit=18, max_name_column_width=60))
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**summary, "table": ka.table(sort_by="self_cpu_time_total", row_limit=40)}, f, indent=1)


if __name__ == "__main__":
    main()
