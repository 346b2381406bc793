"""Train the LLaMA-style ``GPT`` of ``adalomo.experiments.models`` with fused AdaLomo under FSDP2.

Each parameter is updated inside ``loss.backward()`` right after FSDP2's reduce-scatter delivers its
gradient shard, and the gradient is freed at once: no full set of gradients and no Adam moments ever
exist. The update equals the single-process AdaLomo update of the full tensor (see docs/distributed.md).

    # 2 GPUs, ~1B model, bf16 weights (stochastic rounding), gradient checkpointing
    torchrun --nproc-per-node=2 examples/fsdp_train.py --size 1b --gradient-checkpointing

    # WikiText-2 (word level) instead of random tokens, checkpoint + resume with torch.distributed.checkpoint
    torchrun --nproc-per-node=2 examples/fsdp_train.py --size 125m --data-dir ../shared/data --checkpoint-dir ck

    # data parallel with full replicas (HSDP mesh (replicate=N, shard=1)); DDP cannot run fused updates
    torchrun --nproc-per-node=2 examples/fsdp_train.py --size 125m --hsdp

    # CPU smoke test (gloo)
    torchrun --nproc-per-node=2 examples/fsdp_train.py --size tiny --device cpu --dtype fp32 --steps 3

``--optimizer adamw`` runs the same loop with ``torch.optim.AdamW`` (classic step) for comparison.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import adalomo
from adalomo.distributed import check_not_ddp, hsdp_mesh
from adalomo.experiments.models import GPT, GPT_PRESETS, GPTConfig

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="125m", help=f"GPT preset: {', '.join(GPT_PRESETS)}")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per GPU per step")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--optimizer", choices=["adalomo", "adamw"], default="adalomo")
    ap.add_argument("--lr", type=float, default=None,
                    help="peak lr (default: 1e-2 for AdaLomo from scratch, whose lr is relative to the weight "
                         "RMS (use ~1e-3 to fine-tune); 3e-4 for AdamW)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip-grad-norm", type=float, default=None,
                    help="global gradient-norm clipping (AdaLomo: two backward passes per step)")
    ap.add_argument("--dtype", choices=list(DTYPES), default=None,
                    help="storage dtype of the weights (default bf16 on GPU, fp32 on CPU); bf16 weights get "
                         "stochastic rounding; compute is bf16 on GPU either way")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="non-reentrant, per block")
    ap.add_argument("--hsdp", action="store_true", help="mesh (replicate=world, shard=1): full replicas")
    ap.add_argument("--no-reshard-after-forward", action="store_true",
                    help="keep the blocks unsharded between forward and backward (faster, more memory)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default=None)
    ap.add_argument("--data-dir", default=None, help="DIR with wikitext-2/train.txt; random tokens without it")
    ap.add_argument("--checkpoint-dir", default=None, help="DCP checkpoint: resumed from if present, saved at the end")
    ap.add_argument("--log-every", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def setup(device_type: str) -> tuple[int, int, torch.device]:
    backend = "nccl" if device_type == "cuda" else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def build_model(cfg: GPTConfig, device: torch.device, dtype: torch.dtype, mesh=None,
                reshard_after_forward: bool = True, seed: int = 0) -> GPT:
    """GPT built on the meta device, ``fully_shard`` per block and at the root, then materialised shard by
    shard (no rank ever holds the full model). bf16 compute with fp32 gradient reduction on GPU."""
    with torch.device("meta"):
        model = GPT(replace(cfg, gradient_checkpointing=False)).to(dtype)
    if cfg.gradient_checkpointing:
        # checkpoint *inside* each FSDP unit (as torchtitan does): FSDP2's hooks (all-gather, input casts) then
        # run outside the recomputed region; checkpointing the FSDP module itself fails on CUDA with a
        # metadata mismatch at recomputation
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    mp = None
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, reshard_after_forward=reshard_after_forward)
    if mp is not None:
        kw["mp_policy"] = mp
    for block in model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    model.to_empty(device=device)
    if device.type == "cpu":
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
    torch.manual_seed(seed)  # same seed on every rank: DTensor's RNG draws each shard's part of one tensor
    model.init_weights()
    return model


def make_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float,
                   clip_grad_norm: float | None, device: torch.device) -> torch.optim.Optimizer:
    if name == "adalomo":
        # fused=True: updates happen inside loss.backward(), from FSDP2's post-reduce-scatter hooks
        return adalomo.AdaLomo(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True,
                               clip_grad_norm=clip_grad_norm)
    kw = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay, **kw)


def lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


class Batches:
    """Random tokens (throughput runs) or WikiText-2 word-level tokens, a different slice per rank."""

    def __init__(self, vocab: int, batch: int, seq: int, rank: int, world: int, device, data=None, seed=0):
        self.vocab, self.batch, self.seq, self.device = vocab, batch, seq, device
        self.data, self.rank, self.world = data, rank, world
        self.gen = torch.Generator().manual_seed(seed * 1009 + rank)

    def __call__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.data is None:
            xy = torch.randint(0, self.vocab, (self.batch, self.seq + 1), generator=self.gen)
        else:
            n = self.data.numel() - self.seq - 1
            base = (step * self.world + self.rank) * self.batch
            starts = [((base + i) * 7919 * self.seq) % n for i in range(self.batch)]
            xy = torch.stack([self.data[s:s + self.seq + 1] for s in starts])
        xy = xy.to(self.device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]


def checkpoint_state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    return {"model": msd, "optim": osd}


def main(argv=None) -> None:
    args = parse_args(argv)
    device_type = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, device = setup(device_type)
    dtype = DTYPES[args.dtype or ("bf16" if device_type == "cuda" else "fp32")]
    data = None
    cfg = GPTConfig.preset(args.size, gradient_checkpointing=args.gradient_checkpointing,
                           max_seq=max(args.seq_len, GPT_PRESETS[args.size].max_seq))
    if args.data_dir:
        from pathlib import Path

        from adalomo.experiments.data import load_wikitext2

        corpus = load_wikitext2(Path(args.data_dir))
        data = corpus.train
        cfg = replace(cfg, vocab_size=len(corpus.vocab))
    mesh = hsdp_mesh(world, 1, device_type) if args.hsdp else None
    model = build_model(cfg, device, dtype, mesh, not args.no_reshard_after_forward, args.seed)
    lr = args.lr if args.lr is not None else (1e-2 if args.optimizer == "adalomo" else 3e-4)
    opt = make_optimizer(args.optimizer, model, lr, args.weight_decay, args.clip_grad_norm, device)
    check_not_ddp(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    fused = args.optimizer == "adalomo"

    start = 0
    if args.checkpoint_dir and os.path.exists(os.path.join(args.checkpoint_dir, ".metadata")):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        sd = checkpoint_state(model, opt)
        sd["train"] = {"step": torch.tensor(0)}
        dcp.load(sd, checkpoint_id=args.checkpoint_dir)
        set_state_dict(model, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        start = int(sd["train"]["step"])
        for _ in range(start):
            sched.step()
        if rank == 0:
            print(f"resumed from {args.checkpoint_dir} at step {start}", flush=True)

    n_params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"GPT {args.size}: {n_params / 1e6:.1f}M parameters, world {world}"
              f"{' (HSDP)' if args.hsdp else ''}, {args.optimizer}{' fused' if fused else ''}, weights {dtype}, "
              f"batch {args.batch_size}x{args.seq_len} per rank", flush=True)
    batches = Batches(cfg.vocab_size, args.batch_size, args.seq_len, rank, world, device, data, args.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    t0, tokens = time.perf_counter(), 0
    for step in range(start, args.steps):
        x, y = batches(step)
        _, loss = model(x, y)  # bf16 compute on GPU through FSDP2's MixedPrecisionPolicy
        if fused:
            if args.clip_grad_norm is not None:
                opt.grad_norm(loss)  # first pass: the global gradient norm (all-reduced across ranks)
            loss.backward()          # the update happens here
            opt.step()               # a no-op in fused mode; keeps LR schedulers' bookkeeping happy
        else:
            loss.backward()
            if args.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        sched.step()
        tokens += x.numel()
        if rank == 0 and ((step + 1) % args.log_every == 0 or step + 1 == args.steps):
            lval = float(loss.detach())  # host sync only for logging
            dt = time.perf_counter() - t0
            mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
            print(f"step {step + 1} loss {lval:.4f} lr {sched.get_last_lr()[0]:.3g} "
                  f"tok/s/rank {tokens / dt:.0f} peak mem {mem:.2f} GiB", flush=True)
    if args.checkpoint_dir:
        import torch.distributed.checkpoint as dcp

        sd = checkpoint_state(model, opt)
        sd["train"] = {"step": torch.tensor(args.steps)}
        dcp.save(sd, checkpoint_id=args.checkpoint_dir)
        if rank == 0:
            print(f"saved checkpoint to {args.checkpoint_dir}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
