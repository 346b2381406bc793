"""CPU update time and peak memory of the torch path: fused AdaLomo against torch Adam and against a floor.

    PYTHONPATH=src python benchmarks/bench_cpu_step.py --out benchmarks/results/cpu_step.json

Two questions, one table each:

* **speed**: the time of the update on the WikiText-2 LSTM (``adalomo experiment lstm-lm --corpus wikitext-2``:
  a 33278-word vocabulary, LSTM 2 x 200, tied embedding; batch 20 x 35 of random tokens), fp32 and bf16
  parameters, one thread. Every row trains its own copy of the model on the same batches, the rows interleaved
  step by step in one process (in a rotating order), median over ``--steps`` steps after ``--warmup``.
  "update ms": the optimizer alone (``step()`` and ``zero_grad()`` for classic rows; for fused rows the time spent
  in the updates inside backward and at its end); "train ms": forward + backward + update; "CPU ms": the update's
  CPU time (``time.process_time``: what it costs when other jobs share the cores). Optimizers as
  ``adalomo experiment`` builds them (default lr and settings; torch Adam's CPU default, a loop over tensors);
* **memory**: peak RSS (``ru_maxrss``) after ``--rss-steps`` training steps of a ~1 GB fp32 LLaMA-style model (245M
  parameters, the largest tensors the 32000 x 1024 embeddings), each row in its own subprocess, against the
  floor: forward + backward with every gradient dropped in a post-accumulate hook (no optimizer at all).

The machine's load (other jobs on its cores) is recorded with the results: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

SPEED_ROWS = ("floor", "adalomo", "adalomo-classic", "adam")
RSS_ROWS = ("floor", "adalomo", "adalomo-classic", "adafactor", "lomo", "adam", "adamw")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: the word-level WikiText-2 LSTM of ``adalomo experiment lstm-lm`` (its vocabulary with <unk> and <eos>)
LSTM = dict(vocab=33278, embed=200, hidden=200, layers=2, dropout=0.2, tied=True, batch=20, seq=35)
#: ~1 GB in fp32: 14 LLaMA blocks of dim 1024 (SwiGLU 2816) and untied 32000 x 1024 embeddings
RSS_MODEL = dict(vocab_size=32000, dim=1024, n_layers=14, n_heads=16, ffn_dim=2816, max_seq=128)


def make_optimizer(row: str, model: torch.nn.Module, task: str):
    """The optimizer of ``row`` as the experiments build it; None for the floor (gradients dropped in hooks)."""
    if row == "floor":
        for p in model.parameters():
            p.register_post_accumulate_grad_hook(_drop_grad)
        return None
    from adalomo.experiments.train import OPTIMIZERS

    spec = OPTIMIZERS[row]
    params = list(model.named_parameters()) if spec.named_params else list(model.parameters())
    return spec.factory(params, spec.default_lr[task], task)


def _drop_grad(p: torch.Tensor) -> None:
    p.grad = None


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t0: tuple[float, float]) -> tuple[float, float]:
    t1 = _now()
    return t1[0] - t0[0], t1[1] - t0[1]


class UpdateClock:
    """(wall, CPU) time spent in the fused updates: the dispatch of each gradient (or bucket) and the end of each
    backward."""

    def __init__(self):
        from adalomo.optim import dispatch

        self.total = (0.0, 0.0)
        dispatch.update = self._timed(dispatch.update)

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t0 = _now()
            try:
                return fn(*args, **kwargs)
            finally:
                d = _since(t0)
                self.total = (self.total[0] + d[0], self.total[1] + d[1])
        return timed

    def watch(self, opt) -> None:
        opt._finish_step = self._timed(opt._finish_step)

    def take(self) -> tuple[float, float]:
        t, self.total = self.total, (0.0, 0.0)
        return t


def lstm_speed(steps: int, warmup: int, dtype: torch.dtype) -> dict[str, dict[str, float]]:
    """Median train/update (wall) and update CPU ms per row on the WikiText-2 LSTM, the rows interleaved step by
    step."""
    from adalomo.experiments.models import LSTMLM

    clock = UpdateClock()
    runs = {}
    for row in SPEED_ROWS:
        torch.manual_seed(0)
        model = LSTMLM(LSTM["vocab"], LSTM["embed"], LSTM["hidden"], LSTM["layers"], LSTM["dropout"],
                       LSTM["tied"]).to(dtype)
        opt = make_optimizer(row, model, "lstm-lm")
        fused = bool(getattr(opt, "fused", False))
        if fused:
            clock.watch(opt)
        runs[row] = (model, opt, fused, {"train": [], "update": [], "update_cpu": []})
    gen = torch.Generator().manual_seed(0)
    for i in range(warmup + steps):
        tokens = torch.randint(LSTM["vocab"], (LSTM["batch"], LSTM["seq"] + 1), generator=gen)
        x, y = tokens[:, :-1], tokens[:, 1:]
        order = SPEED_ROWS[i % len(SPEED_ROWS):] + SPEED_ROWS[: i % len(SPEED_ROWS)]
        for row in order:
            model, opt, fused, times = runs[row]
            clock.take()
            t0 = _now()
            loss, _ = model(x, None, targets=y)
            loss.backward()
            t1 = _now()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            step = _since(t1)
            inside = clock.take() if fused else (0.0, 0.0)
            if i >= warmup:
                times["train"].append(_since(t0)[0])
                times["update"].append(step[0] + inside[0] if opt is not None else 0.0)
                times["update_cpu"].append(step[1] + inside[1] if opt is not None else 0.0)
    return {row: {k: statistics.median(v) * 1e3 for k, v in runs[row][3].items()} for row in SPEED_ROWS}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def rss_row(row: str, steps: int) -> dict[str, float]:
    """Peak RSS (MiB) of ``steps`` training steps of the ~1 GB model with the optimizer of ``row`` (run alone in a
    fresh process: ru_maxrss never goes down).

    Every row, the floor included, first imports ``torch._dynamo``: ``torch.optim.Optimizer`` does on its first
    param group (and Triton with it, when installed), which is runtime, not optimizer memory; its cost is
    reported as ``dynamo_import_mib``.
    """
    from adalomo.experiments.models import GPT, GPTConfig

    before = _rss_mib()
    import torch._dynamo  # noqa: F401

    dynamo_mib = _rss_mib() - before
    torch.manual_seed(0)
    model = GPT(GPTConfig(**RSS_MODEL))
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(row, model, "gpt-lm")
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        tokens = torch.randint(RSS_MODEL["vocab_size"], (1, 65), generator=gen)
        loss = model(tokens[:, :-1], tokens[:, 1:])[1]
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "params_mib": n_params * 4 / 2**20, "params": n_params, "dynamo_import_mib": dynamo_mib}


def rss_table(steps: int, threads: int) -> dict[str, dict[str, float]]:
    out = {}
    for row in RSS_ROWS:
        cmd = [sys.executable, os.path.abspath(__file__), "--rss-row", row, "--rss-steps", str(steps),
               "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[row] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"  rss {row:16s} {out[row]['peak_rss_mib']:8.0f} MiB", file=sys.stderr, flush=True)
    return out


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores"


def speed_rows(speed: dict[str, dict[str, float]]) -> list[dict]:
    adam = speed["adam"]
    return [{"row": row, "train_ms": sp["train"], "update_ms": sp["update"],
             "update_x_adam": sp["update"] / adam["update"], "update_cpu_ms": sp["update_cpu"],
             "update_cpu_x_adam": sp["update_cpu"] / adam["update_cpu"]} for row, sp in speed.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--steps", type=int, default=20, help="timed LSTM steps per row and dtype")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtypes", default="fp32,bf16", help="parameter dtypes of the speed table")
    ap.add_argument("--vocab", type=int, default=LSTM["vocab"],
                    help="the LSTM's vocabulary (2364: the quick start's embedded corpus)")
    ap.add_argument("--rss-steps", type=int, default=3)
    ap.add_argument("--no-rss", action="store_true", help="skip the memory table")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--rss-row", default=None, help=argparse.SUPPRESS)  # one memory row (the subprocess)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.rss_row:
        print(json.dumps(rss_row(args.rss_row, args.rss_steps)))
        return
    LSTM["vocab"] = args.vocab
    load_before = os.getloadavg()
    speed = {}
    for name in args.dtypes.split(","):
        speed[name] = speed_rows(lstm_speed(args.steps, args.warmup, DTYPES[name]))
        print(f"update on the LSTM ({args.vocab} words), {name} parameters, {args.threads} thread(s), "
              f"median of {args.steps}")
        print(f"  {'':16s} {'update ms':>10s} {'x Adam':>7s} {'CPU ms':>7s} {'x Adam':>7s} {'train ms':>9s}")
        for r in speed[name]:
            print(f"  {r['row']:16s} {r['update_ms']:10.2f} {r['update_x_adam']:7.2f} {r['update_cpu_ms']:7.2f} "
                  f"{r['update_cpu_x_adam']:7.2f} {r['train_ms']:9.1f}", flush=True)
    load_after = os.getloadavg()
    memory = None if args.no_rss else rss_table(args.rss_steps, args.threads)
    if memory is not None:
        floor = memory["floor"]["peak_rss_mib"]
        print(f"peak RSS, ~1 GB fp32 model ({memory['floor']['params'] / 1e6:.0f}M parameters), one process per row")
        print(f"  {'':16s} {'MiB':>8s} {'x floor':>8s}")
        for row, m in memory.items():
            print(f"  {row:16s} {m['peak_rss_mib']:8.0f} {m['peak_rss_mib'] / floor:8.3f}")
    if args.out:
        result = {"command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now().isoformat(
            timespec="seconds"), "machine": machine(), "torch": torch.__version__, "threads": args.threads,
            "load_average": {"before": load_before, "after": load_after},
            "speed": {"model": LSTM, "steps": args.steps, "warmup": args.warmup, "statistic": "median",
                      "rows": {k: [_rounded(r) for r in v] for k, v in speed.items()}},
            "memory": None if memory is None else {
                "model": RSS_MODEL, "params": memory["floor"]["params"], "steps": args.rss_steps,
                "statistic": "ru_maxrss", "dynamo_import_mib": round(memory["floor"]["dynamo_import_mib"], 1),
                "rows": [{"row": row, "peak_rss_mib": round(m["peak_rss_mib"], 1),
                          "x_floor": round(m["peak_rss_mib"] / memory["floor"]["peak_rss_mib"], 4)}
                         for row, m in memory.items()]}}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def _rounded(row: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


if __name__ == "__main__":
    main()
