"""One training loop shared by the three experiment tasks, the optimizer registry, and memory accounting.

The loop (``train_one``) is nanoGPT style: build the model with a fixed seed, build the optimizer from the
registry, then ``loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); sched.step()``. The same loop
works for classic optimizers (Adam, SGD) and fused ones (AdaLomo, LOMO, Adafactor with ``fused=True``), whose
parameters are updated inside ``loss.backward()`` and whose ``step()``/``zero_grad()`` are no-ops.

Choices (documented in docs/experiments.md):

* LR schedule: linear warmup then cosine decay to ``min_lr_ratio * lr`` (``torch.optim.lr_scheduler.LambdaLR``),
  applied to every optimizer in the same way.
* ``adafactor`` is run with ``relative_step=False, scale_parameter=True`` and the given lr: the step is then
  ``lr * max(1e-3, RMS(W))`` exactly like AdaLomo, so the two share an lr scale and the LR schedule applies to
  both. (Adafactor's own ``relative_step`` schedule ignores ``--lr``, which would break the comparison.)
* ``--dtype bf16`` casts the *parameters* to bf16 ("pure bf16", as in the LOMO/AdaLomo papers: no fp32 master
  copy, so the memory numbers show what a low-memory optimizer saves; adalomo's optimizers use stochastic
  rounding for bf16 weights). ``--dtype bf16-autocast`` keeps fp32 parameters and runs the forward under
  ``torch.autocast`` (mixed precision).
* Global gradient-norm clipping (``--grad-clip``) is applied only to classic-mode optimizers: a fused
  optimizer frees each gradient during backward (AdaLomo and Adafactor clip their update RMS instead).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import EOS, PAD, SOS, ExperimentError, LMCorpus, PairCorpus
from .models import GPT, LSTMLM, GPTConfig, Seq2Seq, _round_up, count_params

TASKS = ("lstm-lm", "seq2seq", "gpt-lm")

# ============================================================================ optimizer registry


@dataclass(frozen=True)
class OptimizerSpec:
    """``factory(params, lr, task, weight_decay=None) -> torch.optim.Optimizer``; ``default_lr[task]``.
    ``params`` is ``list(model.parameters())``, or ``list(model.named_parameters())`` when ``named_params``."""

    name: str
    factory: Callable
    default_lr: dict[str, float]
    fused: bool
    description: str
    named_params: bool = False


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(name: str, factory: Callable, default_lr: dict[str, float], fused: bool = False,
                       description: str = "", named_params: bool = False) -> OptimizerSpec:
    """Add (or replace) an optimizer the experiments can use by name."""
    spec = OptimizerSpec(name, factory, dict(default_lr), fused, description, named_params)
    OPTIMIZERS[name] = spec
    return spec


def _adalomo_class(name: str):
    try:
        mod = importlib.import_module("adalomo")
    except ImportError as e:  # pragma: no cover
        raise ExperimentError(f"cannot import adalomo: {e}") from e
    cls = getattr(mod, name, None)
    if cls is None:
        raise ExperimentError(f"adalomo.{name} is not available in this version of adalomo "
                              f"({getattr(mod, '__version__', '?')}); pick another optimizer")
    return cls


def _wd(weight_decay, default=0.0):
    return default if weight_decay is None else weight_decay


def _make_adalomo(fused: bool, clip_grad_norm: float | None = None):
    def factory(params, lr, task, weight_decay=None):
        return _adalomo_class("AdaLomo")(params, lr=lr, weight_decay=_wd(weight_decay), fused=fused,
                                         clip_grad_norm=clip_grad_norm)
    return factory


def _make_lomo(clip_grad_norm: float | None):
    def factory(params, lr, task, weight_decay=None):
        return _adalomo_class("Lomo")(params, lr=lr, weight_decay=_wd(weight_decay), fused=True,
                                      clip_grad_norm=clip_grad_norm)
    return factory


def _make_adafactor(beta1):
    def factory(params, lr, task, weight_decay=None):
        return _adalomo_class("Adafactor")(params, lr=lr, relative_step=False, scale_parameter=True,
                                           warmup_init=False, beta1=beta1, weight_decay=_wd(weight_decay),
                                           fused=True)
    return factory


def _make_adapm(second_moment: str):
    # gets model.named_parameters(): AdaPM picks each tensor's momentum kind (none / low-rank / full) by name
    def factory(params, lr, task, weight_decay=None):
        cls = _adalomo_class("AdaPM")
        try:
            return cls(params, lr=lr, weight_decay=_wd(weight_decay), second_moment=second_moment, fused=True)
        except TypeError as e:
            raise ExperimentError(f"adalomo.AdaPM has an unexpected signature: {e}") from e
    return factory


def _adam(params, lr, task, weight_decay=None):
    return torch.optim.Adam(params, lr=lr, weight_decay=_wd(weight_decay))


def _adamw(params, lr, task, weight_decay=None):
    return torch.optim.AdamW(params, lr=lr, weight_decay=_wd(weight_decay, 0.01))


def _sgd(params, lr, task, weight_decay=None):
    return torch.optim.SGD(params, lr=lr, weight_decay=_wd(weight_decay))


# Default learning rates per task, from the sweeps in docs/experiments.md (from-scratch training). AdaLomo's
# (and Adafactor's, with scale_parameter=True) lr is RELATIVE to the weight RMS: the step is lr * RMS(W), so
# from-scratch training (RMS(W) ~ 0.02-0.1) wants ~3e-2 (1e-1 was unstable over a WikiText-2 epoch, 1e-2 slow).
# Fine-tuning (``adalomo experiment finetune``, keys "domain" and "sft"): AdaLomo the authors' values, 1e-3 for
# further pre-training and 5e-4 for instruction tuning; AdamW (and AdaPM, whose step is AdamW's) 5e-5, the
# transformers Trainer's default and the usual value for fine-tuning GPT-2-small-sized models; clipped LOMO
# 3e-2, the LOMO authors' value with clip_grad_norm=1.0; unclipped SGD 1e-2, untuned. Why: docs/experiments.md.
_ADALOMO_LR = {"lstm-lm": 3e-2, "seq2seq": 3e-2, "gpt-lm": 3e-2, "domain": 3e-2, "sft": 1.6e-2}
_SGD_LR = {"lstm-lm": 10.0, "seq2seq": 1.0, "gpt-lm": 0.05,  # gpt-lm: a guess (0.3 diverged at 1B in bf16)
           "domain": 1e-2, "sft": 1e-2}
_LOMO_CLIP_LR = {**_SGD_LR, "domain": 1.0, "sft": 1.0}
_ADAM_LR = {"lstm-lm": 3e-3, "seq2seq": 3e-3, "gpt-lm": 6e-4, "domain": 5e-4, "sft": 5e-4}
# LOMO's two-pass clipping, as its authors fine-tune with it
CLIP_GRAD_NORM = 1.0

register_optimizer("adalomo", _make_adalomo(True), _ADALOMO_LR, True,
                   "adalomo.AdaLomo(fused=True): updates inside backward, factored 2nd moment, no momentum")
register_optimizer("adalomo-classic", _make_adalomo(False), _ADALOMO_LR, False,
                   "adalomo.AdaLomo(fused=False): same maths, classic loss.backward(); step()")
register_optimizer("adalomo-clip", _make_adalomo(True, CLIP_GRAD_NORM), _ADALOMO_LR, True,
                   f"adalomo.AdaLomo(fused=True, clip_grad_norm={CLIP_GRAD_NORM}): two backward passes per step, "
                   "opt.grad_norm(loss) then the updating one")
register_optimizer("lomo", _make_lomo(None), _SGD_LR, True, "adalomo.Lomo(fused=True): SGD fused into backward")
register_optimizer("lomo-clip", _make_lomo(CLIP_GRAD_NORM), _LOMO_CLIP_LR, True,
                   f"adalomo.Lomo(fused=True, clip_grad_norm={CLIP_GRAD_NORM}): two backward passes per step, "
                   "opt.grad_norm(loss) then the updating one")
register_optimizer("adafactor", _make_adafactor(None), _ADALOMO_LR, True,
                   "adalomo.Adafactor(fused=True, relative_step=False, scale_parameter=True, beta1=None)")
register_optimizer("adafactor-momentum", _make_adafactor(0.9), _ADALOMO_LR, True,
                   "adalomo.Adafactor(fused=True, relative_step=False, scale_parameter=True, beta1=0.9)")
register_optimizer("adapm", _make_adapm("adam"), _ADAM_LR, True,
                   "adalomo.AdaPM(fused=True): low-rank/full/no momentum per tensor, Adam second moment",
                   named_params=True)
register_optimizer("adapm-factored", _make_adapm("factored"), _ADAM_LR, True,
                   "adalomo.AdaPM(fused=True, second_moment='factored'): + AdaLomo's factored second moment",
                   named_params=True)
register_optimizer("adam", _adam, _ADAM_LR, False, "torch.optim.Adam")
register_optimizer("adamw", _adamw, _ADAM_LR, False, "torch.optim.AdamW (weight_decay 0.01 unless given)")
register_optimizer("sgd", _sgd, _SGD_LR, False, "torch.optim.SGD (no momentum)")


@dataclass
class RunSpec:
    label: str  # "adam" or "adalomo@0.01" (a label is unique within an experiment)
    optimizer: str
    lr: float


def _parse_float(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ExperimentError(f"bad {what} {text!r}: not a number") from None
    if not math.isfinite(v) or v <= 0:
        raise ExperimentError(f"bad {what} {text!r}: must be a positive number")
    return v


def parse_lr_overrides(text: str | None, names) -> dict[str, float]:
    """``"adalomo=1e-3,adam=1e-3"`` -> dict; a bare number (``"3e-3"``) applies to every optimizer."""
    if not text:
        return {}
    text = text.strip()
    if "=" not in text:
        v = _parse_float(text, "--lr value")
        return {n: v for n in names}
    out = {}
    for item in text.split(","):
        if not item.strip():
            continue
        name, sep, val = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ExperimentError(f"bad --lr item {item!r}: expected NAME=VALUE, e.g. --lr adalomo=1e-2,adam=1e-3")
        if name not in OPTIMIZERS:
            raise ExperimentError(f"unknown optimizer {name!r} in --lr (known: {', '.join(OPTIMIZERS)})")
        out[name] = _parse_float(val.strip(), f"--lr value for {name}")
    return out


def parse_runs(optimizers: str, lr_text: str | None, task: str) -> list[RunSpec]:
    """``--optimizers adalomo,adam,sgd`` (an entry may pin its lr: ``adalomo@1e-2``; repeat a name with
    different lrs for a sweep) + ``--lr`` overrides -> the list of runs."""
    entries = [e.strip() for e in (optimizers or "").split(",") if e.strip()]
    if not entries:
        raise ExperimentError("--optimizers is empty; e.g. --optimizers adalomo,adam,sgd")
    names = []
    for e in entries:
        name = e.partition("@")[0].strip()
        if name not in OPTIMIZERS:
            raise ExperimentError(f"unknown optimizer {name!r} (known: {', '.join(OPTIMIZERS)})")
        names.append(name)
    overrides = parse_lr_overrides(lr_text, names)
    runs, seen = [], set()
    for e, name in zip(entries, names):
        _, at, pinned = e.partition("@")
        if at:
            lr = _parse_float(pinned, f"lr in {e!r}")
        elif name in overrides or task in OPTIMIZERS[name].default_lr:
            lr = overrides.get(name, OPTIMIZERS[name].default_lr.get(task))
        else:
            raise ExperimentError(f"optimizer {name!r} has no default lr for {task}; give one: {name}@LR or "
                                  f"--lr {name}=LR")
        label = e if at else name
        if label in seen:
            raise ExperimentError(f"optimizer {label!r} listed twice; pin different lrs (name@lr) for a sweep")
        seen.add(label)
        runs.append(RunSpec(label, name, lr))
    return runs


def check_optimizer_available(name: str) -> None:
    """Fail early (one line) when an adalomo optimizer class does not exist in this install."""
    needs = {"adalomo": "AdaLomo", "adalomo-classic": "AdaLomo", "adalomo-clip": "AdaLomo", "lomo": "Lomo",
             "lomo-clip": "Lomo", "adafactor": "Adafactor",
             "adafactor-momentum": "Adafactor", "adapm": "AdaPM", "adapm-factored": "AdaPM"}
    if name in needs:
        _adalomo_class(needs[name])


# ============================================================================ configuration

LSTM_SIZES = {
    "tiny": dict(dim=64, n_layers=2, dropout=0.1),
    "small": dict(dim=200, n_layers=2, dropout=0.2),  # pytorch/examples word_language_model defaults
    "medium": dict(dim=650, n_layers=2, dropout=0.5),  # Zaremba et al. medium
    "large": dict(dim=1500, n_layers=2, dropout=0.65),
}
SEQ2SEQ_SIZES = {
    "tiny": dict(dim=64, n_layers=1, dropout=0.1),
    "small": dict(dim=256, n_layers=1, dropout=0.1),
    "medium": dict(dim=512, n_layers=2, dropout=0.2),
}
TASK_DEFAULTS = {
    "lstm-lm": dict(size="small", batch_size=20, seq_len=35),
    "seq2seq": dict(size="small", batch_size=64, seq_len=None),
    "gpt-lm": dict(size="tiny", batch_size=16, seq_len=128),
}


def task_sizes(task: str) -> dict:
    from .models import GPT_PRESETS

    return {"lstm-lm": LSTM_SIZES, "seq2seq": SEQ2SEQ_SIZES, "gpt-lm": GPT_PRESETS}[task]


@dataclass
class ExperimentConfig:
    task: str
    optimizers: str = "adalomo,adam,sgd"
    lr: str | None = None
    data_dir: str | None = None
    corpus: str = "auto"
    data_limit: int | None = None
    max_steps: int | None = None
    epochs: float | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    size: str | None = None
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    ffn_dim: int | None = None
    dropout: float | None = None
    tie: bool | None = None
    gradient_checkpointing: bool = False
    adaptive_softmax: bool = False
    vocab_size: int | None = None
    max_len: int = 10
    keep_accents: bool = False
    device: str = "auto"
    dtype: str = "fp32"
    seed: int = 0
    threads: int | None = None
    out: str | None = None
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float | None = None
    grad_clip: float | None = None
    eval_every: int = 0
    eval_batches: int = 20
    test_batches: int | None = None
    quiet: bool = False
    log_every: int | None = None
    time_limit_s: float | None = None  # stop a run's training loop after this many seconds (not a CLI flag)
    command: str = ""
    extra: dict = field(default_factory=dict)

    def resolve(self) -> ExperimentConfig:
        if self.task not in TASKS:
            raise ExperimentError(f"unknown task {self.task!r} (choose from {', '.join(TASKS)})")
        d = TASK_DEFAULTS[self.task]
        self.size = self.size or d["size"]
        if self.size not in task_sizes(self.task):
            raise ExperimentError(f"unknown --size {self.size!r} for {self.task} "
                                  f"(choose from {', '.join(task_sizes(self.task))})")
        self.batch_size = self.batch_size or d["batch_size"]
        self.seq_len = self.seq_len or d["seq_len"]
        if self.dtype not in ("fp32", "bf16", "bf16-autocast"):
            raise ExperimentError(f"unknown --dtype {self.dtype!r} (fp32, bf16, bf16-autocast)")
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ExperimentError(f"unknown --schedule {self.schedule!r} (cosine, linear, constant)")
        for name in ("max_steps", "epochs", "batch_size", "seq_len", "data_limit", "threads", "dim", "n_layers",
                     "n_heads", "ffn_dim", "vocab_size", "max_len", "eval_batches", "test_batches", "log_every"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ExperimentError(f"--{name.replace('_', '-')} must be positive, got {v}")
        for name in ("warmup_steps", "eval_every", "weight_decay", "grad_clip"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ExperimentError(f"--{name.replace('_', '-')} must be >= 0, got {v}")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ExperimentError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ExperimentError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.out is None:
            self.out = f"runs/{self.task}"
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ExperimentError(f"unknown --device {name!r} (auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ExperimentError(f"--device {name} requested but CUDA is not available")
    return dev


# ============================================================================ tasks


class LSTMLMTask:
    """Word-level LM with an LSTM: contiguous BPTT windows, hidden state carried across windows (detached)."""

    name = "lstm-lm"
    is_lm = True

    def __init__(self, cfg: ExperimentConfig, corpus: LMCorpus, device):
        self.cfg, self.corpus, self.device = cfg, corpus, device
        size = dict(LSTM_SIZES[cfg.size])
        size.update({k: v for k, v in dict(dim=cfg.dim, n_layers=cfg.n_layers, dropout=cfg.dropout).items()
                     if v is not None})
        self.size = size
        self.cutoffs = None
        if cfg.adaptive_softmax:
            self.cutoffs = tuple(c for c in (2000, 10000) if c < len(corpus.vocab) - 1) or None
        if cfg.tie and self.cutoffs:
            raise ExperimentError("--tie cannot be combined with --adaptive-softmax")
        self.tie = (cfg.tie is None or cfg.tie) and not self.cutoffs
        self.train_data = self._batchify(corpus.train, cfg.batch_size)
        self.steps_per_epoch = max(1, (self.train_data.size(1) - 1) // cfg.seq_len)
        self.hidden = None

    @staticmethod
    def _batchify(data, bsz):
        n = data.numel() // bsz
        if n < 2:
            raise ExperimentError(f"corpus too small for batch size {bsz}")
        return data[: n * bsz].view(bsz, n)  # row b is a contiguous stream (pytorch/examples layout)

    def build_model(self):
        s = self.size
        return LSTMLM(len(self.corpus.vocab), s["dim"], s["dim"], s["n_layers"], s["dropout"], self.tie,
                      self.cutoffs)

    def model_info(self, model):
        return {"type": "LSTMLM", **self.size, "tied": self.tie, "vocab_size": len(self.corpus.vocab),
                "softmax": f"adaptive, cutoffs {list(self.cutoffs)}" if self.cutoffs else "full"}

    def batches(self, seed):
        T = self.cfg.seq_len
        while True:
            self.hidden = None  # a new epoch starts from a zero state
            for i in range(0, self.steps_per_epoch * T, T):
                chunk = self.train_data[:, i: i + T + 1].to(self.device)
                yield chunk[:, :-1], chunk[:, 1:]

    def loss(self, model, batch):
        x, y = batch
        if self.hidden is not None:
            self.hidden = tuple(h.detach() for h in self.hidden)
        loss, self.hidden = model(x, self.hidden, targets=y)
        return loss, y.numel()

    @torch.no_grad()
    def evaluate(self, model, split, max_batches=None):
        data = self._batchify(getattr(self.corpus, split), max(10, self.cfg.batch_size))
        T, hidden, total, count = self.cfg.seq_len, None, 0.0, 0
        for b, i in enumerate(range(0, data.size(1) - 1, T)):
            if max_batches and b >= max_batches:
                break
            chunk = data[:, i: i + T + 1].to(self.device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            with self.autocast():
                loss, hidden = model(x, hidden, targets=y)
            total += loss.item() * y.numel()
            count += y.numel()
        return total / max(count, 1)

    def final_metrics(self, model):
        test = self.evaluate(model, "test", self.cfg.test_batches)  # whole test split unless --test-batches
        split = "test" if not self.cfg.test_batches else f"test (first {self.cfg.test_batches} batches)"
        return {"eval_loss": test, "eval_ppl": _ppl(test), "eval_split": split}

    autocast = contextlib.nullcontext  # replaced by the runner for --dtype bf16-autocast


class GPTTask(LSTMLMTask):
    """LLaMA-style decoder trained from scratch: random windows of seq_len tokens (same order for every run)."""

    name = "gpt-lm"

    def __init__(self, cfg: ExperimentConfig, corpus: LMCorpus, device):
        self.cfg, self.corpus, self.device = cfg, corpus, device
        over = {k: v for k, v in dict(dim=cfg.dim, n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                      ffn_dim=cfg.ffn_dim, dropout=cfg.dropout,
                                      tie_embeddings=cfg.tie).items() if v is not None}
        vocab = max(_round_up(len(corpus.vocab), 64), cfg.vocab_size or 0)  # --vocab-size: LLaMA-size tables
        self.gcfg = GPTConfig.preset(cfg.size, vocab_size=vocab,
                                     max_seq=max(cfg.seq_len, 16), gradient_checkpointing=cfg.gradient_checkpointing,
                                     **over)
        if self.gcfg.dim % self.gcfg.n_heads:
            raise ExperimentError(f"--dim {self.gcfg.dim} is not divisible by --n-heads {self.gcfg.n_heads}")
        if corpus.train.numel() <= cfg.seq_len + 1:
            raise ExperimentError(f"corpus too small for --seq-len {cfg.seq_len}")
        self.steps_per_epoch = max(1, corpus.train.numel() // (cfg.batch_size * cfg.seq_len))

    def build_model(self):
        return GPT(self.gcfg)

    def model_info(self, model):
        return {"type": "GPT", **self.gcfg.to_dict(), "corpus_vocab_size": len(self.corpus.vocab),
                "non_embedding_params": model.num_params(non_embedding=True)}

    def batches(self, seed):
        return random_windows(self.corpus.train, self.cfg.batch_size, self.cfg.seq_len, seed, self.device)

    def loss(self, model, batch):
        x, y = batch
        return model(x, y)[1], y.numel()

    def evaluate(self, model, split, max_batches=None):
        return window_loss(lambda x, y: model(x, y)[1], getattr(self.corpus, split), self.cfg.batch_size,
                           self.cfg.seq_len, self.device, max_batches, self.autocast)


def random_windows(data: torch.Tensor, batch_size: int, seq_len: int, seed: int, device):
    """Endless (inputs, targets) batches of random windows of a token stream, in an order fixed by ``seed``."""
    g = torch.Generator().manual_seed(seed)
    while True:
        ix = torch.randint(data.numel() - seq_len - 1, (batch_size,), generator=g)
        chunk = torch.stack([data[i: i + seq_len + 1] for i in ix.tolist()]).to(device)
        yield chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def window_loss(loss_of: Callable, data: torch.Tensor, batch_size: int, seq_len: int, device,
                max_batches: int | None = None, autocast=contextlib.nullcontext) -> float:
    """Mean cross-entropy per token over consecutive windows of a token stream (the first ``max_batches``
    batches only, if given); ``loss_of(inputs, targets)`` returns a batch's mean loss."""
    starts = list(range(0, data.numel() - seq_len - 1, seq_len)) or [0]
    total, count = 0.0, 0
    for b in range(0, len(starts), batch_size):
        if max_batches and b // batch_size >= max_batches:
            break
        chunk = torch.stack([data[i: i + seq_len + 1] for i in starts[b: b + batch_size]]).to(device)
        with autocast():
            loss = loss_of(chunk[:, :-1], chunk[:, 1:])
        total += loss.item() * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    return total / max(count, 1)


