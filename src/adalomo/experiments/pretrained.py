"""Base models for fine-tuning: our ``gpt-lm`` saved as safetensors + JSON, or a ``transformers`` directory.

A saved base of ours is a directory::

    config.json          {"format": "adalomo-gpt-lm", "format_version": 1, "model": GPTConfig, "pretraining": {...}}
    model.safetensors    the weights (tied embeddings stored once)
    vocab.json           the word vocabulary, id order

A ``transformers`` directory (``save_pretrained``, e.g. a GPT-2 or LLaMA checkpoint already on disk) is loaded
with ``AutoModelForCausalLM.from_pretrained`` and its own tokenizer when the directory has one. Without one,
the texts are mapped to ids with our word tokenizer built from the fine-tuning data: the model then runs and
trains, but its embedding rows do not mean those words (the report says so).

Every fine-tuning run starts from a copy of the same loaded weights (:meth:`Base.new_model`).
"""

from __future__ import annotations

import collections
import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from .data import ExperimentError, Vocab
from .models import GPT, GPTConfig, count_params

FORMAT = "adalomo-gpt-lm"
FORMAT_VERSION = 1
CONFIG, WEIGHTS, VOCAB = "config.json", "model.safetensors", "vocab.json"
# files by which save_pretrained / the Hub store a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
BASE_HINT = ("give --base DIR: a directory written by `adalomo experiment finetune --pretrain-steps N` (its "
             "OUT/base) or by transformers' save_pretrained")


