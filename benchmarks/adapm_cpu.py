"""AdaPM against AdamW and AdaLomo on a tiny character-level GPT (CPU): eval loss and optimizer state.

    PYTHONPATH=src python benchmarks/adapm_cpu.py --steps 400 --data-dir ../shared/data \
        --runs adamw-grouped@3e-3,adapm@3e-3,adapm-factored@3e-3,adalomo@1e-1

The setting of docs/adapm.md's CPU table: ``adalomo.experiments.models.GPT`` with dim 128, 4 layers, 4 heads, SwiGLU
352, untied, on tinyshakespeare (``DATA_DIR/tinyshakespeare/input.txt``) at character level; batches of 16 x 128,
warm-up 30 steps then cosine to 10%; the same initial weights and data order for every run; eval on 25 held-out
batches; one CPU thread. Prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from adalomo import AdaLomo, AdaPM, adapm_param_groups
from adalomo.experiments.models import GPT, GPTConfig
from adalomo.optim.adapm import adapm_policy

B, T, WARM = 16, 128, 30


def make(name: str, model, lr: float):
    groups = lambda policy="adapm", **kw: adapm_param_groups(model, policy, weight_decay=0.1, **kw)  # noqa: E731
    adapm = dict(lr=lr, betas=(0.9, 0.95), fused=True)
    if name == "adamw":  # torch's default grouping: decay on every tensor
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    if name == "adamw-grouped":  # AdaPM's decay grouping: no decay on 1-D tensors and embeddings
        return torch.optim.AdamW([{k: v for k, v in g.items() if k != "momentum"} for g in groups("full")],
                                 lr=lr, betas=(0.9, 0.95))
    if name == "adalomo":
        return AdaLomo(model.parameters(), lr=lr, fused=True)
    if name == "adapm":
        return AdaPM(groups(rank=8), **adapm)
    if name == "adapm-factored":
        return AdaPM(groups(rank=8), second_moment="factored", **adapm)
    if name == "adapm-nofill":
        return AdaPM(groups(rank=8), refresh_fill=False, **adapm)
    if name == "adapm-nomom":
        return AdaPM(groups("none"), **adapm)
    if name == "adapm-lr-as-none":  # the low-rank blocks get no momentum instead
        none = lambda nm, p: "none" if adapm_policy(nm, p) == "low_rank" else adapm_policy(nm, p)  # noqa: E731
        return AdaPM(groups(none), **adapm)
    raise SystemExit(f"adapm_cpu: unknown run {name!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="adamw-grouped@3e-3,adapm@3e-3,adapm-factored@3e-3,adalomo@1e-1",
                    help="comma-separated NAME@LR")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--data-dir", default=os.environ.get("ADALOMO_DATA_DIR", "../shared/data"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    text = open(os.path.join(args.data_dir, "tinyshakespeare", "input.txt")).read()
    stoi = {c: i for i, c in enumerate(sorted(set(text)))}
    data = torch.tensor([stoi[c] for c in text])
    n = int(0.9 * len(data))
    train, val = data[:n], data[n:]
    cfg = GPTConfig(vocab_size=len(stoi), dim=128, n_layers=4, n_heads=4, ffn_dim=352, max_seq=T,
                    tie_embeddings=False)

    def batch(src, gen):
        s = torch.randint(0, src.numel() - T - 1, (B,), generator=gen)
        x = torch.stack([src[i:i + T + 1] for i in s.tolist()])
        return x[:, :-1], x[:, 1:]

    def lr_at(step, peak):
        if step < WARM:
            return peak * (step + 1) / WARM
        return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - WARM) / (args.steps - WARM))))

    @torch.no_grad()
    def evaluate(model):
        gen = torch.Generator().manual_seed(999)
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in
                  (batch(val, gen) for _ in range(25))]
        return sum(losses) / len(losses)

    for item in args.runs.split(","):
        name, lr = item.split("@")
        torch.manual_seed(0)
        model = GPT(cfg)
        opt = make(name, model, float(lr))
        fused = getattr(opt, "fused", False)
        gen = torch.Generator().manual_seed(1234)
        t0 = time.time()
        for step in range(args.steps):
            for g in opt.param_groups:
                g["lr"] = lr_at(step, float(lr))
            x, y = batch(train, gen)
            F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
            if not fused:
                opt.step()
                opt.zero_grad(set_to_none=True)
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if torch.is_tensor(v) and v.dim())
        print(json.dumps(dict(name=name, lr=float(lr), steps=args.steps, eval_loss=round(evaluate(model), 4),
                              state_bytes=state, tok_s=round(args.steps * B * T / (time.time() - t0)))), flush=True)


if __name__ == "__main__":
    main()