class Seq2SeqTask:
    """Translation with a GRU encoder-decoder + attention; cross-entropy per target token and greedy BLEU."""

    name = "seq2seq"
    is_lm = False
    autocast = contextlib.nullcontext

    def __init__(self, cfg: ExperimentConfig, corpus: PairCorpus, device):
        self.cfg, self.corpus, self.device = cfg, corpus, device
        size = dict(SEQ2SEQ_SIZES[cfg.size])
        size.update({k: v for k, v in dict(dim=cfg.dim, n_layers=cfg.n_layers, dropout=cfg.dropout).items()
                     if v is not None})
        self.size = size
        self.train_enc = [self._encode(p) for p in corpus.train]
        self.steps_per_epoch = max(1, len(self.train_enc) // cfg.batch_size)

    def _encode(self, pair):
        return self.corpus.src_vocab.encode(pair[0].split()), self.corpus.tgt_vocab.encode(pair[1].split())

    def build_model(self):
        s = self.size
        return Seq2Seq(len(self.corpus.src_vocab), len(self.corpus.tgt_vocab), s["dim"], s["n_layers"],
                       s["dropout"], pad_id=PAD)

    def model_info(self, model):
        return {"type": "Seq2Seq (bi-GRU encoder, GRU decoder, Luong attention)", **self.size,
                "src_vocab_size": len(self.corpus.src_vocab), "tgt_vocab_size": len(self.corpus.tgt_vocab)}

    def _collate(self, items):
        S = max(len(s) for s, _ in items)
        T = max(len(t) for _, t in items) + 1
        src = torch.full((len(items), S), PAD, dtype=torch.long)
        tin = torch.full((len(items), T), PAD, dtype=torch.long)
        tout = torch.full((len(items), T), PAD, dtype=torch.long)
        for i, (s, t) in enumerate(items):
            src[i, : len(s)] = torch.tensor(s)
            tin[i, : len(t) + 1] = torch.tensor([SOS, *t])
            tout[i, : len(t) + 1] = torch.tensor([*t, EOS])
        lens = torch.tensor([len(s) for s, _ in items])
        return src.to(self.device), lens, tin.to(self.device), tout.to(self.device)

    def batches(self, seed):
        return shuffled_batches(self.train_enc, self.cfg.batch_size, seed, self._collate)

    def loss(self, model, batch):
        src, lens, tin, tout = batch
        logits = model(src, lens, tin)
        ntok = int((tout != PAD).sum())
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tout.reshape(-1),
                               ignore_index=PAD), ntok

    @torch.no_grad()
    def evaluate(self, model, split, max_batches=None):
        pairs = getattr(self.corpus, split)
        total, count, B = 0.0, 0, 256
        for b in range(0, len(pairs), B):
            if max_batches and b // B >= max_batches:
                break
            src, lens, tin, tout = self._collate([self._encode(p) for p in pairs[b: b + B]])
            with self.autocast():
                logits = model(src, lens, tin)
            total += F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), tout.reshape(-1),
                                     ignore_index=PAD, reduction="sum").item()
            count += int((tout != PAD).sum())
        return total / max(count, 1)

    @torch.no_grad()
    def translate(self, model, sentences):
        out, vocab = [], self.corpus.tgt_vocab
        for b in range(0, len(sentences), 256):
            items = [(self.corpus.src_vocab.encode(s.split()), []) for s in sentences[b: b + 256]]
            src, lens, _, _ = self._collate(items)
            with self.autocast():
                ids = model.greedy(src, lens, SOS, EOS, max_len=self.cfg.max_len + 2).tolist()
            for row in ids:
                row = row[: row.index(EOS)] if EOS in row else row
                out.append(" ".join(vocab.decode(row)))
        return out

    def final_metrics(self, model):
        valid, test = self.evaluate(model, "valid"), self.evaluate(model, "test")
        srcs = [s for s, _ in self.corpus.test]
        refs = [t for _, t in self.corpus.test]
        hyps = self.translate(model, srcs)
        bleu, sig, note = compute_bleu(hyps, refs)
        samples, seen = [], set()
        for s, r, h in zip(srcs, refs, hyps):  # the first 6 distinct source sentences
            if s not in seen and len(samples) < 6:
                seen.add(s)
                samples.append({"source": s, "reference": r, "hypothesis": h})
        return {"valid_loss": valid, "eval_loss": test, "eval_ppl": _ppl(test), "eval_split": "test",
                "bleu": bleu, "bleu_signature": sig, "bleu_note": note, "samples": samples}


