"""How close to the memory bandwidth does AdaPM's update run, per momentum kind and second moment? And what does a
basis refresh cost?

    PYTHONPATH=src python3 benchmarks/bench_adapm_kernels.py --out benchmarks/results/adapm_kernels_h100.json

Per LLaMA matrix shape (0.94B and 6.7B), bf16 parameters and gradients, fp32 state, rank 64: the device time of one
AdaPM update of one tensor (``opt.step()`` on it, no basis refresh: the sum of its kernels' device times from
torch.profiler, and the wall time from CUDA events), the bytes
each kind must move (``kernels/adapm.py``'s count: every pass's reads and writes of full-size tensors, small state
and partial sums not counted), the achieved GB/s and its fraction of the device's copy bandwidth; the torch path's
time for comparison; and, for low-rank momentum, the extra time of a step with a basis refresh (every step
refreshes with ``update_proj_gap=1``). ``--device cpu`` dry-runs the script through Triton's interpreter on a tiny
shape (no meaningful times). Prints a short table last; ``--out`` writes JSON with the command, date and device.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

SHAPES = {  # LLaMA 0.94B (h=2048, inter 5504) and 6.7B (h=4096, inter 11008); (out, in) as nn.Linear stores them
    "0.94b attn 2048x2048": (2048, 2048),
    "0.94b mlp up 5504x2048": (5504, 2048),
    "0.94b mlp down 2048x5504": (2048, 5504),
    "6.7b attn 4096x4096": (4096, 4096),
    "6.7b mlp up 11008x4096": (11008, 4096),
    "6.7b mlp down 4096x11008": (4096, 11008),
}
KINDS = ("none", "full", "low_rank")
SECONDS = ("adam", "factored")


def bytes_per_element(kind: str, second: str, p_bytes: int = 2, g_bytes: int = 2, clip: bool = True,
                      relative_lr: bool = False) -> int:
    """What one update must move per element (kernels/adapm.py's passes), fp32 state. A low-rank chunk reads g once
    more for its projection and has its lift L (fp32) written once and read by each later pass."""
    stats = g_bytes + (p_bytes if relative_lr and second == "factored" else 0)
    low = kind == "low_rank"
    project = g_bytes + 4 if low else 0  # g read by the projection; the lift written
    lift = 4 if low else 0  # the lift read, per pass
    if second == "adam":
        write = g_bytes + 2 * p_bytes + 8 + (8 if kind == "full" else 0) + lift  # g, p, v (and m or L) read; p, v
        return stats + project + write  # (and m) written
    if not clip:  # no RMS(u) pass: the write forms m itself
        write = g_bytes + 2 * p_bytes + (8 if kind == "full" else 0) + lift
        return stats + project + write
    usq = g_bytes + (8 if kind == "full" else 0) + lift  # full momentum writes m here
    write = (4 if kind == "full" else g_bytes) + 2 * p_bytes + lift  # m (or g) and p read, p written
    return stats + project + usq + write


def _copy_bandwidth(torch, dev, n: int) -> float:
    """Device-to-device copy of n bf16 elements: (read + write) bytes / time, GB/s."""
    a = torch.empty(n, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    return 4 * n / (e0.elapsed_time(e1) / 20 / 1e3) / 1e9


#: the device time (us per step) of each kernel of the last ``_time_steps`` on CUDA
LAST_KERNELS: dict = {}


def _time_steps(torch, opt, p, grads, iters: int, cuda: bool) -> tuple[float, float]:
    """(wall seconds per ``opt.step()`` from CUDA events, device seconds per step: the sum of its kernels' times from
    torch.profiler) over ``iters`` steps (gradients rotated), after 2 warm-up steps. A small tensor's step may be
    host-bound (wall > device): its bandwidth is computed from the device time."""
    def run(n):
        for i in range(n):
            p.grad = grads[i % len(grads)]
            opt.step()
    run(2)
    if not cuda:
        t0 = time.perf_counter()
        run(iters)
        t = (time.perf_counter() - t0) / iters
        return t, t
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    run(iters)
    e1.record()
    torch.cuda.synchronize()
    wall = e0.elapsed_time(e1) / iters / 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run(iters)
        torch.cuda.synchronize()
    total, per_kernel = 0.0, {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        us = us if us is not None else getattr(e, "self_cuda_time_total", 0.0)
        total += us
        if us:
            per_kernel[e.key[:40]] = round(us / iters, 1)
    LAST_KERNELS.clear()
    LAST_KERNELS.update(per_kernel)
    return wall, total / iters / 1e6


def measure(shape, kind: str, second: str, *, dev: str, iters: int, rank: int, torch_path: bool,
            refresh: bool = False) -> tuple[float, float]:
    import torch

    import adalomo
    if torch_path:
        os.environ["ADALOMO_DISABLE_TRITON"] = "1"
    try:
        gen = torch.Generator(device=dev).manual_seed(0)
        p = torch.nn.Parameter(torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16))
        # more gradients than L2 holds in all: each step reads from memory
        n_grads = max(2, min(8, (200 << 20) // max(p.numel() * 2, 1) + 1))
        grads = [torch.randn(shape, generator=gen, device=dev, dtype=torch.bfloat16) * 1e-2 for _ in range(n_grads)]
        opt = adalomo.AdaPM([{"params": [p], "momentum": kind}], lr=1e-4, rank=rank, second_moment=second,
                            update_proj_gap=1 if refresh else 10**9)
        if not torch_path:
            from adalomo import kernels
            assert kernels.use_triton(p), "the kernels do not run here"
        return _time_steps(torch, opt, p, grads, iters, dev == "cuda")
    finally:
        os.environ.pop("ADALOMO_DISABLE_TRITON", None)


def refresh_flops(shape, rank: int, oversample: int = 8, power_iters: int = 2, iters: int = 8) -> float:
    """FLOPs of one randomized basis refresh of an a x b matrix (momentum.orthonormal_basis + refresh_basis_):
    the sketch and power iterations (2 (1 + 2 power_iters) a b k), the small projected matrix (2 a b k), the
    orthogonal iteration on k x k, the carried momentum and fill (about 4 a b r)."""
    a, b = sorted(shape)
    k = min(rank + oversample, a, b)
    return 2 * (1 + 2 * power_iters) * a * b * k + 2 * a * b * k + iters * 4 * k**3 + 4 * a * b * rank


def _variants(spec: str) -> list[tuple[str, dict]]:
    """'name:A=1;B=(2, 3)|other:A=2' -> [(name, {A: 1, B: [2, 3]}), (other, {A: 2})]."""
    from bench_gpu import _parse_constants
    return [(name.strip(), _parse_constants(body))
            for name, _, body in (part.partition(":") for part in filter(None, spec.split("|")))]


@contextlib.contextmanager
def _constants(settings: dict):
    """Module constants of adalomo.kernels.adapm set inside the block."""
    from bench_gpu import _set_adapm_constants
    old = _set_adapm_constants(settings)
    try:
        yield
    finally:
        _set_adapm_constants(old)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES, or AxB")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--no-torch-path", action="store_true", help="skip the torch path's timings")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated momentum kinds")
    ap.add_argument("--seconds", default=",".join(SECONDS), help="comma-separated second moments")
    ap.add_argument("--variants", default="",
                    help="kernel variants to compare on low-rank rows: 'name:CONST=value;CONST=value|name2:...', each "
                         "setting module constants of adalomo.kernels.adapm (e.g. _FINISH_BLOCK=128 or "
                         "_MOMENTUM_BLOCK=512); their times go to us_<name> and kernels_<name>")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.device == "cpu":  # the interpreter (set before anything imports triton): a dry run
        os.environ["ADALOMO_TRITON_INTERPRET"] = "1"
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.join(ROOT, "src"))
    import torch
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --device cpu for a dry run")
    shapes = {}
    for name in args.shapes.split(","):
        shapes[name] = SHAPES[name] if name in SHAPES else tuple(int(x) for x in name.split("x"))
    if not cuda and args.shapes == ",".join(SHAPES):
        shapes = {"tiny 48x80": (48, 80)}
        args.iters = min(args.iters, 2)
    device = torch.cuda.get_device_name() if cuda else "cpu (Triton interpreter: times mean nothing)"
    copy_gbs = _copy_bandwidth(torch, "cuda", 1 << 28) if cuda else float("nan")
    rows = []
    for name, shape in shapes.items():
        numel = shape[0] * shape[1]
        for second in args.seconds.split(","):
            for kind in args.kinds.split(","):
                wall, t = measure(shape, kind, second, dev=args.device, iters=args.iters, rank=args.rank,
                                  torch_path=False)
                moved = bytes_per_element(kind, second) * numel
                row = {"shape": name, "kind": kind, "second_moment": second, "numel": numel,
                       "bytes_per_param": bytes_per_element(kind, second), "us": round(t * 1e6, 1),
                       "wall_us": round(wall * 1e6, 1), "GB_s": round(moved / t / 1e9, 1),
                       "of_copy_bw": round(moved / t / 1e9 / copy_gbs, 3), "kernels": dict(LAST_KERNELS)}
                if not args.no_torch_path:
                    _, tt = measure(shape, kind, second, dev=args.device, iters=max(2, args.iters // 4),
                                    rank=args.rank, torch_path=True)
                    row["torch_us"] = round(tt * 1e6, 1)
                if kind == "low_rank" and args.variants:
                    for vname, settings in _variants(args.variants):
                        try:
                            with _constants(settings):
                                _, tv = measure(shape, kind, second, dev=args.device, iters=args.iters,
                                                rank=args.rank, torch_path=False)
                        except Exception as e:  # a variant that does not compile (e.g. out of resources)
                            row[f"error_{vname}"] = f"{type(e).__name__}: {e}"[:200]
                            continue
                        row[f"us_{vname}"] = round(tv * 1e6, 1)
                        row[f"kernels_{vname}"] = dict(LAST_KERNELS)
                if kind == "low_rank":
                    _, tr = measure(shape, kind, second, dev=args.device, iters=max(2, args.iters // 4),
                                    rank=args.rank, torch_path=False, refresh=True)
                    row["refresh_extra_us"] = round((tr - t) * 1e6, 1)
                    row["refresh_GFLOP"] = round(refresh_flops(shape, args.rank) / 1e9, 2)
                rows.append(row)
                print(json.dumps(row), flush=True)
    res = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "device": device,
           "copy_GB_s": round(copy_gbs, 1), "rank": args.rank, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    print(f"\n{device}; copy bandwidth {copy_gbs:.0f} GB/s (read + write); rank {args.rank}; bf16 p and g, fp32 state")
    print("us: device time per update (sum of its kernels); wall: CUDA events (host-bound when larger)")
    print(f"{'shape':26s} {'second':8s} {'kind':9s} {'B/param':>7s} {'us':>8s} {'wall us':>8s} {'GB/s':>7s} "
          f"{'of copy':>7s} {'torch us':>9s} {'refresh +us':>11s}")
    nan = float("nan")
    for r in rows:
        print(f"{r['shape']:26s} {r['second_moment']:8s} {r['kind']:9s} {r['bytes_per_param']:7d} {r['us']:8.1f} "
              f"{r['wall_us']:8.1f} {r['GB_s']:7.1f} {r['of_copy_bw']:7.3f} {r.get('torch_us', nan):9.1f} "
              f"{r.get('refresh_extra_us', nan):11.1f}")


if __name__ == "__main__":
    main()
