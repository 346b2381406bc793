"""One optimizer step on CPU (the torch path): AdaLomo against torch Adam on the word-level LSTM's tensors.

    PYTHONPATH=src python benchmarks/bench_cpu_step.py [--threads 1] [--out benchmarks/results/cpu_step.json]

The tensors of the WikiText-2 LSTM LM (33278 x 200 embedding, 800 x 200 LSTM weights, 800 biases), fixed
gradients, classic ``step()``, median of 10 steps after one; fp32 and bf16 parameters.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time

import torch

import adalomo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        shapes = [(33278, 200), (800, 200), (800,)]
        makers = {"adalomo": lambda ps: adalomo.AdaLomo(ps, lr=1e-2, weight_decay=0.01),
                  "torch_adam": lambda ps: torch.optim.Adam(ps, lr=1e-3, foreach=False)}
        for name, make in makers.items():
            ps = [torch.nn.Parameter(torch.randn(*s, dtype=dtype) * 0.02) for s in shapes]
            gs = [torch.randn_like(p) for p in ps]
            opt = make(ps)
            times = []
            for i in range(args.steps + 1):
                for p, g in zip(ps, gs):
                    p.grad = g
                t = time.perf_counter()
                opt.step()
                if i:
                    times.append(time.perf_counter() - t)
            rows.append({"dtype": str(dtype).removeprefix("torch."), "optimizer": name,
                         "step_ms": round(statistics.median(times) * 1e3, 1)})
            print(f"{rows[-1]['dtype']:9s} {name:11s} {rows[-1]['step_ms']:8.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(
                timespec="seconds"), "machine": platform.processor() or platform.machine(),
                "torch": torch.__version__, "threads": args.threads, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
