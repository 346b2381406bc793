"""Train a LLaMA-shaped model with ``AdaLomoTrainer`` on N GPUs with one command, fused AdaLomo kept.

    # data parallelism (fused mode runs FSDP2 as HSDP: full replicas, the hooks see all-reduced gradients)
    torchrun --nproc-per-node 2 examples/trainer_torchrun.py --size 1b --bf16 --gradient-checkpointing

    # FSDP2 (parameters, gradients and optimizer state sharded), gradient accumulation over 4 micro-batches
    torchrun --nproc-per-node 2 examples/trainer_torchrun.py --size 1b --bf16 --fsdp --grad-accum 4

    # one GPU; the same run with torch AdamW under the same Trainer, for comparison
    python examples/trainer_torchrun.py --size 1b --bf16 --gradient-checkpointing --grad-accum 4
    python examples/trainer_torchrun.py --size 1b --bf16 --gradient-checkpointing --grad-accum 4 --optimizer adamw

    # checkpoints every 10 steps; --resume continues from the last one (bit-identical on the same number of ranks)
    torchrun --nproc-per-node 2 examples/trainer_torchrun.py --size tiny --max-steps 20 --save-steps 10
    torchrun --nproc-per-node 2 examples/trainer_torchrun.py --size tiny --max-steps 30 --save-steps 10 --resume

    # CPU smoke test (gloo)
    torchrun --nproc-per-node 2 examples/trainer_torchrun.py --size tiny --max-steps 4

The model is built from a config (random weights; ``--model`` loads a checkpoint instead) and trained on random
tokens, so that nothing is downloaded. Rank 0 prints a ``RESULT`` line (JSON): tokens/s per rank after the first
step, peak GPU memory, the last logged loss.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

#: LLaMA shapes: (hidden, intermediate, layers, heads, kv heads); "1b" is TinyLlama-1.1B's shape
SIZES = {"tiny": (64, 128, 2, 4, 2), "125m": (768, 2048, 12, 12, 4), "1b": (2048, 5632, 22, 32, 4)}
OPTIMIZERS = ("adalomo", "adafactor", "lomo", "adapm", "adamw")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="tiny")
    ap.add_argument("--model", default=None, help="a Hugging Face checkpoint (directory or hub name) instead")
    ap.add_argument("--optimizer", choices=OPTIMIZERS, default="adalomo", help="adamw: torch's, classic")
    ap.add_argument("--classic", action="store_true", help="fused=False (DDP without --fsdp)")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 through the Trainer's fsdp_config (version 2)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per device per micro-batch")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--num-sequences", type=int, default=2048, help="random training sequences (the epoch)")
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-2 for AdaLomo from scratch, 3e-4 AdamW")
    ap.add_argument("--clip", type=float, default=0.0, help="global grad-norm clipping (fused: exact, by the "
                                                            "optimizer)")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (FSDP2: bf16 compute, fp32 weights)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: no checkpoints)")
    ap.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --output-dir")
    ap.add_argument("--output-dir", default="out/trainer_torchrun")
    ap.add_argument("--logging-steps", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n: int, seq_len: int, vocab: int, seed: int):
        self.x = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    hidden, inter, layers, heads, kv = SIZES[args.size]
    cfg = LlamaConfig(vocab_size=32000 if args.size != "tiny" else 128, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=max(2048, args.seq_len))
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(cfg)


class Throughput:
    """tokens/s per rank over the optimizer steps after the first (the time between a step's begin and end:
    logging and checkpoints excluded), and the peak GPU memory."""

    def __init__(self, tokens_per_step: int):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kw):
                outer.t_begin = outer._now()

            def on_step_end(self, args, state, control, **kw):
                if outer.warm:  # the first step of the run (compilation of kernels, allocations) is not timed
                    outer.seconds += outer._now() - outer.t_begin
                    outer.steps += 1
                outer.warm = True

        self.callback, self.tokens_per_step = Callback(), tokens_per_step
        self.t_begin, self.seconds, self.steps, self.warm = 0.0, 0.0, 0, False

    @staticmethod
    def _now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def result(self) -> dict:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        tps = self.steps * self.tokens_per_step / self.seconds if self.steps else None
        return {"tokens_per_s_per_rank": None if tps is None else round(tps, 1),
                "peak_gib": None if peak is None else round(peak, 2)}


def main(argv=None):
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    from adalomo.integrations.transformers import AdaLomoTrainer

    args = parse_args(argv)
    adamw = args.optimizer == "adamw"
    lr = args.lr if args.lr is not None else (3e-4 if adamw else 1e-2)
    fsdp = {}
    if args.fsdp:  # accelerate's FSDP2; activation checkpointing then goes inside each FSDP unit
        fsdp = dict(fsdp=True, fsdp_config={"version": 2, "activation_checkpointing": args.gradient_checkpointing})
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=lr, lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 10), weight_decay=0.0,
        max_grad_norm=args.clip,  # the Trainer's default 1.0 is refused in fused mode: 0, or clip exactly (below)
        bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing and not args.fsdp,
        logging_steps=args.logging_steps, save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500, report_to="none", disable_tqdm=True, seed=args.seed,
        optim="adamw_torch_fused" if adamw and torch.cuda.is_available() else "adamw_torch",
        use_cpu=not torch.cuda.is_available(), ddp_find_unused_parameters=False, **fsdp)
    model = build_model(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    data = RandomTokens(args.num_sequences, args.seq_len, model.config.vocab_size, args.seed)
    meter = Throughput(args.grad_accum * args.batch_size * args.seq_len)
    if adamw:
        trainer = Trainer(model=model, args=targs, train_dataset=data, callbacks=[meter.callback])
    else:
        kwargs = {"fused": not args.classic}
        if args.clip > 0 and not args.classic:
            kwargs["clip_grad_norm"] = args.clip  # exact global-norm clipping in fused mode
        trainer = AdaLomoTrainer(model=model, args=targs, train_dataset=data, callbacks=[meter.callback],
                                 adalomo_optimizer=args.optimizer, adalomo_kwargs=kwargs)
    resume = get_last_checkpoint(args.output_dir) if args.resume and os.path.isdir(args.output_dir) else None
    out = trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        mode = "classic" if args.classic or adamw else "fused"
        setup = "FSDP2" if args.fsdp else ("HSDP" if getattr(trainer, "_adalomo_hsdp", False) else
                                           "DDP" if world > 1 else "1 process")
        result = {"optimizer": args.optimizer, "mode": mode, "parallel": setup, "world": world,
                  "size": args.model or args.size, "grad_accum": args.grad_accum, "batch": args.batch_size,
                  "seq_len": args.seq_len, "bf16": args.bf16, "checkpointing": args.gradient_checkpointing,
                  "steps": out.global_step, "resumed_from": resume, "last_loss": losses[-1] if losses else None,
                  **meter.result()}
        print("RESULT " + json.dumps(result), flush=True)
    return trainer


if __name__ == "__main__":
    main()
