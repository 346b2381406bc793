"""``adalomo experiment finetune``: fine-tune one pretrained model with each optimizer, at its default lr and
over an lr sweep, on two tasks that mirror the AdaLomo paper's.

* ``domain``: further pre-training on a new domain. Score: the target domain's test perplexity; the source
  domain's (the base's pretraining corpus) perplexity after fine-tuning shows what was forgotten.
* ``sft``: instruction-style supervised fine-tuning on (prompt, answer) pairs, English -> French, the loss on
  the answer tokens only. Score: the answer perplexity on held-out pairs; BLEU of greedy answers beside it.

The base is pretrained here (``--pretrain-steps``: a ``gpt-lm`` model trained with AdamW, saved to OUT/base)
or loaded (``--base``, see :mod:`.pretrained`). Every run starts from a copy of the same weights and reads
the same batches in the same order; the loop, its timing and memory accounting are ``train.train_one``'s.
"""

from __future__ import annotations

import contextlib
import gc
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .data import ExperimentError, LMCorpus, PairCorpus, WordLines, lm_lines, load_pair_corpus, resolve_data_dir
from .models import GPT, GPT_PRESETS
from .pretrained import Base, WordTokenizer, load_base, save_base
from .train import (
    CPU_THREADS,
    OPTIMIZERS,
    ExperimentConfig,
    GPTTask,
    Progress,
    RunSpec,
    _environment,
    _ppl,
    _torch_threads,
    _warmup,
    check_optimizer_available,
    compute_bleu,
    parse_runs,
    random_windows,
    require_experiment_packages,
    resolve_device,
    shuffled_batches,
    train_one,
    window_loss,
)

FINETUNE_TASKS = ("domain", "sft")
DEFAULT_OPTIMIZERS = "adalomo,adamw,lomo-clip,adafactor,adapm"
# the base is pretrained the way LLaMA-style models are: AdamW at gpt-lm's lr (6e-4)
PRETRAIN_OPTIMIZER = "adamw"
# with --budget-minutes, pretraining stops after this share of the budget, keeping the rest for fine-tuning
PRETRAIN_BUDGET_SHARE = 0.4
IGNORE = -100  # target id of the prompt and padding positions: no loss there


