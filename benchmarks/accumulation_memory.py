"""What does exact gradient accumulation cost in memory, fused and classic?

Peak memory of one training step of a small LM (embedding, residual MLP blocks, LM head) for:
fused K=1 on one micro-batch, fused K=1 on the K-times larger batch, fused with ``accumulation_steps=K``,
classic with K backwards, classic K=1. On CPU the peak is measured with torch's ``MemTracker`` (a dispatch
mode that follows every tensor's storage: parameters, gradients, activations, optimizer state, temporaries);
on CUDA with ``torch.cuda.max_memory_allocated``.

    python benchmarks/accumulation_memory.py --hidden 512 --layers 8 --batch 4 --seq 64 --k 4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import torch
from torch import nn

import adalomo


class Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, layers: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return nn.functional.cross_entropy(self.head(h[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def run(fused: bool, k: int, batch: int, args, device: torch.device) -> dict:
    """Two optimizer steps of K micro-batches of ``batch`` sequences; the peak over both."""
    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.hidden, args.layers).to(device)
    opt = adalomo.AdaLomo(model.parameters(), lr=1e-3, fused=fused, accumulation_steps=k if fused else 1,
                          bucket_cap_mb=0)
    data = torch.randint(0, args.vocab, (2, k, batch, args.seq), device=device)

    def steps(tracker=None):
        for s in range(2):
            for i in range(k):
                if tracker is not None:
                    tracker.reset_mod_stats()  # the module tracker allows one forward per module and reset
                (model(data[s, i]) / k).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20 - param_mib  # what is not the model's parameters
        steps()
        torch.cuda.synchronize()
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20 - base, "param_mib": param_mib}
    from torch.distributed._tools.mem_tracker import MemTracker

    warnings.filterwarnings("ignore", message="Expected a tensor")  # MemTracker on a parameter without .grad
    tracker = MemTracker()
    tracker.track_external(model, opt)
    with tracker:
        steps(tracker)
    peak = {str(kind).split(".")[-1]: v / 2**20 for kind, v in tracker.get_tracker_snapshot("peak")[device].items()}
    return {"peak_mib": peak["Total"], "grad_mib": peak["GRAD"], "act_mib": peak["ACT"], "param_mib": param_mib}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--k", type=int, default=4, help="micro-batches per optimizer step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(1)
    rows = []
    k, b = args.k, args.batch
    configs = [("fused K=1", True, 1, b), (f"fused K=1, batch x{k}", True, 1, b * k), (f"fused K={k}", True, k, b),
               (f"classic K={k}", False, k, b), ("classic K=1", False, 1, b)]
    for name, fused, steps, batch in configs:
        row = {"row": name, **run(fused, steps, batch, args, device)}
        rows.append(row)
        print("  ".join(f"{key}={v:.2f}" if isinstance(v, float) else f"{key}={v}" for key, v in row.items()),
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"), "device": str(device),
                       "args": vars(args), "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