class WordTokenizer:
    """Whitespace-separated words -> ids of a fixed vocabulary (unknown words -> ``<unk>``), the tokenizer
    ``gpt-lm`` is trained with. ``<sep>`` ends an instruction prompt, ``<eos>`` a line or an answer."""

    kind = "word"
    SPECIALS = ("<unk>", "<eos>", "<sep>")

    def __init__(self, words: list[str]):
        if list(words[: len(self.SPECIALS)]) != list(self.SPECIALS):
            raise ExperimentError(f"a word vocabulary must start with {', '.join(self.SPECIALS)}")
        self.vocab = Vocab(words, specials=())
        self.eos_id, self.sep_id = self.vocab.stoi["<eos>"], self.vocab.stoi["<sep>"]
        self.pad_id = self.eos_id

    @classmethod
    def build(cls, texts, min_freq: int = 2, max_size: int | None = None) -> WordTokenizer:
        """The words seen at least ``min_freq`` times in ``texts`` (lists of words), most frequent first,
        at most ``max_size`` ids in all."""
        counts = collections.Counter(w for words in texts for w in words)
        words = [w for w, c in counts.most_common() if c >= min_freq and w not in cls.SPECIALS]
        if max_size is not None:
            words = words[: max(0, max_size - len(cls.SPECIALS))]
        return cls([*cls.SPECIALS, *words])

    def __len__(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(text.split())

    def encode_lines(self, texts: list[str]) -> torch.Tensor:
        """One token stream: every line followed by ``<eos>``."""
        return torch.tensor([i for t in texts for i in (*self.encode(t), self.eos_id)], dtype=torch.long)

    def prompt_ids(self, source: str) -> list[int]:
        return [*self.encode(source), self.sep_id]

    def answer_ids(self, target: str) -> list[int]:
        return [*self.encode(target), self.eos_id]

    def decode(self, ids) -> str:
        return " ".join(self.vocab.decode(ids))

    def info(self) -> dict:
        return {"type": "word", "size": len(self)}

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps({"type": "word", "words": self.vocab.itos}, ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> WordTokenizer:
        try:
            data = json.loads(Path(path).read_text())
            return cls(list(data["words"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExperimentError(f"cannot read the word vocabulary {str(path)!r}: {e}") from None


class HFTokenizer:
    """A ``transformers`` tokenizer behind :class:`WordTokenizer`'s interface. A prompt gets the tokenizer's
    own special tokens (LLaMA's BOS) and ends with ``" =>"``; an answer ends with its EOS token."""

    kind = "transformers"

    def __init__(self, tok):
        if tok.eos_token_id is None:
            raise ExperimentError("the model's tokenizer has no EOS token: answers and lines could not end; "
                                  "set eos_token in its tokenizer_config.json")
        self.tok = tok
        self.eos_id = tok.eos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_lines(self, texts: list[str]) -> torch.Tensor:
        ids = self.tok(list(texts), add_special_tokens=False)["input_ids"] if texts else []
        return torch.tensor([i for row in ids for i in (*row, self.eos_id)], dtype=torch.long)

    def prompt_ids(self, source: str) -> list[int]:
        return self.tok(f"{source} =>", add_special_tokens=True)["input_ids"]

    def answer_ids(self, target: str) -> list[int]:
        return [*self.encode(f" {target}"), self.eos_id]

    def decode(self, ids) -> str:
        return " ".join(self.tok.decode(ids, skip_special_tokens=True).split())

    def info(self) -> dict:
        return {"type": "transformers", "class": type(self.tok).__name__, "size": len(self)}


@dataclass
class Base:
    """A loaded base model: the pristine weights (on the CPU), their tokenizer and how to call the model."""

    model: nn.Module
    tokenizer: WordTokenizer | HFTokenizer
    format: str  # FORMAT or "transformers"
    path: str
    max_seq: int | None
    info: dict
    pretraining: dict | None = None
    notes: list[str] = field(default_factory=list)

    def new_model(self, dtype: torch.dtype | None = None, gradient_checkpointing: bool = False) -> nn.Module:
        """A fresh copy of the base weights, cast to ``dtype`` (kept as loaded when None)."""
        model = copy.deepcopy(self.model)
        if dtype is not None:
            model = model.to(dtype=dtype)
        if gradient_checkpointing:
            if self.format == FORMAT:
                model.cfg.gradient_checkpointing = True
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def logits(self, model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        if self.format == FORMAT:
            return model(idx)
        return model(input_ids=idx).logits


# ---------------------------------------------------------------------------- ours


def save_base(model: GPT, tokenizer: WordTokenizer, path, pretraining: dict | None = None) -> Path:
    """Write a ``gpt-lm`` model (safetensors, any dtype), its config and vocabulary to the directory ``path``."""
    from safetensors.torch import save_model

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {k: v for k, v in model.cfg.to_dict().items() if k != "gradient_checkpointing"}
    save_model(model, str(path / WEIGHTS))  # stores tied tensors once
    tokenizer.save(path / VOCAB)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": cfg, "tokenizer": VOCAB,
            "pretraining": pretraining or {}}
    (path / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
    return path


def _load_ours(path: Path, meta: dict) -> Base:
    from safetensors.torch import load_model

    if meta.get("format_version") != FORMAT_VERSION:
        raise ExperimentError(f"{str(path)!r} is an {FORMAT} of format version {meta.get('format_version')!r}; "
                              f"this adalomo reads version {FORMAT_VERSION}")
    for name in (WEIGHTS, VOCAB):
        if not (path / name).is_file():
            raise ExperimentError(f"the base model {str(path)!r} lacks {name}; {BASE_HINT}")
    try:
        gcfg = GPTConfig(**meta["model"])
    except TypeError as e:
        raise ExperimentError(f"{str(path / CONFIG)!r} has an invalid model config: {e}") from None
    model = GPT(gcfg)
    try:
        load_model(model, str(path / WEIGHTS))
    except (RuntimeError, OSError) as e:
        msg = " ".join(str(e).split())[:300]
        raise ExperimentError(f"{str(path / WEIGHTS)!r} does not hold this config's model: {msg}") from None
    tokenizer = WordTokenizer.load(path / VOCAB)
    if len(tokenizer) > gcfg.vocab_size:
        raise ExperimentError(f"{str(path)!r}: the vocabulary has {len(tokenizer)} words but the model embeds "
                              f"{gcfg.vocab_size}")
    info = {"type": "GPT (adalomo gpt-lm)", **meta["model"], "n_params": count_params(model),
            "non_embedding_params": model.num_params(non_embedding=True)}
    return Base(model, tokenizer, FORMAT, str(path), gcfg.max_seq, info, meta.get("pretraining") or None)


# ---------------------------------------------------------------------------- transformers


def _load_transformers(path: Path, meta: dict, fallback_texts) -> Base:
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise ExperimentError(f"{str(path)!r} is a transformers model directory; loading it needs "
                              'transformers: pip install "adalomo[hf]"') from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        msg = " ".join(str(e).split())[:300]
        raise ExperimentError(f"cannot load {str(path)!r} with AutoModelForCausalLM: {msg}") from None
    model.config.use_cache = False  # training and our greedy decoding re-run the whole prefix
    vocab_size = model.get_input_embeddings().weight.shape[0]
    notes = []
    if any((path / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(path)))
        except (OSError, ValueError, KeyError, TypeError) as e:
            msg = " ".join(str(e).split())[:300]
            raise ExperimentError(f"cannot load the tokenizer in {str(path)!r}: {msg}") from None
    else:
        tokenizer = WordTokenizer.build(fallback_texts(), max_size=vocab_size)
        notes.append(f"{path} has no tokenizer: texts are mapped to ids by a word vocabulary of the fine-tuning "
                     f"data ({len(tokenizer)} words), so the pretrained embedding rows do not mean these words")
    if len(tokenizer) > vocab_size:
        raise ExperimentError(f"the tokenizer in {str(path)!r} has {len(tokenizer)} tokens but the model embeds "
                              f"{vocab_size}")
    cfg = model.config
    max_seq = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    info = {"type": f"transformers {type(model).__name__}", "model_type": meta.get("model_type"),
            "vocab_size": vocab_size, "max_positions": max_seq, "dtype": str(next(model.parameters()).dtype),
            "n_params": count_params(model)}
    return Base(model, tokenizer, "transformers", str(path), max_seq, info, None, notes)


# ---------------------------------------------------------------------------- either


def load_base(path, fallback_texts=lambda: []) -> Base:
    """Load ``path``: a base saved by :func:`save_base`, or a ``transformers`` model directory.
    ``fallback_texts()`` (lists of words) builds a word tokenizer for a transformers directory without one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ExperimentError(f"--base {str(path)!r} does not exist; {BASE_HINT}")
    if not path.is_dir():
        raise ExperimentError(f"--base {str(path)!r} is a file, not a model directory; {BASE_HINT}")
    if not (path / CONFIG).is_file():
        raise ExperimentError(f"--base {str(path)!r} has no {CONFIG}: neither a saved base model nor a "
                              f"transformers model directory; {BASE_HINT}")
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"{str(path / CONFIG)!r} is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ExperimentError(f"{str(path / CONFIG)!r} is not a model config (not a JSON object)")
    if meta.get("format") == FORMAT:
        return _load_ours(path, meta)
    if "model_type" in meta:
        return _load_transformers(path, meta, fallback_texts)
    raise ExperimentError(f"{str(path / CONFIG)!r} is neither an {FORMAT} config nor a transformers config "
                          f"(no 'model_type'); {BASE_HINT}")
