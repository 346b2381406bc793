"""Host time of the fused hooks and bucket flushes, without a GPU: the kernel launches are stubbed out.

    PYTHONPATH=src python benchmarks/host_overhead.py [--tensors 147] [--bucket-mb 0,16,64,256]

On CUDA the fused backward of a ~1B model is host-bound (docs/kernels.md): every microsecond of Python per
hook or per flush adds to the step. This measures that Python on any machine: a chain of small linear
layers (so autograd itself is cheap), each parameter's update going through the real hook, queue, flush and
grouped-launch preparation (``kernels.updates.scaled_rms_update_many_`` up to the launches), with the
Triton launchers replaced by no-ops and the "device" being the CPU. Prints microseconds per parameter.
(``bucket_cap_mb`` 0, the per-tensor path, looks cheap here only because its launches, its main host
cost on a GPU, are stubbed out: compare the bucketed rows with each other.)

The configurations are built first and measured in interleaved rounds, each keeping its best round (``--repeat``):
a shared virtual machine's speed drifts by up to 2x within a minute. ``--count-ops`` counts the ATen ops that one
bucket flush dispatches (CPU path). ``--out`` writes JSON and keeps the file's ``history`` list
(``--history-note`` first appends the rows already there to it).
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
    ap.add_argument("--repeat", type=int, default=5, help="best of this many runs of --steps steps (the VM is noisy)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--count-ops", action="store_true",
                    help="count the ATen ops each bucket flush dispatches (CPU path: no pinned copies here)")
    ap.add_argument("--out", default=None, help="also write the numbers as JSON (its 'history' list is kept)")
    ap.add_argument("--note", default=None, help="with --out: the note of this run")
    ap.add_argument("--history-note", default=None,
                    help="with --out: append the rows already in the file to 'history' under this note")
    args = ap.parse_args()
    import torch

    import adalomo
    from adalomo import kernels
    if not kernels.use_triton(torch.zeros(2)):
        raise SystemExit("triton is needed (pip install triton): its interpreter stands in for the GPU here")
    from adalomo.kernels import factored, grouped, launch, lomo, one_read, vector
    for mod in (factored, grouped, lomo, one_read, vector):  # the launches (Launcher objects) of every family
        for name in dir(mod):
            if isinstance(getattr(mod, name), launch.Launcher):
                setattr(mod, name, lambda *a, **k: None)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # 147 tensors: 7 matrices and 2 norms per layer (a LLaMA block) + the rest, 64x64 so autograd is cheap
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64, bias=i % 5 == 0) for i in range(args.tensors * 5 // 6)])
    n = sum(1 for _ in model.parameters())
    x = torch.randn(2, 64)

    def build(setup):
        m = type(model)(*[type(layer)(64, 64, bias=layer.bias is not None) for layer in model])
        m.load_state_dict(model.state_dict())
        keep = setup(m)
        for _ in range(3):
            m(x).sum().backward()
        return m, keep

    def run(m) -> float:
        t = time.perf_counter()
        for _ in range(args.steps):
            m(x).sum().backward()
        return (time.perf_counter() - t) / args.steps / n * 1e6

    def floor(m):
        for p in m.parameters():
            p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))

    def fused(mb):
        cap = mb if mb == 0 else mb * (64 * 64 * 4 * n / 2**20) / 1880  # scale: same bucket count as a 0.94B model
        return lambda m: adalomo.AdaLomo(m.parameters(), lr=1e-3, fused=True, bucket_cap_mb=cap, nonfinite="count")

    # every configuration is built first and the rounds interleave them, each keeping its best round: the drift
    # of this (shared, virtual) machine then hits the floor and the rows alike
    mbs = [float(v) for v in args.bucket_mb.split(",")]
    models = [build(floor)] + [build(fused(mb)) for mb in mbs]
    best = [float("inf")] * len(models)
    for _ in range(max(1, args.repeat)):
        for k, (m, _) in enumerate(models):
            best[k] = min(best[k], run(m))
    base = best[0]
    print(f"{n} parameters; forward+backward with a hook that drops the gradient: {base:.1f} us per parameter")
    print(f"{'bucket_cap_mb':>14s} {'us/param over floor':>20s}")
    rows = []
    for mb, us in zip(mbs, best[1:]):
        rows.append({"bucket_cap_mb_at_0.94b": mb, "us_per_param_over_floor": round(us - base, 1)})
        print(f"{mb:14g} {us - base:20.1f}")
    ops = count_ops(model, x, n, adalomo) if args.count_ops else None
    if ops is not None:
        print(f"64 MiB buckets: {ops['flushes_per_step']} flushes per backward, ATen ops per flush: "
              f"{ops['aten_ops_per_flush']} {ops['by_op']}")
    if args.out:
        import datetime
        import json
        import platform
        import sys
        old = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                old = json.load(f)
        history = list(old.get("history", []))
        if args.history_note and old.get("rows"):
            history.append({"note": args.history_note, "floor_us_per_param": old.get("floor_us_per_param"),
                            "rows": old["rows"]})
        doc = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(
            timespec="seconds"), "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
            "parameters": n, "repeat": args.repeat, "floor_us_per_param": round(base, 1), "rows": rows}
        if ops is not None:
            doc["ops_64mib"] = ops
        if history:
            doc["history"] = history
        if args.note:
            doc["note"] = args.note
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    if args.profile:
        import cProfile
        import pstats
        pr = cProfile.Profile()
        pr.enable()
        run(build(fused(64))[0])
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(18)


def count_ops(model, x, n, adalomo) -> dict:
    """ATen ops dispatched per bucket flush (64 MiB-equivalent buckets), by a TorchDispatchMode around ``_flush``."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            counts[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    m = type(model)(*[type(layer)(64, 64, bias=layer.bias is not None) for layer in model])
    opt = adalomo.AdaLomo(m.parameters(), lr=1e-3, fused=True, nonfinite="count",
                          bucket_cap_mb=64 * (64 * 64 * 4 * n / 2**20) / 1880)
    m(x).sum().backward()
    flushes = [0]
    orig = opt._flush

    def flush(gi):
        if opt._pending.get(gi):
            flushes[0] += 1
        with Count():
            orig(gi)
    opt._flush = flush
    steps = 5
    for _ in range(steps):
        m(x).sum().backward()
    total = sum(counts.values())
    return {"flushes_per_step": flushes[0] / steps, "aten_ops_per_flush": round(total / flushes[0], 2),
            "by_op": {k: round(v / flushes[0], 2) for k, v in counts.most_common()}}


if __name__ == "__main__":
    main()
