"""Quick start: train a small causal LM with fused AdaLomo in a plain PyTorch loop.

    python examples/quickstart.py                  # fused AdaLomo (the default)
    python examples/quickstart.py --classic        # the same optimizer, classic step()
    python examples/quickstart.py --clip 1.0       # + exact global-norm clipping (two backward passes)

Fused mode updates each parameter inside ``loss.backward()`` as soon as its gradient is ready and
frees that gradient, so no full set of gradients ever exists; ``step()`` / ``zero_grad()`` become
no-ops, which keeps the loop identical to the classic one. The model is a tiny character-level
Transformer trained from scratch, hence AdaLomo's from-scratch lr 1e-2 (its lr is relative to the
weight RMS: use 1e-3 / 5e-4 to fine-tune a pretrained model). Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from adalomo import AdaLomo

TEXT = (
    "AdaLomo combines the low memory of LOMO, which updates every parameter during the backward pass, "
    "with the adaptive learning rate of Adafactor, whose second moment is factored into one row and one "
    "column statistic per matrix. The optimizer state is therefore tiny, and no gradient is ever stored. "
) * 4


class TinyLM(nn.Module):
    """Token + position embedding, pre-norm Transformer blocks with a causal mask, tied output head."""

    def __init__(self, vocab: int, dim: int = 64, layers: int = 2, heads: int = 4, context: int = 64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(context, dim)
        block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied: one tensor, updated once per step
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return self.head(self.norm(self.blocks(x, mask=mask, is_causal=True)))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-2, help="relative lr: 1e-2 from scratch, 1e-3 to fine-tune")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=None, help="global grad-norm clipping (fused: two passes)")
    ap.add_argument("--classic", action="store_true", help="fused=False: gradients + step()")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    chars = sorted(set(TEXT))
    data = torch.tensor([chars.index(c) for c in TEXT], device=device)
    model = TinyLM(len(chars), context=args.context).to(device)

    # 1. the optimizer: fused=True is the whole switch (plus the two-pass call below if you clip)
    opt = AdaLomo(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=not args.classic,
                  clip_grad_norm=args.clip)
    # 2. any torch LR scheduler works: it edits opt.param_groups, which the fused hooks read
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    max_grad_bytes = 0
    t0 = time.perf_counter()
    first = last = float("nan")
    for step in range(1, args.steps + 1):
        start = torch.randint(0, len(data) - args.context - 1, (args.batch_size,), generator=gen).to(device)
        idx = start[:, None] + torch.arange(args.context + 1, device=device)
        x, y = data[idx[:, :-1]], data[idx[:, 1:]]
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())

        # 3. the step. Fused: parameters are updated inside backward; step()/zero_grad() do nothing.
        if opt.fused and args.clip is not None:
            opt.grad_norm(loss)       # first pass: global gradient norm (no update), sets the clip factor
            opt.fused_backward(loss)  # second pass: clipped update (a non-finite norm skips the step)
        else:
            loss.backward()
        max_grad_bytes = max(max_grad_bytes, tensor_bytes(p.grad for p in model.parameters() if p.grad is not None))
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

        if step == 1:
            first = loss.item()
        if step % max(1, args.steps // 10) == 0 or step == args.steps:
            last = loss.item()
            print(f"step {step:4d}  loss {last:.4f}  lr {sched.get_last_lr()[0]:.2e}")

    params = list(model.parameters())
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    mb = 2.0**20
    print(f"mode: {'fused' if opt.fused else 'classic'}; {time.perf_counter() - t0:.1f}s for {args.steps} steps; "
          f"loss {first:.3f} -> {last:.3f}")
    print(f"parameters        {tensor_bytes(params) / mb:8.3f} MiB")
    print(f"optimizer state   {tensor_bytes(state) / mb:8.3f} MiB  (AdamW: {2 * tensor_bytes(params) / mb:.3f} MiB)")
    print(f"gradients held after backward {max_grad_bytes / mb:8.3f} MiB  (0 in fused mode)")
    if device.type == "cuda":
        print(f"peak CUDA memory  {torch.cuda.max_memory_allocated(device) / mb:8.1f} MiB")
    return last


if __name__ == "__main__":
    main()
