"""Host (CPU) time of AdaPM's kernel path per step: what fused mode pays inside backward, where the GPU waits for it
once it exceeds the backward's own slack.

    PYTHONPATH=src python3 benchmarks/bench_adapm_host.py --out benchmarks/results/adapm_host_h100.json
    ADALOMO_TRITON_INTERPRET=1 TRITON_INTERPRET=1 PYTHONPATH=src python3 benchmarks/bench_adapm_host.py --device cpu

A stack of LLaMA layers of the 0.94B shapes (q, k, v, o, gate, up, down and two norms; the default policy gives them
low-rank, full and no momentum; ``--bias``: biases everywhere, as GPT-2's blocks), bf16, rank 64, the classic
``step()`` (the same ``_update_many`` as a fused bucket). Counts the launches, GEMMs and metadata copies of a step.
On CUDA the GPU is kept busy (``torch.cuda._sleep``) so that launches never wait; but the classic step reads its
finite flags back at its end, so there the time is the GPU's (the counts still hold). On CPU (``--device cpu``, the
kernels selected through the interpreter's switch) the launches see a stream as on a GPU, and each launch stops
after the launcher's own bookkeeping (its variant key), before Triton's C launcher; GEMMs do nothing: the time is
the Python around the launches, which compares code versions on any machine (``PYTHONPATH`` picks the version; the
CPU of a shared machine is noisy: use many ``--steps``). Prints ms per step and us per tensor, the median and the
fastest of ``--repeats``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--bias", action="store_true", help="biases in every linear and norm layer (as GPT-2's blocks)")
    ap.add_argument("--small", action="store_true", help="shapes of 128 x 344 and rank 8 (a quick smoke run)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    import torch
    from torch import nn

    import adalomo
    cuda = args.device == "cuda"
    if not cuda:  # the kernel path as on a GPU (a stream to launch on), but launches and GEMMs do nothing
        from adalomo.kernels import launch, products

        def ctx(self, t):
            self.device, self.stream = 0, 1

        def call(self, grid, args, consts, num_warps, run, maxnreg=None):
            """What ``Launcher`` does before the launch itself: its variant cache's key and lookup."""
            stream, device, key = run
            key = (consts, num_warps, maxnreg) + key if key is not None else (consts, num_warps, maxnreg, device) \
                + tuple((a.dtype, a.data_ptr() % 16 == 0) for a in args[:self.n_ptr])
            self.cache.get(key)

        launch.LaunchContext.__init__, launch.Launcher.__call__ = ctx, call
        products._mm32 = lambda a, b, out=None: out if out is not None else torch.empty(a.shape[0], b.shape[1])
    counts = _count_launches()
    # the 0.94B shapes on CPU too: they decide how the tensors group into waves (``kernels.adapm``)
    hidden, inter = (2048, 5504) if not args.small else (128, 344)

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            lin = lambda i, o: nn.Linear(i, o, bias=args.bias)  # noqa: E731
            self.self_attn = nn.ModuleDict(dict(q_proj=lin(hidden, hidden), k_proj=lin(hidden, hidden),
                                                v_proj=lin(hidden, hidden), o_proj=lin(hidden, hidden)))
            self.mlp = nn.ModuleDict(dict(gate_proj=lin(hidden, inter), up_proj=lin(hidden, inter),
                                          down_proj=lin(inter, hidden)))
            self.input_layernorm = nn.LayerNorm(hidden, bias=args.bias)
            self.post_attention_layernorm = nn.LayerNorm(hidden, bias=args.bias)

    calls = [0]
    update = adalomo.AdaPM._update_many

    def counted(self, ps, *a, **k):  # the kernel path, not the torch maths, is what is timed
        calls[0] += len(ps)
        return update(self, ps, *a, **k)
    adalomo.AdaPM._update_many = counted

    torch.manual_seed(0)
    model = nn.ModuleDict({"layers": nn.ModuleList([Layer() for _ in range(args.layers)])})
    model = model.to(args.device, torch.bfloat16)
    params = list(model.parameters())
    rows = []
    for second in ("factored", "adam"):
        opt = adalomo.AdaPM(adalomo.adapm_param_groups(model, rank=8 if args.small else 64), lr=1e-4,
                            second_moment=second, update_proj_gap=10**9)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        calls[0] = 0
        for k in counts:
            counts[k] = 0
        opt.step()
        kernel_updates = calls[0]
        per_step = dict(counts)
        times = []
        for _ in range(args.repeats):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda._sleep(int(2e9))  # about a second of GPU work queued first: launches never wait
            t0 = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            times.append((time.perf_counter() - t0) / args.steps)
            if cuda:
                torch.cuda.synchronize()
        t = statistics.median(times)
        rows.append({"second_moment": second, "tensors": len(params), "kernel_updates": kernel_updates, **per_step,
                     "host_ms_per_step": round(t * 1e3, 3),
                     "host_us_per_tensor": round(t / len(params) * 1e6, 1),
                     "fastest_us_per_tensor": round(min(times) / len(params) * 1e6, 1),
                     "all_ms": [round(x * 1e3, 3) for x in times]})
        print(json.dumps(rows[-1]), flush=True)
    device = torch.cuda.get_device_name() if cuda else "cpu (launches and GEMMs stubbed)"
    print(f"\n{device}; {args.layers} layers of 0.94B shapes{' with biases' if args.bias else ''}, bf16, classic "
          f"step; median of {args.repeats}")
    print(f"{'second moment':14s} {'tensors':>7s} {'launches':>8s} {'GEMMs':>5s} {'copies':>6s} {'host ms/step':>12s} "
          f"{'us/tensor':>9s} {'fastest':>8s}")
    for r in rows:
        print(f"{r['second_moment']:14s} {r['tensors']:7d} {r['launches']:8d} {r['gemms']:5d} {r['copies']:6d} "
              f"{r['host_ms_per_step']:12.3f} {r['host_us_per_tensor']:9.1f} {r['fastest_us_per_tensor']:8.1f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "device": device, "adalomo": os.path.dirname(adalomo.__file__), "rows": rows}, f, indent=1)


def _count_launches() -> dict:
    """Per step: kernel launches, GEMMs and host-to-device copies of the update (each costs the host a few us on a
    GPU machine; on CPU the launches and GEMMs are stubbed)."""
    import torch

    from adalomo.kernels import launch, products
    counts = {"launches": 0, "gemms": 0, "copies": 0}
    call, mm, copy = launch.Launcher.__call__, products._mm32, torch.Tensor.copy_

    def counted_call(self, *a, **k):
        counts["launches"] += 1
        return call(self, *a, **k)

    def counted_mm(*a, **k):
        counts["gemms"] += 1
        return mm(*a, **k)

    def counted_copy(self, src, non_blocking=False):  # the metadata uploads (the only asynchronous copies)
        counts["copies"] += bool(non_blocking)
        return copy(self, src, non_blocking)
    launch.Launcher.__call__, products._mm32, torch.Tensor.copy_ = counted_call, counted_mm, counted_copy
    return counts


if __name__ == "__main__":
    main()
