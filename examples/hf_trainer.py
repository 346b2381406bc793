"""Train a Hugging Face causal LM with fused AdaLomo through ``transformers.Trainer``.

    # a tiny randomly initialised LLaMA on a toy task (CPU, seconds; no download)
    python examples/hf_trainer.py --output-dir out/hf --max-steps 60
    # resume from the last checkpoint in out/hf: optimizer state, lr schedule, data order restored
    python examples/hf_trainer.py --output-dir out/hf --max-steps 80 --resume
    # fine-tune a pretrained model on a text file (GPU; bf16; activation checkpointing)
    python examples/hf_trainer.py --model meta-llama/Llama-3.2-1B --text-file train.txt --lr 1e-3 \\
        --bf16 --gradient-checkpointing --batch-size 8 --max-steps 1000 --output-dir out/llama

The switch from a stock ``Trainer`` is the class (``AdaLomoTrainer``), ``max_grad_norm=0`` (or
``--clip`` for exact two-pass clipping) and an AdaLomo learning rate: relative to the weight RMS,
1e-3 / 5e-4 to fine-tune (the authors' values), ~1e-2 to 3e-2 from scratch - not AdamW's 2e-5.
"""

from __future__ import annotations

import argparse
import os

import torch

from adalomo.integrations.transformers import AdaLomoTrainer


class ArithmeticLM(torch.utils.data.Dataset):
    """Toy language: arithmetic sequences modulo the vocabulary size (learnable in a few dozen steps)."""

    def __init__(self, n: int, length: int, vocab: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        stride = torch.randint(1, 4, (n, 1), generator=g)
        self.x = (start + stride * torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


class TextBlocks(torch.utils.data.Dataset):
    """A text file tokenized once and cut into blocks of ``length`` tokens."""

    def __init__(self, path: str, tokenizer, length: int):
        with open(path, encoding="utf-8") as f:
            ids = tokenizer(f.read(), return_attention_mask=False)["input_ids"]
        n = len(ids) // length
        if n == 0:
            raise ValueError(f"{path} has fewer than {length} tokens")
        self.x = torch.tensor(ids[: n * length]).view(n, length)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.x[i], "labels": self.x[i]}


def build(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if args.model:
        dtype = torch.bfloat16 if args.bf16_weights else torch.float32
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        if not args.text_file:
            raise SystemExit("--model needs --text-file")
        data = TextBlocks(args.text_file, AutoTokenizer.from_pretrained(args.model), args.seq_len)
        return model, data
    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max(64, args.seq_len))
    model = LlamaForCausalLM(cfg)
    if args.bf16_weights:
        model = model.to(torch.bfloat16)
    return model, ArithmeticLM(512, args.seq_len, cfg.vocab_size, seed=args.seed)


def main(argv: list[str] | None = None):
    from transformers import TrainingArguments
    from transformers.trainer_utils import get_last_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output-dir", default="out/hf_trainer")
    ap.add_argument("--model", default=None, help="a pretrained model name or path (default: tiny random LLaMA)")
    ap.add_argument("--text-file", default=None)
    ap.add_argument("--optimizer", default="adalomo", choices=["adalomo", "adafactor", "lomo"])
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-2 from scratch, 1e-3 with --model")
    ap.add_argument("--weight-decay", type=float, default=0.0)
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--save-steps", type=int, default=20)
    ap.add_argument("--clip", type=float, default=0.0, help="global grad-norm clipping (fused: two passes)")
    ap.add_argument("--classic", action="store_true", help="fused=False (classic mode)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (fp32 weights unless --bf16-weights)")
    ap.add_argument("--bf16-weights", action="store_true", help="bf16 weights (stochastic rounding)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    lr = args.lr if args.lr is not None else (1e-3 if args.model else 1e-2)

    model, data = build(args)
    targs = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=lr, lr_scheduler_type="cosine", warmup_steps=max(1, args.max_steps // 10),
        weight_decay=args.weight_decay,
        max_grad_norm=args.clip,  # the Trainer's default 1.0 is refused in fused mode: 0, or clip two-pass below
        gradient_accumulation_steps=args.grad_accum,
        bf16=args.bf16 or args.bf16_weights, gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=max(1, args.max_steps // 10), save_steps=args.save_steps, save_total_limit=2,
        report_to="none", disable_tqdm=True, seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
    )
    adalomo_kwargs = {"fused": not args.classic}
    if args.clip > 0 and not args.classic:
        adalomo_kwargs["clip_grad_norm"] = args.clip  # exact clipping in fused mode: one extra backward per step
    trainer = AdaLomoTrainer(model=model, args=targs, train_dataset=data, adalomo_optimizer=args.optimizer,
                             adalomo_kwargs=adalomo_kwargs)
    resume = get_last_checkpoint(args.output_dir) if args.resume and os.path.isdir(args.output_dir) else None
    if args.resume and resume is None:
        print(f"no checkpoint in {args.output_dir}: starting from scratch")
    result = trainer.train(resume_from_checkpoint=resume)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"done: {result.global_step} steps; logged loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
          f"final lr {trainer.lr_scheduler.get_last_lr()[0]:.2e}")
    trainer.save_model()
    return trainer


if __name__ == "__main__":
    main()
