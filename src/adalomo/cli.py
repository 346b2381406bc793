"""The ``adalomo`` command.

    adalomo experiment lstm-lm --optimizers adalomo,adam,sgd        # compare optimizers, write a report
    adalomo experiment seq2seq --data-dir ../shared/data
    adalomo experiment gpt-lm --size 125m --dtype bf16 --device cuda --optimizers adalomo,adamw,adafactor,lomo
    adalomo experiment finetune --pretrain-steps 300 --lr-sweep   # fine-tune a pretrained model, lr sweep
    adalomo memory ...                                             # memory estimates (adalomo.memory)
    adalomo --version

Usage errors are one line on stderr (``adalomo: error: ...``) with exit status 2, never a traceback. A reader
that closes the pipe early (``adalomo memory llama-7b --json | head -1``) ends the command quietly with status
141, as ``yes | head`` does.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from ._cli_flags import DeprecatedAlias

PROG = "adalomo"
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a process killed by SIGPIPE


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print the whole usage block; we want one line
        raise UsageError(message)


def _error(msg: str, code: int = 2) -> int:
    msg = " ".join(str(msg).split())  # always a single line
    print(f"{PROG}: error: {msg}", file=sys.stderr)
    return code


def add_experiment_arguments(p: argparse.ArgumentParser) -> None:
    from .experiments.train import OPTIMIZERS, TASKS

    p.add_argument("task", metavar="TASK", choices=(*TASKS, "finetune"), help="one of: " + ", ".join(TASKS)
                   + "; or finetune, with its own options (adalomo experiment finetune -h)")
    g = p.add_argument_group("optimizers")
    g.add_argument("--optimizers", default="adalomo,adam,sgd",
                   help="comma-separated, from: " + ", ".join(OPTIMIZERS) + ". NAME@LR pins an lr, so "
                   "'adalomo@1e-2,adalomo@3e-2' is an lr sweep (default: %(default)s)")
    g.add_argument("--lr", default=None, help="per-optimizer lr overrides 'adalomo=3e-2,adam=1e-3', or one number "
                   "for all (defaults per task: see docs/experiments.md)")
    g.add_argument("--weight-decay", type=float, default=None,
                   help="for every optimizer (default: 0, adamw 0.01)")
    g.add_argument("--grad-clip", type=float, default=None,
                   help="global grad-norm clipping for classic (non-fused) optimizers only (default: off)")
    g.add_argument("--schedule", default="cosine", choices=("cosine", "linear", "constant"),
                   help="after linear warmup (default: %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps (at most 1000)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / peak lr (default: %(default)s)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None,
                   help="directory with wikitext-2/{train,valid,test}.txt and eng-fra/eng-fra.txt "
                   "(default: $ADALOMO_DATA_DIR; without either, an embedded corpus from the Python docs)")
    g.add_argument("--corpus", default="auto",
                   help="auto (data dir if given, else embedded), wikitext-2, tinyshakespeare, eng-fra, embedded")
    g.add_argument("--data-limit", type=int, default=None,
                   help="use only the first N train lines / pairs (N/10 for valid and test): smoke tests")
    g.add_argument("--max-len", type=int, default=10, help="seq2seq: max words per sentence (default: 10)")
    g.add_argument("--keep-accents", action="store_true", help="seq2seq: do not strip accents")
    g = p.add_argument_group("training")
    g.add_argument("--max-steps", type=int, default=None, help="steps per optimizer (caps --epochs)")
    g.add_argument("--epochs", type=float, default=None, help="epochs per optimizer, may be fractional (default 1)")
    g.add_argument("--batch-size", type=int, default=None, help="default: lstm-lm 20, seq2seq 64, gpt-lm 16")
    g.add_argument("--seq-len", type=int, default=None, help="BPTT / context length (default: lstm-lm 35, gpt-lm 128)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "bf16-autocast"),
                   help="bf16 = parameters in bf16 (pure bf16); bf16-autocast = fp32 params + autocast")
    g.add_argument("--seed", type=int, default=0, help="model init, data order and seq2seq split (default: 0)")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default on CPU: 1, which suits the small models and a shared "
                   "machine; more can help larger models on free cores)")
    g.add_argument("--eval-every", type=int, default=0, help="validation loss every N steps (default: end only)")
    g.add_argument("--eval-batches", type=int, default=20, help="batches per periodic validation (default: 20)")
    g.add_argument("--test-batches", type=int, default=None,
                   help="LM tasks: evaluate only the first N test batches (default: the whole test split)")
    g = p.add_argument_group("model")
    g.add_argument("--size", default=None, help="lstm-lm: tiny/small/medium/large (default small); seq2seq: "
                   "tiny/small/medium (default small); gpt-lm: tiny/small/125m/350m/1b (default tiny)")
    g.add_argument("--dim", type=int, default=None, help="embedding/hidden size (overrides --size)")
    g.add_argument("--n-layers", type=int, default=None)
    g.add_argument("--n-heads", type=int, default=None, help="gpt-lm")
    g.add_argument("--ffn-dim", type=int, default=None, help="gpt-lm SwiGLU hidden size")
    g.add_argument("--dropout", type=float, default=None)
    g.add_argument("--tie", action=argparse.BooleanOptionalAction, default=None,
                   help="tie input embedding and output layer (lstm-lm default on; gpt-lm per size)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="gpt-lm: recompute blocks in backward")
    g.add_argument("--grad-checkpointing", dest="gradient_checkpointing", action=DeprecatedAlias,
                   new="--gradient-checkpointing")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="gpt-lm: embedding rows (at least the corpus vocabulary), e.g. 32000 for LLaMA-sized "
                   "memory numbers on a small-vocabulary corpus")
    g.add_argument("--adaptive-softmax", action="store_true",
                   help="lstm-lm: adaptive softmax (cutoffs 2000, 10000; untied), ~5x cheaper for WikiText-2 on CPU")
    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="output directory (default: runs/TASK)")
    g.add_argument("--quiet", action="store_true", help="no progress bars; a few log lines per run")
    g.add_argument("--log-every", type=int, default=None, help="with --quiet: log every N steps")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog=PROG, description="AdaLomo and other memory-light optimizers: experiments and tools.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    exp = sub.add_parser("experiment", help="compare optimizers on lstm-lm, seq2seq or gpt-lm, or fine-tuning "
                         "(finetune), and write a report",
                         description="Train the same model with each optimizer (same seed and data order) and "
                         "write results.json, results.md and plots to --out.")
    add_experiment_arguments(exp)
    sub.add_parser("memory", help="memory estimates (see adalomo memory -h)", add_help=False)
    return parser


def _run_finetune(rest, argv) -> int:
    from .experiments import ExperimentError
    from .experiments.finetune import FinetuneConfig, add_arguments, run_finetune

    p = _Parser(prog=f"{PROG} experiment finetune", description="Fine-tune one pretrained model with each "
                "optimizer (same weights, same data order), at its default lr and over an lr sweep, and write "
                "results.json, results.md and plots to --out.")
    add_arguments(p)
    cfg = FinetuneConfig(**vars(p.parse_args(rest)), command="adalomo " + shlex.join(argv))
    try:
        run_finetune(cfg)
    except ExperimentError as e:
        return _error(e)
    return 0


def _run_experiment(args, argv) -> int:
    from .experiments import ExperimentConfig, ExperimentError, run_experiment

    if args.task == "finetune":
        return _error("finetune takes its own options: write them after it (adalomo experiment finetune ...)")
    cfg = ExperimentConfig(**{k: v for k, v in vars(args).items() if k != "command"})
    cfg.command = "adalomo " + shlex.join(argv)
    try:
        run_experiment(cfg)
    except ExperimentError as e:
        return _error(e)
    return 0


def _run_memory(rest) -> int:
    from . import memory

    p = _Parser(prog=f"{PROG} memory", description=(memory.__doc__ or "").strip().split("\n")[0] or None)
    memory.add_arguments(p)
    return int(memory.run(p.parse_args(rest)) or 0)


def _dispatch(argv) -> int:
    if argv[:2] == ["experiment", "finetune"]:
        return _run_finetune(argv[2:], argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command is None:
        return _error("missing command: experiment or memory (see adalomo -h)")
    if args.command == "memory":
        return _run_memory(rest)
    if rest:
        return _error(f"unrecognized arguments: {' '.join(rest)}")
    return _run_experiment(args, argv)


def _silence_stdout() -> None:
    """After a closed pipe: point stdout at /dev/null so that the interpreter's final flush cannot fail again
    (the recipe of Python's signal-module docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # stdout replaced by an object without a descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        try:
            return _dispatch(argv)
        finally:  # also after --help/--version: a closed pipe must show here, not in the interpreter's exit
            sys.stdout.flush()
    except UsageError as e:
        return _error(e)
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
