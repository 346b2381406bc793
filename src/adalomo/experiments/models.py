"""Models for the experiments: a word-level LSTM LM, a GRU encoder-decoder with attention, and a LLaMA-style
decoder (``GPT``).

``GPT`` is also used by the FSDP example and the GPU benchmarks, so this module imports only torch and builds
on the meta device::

    with torch.device("meta"):
        model = GPT(GPTConfig.preset("1b"))
    # ... shard / model.to_empty(device="cuda") ...
    model.init_weights()

It has no buffers (rotary tables are computed in ``forward`` in fp32), so ``to_empty`` + ``init_weights`` fully
initialises it and casting it to bf16 does not degrade the rotary angles.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# ============================================================================ LSTM language model


class LSTMLM(nn.Module):
    """The classic word-level LSTM LM (pytorch/examples word_language_model): embedding -> dropout ->
    n-layer LSTM -> dropout -> linear decoder, optionally tied to the embedding (needs emb_dim == hidden_dim).

    ``adaptive_cutoffs`` (e.g. ``(2000, 10000)``) replaces the full softmax by an adaptive softmax
    (Grave et al., 2017; ``nn.AdaptiveLogSoftmaxWithLoss``): an exact, normalised distribution that is ~5x
    cheaper for a 33k vocabulary, which is what makes full WikiText-2 feasible on a CPU. It cannot be tied.
    """

    def __init__(self, vocab_size: int, emb_dim: int = 200, hidden_dim: int = 200, n_layers: int = 2,
                 dropout: float = 0.2, tie_weights: bool = True, adaptive_cutoffs=None):
        super().__init__()
        if tie_weights and emb_dim != hidden_dim:
            raise ValueError("tied weights need emb_dim == hidden_dim")
        if tie_weights and adaptive_cutoffs:
            raise ValueError("an adaptive softmax cannot be tied to the embedding")
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(vocab_size, emb_dim)
        self.rnn = nn.LSTM(emb_dim, hidden_dim, n_layers, dropout=dropout if n_layers > 1 else 0.0,
                           batch_first=True)
        self.n_layers, self.hidden_dim, self.vocab_size = n_layers, hidden_dim, vocab_size
        initrange = 0.1
        nn.init.uniform_(self.encoder.weight, -initrange, initrange)
        if adaptive_cutoffs:
            self.decoder = None
            self.adaptive = nn.AdaptiveLogSoftmaxWithLoss(hidden_dim, vocab_size, list(adaptive_cutoffs),
                                                          div_value=4.0)
        else:
            self.adaptive = None
            self.decoder = nn.Linear(hidden_dim, vocab_size)
            nn.init.zeros_(self.decoder.bias)
            if tie_weights:
                self.decoder.weight = self.encoder.weight
            else:
                nn.init.uniform_(self.decoder.weight, -initrange, initrange)

    def forward(self, x, hidden=None, targets=None):
        """x: (B, T) token ids -> (logits (B, T, V), hidden); with ``targets``: (mean cross-entropy, hidden).
        An adaptive-softmax model needs ``targets`` (it never builds the full logits)."""
        emb = self.drop(self.encoder(x))
        out, hidden = self.rnn(emb, hidden)
        out = self.drop(out)
        if self.adaptive is not None:
            if targets is None:
                return self.adaptive.log_prob(out.reshape(-1, out.size(-1))).view(*x.shape, -1), hidden
            return self.adaptive(out.reshape(-1, out.size(-1)).float(), targets.reshape(-1)).loss, hidden
        logits = self.decoder(out)
        if targets is None:
            return logits, hidden
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1)), hidden


# ============================================================================ seq2seq with attention


class Seq2Seq(nn.Module):
    """GRU encoder-decoder with Luong (general) attention.

    Training is teacher-forced and runs the decoder GRU over the whole target at once; attention is applied
    to the decoder outputs (Luong et al., 2015), so one batch needs one GRU call per side. ``greedy`` decodes
    step by step with the same modules.
    """

    def __init__(self, src_vocab: int, tgt_vocab: int, dim: int = 256, n_layers: int = 1,
                 dropout: float = 0.1, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.src_emb = nn.Embedding(src_vocab, dim, padding_idx=pad_id)
        self.tgt_emb = nn.Embedding(tgt_vocab, dim, padding_idx=pad_id)
        rnn_drop = dropout if n_layers > 1 else 0.0
        self.encoder = nn.GRU(dim, dim, n_layers, batch_first=True, bidirectional=True, dropout=rnn_drop)
        self.bridge = nn.Linear(2 * dim, dim)  # bidirectional encoder states -> decoder size
        self.decoder = nn.GRU(dim, dim, n_layers, batch_first=True, dropout=rnn_drop)
        self.attn = nn.Linear(dim, dim, bias=False)
        self.combine = nn.Linear(2 * dim, dim)
        self.out = nn.Linear(dim, tgt_vocab)
        self.drop = nn.Dropout(dropout)
        self.n_layers, self.dim = n_layers, dim

    def encode(self, src, src_len):
        emb = self.drop(self.src_emb(src))
        packed = nn.utils.rnn.pack_padded_sequence(emb, src_len.cpu(), batch_first=True, enforce_sorted=False)
        out, h = self.encoder(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.size(1))
        mem = self.bridge(out)  # (B, S, D)
        h = h.view(self.n_layers, 2, h.size(1), self.dim).sum(1)  # sum directions -> (L, B, D)
        return mem, torch.tanh(h)

    def _attend(self, dec_out, mem, src_mask):
        scores = torch.bmm(self.attn(dec_out), mem.transpose(1, 2))  # (B, T, S)
        scores = scores.masked_fill(~src_mask[:, None, :], float("-inf"))
        ctx = torch.bmm(torch.softmax(scores.float(), -1).to(mem.dtype), mem)
        h = torch.tanh(self.combine(torch.cat([dec_out, ctx], -1)))
        return self.out(self.drop(h))

    def forward(self, src, src_len, tgt_in):
        """Teacher forcing: tgt_in = <sos> + target[:-1] -> logits (B, T, V_tgt)."""
        mem, h = self.encode(src, src_len)
        dec_out, _ = self.decoder(self.drop(self.tgt_emb(tgt_in)), h)
        return self._attend(dec_out, mem, src != self.pad_id)

    @torch.no_grad()
    def greedy(self, src, src_len, sos_id: int, eos_id: int, max_len: int = 20):
        mem, h = self.encode(src, src_len)
        mask = src != self.pad_id
        tok = torch.full((src.size(0), 1), sos_id, dtype=torch.long, device=src.device)
        out = []
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for _ in range(max_len):
            dec_out, h = self.decoder(self.tgt_emb(tok), h)
            tok = self._attend(dec_out, mem, mask).argmax(-1)
            out.append(tok)
            done |= tok.squeeze(1) == eos_id
            if bool(done.all()):
                break
        return torch.cat(out, 1)


# ============================================================================ LLaMA-style decoder


@dataclass
class GPTConfig:
    vocab_size: int = 32000
    dim: int = 768
    n_layers: int = 12
    n_heads: int = 12
    ffn_dim: int = 2048  # SwiGLU hidden size (LLaMA: ~8/3 * dim rounded)
    max_seq: int = 2048
    tie_embeddings: bool = False
    gradient_checkpointing: bool = False
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @staticmethod
    def preset(name: str, **overrides) -> GPTConfig:
        if name not in GPT_PRESETS:
            raise ValueError(f"unknown GPT size {name!r}; choose from {', '.join(GPT_PRESETS)}")
        return replace(GPT_PRESETS[name], **overrides)

    def to_dict(self) -> dict:
        return asdict(self)


# Parameter counts are for the preset vocabulary; the experiments replace vocab_size by the corpus vocabulary.
GPT_PRESETS: dict[str, GPTConfig] = {
    # ~0.6M params: seconds per step on a laptop CPU
    "tiny": GPTConfig(vocab_size=8192, dim=64, n_layers=2, n_heads=4, ffn_dim=176, max_seq=256,
                      tie_embeddings=True),
    # ~5.3M params (3.2M non-embedding); CPU-friendly
    "small": GPTConfig(vocab_size=8192, dim=256, n_layers=4, n_heads=4, ffn_dim=688, max_seq=512,
                       tie_embeddings=True),
    # GPT-2 small / Pythia-160M shape, LLaMA blocks: 134M (85M non-embedding)
    "125m": GPTConfig(vocab_size=32000, dim=768, n_layers=12, n_heads=12, ffn_dim=2048, max_seq=2048),
    # 374M (308M non-embedding)
    "350m": GPTConfig(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, ffn_dim=2816, max_seq=2048),
    # ~0.94B: LLaMA-style 1B (dim 2048, 16 layers, ffn 5504, vocab 32000, untied)
    "1b": GPTConfig(vocab_size=32000, dim=2048, n_layers=16, n_heads=16, ffn_dim=5504, max_seq=2048),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()  # (T, head_dim/2)


def apply_rotary(x, cos, sin):
    """x: (B, H, T, hd); rotate pairs (x[..., :hd/2], x[..., hd/2:]) (the HF LLaMA "rotate_half" layout)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.dim % cfg.n_heads:
            raise ValueError("dim must be divisible by n_heads")
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.dim // cfg.n_heads, cfg.dropout
        self.wq = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape

        def heads(t):
            return t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.wo(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # gate
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_dim, bias=False)  # up
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin):
        x = x + self.drop(self.attn(self.attn_norm(x), cos, sin))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class GPT(nn.Module):
    """LLaMA-style decoder: token embedding, pre-norm blocks (RMSNorm, rotary attention via
    ``F.scaled_dot_product_attention(is_causal=True)``, SwiGLU), final RMSNorm, LM head."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """HF-LLaMA-like init: every Linear/Embedding weight ~ N(0, init_std), norms = 1. Safe to call again
        after ``to_empty`` (it is a no-op on the meta device)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if not self.cfg.tie_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def forward(self, idx, targets=None):
        """idx: (B, T) -> logits (B, T, V); with targets also the mean cross-entropy (computed in fp32)."""
        T = idx.size(1)
        if T > self.cfg.max_seq:
            raise ValueError(f"sequence length {T} > max_seq {self.cfg.max_seq}")
        cos, sin = rotary_cos_sin(T, self.cfg.dim // self.cfg.n_heads, self.cfg.rope_theta, idx.device)
        x = self.tok_emb(idx)
        for layer in self.layers:
            if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss


def count_params(model: nn.Module) -> int:
    """Parameters counted once (tied weights are shared)."""
    return sum(p.numel() for p in model.parameters())


def gpt_param_count(name_or_cfg, vocab_size: int | None = None) -> int:
    """Parameter count of a preset without allocating it (built on the meta device)."""
    cfg = GPTConfig.preset(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
    if vocab_size is not None:
        cfg = replace(cfg, vocab_size=vocab_size)
    with torch.device("meta"):
        return GPT(cfg).num_params()


def _round_up(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)