def shuffled_batches(items: list, batch_size: int, seed: int, collate: Callable):
    """Endless batches ``collate(list of items)``: every epoch a new order of the items, fixed by ``seed``
    and the epoch, the last incomplete batch left out."""
    g, epoch = torch.Generator(), 0
    while True:
        g.manual_seed(seed * 1000 + epoch)
        order = torch.randperm(len(items), generator=g).tolist()
        for b in range(len(items) // batch_size or 1):
            yield collate([items[i] for i in order[b * batch_size: (b + 1) * batch_size]])
        epoch += 1


def compute_bleu(hyps, refs):
    """Corpus BLEU with sacrebleu."""
    import sacrebleu

    # the sentences are already normalised and split into words (punctuation included): no re-tokenising
    metric = sacrebleu.metrics.BLEU(tokenize="none", force=True)
    score = metric.corpus_score(hyps, [refs])
    return (round(score.score, 2), str(metric.get_signature()),
            "greedy decoding, one reference per pair, on the normalised word tokens")


def _ppl(loss):
    return math.exp(loss) if loss < 50 else float("inf")


# ============================================================================ memory accounting


def tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def optimizer_state_bytes(opt) -> int:
    seen, total = set(), 0
    for state in opt.state.values():
        for v in state.values() if isinstance(state, dict) else ():
            if torch.is_tensor(v) and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += tensor_bytes(v)
    return total


class MemoryMeter:
    """Exact component sizes: parameters, the most gradient bytes alive at once (``.grad`` tensors, seen
    from post-accumulate-grad hooks registered *before* the optimizer's, so a fused optimizer's freeing is
    visible), tensors saved for backward (``saved_tensors_hooks``, parameters excluded), and optimizer state.
    Gradients and activations are measured during the first ``steps`` steps only (they repeat every step)."""

    def __init__(self, model: nn.Module, steps: int = 3):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.param_bytes = sum(tensor_bytes(p) for p in model.parameters())
        self.max_grad_bytes = 0
        self.max_saved_bytes = 0
        self.steps = steps
        self.handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.params]

    def _on_grad(self, _p):
        live = sum(tensor_bytes(q.grad) for q in self.params if q.grad is not None)
        self.max_grad_bytes = max(self.max_grad_bytes, live)

    def forward(self, step: int):
        """Context for the forward pass of ``step``: counts bytes saved for backward."""
        if step > self.steps:
            if self.handles:
                for h in self.handles:
                    h.remove()
                self.handles = []
            return contextlib.nullcontext()
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in self.param_ptrs and ptr not in seen:
                seen[ptr] = st.nbytes()
            return t

        meter = self

        class _Ctx(torch.autograd.graph.saved_tensors_hooks):
            def __exit__(self, *exc):
                super().__exit__(*exc)
                meter.max_saved_bytes = max(meter.max_saved_bytes, sum(seen.values()))

        return _Ctx(pack, lambda t: t)

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


