"""Host time of the fused hooks and bucket flushes, without a GPU: the kernel launches are stubbed out.

    PYTHONPATH=src python benchmarks/host_overhead.py [--tensors 147] [--bucket-mb 0,16,64,256]

On CUDA the fused backward of a ~1B model is host-bound (docs/kernels.md): every microsecond of Python per
hook or per flush adds to the step. This measures that Python on any machine: a chain of small linear
layers (so autograd itself is cheap), each parameter's update going through the real hook, queue, flush and
grouped-launch preparation (``kernels._triton.scaled_rms_update_many_`` up to the launches), with the
Triton launchers replaced by no-ops and the "device" being the CPU. Prints microseconds per parameter.
(``bucket_cap_mb`` 0, the per-tensor path, looks cheap here only because its launches, its main host
cost on a GPU, are stubbed out: compare the bucketed rows with each other.)
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("ADALOMO_TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_INTERPRET", "1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tensors", type=int, default=147)
    ap.add_argument("--bucket-mb", default="0,16,64,256")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON")
    args = ap.parse_args()
    import torch

    import adalomo
    from adalomo import kernels
    from adalomo.kernels import _triton as K

    if not kernels.use_triton(torch.zeros(2)):
        raise SystemExit("triton is needed (pip install triton): its interpreter stands in for the GPU here")
    for name in dir(K):  # the launches: grouped (_G_*) and per tensor (_STATS, _WRITE, ... are _Launcher objects)
        if name.startswith("_G_") or isinstance(getattr(K, name), K._Launcher):
            setattr(K, name, lambda *a, **k: None)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # 147 tensors: 7 matrices and 2 norms per layer (a LLaMA block) + the rest, 64x64 so autograd is cheap
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=i % 5 == 0) for i in range(args.tensors * 5 // 6)])
    n = sum(1 for _ in model.parameters())
    x = torch.randn(2, 64)

    def per_param_us(setup) -> float:
        m = type(model)(*[type(layer)(64, 64, bias=layer.bias is not None) for layer in model])
        m.load_state_dict(model.state_dict())
        setup(m)
        for _ in range(3):
            m(x).sum().backward()
        t = time.perf_counter()
        for _ in range(args.steps):
            m(x).sum().backward()
        return (time.perf_counter() - t) / args.steps / n * 1e6

    def floor(m):
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

    base = per_param_us(floor)
    print(f"{n} parameters; forward+backward with a hook that drops the gradient: {base:.1f} us per parameter")
    print(f"{'bucket_cap_mb':>14s} {'us/param over floor':>20s}")
    rows = []
    for mb in (float(v) for v in args.bucket_mb.split(",")):
        cap = mb if mb == 0 else mb * (64 * 64 * 4 * n / 2**20) / 1880  # scale: same bucket count as a 0.94B model
        us = per_param_us(lambda m, cap=cap: adalomo.AdaLomo(m.parameters(), lr=1e-3, fused=True, bucket_cap_mb=cap,
                                                             nonfinite="count"))
        rows.append({"bucket_cap_mb_at_0.94b": mb, "us_per_param_over_floor": round(us - base, 1)})
        print(f"{mb:14g} {us - base:20.1f}")
    if args.out:
        import datetime
        import json
        import platform
        import sys
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(
                timespec="seconds"), "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                "parameters": n, "floor_us_per_param": round(base, 1), "rows": rows}, f, indent=1)
    if args.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        per_param_us(lambda m: adalomo.AdaLomo(m.parameters(), lr=1e-3, fused=True, nonfinite="count",
                                               bucket_cap_mb=64 * (64 * 64 * 4 * n / 2**20) / 1880))
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
