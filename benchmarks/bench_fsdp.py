"""FSDP2 throughput and memory: fused AdaLomo (and AdaPM) vs FSDP2 + torch AdamW, 1 -> 2 -> 4 GPUs.

Driver (one torchrun per configuration, so every run starts with an empty allocator)::

    python benchmarks/bench_fsdp.py --sizes 1b,7b --gpus 1,2 --optimizers adalomo,adamw
    python benchmarks/bench_fsdp.py --find-max --gpus 2          # the largest preset that fits, per optimizer
    python benchmarks/bench_fsdp.py --sizes 1b --gpus 1,2 --optimizers adalomo,adapm,adapm_factored,adamw
    python benchmarks/bench_fsdp.py --sizes tiny --gpus 2 --device cpu --steps 3 --warmup 1 --seq-len 64

prints a Markdown table (tokens/s per GPU, peak memory per GPU, scaling versus 1 GPU) and writes JSON
(``--out``, default benchmarks/results/fsdp.json). The worker is this file with ``--worker`` under torchrun;
the model and sharding are those of ``examples/fsdp_train.py`` (GPT from ``adalomo.experiments.models``,
``fully_shard`` per block + root, bf16 compute with fp32 gradient reduction).

Weights: AdaLomo keeps bf16 weights (stochastic rounding) and no gradients or moments beyond one block;
AdamW runs the usual recipe, fp32 master weights and moments with bf16 compute (``--adamw-dtype bf16``
for bf16 weights and moments). Gradient checkpointing is on by default (``--no-gradient-checkpointing`` to disable).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: AdaPM rows (``--optimizers adapm,adapm_factored``): fused AdaPM with its default momentum policy
ADAPM = {"adapm": {}, "adapm_factored": {"second_moment": "factored"}}

# Presets beyond adalomo.experiments.models.GPT_PRESETS (LLaMA shapes, full multi-head attention, vocab 32000).
EXTRA_SIZES = {
    "3b": dict(dim=3200, n_layers=26, n_heads=32, ffn_dim=8640),      # OpenLLaMA-3B shape: 3.4B
    "7b": dict(dim=4096, n_layers=32, n_heads=32, ffn_dim=11008),     # LLaMA-7B: 6.7B
    "13b": dict(dim=5120, n_layers=40, n_heads=40, ffn_dim=13824),    # LLaMA-13B: 13.0B
    "30b": dict(dim=6656, n_layers=60, n_heads=52, ffn_dim=17920),    # LLaMA-30B: 32.5B
    "70b": dict(dim=8192, n_layers=80, n_heads=64, ffn_dim=28672),    # LLaMA-2-70B without GQA: ~78B
    "100b": dict(dim=8192, n_layers=104, n_heads=64, ffn_dim=28672),  # the 70B shape, 104 layers: ~101B
}
MAX_LADDER = ["1b", "3b", "7b", "13b", "30b", "70b", "100b"]


def gpt_config(size: str, seq_len: int, ac: bool):
    from adalomo.experiments.models import GPT_PRESETS, GPTConfig

    if size in GPT_PRESETS:
        cfg = GPTConfig.preset(size)
    elif size in EXTRA_SIZES:
        cfg = replace(GPTConfig.preset("1b"), **EXTRA_SIZES[size])
    else:
        raise SystemExit(f"unknown size {size!r}: {', '.join([*GPT_PRESETS, *EXTRA_SIZES])}")
    return replace(cfg, max_seq=max(cfg.max_seq, seq_len), gradient_checkpointing=ac)


def _load_example():
    spec = importlib.util.spec_from_file_location("fsdp_train", ROOT / "examples" / "fsdp_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------ worker
def worker(args) -> None:
    import torch
    import torch.distributed as dist

    ex = _load_example()
    rank, world, device = ex.setup(args.device)
    cuda = device.type == "cuda"
    cfg = gpt_config(args.size, args.seq_len, args.gradient_checkpointing)
    ours = args.optimizer in ("adalomo", *ADAPM)
    if ours:
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    else:
        dtype = torch.bfloat16 if args.adamw_dtype == "bf16" else torch.float32
    result = dict(size=args.size, optimizer=args.optimizer, gpus=world, device=args.device,
                  weights=str(dtype).removeprefix("torch."), batch_per_gpu=args.batch_size, seq_len=args.seq_len,
                  activation_checkpointing=args.gradient_checkpointing, status="ok")
    # an OOM is not caught: torchrun then stops every rank (a caught one would hang the others' collectives)
    model = ex.build_model(cfg, device, dtype, None, True, 0)
    result["params"] = sum(p.numel() for p in model.parameters())
    lr = 1e-2 if args.optimizer == "adalomo" else 3e-4
    if args.optimizer in ADAPM:  # fused, its default policy by parameter name
        import adalomo
        opt = adalomo.AdaPM(model.named_parameters(), lr=lr, fused=True, **ADAPM[args.optimizer])
    else:
        opt = ex.make_optimizer(args.optimizer, model, lr, 0.0, None, device)
    if args.optimizer == "adalomo" and args.adalomo_kwargs:  # e.g. {"bucket_cap_mb": 256}
        for k, v in json.loads(args.adalomo_kwargs).items():
            if not hasattr(opt, k):
                raise SystemExit(f"--adalomo-kwargs: AdaLomo has no attribute {k!r}")
            setattr(opt, k, v)
        result["optimizer"] = f"adalomo {args.adalomo_kwargs}"
    batches = ex.Batches(cfg.vocab_size, args.batch_size, args.seq_len, rank, world, device)
    fused = ours

    def one_step(step):
        x, y = batches(step)
        _, loss = model(x, y)
        loss.backward()
        if not fused:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss

    for s in range(args.warmup):
        one_step(s)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    t0 = time.perf_counter()
    for s in range(args.warmup, args.warmup + args.steps):
        loss = one_step(s)
    if cuda:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    if cuda:  # one more step with torch's sync debug mode: how often the host waited for the GPU (should be 0)
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                one_step(args.warmup + args.steps + 10)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message)
                 and "debug mode is a prototype" not in str(w.message)]  # torch's notice on entering the mode
        result["host_syncs_in_one_step"] = len(syncs)
        result["host_sync_examples"] = sorted(set(syncs))[:3]
    if args.profile_out and cuda:  # a few more steps under torch.profiler; rank 0 writes the op table
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for s in range(3):
                one_step(args.warmup + args.steps + s)
            torch.cuda.synchronize(device)
        if rank == 0:
            ka = prof.key_averages()
            Path(args.profile_out).write_text(
                ka.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70) + "\n"
                + ka.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70))
    stats = torch.tensor([dt, torch.cuda.max_memory_allocated(device) / 2**30 if cuda else 0.0,
                          torch.cuda.max_memory_reserved(device) / 2**30 if cuda else 0.0],
                         dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # slowest rank, largest memory
    tokens = args.batch_size * args.seq_len * args.steps
    result.update(seconds=float(stats[0]), tokens_per_s_per_gpu=tokens / float(stats[0]),
                  peak_alloc_gib=float(stats[1]), peak_reserved_gib=float(stats[2]),
                  final_loss=float(loss.detach()))
    if rank == 0 and args.json_out:
        Path(args.json_out).write_text(json.dumps(result))
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ driver
def run_one(args, size: str, optimizer: str, gpus: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
               __file__, "--worker", "--size", size, "--optimizer", optimizer, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len),
               "--device", args.device, "--dtype", args.dtype, "--adamw-dtype", args.adamw_dtype,
               "--json-out", out, "--adalomo-kwargs", args.adalomo_kwargs or ""] + (
                   ["--no-gradient-checkpointing"] if not args.gradient_checkpointing else []) + (
                   ["--profile-out", f"{args.profile_out}.{size}.{optimizer}.x{gpus}.txt"] if args.profile_out else [])
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if os.path.exists(out):
            res = json.loads(Path(out).read_text())
        else:
            oom = "OutOfMemoryError" in r.stderr or "CUDA out of memory" in r.stderr
            rank0 = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.startswith("[rank0]:")]
            res = dict(size=size, optimizer=optimizer, gpus=gpus, status="oom" if oom else "failed",
                       error="\n".join(rank0[-40:])[-4000:] or (r.stderr or r.stdout)[-2000:])
        res["wall_s"] = round(time.time() - t0, 1)
    print(f"  {size:>5} {optimizer:>8} x{gpus}: {res['status']}"
          + (f" {res['tokens_per_s_per_gpu']:.0f} tok/s/GPU, {res['peak_alloc_gib']:.1f} GiB"
             if res["status"] == "ok" else ""), flush=True)
    return res


def table(results: list[dict]) -> str:
    base = {(r["size"], r["optimizer"]): r["tokens_per_s_per_gpu"]
            for r in results if r["status"] == "ok" and r["gpus"] == 1}
    lines = ["| model | params | optimizer | weights | GPUs | tokens/s per GPU | scaling vs 1 GPU | "
             "peak alloc per GPU (GiB) | peak reserved (GiB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r.get("params", 0), r["size"], r["optimizer"], r["gpus"])):
        n = r.get("params", 0)
        params = "" if not n else f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"
        if r["status"] != "ok":
            lines.append(f"| {r['size']} | {params} | {r['optimizer']} | {r.get('weights', '')} | {r['gpus']} | "
                         f"{r['status'].upper()} | | | |")
            continue
        b = base.get((r["size"], r["optimizer"]))
        scale = f"{r['tokens_per_s_per_gpu'] / b:.2f}" if b else ""
        lines.append(f"| {r['size']} | {params} | {r['optimizer']} | {r['weights']} | {r['gpus']} | "
                     f"{r['tokens_per_s_per_gpu']:.0f} | {scale} | {r['peak_alloc_gib']:.1f} | "
                     f"{r['peak_reserved_gib']:.1f} |")
    return "\n".join(lines)


def driver(args) -> None:
    gpus = [int(g) for g in args.gpus.split(",")]
    optims = args.optimizers.split(",")
    results = []
    if args.find_max:
        ladder = args.sizes.split(",") if args.sizes else MAX_LADDER
        for opt in optims:
            for n in gpus:
                for size in ladder:
                    res = run_one(args, size, opt, n)
                    results.append(res)
                    if res["status"] != "ok":
                        break
    else:
        for size in (args.sizes or "1b").split(","):
            for opt in optims:
                for n in gpus:
                    results.append(run_one(args, size, opt, n))
    md = table(results)
    print(md)
    meta = dict(argv=sys.argv[1:], time=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        import torch

        meta.update(torch=torch.__version__,
                    gpu=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    except Exception:  # noqa: BLE001
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "table_md": md}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--profile-out", default=None, help="worker: profile 3 extra steps, rank 0 writes the table here")
    ap.add_argument("--size", default="1b", help=argparse.SUPPRESS)
    ap.add_argument("--optimizer", default="adalomo", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default=None, help="sizes to run (default 1b); with --find-max the ladder to climb")
    ap.add_argument("--optimizers", default="adalomo,adamw")
    ap.add_argument("--gpus", default="1,2", help="comma-separated process counts (GPUs)")
    ap.add_argument("--find-max", action="store_true", help=f"grow the model ({', '.join(MAX_LADDER)}) until OOM")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per GPU")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="AdaLomo and AdaPM weights")
    ap.add_argument("--adamw-dtype", choices=["bf16", "fp32"], default="fp32",
                    help="AdamW weights and moments (fp32 master weights + bf16 compute is the usual recipe)")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                    help="recompute each block in backward (default: on)")
    ap.add_argument("--adalomo-kwargs", default="",
                    help='JSON of AdaLomo attributes to set, e.g. \'{"bucket_cap_mb": 256}\'')
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fsdp.json"))
    args = ap.parse_args()
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
