"""Corpora for the experiments: WikiText-2 (word level), eng-fra sentence pairs, and an embedded fallback.

Layout of a data directory (``--data-dir`` or ``$ADALOMO_DATA_DIR``)::

    DIR/wikitext-2/{train,valid,test}.txt     # tokenized WikiText-2 v1 (with <unk>), one paragraph a line
    DIR/eng-fra/eng-fra.txt                   # "English<TAB>French" a line (manythings.org/anki, Tatoeba)
    DIR/tinyshakespeare/input.txt             # optional, used by --corpus tinyshakespeare

When no data directory is given, the experiments fall back to an *embedded* corpus that every Python
install has: the English text of the Python reference documentation shipped in ``pydoc_data.topics``
(~465k characters, ~100k word tokens). It needs no network and no files.
"""

from __future__ import annotations

import collections
import os
import random
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch

DATA_ENV = "ADALOMO_DATA_DIR"
WIKITEXT_HINT = (
    "for WikiText-2 pass --data-dir DIR (or set ADALOMO_DATA_DIR) with DIR/wikitext-2/{train,valid,test}.txt "
    "(the tokenized v1 files used by pytorch/examples word_language_model)"
)
ENGFRA_HINT = (
    "for real English->French pairs pass --data-dir DIR (or set ADALOMO_DATA_DIR) with DIR/eng-fra/eng-fra.txt "
    "('English<TAB>French' lines, e.g. fra.txt from manythings.org/anki)"
)


class ExperimentError(Exception):
    """A user-facing problem (bad argument, missing directory or file): the CLI prints it as one line."""


DataError = ExperimentError


