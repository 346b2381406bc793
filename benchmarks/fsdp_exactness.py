"""FSDP2 on real GPUs (NCCL): fused AdaLomo / Adafactor / Lomo / AdaPM over sharded DTensors equal one process.

    torchrun --nproc-per-node=2 benchmarks/fsdp_exactness.py [--device cuda] [--steps 10] [--out r.json]
        [--optimizers adapm,adapm_factored]

The CPU tests (tests/test_distributed.py, gloo) prove the sharded maths; this runs the same check where users
run it: NCCL collectives, CUDA tensors, and a single-process reference that takes the Triton kernels (grouped,
bucketed) while the sharded run takes the sharded torch path, so two implementations meet. Each rank trains a
plain replica on the full batch (the reference) and an FSDP2 model (``fully_shard`` per block + root, and
HSDP on a (2, 1) mesh) on its half; after every step the full parameters must agree to fp32 tolerance. The
model has an odd vocabulary (1003 rows: uneven shards) and a 3-D parameter of 3 matrices (sharded 2/1: whole
matrices per rank, the >= 3-D path of the sharded kernels). AdaPM (default policy by name, rank 8, a basis refresh
every 3 steps) runs its sharded torch maths against its single-process path. fp32 weights, TF32 off: bf16 with
stochastic rounding draws different bits per shard by design, so it cannot be compared bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import adalomo  # noqa: E402
from adalomo.distributed import hsdp_mesh, is_dtensor  # noqa: E402
from adalomo.experiments.models import GPT, GPTConfig  # noqa: E402

CFG = GPTConfig(vocab_size=1003, dim=96, n_layers=2, n_heads=4, ffn_dim=250, max_seq=64)
BATCH, SEQ = 4, 32
OPTIMIZERS = {  # name: (factory, two-pass clipping)
    "adalomo": (lambda ps: adalomo.AdaLomo(ps, lr=3e-2, weight_decay=0.1, fused=True), False),
    "adafactor_momentum": (lambda ps: adalomo.Adafactor(ps, beta1=0.9, weight_decay=0.01, fused=True), False),
    "lomo_clip": (lambda ps: adalomo.Lomo(ps, lr=5e-2, clip_grad_norm=0.5, fused=True), True),
    "adalomo_clip": (lambda ps: adalomo.AdaLomo(ps, lr=3e-2, clip_grad_norm=0.5, fused=True), True),
    # Adam's m / sqrt(v) makes the first steps ~lr * sign(g): the rounding of near-zero gradients (reduced in another
    # order) shows as differences near 1e-5 at lr 1e-3, also under HSDP, which runs the single-process maths
    "adapm": (lambda ps: adalomo.AdaPM(ps, lr=1e-3, rank=8, update_proj_gap=3, weight_decay=0.1, fused=True), False),
    "adapm_factored": (lambda ps: adalomo.AdaPM(ps, lr=1e-3, rank=8, update_proj_gap=3, weight_decay=0.1,
                                                second_moment="factored", relative_lr=True, fused=True), False),
}


class GPT3D(GPT):
    """The GPT with a 3-D parameter (``experts``: 3 matrices, uneven over 2 ranks) in an auxiliary loss term."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.experts = torch.nn.Parameter(torch.empty(3, cfg.dim, cfg.dim))

    def forward(self, idx, targets=None):
        logits, loss = super().forward(idx, targets)
        aux = torch.einsum("bsd,edf->bsef", self.tok_emb(idx), self.experts).tanh().square().mean()
        return logits, loss + 0.1 * aux


def reference_model(device) -> GPT:
    torch.manual_seed(0)
    model = GPT3D(CFG).to(device)
    model.init_weights()
    with torch.no_grad():
        model.experts.normal_(0.0, 0.2)
    return model


def sharded_model(ref: GPT, device, mesh=None) -> GPT:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    with torch.device("meta"):
        model = GPT3D(CFG)
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device=device)
    full = dict(ref.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.to_local().copy_(distribute_tensor(full[name].detach(), p.device_mesh, p.placements).to_local())
        for name, b in model.named_buffers():  # rotary tables
            b.copy_(dict(ref.named_buffers())[name])
    return model


def batch(step: int, device, rank: int | None = None, world: int = 1):
    g = torch.Generator().manual_seed(1000 + step)
    xy = torch.randint(0, CFG.vocab_size, (BATCH, SEQ + 1), generator=g)
    if rank is not None:
        per = BATCH // world
        xy = xy[rank * per:(rank + 1) * per]
    xy = xy.to(device)
    return xy[:, :-1], xy[:, 1:]


def train_step(model, opt, x, y, two_pass: bool) -> None:
    _, loss = model(x, y)
    if two_pass:
        _, loss2 = model(x, y)
        opt.grad_norm(loss2)
    loss.backward()


def max_diff(model, ref) -> float:
    full = dict(ref.named_parameters())
    worst = 0.0
    for name, p in model.named_parameters():
        t = p.full_tensor() if is_dtensor(p) else p
        worst = max(worst, float((t.detach() - full[name].detach()).abs().max()))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--atol", type=float, default=2e-5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated subset of: "
                    + ", ".join(OPTIMIZERS))
    args = ap.parse_args()
    chosen = args.optimizers.split(",")
    unknown = sorted(set(chosen) - set(OPTIMIZERS))
    if unknown:
        ap.error(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        device = torch.device("cpu")
    rows = []
    for layout in ("fsdp", "hsdp"):
        for name in chosen:
            factory, two_pass = OPTIMIZERS[name]
            t0 = time.perf_counter()
            ref = reference_model(device)
            model = sharded_model(ref, device, hsdp_mesh(world, 1, args.device) if layout == "hsdp" else None)
            ref_opt = factory(ref.named_parameters())  # names: AdaPM's momentum policy reads them
            ref_opt.allow_unsharded_distributed = True  # a plain replica on every rank, on purpose
            opt = factory(model.named_parameters())
            diffs = []
            for s in range(args.steps):
                train_step(ref, ref_opt, *batch(s, device), two_pass)
                train_step(model, opt, *batch(s, device, rank, world), two_pass)
                diffs.append(max_diff(model, ref))
            ok = max(diffs) <= args.atol and all(d == d for d in diffs)
            skipped = [int(o.skipped_updates) if o.skipped_updates is not None else 0 for o in (ref_opt, opt)]
            ok = ok and skipped == [0, 0]
            rows.append(dict(layout=layout, optimizer=name, steps=args.steps, max_abs_diff=max(diffs),
                             per_step=diffs, skipped_single_sharded=skipped, ok=ok,
                             seconds=round(time.perf_counter() - t0, 2)))
            if rank == 0:
                print(f"{layout:5s} {name:20s} max |sharded - single| over {args.steps} steps = {max(diffs):.3g} "
                      f"skipped steps (single, sharded) {skipped} {'ok' if ok else 'FAIL'}", flush=True)
    if rank == 0:
        summary = dict(world=world, backend=backend, device=torch.cuda.get_device_name() if args.device == "cuda"
                       else "cpu", torch=torch.__version__, atol=args.atol, all_ok=all(r["ok"] for r in rows),
                       date=time.strftime("%Y-%m-%d %H:%M:%S"), command=" ".join(sys.argv), rows=rows)
        print("SUMMARY all_ok=" + str(summary["all_ok"]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(summary, indent=1))
    dist.destroy_process_group()
    sys.exit(0 if all(r["ok"] for r in rows) else 1)


if __name__ == "__main__":
    main()