@dataclass
class FinetuneConfig:
    task: str = "domain,sft"
    base: str | None = None
    pretrain_steps: int | None = None
    optimizers: str = DEFAULT_OPTIMIZERS
    lr: str | None = None
    lr_sweep: int | None = None
    data_dir: str | None = None
    target_corpus: str = "auto"
    data_limit: int | None = None
    max_len: int = 10
    max_steps: int = 200
    batch_size: int = 16
    sft_batch_size: int = 64
    pretrain_batch_size: int | None = None
    seq_len: int = 128
    size: str = "tiny"
    dim: int | None = None
    n_layers: int | None = None
    n_heads: int | None = None
    ffn_dim: int | None = None
    vocab_size: int | None = None
    gradient_checkpointing: bool = False
    device: str = "auto"
    dtype: str = "fp32"
    seed: int = 0
    threads: int | None = None
    warmup_steps: int | None = None
    test_batches: int | None = None
    eval_pairs: int = 500
    budget_minutes: float | None = None
    out: str | None = None
    quiet: bool = False
    command: str = ""

    def resolve(self) -> FinetuneConfig:
        self.tasks = [t.strip() for t in self.task.split(",") if t.strip()]
        bad = [t for t in self.tasks if t not in FINETUNE_TASKS]
        if bad or not self.tasks:
            raise ExperimentError(f"unknown --task {', '.join(bad) or repr(self.task)} (choose domain, sft or "
                                  "domain,sft)")
        if (self.base is None) == (self.pretrain_steps is None):
            raise ExperimentError("give either --base DIR (a saved base model or a transformers model directory) "
                                  "or --pretrain-steps N (pretrain one here first)"
                                  + (", not both" if self.base is not None else ""))
        for name in ("pretrain_steps", "max_steps", "batch_size", "sft_batch_size", "pretrain_batch_size",
                     "seq_len", "data_limit", "max_len", "dim", "n_layers", "n_heads", "ffn_dim", "vocab_size",
                     "threads", "test_batches", "eval_pairs", "budget_minutes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ExperimentError(f"--{name.replace('_', '-')} must be positive, got {v}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ExperimentError(f"--warmup-steps must be >= 0, got {self.warmup_steps}")
        if self.lr_sweep is not None and (self.lr_sweep < 3 or self.lr_sweep % 2 == 0):
            raise ExperimentError(f"--lr-sweep takes an odd number of points >= 3 (default lr in the middle), "
                                  f"got {self.lr_sweep}")
        if self.size not in GPT_PRESETS:
            raise ExperimentError(f"unknown --size {self.size!r} (choose from {', '.join(GPT_PRESETS)})")
        if self.dtype not in ("fp32", "bf16", "bf16-autocast"):
            raise ExperimentError(f"unknown --dtype {self.dtype!r} (fp32, bf16, bf16-autocast)")
        self.out = self.out or "runs/finetune"
        return self

    def train_config(self, task: str, steps: int, **over) -> ExperimentConfig:
        """The settings ``train_one`` reads, for one fine-tuning task (or ``gpt-lm``: the pretraining)."""
        batch = {"sft": self.sft_batch_size, "gpt-lm": self.pretrain_batch_size or self.batch_size}
        return ExperimentConfig(task=task, max_steps=steps, batch_size=batch.get(task, self.batch_size),
                                seq_len=self.seq_len,
                                dtype=self.dtype, seed=self.seed, warmup_steps=self.warmup_steps,
                                test_batches=self.test_batches, quiet=self.quiet,
                                gradient_checkpointing=self.gradient_checkpointing, **over)


def _texts(lines: list[list[str]]) -> list[str]:
    """Word lines (each ending with ``<eos>``) as text: the tokenizer appends its own end of line."""
    return [" ".join(w[:-1] if w and w[-1] == "<eos>" else w) for w in lines]


def sweep_lrs(center: float, points: int) -> list[float]:
    """``points`` lrs a half-decade (x3.16) apart, ``center`` in the middle (2 significant digits)."""
    half = points // 2
    return [center if k == 0 else float(f"{center * 10 ** (k / 2):.2g}") for k in range(-half, half + 1)]


# ============================================================================ the two tasks


class _FinetuneTask:
    """What both tasks share: the base, a fresh copy of it per run, the logits of a batch."""

    autocast = contextlib.nullcontext  # replaced by the runner for --dtype bf16-autocast

    def __init__(self, cfg: FinetuneConfig, base: Base, device):
        self.cfg, self.base, self.device, self.tok = cfg, base, device, base.tokenizer
        self.model_dtype = torch.bfloat16 if cfg.dtype == "bf16" else torch.float32

    def build_model(self):
        return self.base.new_model(self.model_dtype, self.cfg.gradient_checkpointing)

    def model_info(self, model):
        return dict(self.base.info)

    def _logits(self, model, x):
        return self.base.logits(model, x).float()


class DomainTask(_FinetuneTask):
    """Further pre-training: random windows of the target corpus; perplexity on the target and the source."""

    name = "domain"
    is_lm = True

    def __init__(self, cfg: FinetuneConfig, base: Base, target: WordLines, source: WordLines, device):
        super().__init__(cfg, base, device)
        self.target_name, self.source_name = target.name, source.name
        self.data = {"train": self.tok.encode_lines(_texts(target.train)),
                     "valid": self.tok.encode_lines(_texts(target.valid)),
                     "test": self.tok.encode_lines(_texts(target.test)),
                     "source": self.tok.encode_lines(_texts(source.test))}
        for split, ids in self.data.items():
            if ids.numel() <= cfg.seq_len + 1:
                raise ExperimentError(f"the {split} split of {target.name if split != 'source' else source.name} "
                                      f"has {ids.numel()} tokens, too few for --seq-len {cfg.seq_len}")
        self.steps_per_epoch = max(1, self.data["train"].numel() // (cfg.batch_size * cfg.seq_len))

    def batches(self, seed):
        return random_windows(self.data["train"], self.cfg.batch_size, self.cfg.seq_len, seed, self.device)

    def _loss(self, model, x, y):
        logits = self._logits(model, x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    def loss(self, model, batch):
        x, y = batch
        return self._loss(model, x, y), y.numel()

    def evaluate(self, model, split, max_batches=None):
        return window_loss(lambda x, y: self._loss(model, x, y), self.data[split], self.cfg.batch_size,
                           self.cfg.seq_len, self.device, max_batches, self.autocast)

    def final_metrics(self, model):
        target = self.evaluate(model, "test", self.cfg.test_batches)
        source = self.evaluate(model, "source", self.cfg.test_batches)
        return {"eval_loss": target, "eval_ppl": _ppl(target), "eval_split": f"{self.target_name} test",
                "target_loss": target, "target_ppl": _ppl(target), "source_loss": source,
                "source_ppl": _ppl(source), "score": _ppl(target)}


class SFTTask(_FinetuneTask):
    """Prompt -> answer pairs, the loss on the answer tokens only; greedy answers scored by BLEU."""

    name = "sft"
    is_lm = False

    def __init__(self, cfg: FinetuneConfig, base: Base, pairs: PairCorpus, device):
        super().__init__(cfg, base, device)
        self.pairs_name = pairs.name
        self.train_items = [it for it in map(self._encode, pairs.train) if it is not None]
        held_out = [(p, it) for p in pairs.test[: cfg.eval_pairs] if (it := self._encode(p)) is not None]
        if not self.train_items or not held_out:
            raise ExperimentError(f"no pair of {pairs.name} fits --seq-len {cfg.seq_len}")
        self.test_refs = [p[1] for p, _ in held_out]
        self.test_items = [it for _, it in held_out]
        self.steps_per_epoch = max(1, len(self.train_items) // cfg.sft_batch_size)
        # a cap fixed by the held-out set, the same for every model: its longest answer and a little more
        self.max_new = max(len(a) for _, a in self.test_items) + 2

    def _encode(self, pair):
        prompt, answer = self.tok.prompt_ids(pair[0]), self.tok.answer_ids(pair[1])
        room = self.cfg.seq_len + 1 - len(prompt)
        return (prompt, answer[:room]) if room > 0 else None

    def _collate(self, items):
        T = max(len(p) + len(a) for p, a in items) - 1
        x = torch.full((len(items), T), self.tok.pad_id, dtype=torch.long)
        y = torch.full((len(items), T), IGNORE, dtype=torch.long)
        for i, (p, a) in enumerate(items):
            full = torch.tensor(p + a)
            x[i, : len(full) - 1] = full[:-1]
            y[i, len(p) - 1: len(full) - 1] = full[len(p):]  # predict each answer token from what precedes it
        return x.to(self.device), y.to(self.device), sum(len(p) + len(a) - 1 for p, a in items)

    def batches(self, seed):
        return shuffled_batches(self.train_items, self.cfg.sft_batch_size, seed, self._collate)

    def loss(self, model, batch):
        x, y, ntok = batch
        logits = self._logits(model, x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE), ntok

    @torch.no_grad()
    def evaluate(self, model, split="test", max_batches=None):
        total, count, B = 0.0, 0, 4 * self.cfg.sft_batch_size
        for b in range(0, len(self.test_items), B):
            x, y, _ = self._collate(self.test_items[b: b + B])
            with self.autocast():
                logits = self._logits(model, x)
            total += F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1), ignore_index=IGNORE,
                                     reduction="sum").item()
            count += int((y != IGNORE).sum())
        return total / max(count, 1)

    @torch.no_grad()
    def answers(self, model) -> list[str]:
        """Greedy answers to the held-out prompts, batched by prompt length (no padding, so no mask)."""
        by_len: dict[int, list[int]] = {}
        for i, (p, _) in enumerate(self.test_items):
            by_len.setdefault(len(p), []).append(i)
        out = [""] * len(self.test_items)
        limit = self.base.max_seq or (self.cfg.seq_len + self.max_new)
        for n, idx in sorted(by_len.items()):
            for b in range(0, len(idx), 4 * self.cfg.sft_batch_size):
                rows = idx[b: b + 4 * self.cfg.sft_batch_size]
                x = torch.tensor([self.test_items[i][0] for i in rows], device=self.device)
                done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
                new = []
                for _ in range(min(self.max_new, limit - n)):
                    with self.autocast():
                        # the embedding may have more rows than the tokenizer has tokens (rounded up)
                        nxt = self._logits(model, x)[:, -1, : len(self.tok)].argmax(-1)
                    new.append(nxt)
                    done |= nxt == self.tok.eos_id
                    x = torch.cat([x, nxt[:, None]], 1)
                    if bool(done.all()):
                        break
                gen = torch.stack(new, 1).tolist() if new else [[] for _ in rows]
                for i, ids in zip(rows, gen):
                    ids = ids[: ids.index(self.tok.eos_id)] if self.tok.eos_id in ids else ids
                    out[i] = self.tok.decode(ids)
        return out

    def final_metrics(self, model):
        loss = self.evaluate(model)
        hyps = self.answers(model)
        bleu, sig, note = compute_bleu(hyps, self.test_refs)
        samples = [{"prompt": self.tok.decode(p), "reference": r, "answer": h}
                   for (p, _), r, h in list(zip(self.test_items, self.test_refs, hyps))[:6]]
        return {"eval_loss": loss, "eval_ppl": _ppl(loss), "eval_split": f"answers of {len(hyps)} held-out pairs",
                "answer_loss": loss, "answer_ppl": _ppl(loss), "bleu": bleu, "bleu_signature": sig,
                "bleu_note": note, "samples": samples, "score": _ppl(loss)}


# ============================================================================ the base model


class _PretrainTask(GPTTask):
    """``gpt-lm`` on the source corpus, keeping the model it builds so that it can be saved."""

    def build_model(self):
        self.model = GPT(self.gcfg)
        return self.model


def _corpus_names(cfg: FinetuneConfig, data_dir, base: Base | None) -> tuple[str, str]:
    """(source, target) corpus names: the base's pretraining corpus (WikiText-2 with a data directory, else
    the Language Reference half of the embedded docs) and the target domain."""
    if base is not None and base.pretraining and base.pretraining.get("corpus_key"):
        source = base.pretraining["corpus_key"]
    else:
        source = "wikitext-2" if data_dir is not None else "embedded-language"
    target = cfg.target_corpus
    if target == "auto":
        target = "embedded" if source == "wikitext-2" else "embedded-library"
    # "embedded" is both halves of the docs: it overlaps either
    overlap = source == target or ("embedded" in (source, target) and source.startswith("embedded")
                                   and target.startswith("embedded"))
    if overlap:
        raise ExperimentError(f"--target-corpus {target} overlaps the base's corpus {source}; pick another "
                              "domain (embedded, embedded-library, tinyshakespeare, wikitext-2)")
    return source, target


def pretrain_base(cfg: FinetuneConfig, source: WordLines, source_key: str, tokenizer: WordTokenizer, device,
                  deadline: float | None, log) -> dict:
    """Train a ``gpt-lm`` model on ``source`` with AdamW, save it to OUT/base; the run's results."""
    enc = {s: tokenizer.encode_lines(_texts(getattr(source, s))) for s in ("train", "valid", "test")}
    corpus = LMCorpus(source.name, source.description, tokenizer.vocab, enc["train"], enc["valid"], enc["test"])
    limit = None if deadline is None else PRETRAIN_BUDGET_SHARE * (deadline - time.perf_counter())
    pcfg = cfg.train_config("gpt-lm", cfg.pretrain_steps, size=cfg.size, dim=cfg.dim, n_layers=cfg.n_layers,
                            n_heads=cfg.n_heads, ffn_dim=cfg.ffn_dim, vocab_size=cfg.vocab_size,
                            time_limit_s=limit)
    task = _PretrainTask(pcfg, corpus, device)
    _autocast(cfg, task, device)
    run = RunSpec("pretrain", PRETRAIN_OPTIMIZER, OPTIMIZERS[PRETRAIN_OPTIMIZER].default_lr["gpt-lm"])
    log(f"pretraining the base: gpt-lm {cfg.size} on {source.name}, {cfg.pretrain_steps} steps, "
        f"{run.optimizer} lr {run.lr:g}")
    res = train_one(task, run, pcfg, device, lambda total, desc: Progress(total, desc, cfg.quiet, None, log))
    res.pop("_model_info")
    meta = {"corpus": source.name, "corpus_key": source_key, "corpus_description": source.description,
            "optimizer": run.optimizer, "lr": run.lr, "steps": res["steps"], "planned_steps": res["planned_steps"],
            "tokens": res["tokens"], "batch_size": pcfg.batch_size, "seq_len": cfg.seq_len, "dtype": cfg.dtype,
            "final_train_loss": res["final_train_loss"], "test_loss": res["eval_loss"],
            "test_ppl": res["eval_ppl"], "wall_time_s": res["wall_time_s"], "device": str(device)}
    path = save_base(task.model, tokenizer, Path(cfg.out) / "base", meta)
    log(f"  base saved to {path}: test ppl {res['eval_ppl'] or float('nan'):.1f} on {source.name} after "
        f"{res['steps']} steps ({res['wall_time_s']:.0f}s)")
    return res


# ============================================================================ runs and the budget


@dataclass
class PlannedRun:
    task: str
    run: RunSpec
    is_default: bool
    distance: int  # sweep points away from the default lr


def plan_runs(cfg: FinetuneConfig) -> list[PlannedRun]:
    """Every (task, optimizer, lr) in the order they run: every default first, then the sweep from the nearest
    points outwards, so that a run cut short by the budget still has the comparison at the defaults."""
    plan = []
    for task in cfg.tasks:
        centers = parse_runs(cfg.optimizers, cfg.lr, task)
        names = [r.optimizer for r in centers]
        if len(set(names)) < len(names):
            raise ExperimentError("list each optimizer once in --optimizers (--lr-sweep makes the lr sweep)")
        for r in centers:
            lrs = sweep_lrs(r.lr, cfg.lr_sweep) if cfg.lr_sweep else [r.lr]
            for k, lr in enumerate(lrs):
                d = k - len(lrs) // 2
                plan.append(PlannedRun(task, RunSpec(f"{r.optimizer}@{lr:g}", r.optimizer, lr), d == 0, abs(d)))
    return sorted(plan, key=lambda p: p.distance)  # stable: tasks and optimizers keep their order


class Budget:
    """``--budget-minutes``: a run starts only if the time it is expected to take (the longest run of that
    optimizer on that task so far, else of the task, else of any) still fits before the deadline."""

    def __init__(self, minutes: float | None, start: float):
        self.start = start
        self.deadline = None if minutes is None else start + 60.0 * minutes
        self.seconds: dict[tuple[str, str], float] = {}

    def fits(self, task: str, optimizer: str) -> bool:
        if self.deadline is None:
            return True
        same_task = [s for (t, _), s in self.seconds.items() if t == task]
        guess = self.seconds.get((task, optimizer)) or max(same_task or self.seconds.values() or [0.0])
        return time.perf_counter() + guess <= self.deadline

    def record(self, task: str, optimizer: str, seconds: float) -> None:
        self.seconds[(task, optimizer)] = max(seconds, self.seconds.get((task, optimizer), 0.0))


# ============================================================================ the experiment


def run_finetune(cfg: FinetuneConfig, log=print) -> dict:
    """Pretrain or load the base, fine-tune it with every (optimizer, lr) on each task, write the report."""
    start = time.perf_counter()
    cfg.resolve()
    require_experiment_packages("finetune", extra=("safetensors", *(("sacrebleu",) if "sft" in cfg.tasks else ())))
    plan = plan_runs(cfg)
    for p in plan:
        check_optimizer_available(p.run.optimizer)
    device = resolve_device(cfg.device)
    with _torch_threads(cfg.threads or (CPU_THREADS if device.type == "cpu" else None)):
        return _finetune_all(cfg, plan, device, Budget(cfg.budget_minutes, start), log)


def _load_data(cfg: FinetuneConfig, data_dir, base: Base | None):
    source_key, target_key = _corpus_names(cfg, data_dir, base)
    source = lm_lines(source_key, data_dir, cfg.data_limit)
    target = lm_lines(target_key, data_dir, cfg.data_limit) if "domain" in cfg.tasks else None
    pairs = (load_pair_corpus("auto", data_dir, cfg.max_len, cfg.seed, cfg.data_limit) if "sft" in cfg.tasks
             else None)
    return source_key, source, target, pairs


def _vocabulary_texts(source, target, pairs):
    """Lists of words the word vocabulary is built from: every corpus the base will see."""
    texts = list(source.train) + (list(target.train) if target else [])
    if pairs is not None:
        texts += [s.split() + t.split() for s, t in pairs.train]
    return texts


def _autocast(cfg: FinetuneConfig, task, device) -> None:
    if cfg.dtype == "bf16-autocast":
        task.autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _finetune_all(cfg: FinetuneConfig, plan: list[PlannedRun], device, budget: Budget, log) -> dict:
    from . import finetune_report as report

    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data_dir = resolve_data_dir(cfg.data_dir)
    base = load_base(cfg.base, lambda: _vocabulary_texts(*_load_data(cfg, data_dir, None)[1:])) if cfg.base else None
    source_key, source, target, pairs = _load_data(cfg, data_dir, base)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExperimentError(f"cannot create output directory {str(out)!r}: {e.strerror}") from None
    results = {"schema_version": 1, "task": "finetune", "command": cfg.command,
               "created": time.strftime("%Y-%m-%d %H:%M:%S"),
               "config": {k: v for k, v in vars(cfg).items() if k != "command"},
               "environment": _environment(device), "base": None, "tasks": {}, "skipped": []}
    pretrain_run = None
    if base is None:
        tokenizer = WordTokenizer.build(_vocabulary_texts(source, target, pairs))
        pretrain_run = pretrain_base(cfg, source, source_key, tokenizer, device, budget.deadline, log)
        base = load_base(out / "base")
    if base.max_seq is not None and cfg.seq_len > base.max_seq:
        raise ExperimentError(f"--seq-len {cfg.seq_len} is longer than the base model's {base.max_seq} positions")
    results["base"] = {"path": base.path, "format": base.format, "model": base.info,
                       "tokenizer": base.tokenizer.info(), "pretraining": base.pretraining,
                       "pretraining_run": pretrain_run, "notes": base.notes}
    for note in base.notes:
        log(f"  note: {note}")
    tasks = {}
    for name in cfg.tasks:
        tasks[name] = (DomainTask(cfg, base, target, source, device) if name == "domain"
                       else SFTTask(cfg, base, pairs, device))
        _autocast(cfg, tasks[name], device)
        results["tasks"][name] = _task_header(tasks[name], target if name == "domain" else pairs, source, device)
        log(f"{name}: {results['tasks'][name]['description']}; before fine-tuning: "
            f"score {results['tasks'][name]['before']['score']:.2f}")
        _warmup(tasks[name], cfg.train_config(name, 1), device)
    with _frozen_heap():
        for p in plan:
            _run_planned(cfg, p, tasks[p.task], results, device, budget, out, log)
    results["elapsed_s"] = round(time.perf_counter() - budget.start, 1)  # data, pretraining, runs: all but the report
    paths = report.write_all(results, out)
    log(f"results: {paths['md']} (tables), {paths['json']} (all numbers), plots: "
        + ", ".join(str(p) for p in paths["plots"]))
    return results


def _run_planned(cfg: FinetuneConfig, p: PlannedRun, task, results: dict, device, budget: Budget, out: Path,
                 log) -> None:
    """One fine-tuning run if the budget allows it; its results into ``results`` and results.json."""
    from . import finetune_report as report

    if not budget.fits(p.task, p.run.optimizer):
        results["skipped"].append(f"{p.task}: {p.run.label}")
        log(f"  {p.task} {p.run.label}: skipped, it would not end within --budget-minutes {cfg.budget_minutes:g}")
        return
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        if not p.is_default:  # a sweep point is a deliberate lr: no advice about it
            warnings.filterwarnings("ignore", message="AdaLomo with lr=")
        res = train_one(task, p.run, cfg.train_config(p.task, cfg.max_steps), device,
                        lambda total, desc: Progress(total, desc, cfg.quiet, None, log))
    res.pop("_model_info")
    res["task"], res["is_default"] = p.task, p.is_default
    res["run_time_s"] = round(time.perf_counter() - t0, 3)  # with the copy of the base and the evaluation
    results["tasks"][p.task]["runs"][p.run.label] = res
    budget.record(p.task, p.run.optimizer, res["run_time_s"])
    log(f"  {p.task} {report.run_line(p.run.label, res)}")
    report.write_json(results, out / "results.json")  # partial results survive an interrupted run


@contextlib.contextmanager
def _frozen_heap():
    """Every object alive now (imported modules, the corpora) left out of garbage collections until the end:
    ``train_one`` collects after each run, and on a heap that holds torch's compiler modules a full
    collection takes about half a second, many times over in a sweep."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _task_header(task, data, source: WordLines, device) -> dict:
    """The task's data, its score and the base's own metrics before any fine-tuning."""
    model = task.build_model().to(device)
    model.eval()
    before = task.final_metrics(model)
    del model
    if task.name == "domain":
        return {"description": f"further pre-training on {data.name} (base corpus {source.name})",
                "score_name": f"{data.name} test perplexity", "target_corpus": data.name,
                "target_description": data.description, "source_corpus": source.name,
                "tokens": {s: int(v.numel()) for s, v in task.data.items()}, "notes": list(data.notes),
                "before": {k: before[k] for k in ("target_ppl", "source_ppl", "score")}, "runs": {}}
    return {"description": f"supervised fine-tuning on {data.name} pairs, loss on the answer only",
            "score_name": "answer perplexity on held-out pairs", "pairs": data.info(),
            "train_pairs": len(task.train_items), "eval_pairs": len(task.test_items), "notes": list(data.notes),
            "before": {k: before[k] for k in ("answer_ppl", "bleu", "score")}, "runs": {}}


# ============================================================================ command line


def add_arguments(p) -> None:
    """The options of ``adalomo experiment finetune``."""
    g = p.add_argument_group("base model")
    g.add_argument("--base", default=None, help="a base saved by an earlier run (OUT/base) or a transformers "
                   "model directory (save_pretrained: GPT-2, LLaMA, ...; its tokenizer if it has one)")
    g.add_argument("--pretrain-steps", type=int, default=None,
                   help="pretrain a gpt-lm base first (AdamW), on WikiText-2 with --data-dir, else on the "
                   "embedded docs; saved to OUT/base")
    g.add_argument("--size", default="tiny", help="pretrained gpt-lm size: " + ", ".join(GPT_PRESETS)
                   + " (default: %(default)s)")
    for flag in ("--dim", "--n-layers", "--n-heads", "--ffn-dim"):
        g.add_argument(flag, type=int, default=None, help="overrides --size")
    g.add_argument("--vocab-size", type=int, default=None, help="embedding rows, at least the vocabulary")
    g = p.add_argument_group("fine-tuning")
    g.add_argument("--task", default="domain,sft", help="domain (further pre-training on a new corpus), sft "
                   "(prompt -> answer pairs, loss on the answer) or both (default: %(default)s)")
    g.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS, help="comma-separated, from: "
                   + ", ".join(OPTIMIZERS) + "; NAME@LR sets one's lr (default: %(default)s)")
    g.add_argument("--lr", default=None, help="'adalomo=1e-3,adamw=5e-5' or one number for all (defaults: "
                   "docs/experiments.md, fine-tuning)")
    g.add_argument("--lr-sweep", type=int, nargs="?", const=5, default=None, metavar="N",
                   help="also run N lrs (default 5) a half-decade (x3.16) apart around each optimizer's lr")
    g.add_argument("--max-steps", type=int, default=200, help="fine-tuning steps per run (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=16, help="domain: windows of --seq-len tokens per step "
                   "(default: %(default)s)")
    g.add_argument("--sft-batch-size", type=int, default=64, help="sft: pairs per step (default: %(default)s)")
    g.add_argument("--pretrain-batch-size", type=int, default=None, help="pretraining: windows of --seq-len "
                   "tokens per step (default: --batch-size)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per window; the longest pair (default: "
                   "%(default)s)")
    g.add_argument("--warmup-steps", type=int, default=None, help="default: 5%% of the steps")
    g.add_argument("--budget-minutes", type=float, default=None, help="stop starting runs that would end after "
                   "this (defaults first, then the sweep outwards; pretraining gets at most 40%%)")
    g = p.add_argument_group("data")
    g.add_argument("--data-dir", default=None, help="with wikitext-2/ and eng-fra/ (default: $ADALOMO_DATA_DIR; "
                   "without either, the embedded docs and word-reversal pairs)")
    g.add_argument("--target-corpus", default="auto", help="domain task: embedded (the Python docs; the default "
                   "after WikiText-2), tinyshakespeare, embedded-library (the default without a data directory)")
    g.add_argument("--data-limit", type=int, default=None, help="first N train lines / pairs: smoke tests")
    g.add_argument("--max-len", type=int, default=10, help="sft: at most N words per side (default: 10)")
    g.add_argument("--test-batches", type=int, default=None, help="domain: evaluate the first N test batches")
    g.add_argument("--eval-pairs", type=int, default=500, help="sft: held-out pairs for the answer loss and "
                   "BLEU (default: %(default)s)")
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "bf16-autocast"))
    g.add_argument("--gradient-checkpointing", action="store_true")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default on CPU: 1)")
    g.add_argument("--out", default=None, help="output directory (default: runs/finetune)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