# ----------------------------------------------------------------------------- data-dir resolution


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``--data-dir`` wins, then ``$ADALOMO_DATA_DIR``; None means "use the embedded corpus".

    A directory that is given but does not exist is an error (never a silent fallback).
    """
    source = "--data-dir"
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get(DATA_ENV) or None
        source = f"${DATA_ENV}"
    if data_dir is None:
        return None
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {str(path)!r} (from {source}) does not exist or is not a directory")
    return path


def _need(path: Path, hint: str) -> Path:
    if not path.is_file():
        raise DataError(f"missing data file {str(path)!r}; {hint}")
    return path


# ----------------------------------------------------------------------------- word-level LM corpora


class Vocab:
    """Word <-> id mapping. ``<unk>`` is always present."""

    def __init__(self, words=(), specials=("<unk>",)):
        self.itos: list[str] = []
        self.stoi: dict[str, int] = {}
        for w in (*specials, *words):
            self.add(w)

    def add(self, w: str) -> int:
        if w not in self.stoi:
            self.stoi[w] = len(self.itos)
            self.itos.append(w)
        return self.stoi[w]

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, words) -> list[int]:
        unk = self.stoi["<unk>"]
        return [self.stoi.get(w, unk) for w in words]

    def decode(self, ids) -> list[str]:
        return [self.itos[i] for i in ids]


@dataclass
class LMCorpus:
    """A word-level corpus as three 1-D LongTensors of token ids (``<eos>`` ends every line)."""

    name: str
    description: str
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "vocab_size": len(self.vocab),
            "train_tokens": int(self.train.numel()),
            "valid_tokens": int(self.valid.numel()),
            "test_tokens": int(self.test.numel()),
            "notes": list(self.notes),
        }


def _lines_to_words(lines):
    # exactly like pytorch/examples word_language_model: every line (empty ones too) ends with <eos>
    return [line.split() + ["<eos>"] for line in lines]


@dataclass
class WordLines:
    """A word-level corpus before it has a vocabulary: lines of words, each ending with ``<eos>``.
    ``min_freq``: the count below which :func:`build_lm` maps a training word to ``<unk>``."""

    name: str
    description: str
    train: list[list[str]]
    valid: list[list[str]]
    test: list[list[str]]
    notes: list[str] = field(default_factory=list)
    min_freq: int = 1


def build_lm(lines: WordLines, max_vocab: int | None = None) -> LMCorpus:
    """Vocabulary from the training lines (most frequent first), then the three splits as token ids."""
    counts = collections.Counter(w for line in lines.train for w in line)
    words = [w for w, c in counts.most_common() if c >= lines.min_freq and w != "<unk>"]
    if max_vocab is not None:
        words = words[: max(0, max_vocab - 2)]
    vocab = Vocab(["<eos>", *words])

    def enc(split):
        return torch.tensor([i for line in split for i in vocab.encode(line)], dtype=torch.long)

    return LMCorpus(lines.name, lines.description, vocab, enc(lines.train), enc(lines.valid), enc(lines.test),
                    list(lines.notes))


def _read_lines(path: Path, limit: int | None) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return lines[:limit] if limit else lines


def wikitext2_lines(data_dir: Path, limit: int | None = None) -> WordLines:
    """WikiText-2 exactly as pytorch/examples word_language_model reads it (split on spaces, ``<eos>``
    appended to each line). ``limit`` keeps the first N lines of train and N//10 of valid/test."""
    root = data_dir / "wikitext-2"
    files = {s: _need(root / f"{s}.txt", WIKITEXT_HINT) for s in ("train", "valid", "test")}
    small = max(1, limit // 10) if limit else None
    train = _lines_to_words(_read_lines(files["train"], limit))
    valid = _lines_to_words(_read_lines(files["valid"], small))
    test = _lines_to_words(_read_lines(files["test"], small))
    notes = [f"data-limit {limit}: first {limit} train lines, {small} valid/test lines"] if limit else []
    return WordLines("wikitext-2", f"WikiText-2 (word level) from {root}", train, valid, test, notes)


def load_wikitext2(data_dir: Path, limit: int | None = None, max_vocab: int | None = None) -> LMCorpus:
    """WikiText-2 as ids; the vocabulary comes from the training split (33,278 types with ``<eos>``, which
    covers valid and test)."""
    return build_lm(wikitext2_lines(data_dir, limit), max_vocab)


_WORD_RE = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+|[^\sA-Za-z\d]")


def simple_tokenize(line: str) -> list[str]:
    """Lowercased words, numbers and single punctuation marks (WikiText-like splitting)."""
    return _WORD_RE.findall(line.lower())


# The pydoc topics that come from the Library Reference's built-in types chapter (library/stdtypes.rst,
# library/string.rst); every other topic comes from the Language Reference. The two halves give an offline
# pair of (mildly) different domains for the fine-tuning experiment.
_LIBRARY_TOPICS = ("types", "bltin-", "string-methods", "formatstrings", "specialattrs")
EMBEDDED_PARTS = {None: "", "language": " (Language Reference topics)", "library": " (Library Reference topics)"}


def embedded_text_lines(part: str | None = None) -> list[str]:
    """The English text of the Python documentation topics bundled with CPython (``pydoc_data.topics``);
    ``part``: ``"language"`` or ``"library"`` keeps only the topics of that reference (None: all)."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - stripped-down Python builds
        raise DataError("the embedded corpus needs the standard library module pydoc_data, which is missing; "
                        + WIKITEXT_HINT) from e
    lines = []
    for key in sorted(topics):
        if part is not None and key.startswith(_LIBRARY_TOPICS) != (part == "library"):
            continue
        for line in topics[key].splitlines():
            line = line.strip()
            if line and not set(line) <= set("*=-~^\"'"):  # drop reST underlines
                lines.append(line)
    return lines


def _split_90_5_5(name, description, lines, limit, min_freq, notes=()) -> WordLines:
    """Tokenized lines (``<eos>`` appended) in a contiguous 90/5/5 split; ``limit`` keeps the first N train
    lines and N//10 of valid and test."""
    lines = [x + ["<eos>"] for x in lines if x]
    n = len(lines)
    a, b = int(0.9 * n), int(0.95 * n)
    train, valid, test = lines[:a], lines[a:b], lines[b:]
    if limit:
        train, valid, test = train[:limit], valid[: max(1, limit // 10)], test[: max(1, limit // 10)]
    return WordLines(name, description, train, valid, test, list(notes), min_freq)


def embedded_lines(limit: int | None = None, part: str | None = None, min_freq: int = 2) -> WordLines:
    """pydoc_data.topics (or one ``part`` of it) as word lines: lowercased, contiguous 90/5/5 split of its
    lines (sorted by topic); words seen fewer than ``min_freq`` times in train become ``<unk>``."""
    name = "embedded-pydoc" + (f"-{part}" if part else "")
    description = ("EMBEDDED corpus: English text of the Python docs (pydoc_data.topics, standard library)"
                   + EMBEDDED_PARTS[part])
    notes = ["embedded corpus used because no data directory was given; " + WIKITEXT_HINT]
    return _split_90_5_5(name, description, [simple_tokenize(x) for x in embedded_text_lines(part)], limit,
                         min_freq, notes)


def load_embedded_lm(limit: int | None = None, min_freq: int = 2) -> LMCorpus:
    return build_lm(embedded_lines(limit, min_freq=min_freq))


def tinyshakespeare_lines(data_dir: Path, limit: int | None = None) -> WordLines:
    path = _need(data_dir / "tinyshakespeare" / "input.txt",
                 "pass --data-dir DIR with DIR/tinyshakespeare/input.txt")
    return _split_90_5_5("tinyshakespeare", f"Tiny Shakespeare (word level, lowercased) from {path}",
                         [simple_tokenize(x) for x in _read_lines(path, None)], limit, min_freq=2)


def load_tinyshakespeare(data_dir: Path, limit: int | None = None) -> LMCorpus:
    return build_lm(tinyshakespeare_lines(data_dir, limit))


def lm_lines(corpus: str, data_dir: Path | None, limit: int | None = None) -> WordLines:
    """``corpus``: auto (WikiText-2 if a data dir is given, else embedded), wikitext-2, tinyshakespeare,
    embedded, embedded-language, embedded-library (the two halves of the embedded docs)."""
    if corpus == "auto":
        corpus = "wikitext-2" if data_dir is not None else "embedded"
    if corpus.startswith("embedded") and corpus.partition("-")[2] in ("", "language", "library"):
        return embedded_lines(limit, corpus.partition("-")[2] or None)
    if data_dir is None:
        raise DataError(f"--corpus {corpus} needs a data directory; pass --data-dir DIR or set {DATA_ENV}")
    if corpus == "wikitext-2":
        return wikitext2_lines(data_dir, limit)
    if corpus == "tinyshakespeare":
        return tinyshakespeare_lines(data_dir, limit)
    raise DataError(f"unknown corpus {corpus!r} for a language-model task (auto, wikitext-2, tinyshakespeare, "
                    "embedded)")


def load_lm_corpus(corpus: str, data_dir: Path | None, limit: int | None = None,
                   max_vocab: int | None = None) -> LMCorpus:
    """:func:`lm_lines` as token ids, with the vocabulary of its training split."""
    return build_lm(lm_lines(corpus, data_dir, limit), max_vocab)


# ----------------------------------------------------------------------------- translation pairs

PAD, SOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<sos>", "<eos>", "<unk>")
_NBSP = {0x00A0: " ", 0x202F: " ", 0x2009: " ", 0x2007: " ", 0x200B: ""}


def strip_accents(s: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFD", s) if unicodedata.category(c) != "Mn")


def normalize_sentence(s: str, accents: bool = False) -> str:
    """The PyTorch seq2seq tutorial's normalisation: lowercase, (optionally) strip accents, split off
    ``.!?``, replace everything that is not a letter or ``.!?`` by a space. French non-breaking spaces
    (U+00A0, U+202F, thin spaces) become plain spaces first."""
    s = s.translate(_NBSP).lower().strip()
    if not accents:
        s = strip_accents(s)
        s = re.sub(r"([.!?])", r" \1", s)
        s = re.sub(r"[^a-z.!?]+", " ", s)
    else:
        s = unicodedata.normalize("NFC", s)
        s = re.sub(r"([.!?])", r" \1", s)
        s = re.sub(r"[^\w.!?]+|[\d_]+", " ", s)
    return " ".join(s.split())


@dataclass
class PairCorpus:
    """Sentence pairs split into train/valid/test, with source and target vocabularies."""

    name: str
    description: str
    src_vocab: Vocab
    tgt_vocab: Vocab
    train: list[tuple[str, str]]
    valid: list[tuple[str, str]]
    test: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)

    def info(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "src_vocab_size": len(self.src_vocab),
            "tgt_vocab_size": len(self.tgt_vocab),
            "train_pairs": len(self.train),
            "valid_pairs": len(self.valid),
            "test_pairs": len(self.test),
            "train_tgt_tokens": sum(len(t.split()) + 1 for _, t in self.train),
            "notes": list(self.notes),
        }


def _split_pairs(pairs, seed, valid_frac=0.05, test_frac=0.05):
    """Split by *source sentence* (all translations of one English sentence land in the same split), so test
    sources are never seen in training. The split depends only on ``seed``."""
    groups: dict[str, list] = collections.defaultdict(list)
    for p in pairs:
        groups[p[0]].append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    n = len(keys)
    nv, nt = int(valid_frac * n), int(test_frac * n)
    test_k, valid_k, train_k = keys[:nt], keys[nt: nt + nv], keys[nt + nv:]

    def flat(ks):
        return [p for k in ks for p in groups[k]]

    train = flat(train_k)
    random.Random(seed + 1).shuffle(train)
    return train, flat(valid_k), flat(test_k)


def _pair_vocabs(train, min_freq):
    def vocab(side):
        counts = collections.Counter(w for p in train for w in p[side].split())
        return Vocab([w for w, c in counts.most_common() if c >= min_freq], specials=SPECIALS)

    return vocab(0), vocab(1)


def _finish_pairs(name, desc, pairs, seed, limit, min_freq, notes):
    if not pairs:
        raise DataError(f"no sentence pairs left in {name} after filtering; relax --max-len")
    train, valid, test = _split_pairs(pairs, seed)
    if limit:
        train, valid, test = train[:limit], valid[: max(1, limit // 10)], test[: max(1, limit // 10)]
        notes = [*notes, f"data-limit {limit}: {len(train)} train pairs, {len(valid)} valid, {len(test)} test"]
    src_v, tgt_v = _pair_vocabs(train, min_freq)
    return PairCorpus(name, desc, src_v, tgt_v, train, valid, test, list(notes))


def load_eng_fra(data_dir: Path, max_len: int = 10, seed: int = 0, limit: int | None = None,
                 accents: bool = False, min_freq: int = 2) -> PairCorpus:
    """English -> French pairs from ``eng-fra.txt``; both sides at most ``max_len`` words after
    normalisation; 90/5/5 train/valid/test split by English sentence, fixed by ``seed``."""
    path = _need(data_dir / "eng-fra" / "eng-fra.txt", ENGFRA_HINT)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if limit:  # smoke tests: normalise only a seeded sample of the file (more than the limit needs)
        lines = random.Random(seed).sample(lines, min(len(lines), 3 * limit))
    pairs = []
    for line in lines:
        cols = line.split("\t")
        if len(cols) < 2:
            continue
        en, fr = normalize_sentence(cols[0], accents), normalize_sentence(cols[1], accents)
        if en and fr and len(en.split()) <= max_len and len(fr.split()) <= max_len:
            pairs.append((en, fr))
    desc = (f"eng-fra English->French from {path} (tutorial normalisation, "
            f"{'accents kept' if accents else 'accents stripped'}, <= {max_len} words per side)")
    return _finish_pairs("eng-fra", desc, pairs, seed, limit, min_freq, [])


def load_embedded_pairs(max_len: int = 10, seed: int = 0, limit: int | None = None,
                        min_freq: int = 1) -> PairCorpus:
    """Offline stand-in for a translation corpus: consecutive word windows (3..max_len words) of the Python
    docs (``pydoc_data.topics``) paired with the same words in REVERSED order. A synthetic task that still
    needs attention to solve; it is not translation."""
    words = [w for line in embedded_text_lines() for w in simple_tokenize(line) if re.fullmatch(r"[a-z]+", w)]
    rng = random.Random(1234)  # window lengths are fixed; the split below depends on ``seed``
    pairs, i = set(), 0
    while i < len(words):
        n = rng.randint(3, max(3, max_len))
        win = words[i: i + n]
        i += n
        if len(win) >= 3:
            pairs.add((" ".join(win), " ".join(reversed(win))))
    desc = ("EMBEDDED synthetic pairs: word windows of the Python docs (pydoc_data.topics) -> the same words "
            "reversed; NOT a translation task")
    notes = ["embedded corpus used because no data directory was given; " + ENGFRA_HINT]
    return _finish_pairs("embedded-pydoc-reverse", desc, sorted(pairs), seed, limit, min_freq, notes)


def load_pair_corpus(corpus: str, data_dir: Path | None, max_len: int = 10, seed: int = 0,
                     limit: int | None = None, accents: bool = False) -> PairCorpus:
    if corpus == "auto":
        corpus = "eng-fra" if data_dir is not None else "embedded"
    if corpus == "embedded":
        return load_embedded_pairs(max_len, seed, limit)
    if corpus == "eng-fra":
        if data_dir is None:
            raise DataError(f"--corpus eng-fra needs a data directory; pass --data-dir DIR or set {DATA_ENV}")
        return load_eng_fra(data_dir, max_len, seed, limit, accents)
    raise DataError(f"unknown corpus {corpus!r} for seq2seq (auto, eng-fra, embedded)")