# ============================================================================ the training loop


def lr_lambda(warmup: int, total: int, schedule: str, min_ratio: float):
    def f(step):  # step = number of scheduler.step() calls so far (0 for the first optimizer step)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - (1.0 - min_ratio) * progress
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def total_steps(cfg: ExperimentConfig, steps_per_epoch: int) -> int:
    if cfg.max_steps is not None and cfg.epochs is None:
        return cfg.max_steps
    n = max(1, math.ceil((cfg.epochs if cfg.epochs is not None else 1.0) * steps_per_epoch))
    return min(n, cfg.max_steps) if cfg.max_steps is not None else n


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_one(task, run: RunSpec, cfg: ExperimentConfig, device, progress: Callable) -> dict:
    """Train one fresh model (same seed, same data order) with one optimizer; return its results dict."""
    spec = OPTIMIZERS[run.optimizer]
    steps = total_steps(cfg, task.steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else min(1000, steps // 20)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.set_flush_denormal(True)  # saturated LSTM gates make denormals: 10x slower CPU steps otherwise
    torch.manual_seed(cfg.seed)  # identical initial weights and dropout masks for every optimizer
    model = task.build_model()
    model = model.to(device=device, dtype=torch.bfloat16 if cfg.dtype == "bf16" else None)
    model.train()
    meter = MemoryMeter(model)  # its gradient hooks must run before a fused optimizer's
    params = list(model.named_parameters() if spec.named_params else model.parameters())
    opt = spec.factory(params, run.lr, task.name, weight_decay=cfg.weight_decay)
    fused = bool(getattr(opt, "fused", spec.fused))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, steps, cfg.schedule, cfg.min_lr_ratio))
    clip = cfg.grad_clip if (cfg.grad_clip and not fused) else None
    # a fused optimizer with clip_grad_norm needs the global norm before the backward that updates
    norm_pass = fused and getattr(opt, "clip_grad_norm", None) is not None
    batches = task.batches(cfg.seed)
    losses, times, tok_hist, tokens, evals, eval_time, diverged = [], [], [], 0, [], 0.0, False
    bar = progress(total=steps, desc=run.label)
    _sync(device)
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(batches)
        with meter.forward(step), task.autocast():
            loss, ntok = task.loss(model, batch)
        if norm_pass:
            opt.grad_norm(loss)  # first backward: the norm only, every gradient freed at once
        loss.backward()  # fused optimizers update (and free each gradient) here
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()  # no-op for fused optimizers
        opt.zero_grad(set_to_none=True)
        sched.step()
        loss_v, tokens = loss.item(), tokens + ntok
        elapsed = time.perf_counter() - t0 - eval_time
        losses.append(loss_v)
        times.append(elapsed)
        tok_hist.append(tokens)
        bar.update(loss_v, tokens / max(elapsed, 1e-9), sched.get_last_lr()[0])
        if not math.isfinite(loss_v):
            diverged = True
            break
        if cfg.time_limit_s is not None and elapsed > cfg.time_limit_s:
            break  # a guard against overrunning a time budget: the report shows steps < planned_steps
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == steps):  # the last step too: time-to-target
            te = time.perf_counter()
            model.eval()
            evals.append([step, round(elapsed, 3), task.evaluate(model, "valid", cfg.eval_batches)])
            model.train()
            eval_time += time.perf_counter() - te
    _sync(device)
    wall = time.perf_counter() - t0 - eval_time
    bar.close()
    meter.close()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    memory = {
        "parameters": meter.param_bytes,
        "gradients": meter.max_grad_bytes,
        "optimizer_state": optimizer_state_bytes(opt),
        "activations_saved": meter.max_saved_bytes,
        "peak_total": peak,
        "activations_and_other": None,
    }
    if peak is not None:
        memory["activations_and_other"] = max(0, peak - memory["parameters"] - memory["gradients"]
                                              - memory["optimizer_state"])
    model.eval()
    metrics = task.final_metrics(model) if not diverged else {"eval_loss": None, "eval_ppl": None}
    if evals and "valid_loss" not in metrics:
        metrics["valid_loss"] = evals[-1][2]
    # steady-state speed: skip the first steps (one-off kernel compilation, allocator growth, the memory
    # meter's hooks), which otherwise dominate short runs; wall_time_s keeps everything. The median step, not
    # the mean: on a CPU shared with other jobs, a burst of theirs stalls the steps of whichever optimizer runs
    # at that moment, and a mean would charge the stall to that optimizer (to the order of the runs).
    n = len(losses)
    skip = min(10, n // 5) if n >= 5 else 0
    step_times = [b - a for a, b in zip([0.0, *times], times)][skip:]
    step_s = max(statistics.median(step_times), 1e-9)
    tokens_per_step = (tokens - (tok_hist[skip - 1] if skip else 0)) / len(step_times)
    n_last = max(1, min(50, len(losses) // 10))
    finite = [x for x in losses[-n_last:] if math.isfinite(x)]
    result = {
        "optimizer": run.optimizer,
        "lr": run.lr,
        "fused": fused,
        "description": spec.description,
        "weight_decay": opt.param_groups[0].get("weight_decay"),
        "grad_clip": clip,
        "warmup_steps": warmup,
        "steps": len(losses),
        "planned_steps": steps,
        "epochs": round(len(losses) / task.steps_per_epoch, 4),
        "tokens": tokens,
        "diverged": diverged,
        "final_train_loss": sum(finite) / len(finite) if finite and not diverged else None,
        "final_train_loss_window": n_last,
        **metrics,
        "wall_time_s": round(wall, 3),
        "time_per_step_s": step_s,
        "tokens_per_s": tokens_per_step / step_s,
        "timing_skipped_steps": skip,
        "n_params": count_params(model),
        "memory": memory,
        "loss_curve": {"step": list(range(1, len(losses) + 1)), "time_s": [round(t, 3) for t in times],
                       "loss": [float(f"{x:.5g}") for x in losses]},
        "eval_curve": evals,
    }
    result["_model_info"] = task.model_info(model)
    if hasattr(opt, "remove_hooks"):
        opt.remove_hooks()
    del model, opt, sched, batches
    gc.collect()
    return result


# ============================================================================ the experiment


class Progress:
    """A tqdm bar per run (loss, tokens/s, lr), or with ``quiet`` a log line every ``log_every`` steps."""

    def __init__(self, total, desc, quiet=False, log_every=None, log=print):
        self.total, self.desc, self.quiet, self.log = total, desc, quiet, log
        self.log_every = log_every or max(1, total // 10)
        self.step, self.ema = 0, None
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, mininterval=0.5)

    def update(self, loss, tok_s, lr):
        self.step += 1
        if math.isfinite(loss):
            self.ema = loss if self.ema is None else 0.9 * self.ema + 0.1 * loss
        if self.bar is not None:
            self.bar.update(1)
            if self.step % 5 == 0 or self.step == self.total:
                self.bar.set_postfix(loss=f"{self.ema:.3f}" if self.ema else "nan", tok_s=f"{tok_s:,.0f}",
                                     lr=f"{lr:.2e}", refresh=False)
        elif self.step % self.log_every == 0 or self.step == self.total:
            ema = f"{self.ema:.4f}" if self.ema is not None else "nan"
            self.log(f"  [{self.desc}] step {self.step}/{self.total} loss {ema} lr {lr:.2e} {tok_s:,.0f} tok/s")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _environment(device) -> dict:
    import platform

    env = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
           "device": str(device), "threads": torch.get_num_threads()}
    try:
        import adalomo

        env["adalomo"] = getattr(adalomo, "__version__", None)
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    else:
        env["device_name"] = platform.processor() or platform.machine()
    return env


def load_task(cfg: ExperimentConfig, device):
    from .data import load_lm_corpus, load_pair_corpus, resolve_data_dir

    data_dir = resolve_data_dir(cfg.data_dir)
    if cfg.task == "seq2seq":
        corpus = load_pair_corpus(cfg.corpus, data_dir, cfg.max_len, cfg.seed, cfg.data_limit, cfg.keep_accents)
        return Seq2SeqTask(cfg, corpus, device), corpus
    corpus = load_lm_corpus(cfg.corpus, data_dir, cfg.data_limit)
    task = (LSTMLMTask if cfg.task == "lstm-lm" else GPTTask)(cfg, corpus, device)
    return task, corpus


def _warmup(task, cfg, device, steps=2):
    """A couple of untimed forward/backward passes so the first optimizer's timing is not penalised by
    one-off start-up costs (allocator, thread pools, kernel selection)."""
    model = task.build_model().to(device=device, dtype=torch.bfloat16 if cfg.dtype == "bf16" else None)
    batches = task.batches(cfg.seed + 12345)
    for _ in range(steps):
        with task.autocast():
            loss, _ = task.loss(model, next(batches))
        loss.backward()
    del model, batches
    task.hidden = None
    gc.collect()


def require_experiment_packages(task: str, extra=()) -> None:
    """The experiments' own dependencies (the ``experiments`` extra) are not needed by the optimizers, so a
    plain ``pip install adalomo`` lacks them: say so in one line before any work is done."""
    needed = ["tqdm", "matplotlib"] + (["sacrebleu"] if task == "seq2seq" else []) + list(extra)
    missing = []
    for name in needed:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ExperimentError(f"the experiments need {', '.join(missing)}, not installed: "
                              'pip install "adalomo[experiments]"')


# Threads for a CPU run without --threads. The experiments' models are small, so an op has little work to
# split: a second thread on a free core shortens a step by about a third at best. On a CPU shared with other
# jobs, a thread whose core is busy stalls every parallel region, which makes steps many times slower, and
# unevenly so across the optimizers being compared. One thread keeps the time predictable and the comparison
# fair.
CPU_THREADS = 1


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """``torch.set_num_threads(n)`` for the duration (a programmatic caller keeps its own setting)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_experiment(cfg: ExperimentConfig, log=print) -> dict:
    """Load the data, train one model per optimizer (same seed and data order), write the report."""
    cfg.resolve()
    require_experiment_packages(cfg.task)
    runs = parse_runs(cfg.optimizers, cfg.lr, cfg.task)
    for r in runs:
        check_optimizer_available(r.optimizer)
    device = resolve_device(cfg.device)
    with _torch_threads(cfg.threads or (CPU_THREADS if device.type == "cpu" else None)):
        return _train_all(cfg, runs, device, log)


def _train_all(cfg: ExperimentConfig, runs: list[RunSpec], device, log) -> dict:
    from pathlib import Path

    from . import report

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 tensor cores
        torch.backends.cudnn.allow_tf32 = True
    task, corpus = load_task(cfg, device)  # checks the data and the model settings before anything is written
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExperimentError(f"cannot create output directory {str(out)!r}: {e.strerror}") from None
    if cfg.dtype == "bf16-autocast":
        task.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    info = corpus.info()
    log(f"adalomo experiment {cfg.task}: corpus = {info['description']}")
    for note in info["notes"]:
        log(f"  note: {note}")
    steps = total_steps(cfg, task.steps_per_epoch)
    log(f"  {steps} steps per optimizer ({steps / task.steps_per_epoch:.3g} epochs of {task.steps_per_epoch} "
        f"steps), batch {cfg.batch_size}, device {device}"
        + (f" ({torch.get_num_threads()} threads)" if device.type == "cpu" else "")
        + f", dtype {cfg.dtype}, seed {cfg.seed}; "
        f"runs: {', '.join(f'{r.label} (lr {r.lr:g})' for r in runs)}")
    results = {
        "schema_version": 1,
        "task": cfg.task,
        "command": cfg.command,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "corpus": info,
        "config": {k: v for k, v in vars(cfg).items() if k not in ("extra", "command")},
        "environment": _environment(device),
        "model": None,
        "runs": {},
    }
    _warmup(task, cfg, device)
    for run in runs:
        def progress(total, desc):
            return Progress(total, desc, cfg.quiet, cfg.log_every, log)

        res = train_one(task, run, cfg, device, progress)
        results["model"] = res.pop("_model_info")
        results["model"]["n_params"] = res["n_params"]
        results["runs"][run.label] = res
        log("  " + report.summary_line(run.label, res))
        report.write_json(results, out / "results.json")  # partial results survive an interrupted run
    paths = report.write_all(results, out)
    log(f"results: {paths['md']} (table), {paths['json']} (all numbers), plots: "
        + ", ".join(str(p) for p in paths["plots"]))
    return results
