"""A plain ``accelerate`` training loop with fused AdaLomo, checkpoints and exact resume.

    python examples/accelerate_train.py --output-dir out/acc --steps 60 --stop-at 40   # "interrupted"
    python examples/accelerate_train.py --output-dir out/acc --steps 60 --resume       # continues from step 40
    accelerate launch --mixed_precision bf16 examples/accelerate_train.py ...          # one process, bf16 autocast

What differs from a usual accelerate loop: ``adalomo.integrations.accelerate.backward(accelerator,
optimizer, loss)`` instead of ``accelerator.backward(loss)``. It checks the setup on every call (no fp16
GradScaler, no DDP in fused mode: those raise a ValueError instead of training silently wrong), sums the
gradients of an accumulation window (``Accelerator(gradient_accumulation_steps=K)`` with
``accelerator.accumulate``) and runs the exact two-pass clipping when the optimizer has ``clip_grad_norm``
(``accelerator.clip_grad_norm_`` sees no gradients in fused mode). ``step()`` and ``zero_grad()`` stay in the
loop; they are no-ops in fused mode.
"""

from __future__ import annotations

import argparse
import os

import torch


def main(argv: list[str] | None = None) -> float:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration
    from transformers import LlamaConfig, LlamaForCausalLM, get_scheduler

    from adalomo import AdaLomo
    from adalomo.integrations.accelerate import backward
    from adalomo.integrations.transformers import parameter_groups

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="out/accelerate_train")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-every", type=int, default=20)
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    ap.add_argument("--stop-at", type=int, default=None, help="simulate an interruption after this step")
    ap.add_argument("--lr", type=float, default=1e-2, help="AdaLomo's relative lr: 1e-2 from scratch")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--clip", type=float, default=None, help="global grad-norm clipping (two-pass)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    # a seedable sampler makes the data order a function of (seed, epoch): resuming mid-epoch is exact
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(args.seed)  # toy data: arithmetic sequences modulo the vocabulary
    seqs = (torch.randint(0, 64, (512, 1), generator=g) + torch.randint(1, 4, (512, 1), generator=g)
            * torch.arange(args.seq_len)) % 64
    loader = torch.utils.data.DataLoader(seqs, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(args.seed))

    # the Trainer's weight-decay groups (no decay on biases / norms); build after the model is on its device
    model = model.to(accelerator.device)
    optimizer = AdaLomo(parameter_groups(model, args.weight_decay), lr=args.lr, fused=True,
                        clip_grad_norm=args.clip)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, args.steps // 10),
                              num_training_steps=args.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    step = 0
    ckpt = os.path.join(args.output_dir, "last")
    if args.resume and os.path.isdir(ckpt):
        accelerator.load_state(ckpt)  # model, optimizer state (AdaLomo's statistics), scheduler, RNG
        with open(os.path.join(ckpt, "step.txt")) as f:
            step = int(f.read())
        accelerator.print(f"resumed at step {step}")
    last = float("nan")
    stop = args.steps if args.stop_at is None else min(args.stop_at, args.steps)
    while step < stop:
        loader.set_epoch(step // len(loader))
        batches = loader
        if step % len(loader):  # resumed in the middle of an epoch: skip what was already seen
            batches = accelerator.skip_first_batches(loader, step % len(loader))
        for seq in batches:
            loss = model(input_ids=seq, labels=seq).loss
            grad_norm = backward(accelerator, optimizer, loss)  # updates the weights inside backward
            optimizer.step()       # no-op (fused)
            scheduler.step()
            optimizer.zero_grad()  # no-op (fused)
            step += 1
            last = loss.item()
            if step % max(1, args.steps // 10) == 0:
                gn = "" if grad_norm is None else f"  grad_norm {grad_norm.item():.3f}"
                accelerator.print(f"step {step:4d}  loss {last:.4f}  lr {scheduler.get_last_lr()[0]:.2e}{gn}")
            if args.save_every and step % args.save_every == 0:
                accelerator.save_state(ckpt)
                if accelerator.is_main_process:
                    with open(os.path.join(ckpt, "step.txt"), "w") as f:
                        f.write(str(step))
            if step >= stop:
                break
    accelerator.print(f"done: {step} steps, last loss {last:.4f}")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        weights = {k: v.detach().cpu() for k, v in accelerator.unwrap_model(model).state_dict().items()}
        torch.save(weights, os.path.join(args.output_dir, "final_weights.pt"))
    return last


if __name__ == "__main__":
    main()
