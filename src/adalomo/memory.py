"""Memory planner: GPU memory of full-parameter training per optimizer, from a model config.

Pure arithmetic: nothing is allocated, no model is built (an ``nn.Module`` on the meta device may be
given to count its exact parameter shapes). For a LLaMA-like or GPT-2 model given by a preset name, a
``transformers`` config (JSON file, dict or object) or a module, :func:`estimate` returns the bytes
of each component of one training step on one GPU:

``weights``
    every parameter in the parameter dtype (``--dtype``); divided by N under FSDP.
``grads``
    the gradient memory alive at the peak. Classic optimizers (step after backward) hold a full
    gradient set in the parameter dtype. Fused ones (``lomo``, ``adalomo``, ``adafactor-fused``,
    ``adapm-fused``: each parameter updated in backward, its gradient freed at once) hold the largest
    single gradient plus the update's fp32 transient (``4 * 4 * min(numel, 2**24)`` bytes: the
    library works on row blocks of at most 2**24 elements).
``state``
    the optimizer state, see :func:`optimizer_state_bytes`. With ``master_weights`` the classic
    optimizers also keep an fp32 copy of the weights (mixed precision, 16 bytes/param for AdamW).
``activations``
    what autograd saves in forward, plus the fp32 transients of the loss backward (see below).
``fsdp_buffers``
    with N > 1 GPUs (FSDP2, one unit per decoder layer): two unsharded units (the one in use and
    the prefetched one) plus one unsharded gradient unit before its reduce-scatter.

and ``peak``, the modelled peak (the ``total`` column of the CLI). It is *not* the plain sum
(``sum``, an upper bound): gradients appear while activations are freed, so the peak is the largest
of four moments: the start of backward (weights + state + all activations + the loss-backward
transients), after the LM head (its gradient has appeared, the loss tensors are gone), the end of
backward (weights + state + all gradients + the first layer's activations not yet freed) and the
optimizer step (weights + state + gradients + the step's own temporaries, e.g. torch's foreach
Adafactor makes gradient-sized temporaries).

Activations (``activation_model="hf"``, the default): what a Hugging Face ``LlamaForCausalLM`` /
``GPT2LMHeadModel`` saves for backward, counted tensor by tensor on an H100 (torch 2.11,
transformers 5.17; see docs/memory.md). Per token and per layer, with ``a`` the bytes of the
parameter dtype (2 for bf16), SDPA/flash attention (no s^2 term):

* LLaMA: ``2 * (4h + 2a h)`` for the two RMSNorms (an fp32 copy of the input, the normalised
  tensor and its product with the weight) ``+ 2a h_q + 2a h_kv`` (q, k, v after RoPE, attention
  output) ``+ 4 heads`` (fp32 log-sum-exp) ``+ 4a i`` (SwiGLU: gate, silu, up, product). In bf16 with
  h_q = h: ``20h + 4h_kv + 8i`` bytes.
* GPT-2: ``2 * 2a h`` (two LayerNorms, input and output) ``+ 5a h + a h`` (c_attn output kept by
  the v view, copies of q and k, attention output) ``+ 5a i`` (``gelu_new`` written in Python keeps
  its input, tanh, 1 + tanh, x/2 and the output) ``+ 2h`` (two dropout masks, when dropout > 0).
  In bf16 with i = 4h and dropout: ``62h`` bytes.
* eager (non-SDPA) attention adds per layer ``(4 + a) * heads * s`` bytes per token for LLaMA
  (fp32 softmax + probabilities), ``(a + (1 + a if dropout)) * heads * s`` for GPT-2.

``activation_model="korthikanti"`` uses instead Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models", eq. 1): ``s*b*h*(34 + 5*heads*s/h)`` bytes per layer in
16-bit (scaled by a/2), with the ``5*heads*s/h`` term dropped for SDPA/flash attention. It assumes a
GPT with a 4h MLP and a fused GeLU: for HF LLaMA it is 25% low (see docs/memory.md).

Both add, per token: the final norm (as one norm above), the fp32 log-softmax saved by the
cross-entropy (``4 V``) and, at the start of backward, its fp32 gradient transients (``8 V``): the
loss takes fp32 logits (``logits.float()``) as the HF loss and the benchmarks do. With full gradient
checkpointing each layer keeps only its input (``a h`` per token) and one layer is recomputed at a
time (its full activations counted once). Sequence length ``s`` and batch ``b`` are per GPU:
activations are not divided by FSDP.

Fits: ``peak + overhead`` against the memory a card reports (RTX 4090 24 GB: 24564 MiB, A100 40 GB:
40536 MiB, H100 80 GB: 81559 MiB, H200 141 GB: 143771 MiB); ``overhead`` (1 GiB by default) stands
for the CUDA context and the caching allocator's fragmentation, which the model does not count.

Command line: ``adalomo memory llama-7b --seq-len 2048 --batch 1 --gradient-checkpointing`` (or
``python -m adalomo.memory ...``), ``--config config.json`` for a HF config, ``--json`` for machine
output. Everything is in GiB (2**30 bytes) on output, bytes in the dict.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._cli_flags import DeprecatedAlias

__all__ = [
    "PRESETS",
    "OPTIMIZERS",
    "DEFAULT_OPTIMIZERS",
    "GPUS",
    "ModelSpec",
    "AdaPMRule",
    "default_adapm_policy",
    "model_spec",
    "model_shapes",
    "num_params",
    "optimizer_state_bytes",
    "activation_bytes",
    "estimate",
    "add_arguments",
    "run",
    "main",
]

GiB = 1 << 30
MiB = 1 << 20

#: Bytes per element of the parameter dtypes the planner knows.
DTYPE_BYTES = {"bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2, "fp32": 4, "float32": 4, "float": 4}

#: Cards for the "fits" columns: label -> memory.total as nvidia-smi reports it (bytes).
GPUS = {"24": 24564 * MiB, "40": 40536 * MiB, "80": 81559 * MiB, "141": 143771 * MiB}

#: The library's fused/blocked updates work on at most this many elements at a time in fp32
#: (``adalomo.functional.BLOCK_NUMEL``).
BLOCK_NUMEL = 1 << 24

#: Optimizers: name -> (fused backward?, description).
OPTIMIZERS: dict[str, tuple[bool, str]] = {
    "adamw": (False, "torch AdamW(fused=True): m, v in the param dtype (fp32 + fp32 master with --master-weights)"),
    "adamw-8bit": (False, "bitsandbytes AdamW8bit: 1+1 bytes/param + fp32 absmax per block; fp32 under 4096"),
    "sgd": (False, "SGD without momentum: no state (fp32 master with --master-weights)"),
    "adafactor": (False, "this library's Adafactor, classic: fp32 rows+cols, numel for 1-D (+ beta1 momentum)"),
    "adafactor-fused": (True, "this library's Adafactor in fused backward"),
    "adafactor-torch": (False, "torch.optim.Adafactor(foreach=True): rows+cols in the param dtype, "
                               "gradient-sized foreach temporaries at the step"),
    "lomo": (True, "LOMO: fused SGD, no state"),
    "adalomo": (True, "AdaLomo: fused, fp32 rows+cols (numel for 1-D), no momentum"),
    "adapm": (False, "AdaPM, classic: partial momentum per the policy + second moment"),
    "adapm-fused": (True, "AdaPM in fused backward"),
}

#: What the CLI prints unless ``--optimizers`` says otherwise.
DEFAULT_OPTIMIZERS = ("adamw", "adamw-8bit", "adafactor", "lomo", "adalomo", "adapm")


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelSpec:
    """The few numbers of a decoder-only LM that its parameter shapes and activations depend on."""

    arch: str  # "llama" (LLaMA, Mistral-like) or "gpt2"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int = 0  # 0 -> 4h for gpt2
    num_kv_heads: int = 0  # 0 -> num_heads
    head_dim: int = 0  # 0 -> hidden // heads
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 0  # gpt2's learned positions
    attention_bias: bool = False  # llama: q, k, v, o biases
    qkv_bias: bool = False  # qwen2: q, k, v biases only
    mlp_bias: bool = False
    activation: str = "silu"  # gpt2: gelu_new (python composite) or a fused one
    dropout: float = 0.0  # gpt2: resid/embd dropout (masks are saved)
    attn_dropout: float = 0.0
    name: str = field(default="", compare=False)

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def inter(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size


def _llama(name, vocab, hidden, inter, layers, heads, kv=0, tied=False, **kw) -> ModelSpec:
    return ModelSpec("llama", vocab, hidden, layers, heads, inter, kv, tie_word_embeddings=tied, name=name, **kw)


def _gpt2(name, hidden, layers, heads) -> ModelSpec:
    return ModelSpec("gpt2", 50257, hidden, layers, heads, 4 * hidden, tie_word_embeddings=True,
                     max_position_embeddings=1024, mlp_bias=True, attention_bias=True, activation="gelu_new",
                     dropout=0.1, attn_dropout=0.1, name=name)


#: Named models. ``llama-1b`` is the benchmarks' 0.94B config.
PRESETS: dict[str, ModelSpec] = {
    "llama-1b": _llama("llama-1b", 32000, 2048, 5504, 16, 16),
    "llama-7b": _llama("llama-7b", 32000, 4096, 11008, 32, 32),
    "llama-13b": _llama("llama-13b", 32000, 5120, 13824, 40, 40),
    "llama-30b": _llama("llama-30b", 32000, 6656, 17920, 60, 52),
    "llama-65b": _llama("llama-65b", 32000, 8192, 22016, 80, 64),
    "llama2-7b": _llama("llama2-7b", 32000, 4096, 11008, 32, 32),
    "llama2-13b": _llama("llama2-13b", 32000, 5120, 13824, 40, 40),
    "llama2-70b": _llama("llama2-70b", 32000, 8192, 28672, 80, 64, kv=8),
    "llama3-8b": _llama("llama3-8b", 128256, 4096, 14336, 32, 32, kv=8),
    "gpt2": _gpt2("gpt2", 768, 12, 12),
    "gpt2-medium": _gpt2("gpt2-medium", 1024, 24, 16),
    "gpt2-large": _gpt2("gpt2-large", 1280, 36, 20),
    "gpt2-xl": _gpt2("gpt2-xl", 1600, 48, 25),
}

_LLAMA_LIKE = {"llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "yi", "internlm2"}


def _spec_from_dict(cfg: dict[str, Any], name: str = "") -> ModelSpec:
    """A ModelSpec from a ``transformers`` config dict (LLaMA-like keys or GPT-2's n_embd/n_layer/...)."""
    if "text_config" in cfg and "hidden_size" not in cfg and "n_embd" not in cfg:
        raise ValueError("multimodal configs are not supported: pass the text model's config")
    mtype = str(cfg.get("model_type", "")).lower()
    try:
        if mtype == "gpt2" or ("n_embd" in cfg and "hidden_size" not in cfg):
            act = str(cfg.get("activation_function", "gelu_new"))
            return ModelSpec(
                "gpt2", int(cfg.get("vocab_size", 50257)), int(cfg["n_embd"]), int(cfg["n_layer"]),
                int(cfg["n_head"]), int(cfg.get("n_inner") or 4 * int(cfg["n_embd"])),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
                max_position_embeddings=int(cfg.get("n_positions", 1024)), attention_bias=True, mlp_bias=True,
                activation=act, dropout=float(cfg.get("resid_pdrop", 0.1) or 0.0),
                attn_dropout=float(cfg.get("attn_pdrop", 0.1) or 0.0), name=name)
        if mtype and mtype not in _LLAMA_LIKE:
            raise ValueError(f"model_type {mtype!r} is not supported (LLaMA-like models and GPT-2 are)")
        heads = int(cfg["num_attention_heads"])
        return ModelSpec(
            "llama", int(cfg["vocab_size"]), int(cfg["hidden_size"]), int(cfg["num_hidden_layers"]), heads,
            int(cfg["intermediate_size"]), int(cfg.get("num_key_value_heads") or heads),
            int(cfg.get("head_dim") or 0), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)), qkv_bias=mtype == "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)), name=name)
    except KeyError as e:
        raise ValueError(f"config has no {e.args[0]!r} (LLaMA-like or GPT-2 keys expected)") from None


def model_spec(model: Any) -> ModelSpec:
    """A :class:`ModelSpec` from a preset name, a JSON path, a config dict/object or an HF module."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str | os.PathLike):
        s = os.fspath(model)
        if s in PRESETS:
            return PRESETS[s]
        if s.endswith(".json") or os.sep in s or os.path.exists(s):
            path = os.path.join(s, "config.json") if os.path.isdir(s) else s
            try:
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
            except FileNotFoundError:
                raise ValueError(f"config file not found: {path}") from None
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read config {path}: {e}") from None
            if not isinstance(cfg, dict):
                raise ValueError(f"{path} is not a JSON object")
            return _spec_from_dict(cfg, name=os.path.basename(os.path.dirname(os.path.abspath(path))) or path)
        raise ValueError(f"unknown preset {s!r} (known: {', '.join(PRESETS)}), and no such config file")
    if isinstance(model, dict):
        return _spec_from_dict(model)
    cfg = getattr(model, "config", None)  # an HF model
    if cfg is not None and hasattr(cfg, "to_dict"):
        return _spec_from_dict(cfg.to_dict())
    if hasattr(model, "to_dict"):  # an HF config
        return _spec_from_dict(model.to_dict())
    raise TypeError(f"cannot make a model spec from {type(model).__name__}")


Shapes = list[tuple[str, tuple[int, ...]]]


def _spec_shapes(m: ModelSpec) -> Shapes:
    h, V, L = m.hidden_size, m.vocab_size, m.num_layers
    out: Shapes = []
    if m.arch == "gpt2":
        i = m.inter
        out += [("transformer.wte.weight", (V, h)), ("transformer.wpe.weight", (m.max_position_embeddings, h))]
        for k in range(L):
            p = f"transformer.h.{k}."
            out += [(p + "ln_1.weight", (h,)), (p + "ln_1.bias", (h,)),
                    (p + "attn.c_attn.weight", (h, 3 * h)), (p + "attn.c_attn.bias", (3 * h,)),
                    (p + "attn.c_proj.weight", (h, h)), (p + "attn.c_proj.bias", (h,)),
                    (p + "ln_2.weight", (h,)), (p + "ln_2.bias", (h,)),
                    (p + "mlp.c_fc.weight", (h, i)), (p + "mlp.c_fc.bias", (i,)),
                    (p + "mlp.c_proj.weight", (i, h)), (p + "mlp.c_proj.bias", (h,))]
        out += [("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,))]
        if not m.tie_word_embeddings:
            out.append(("lm_head.weight", (V, h)))
        return out
    if m.arch != "llama":
        raise ValueError(f"unknown arch {m.arch!r}")
    i, hq, hkv = m.inter, m.num_heads * m.hd, m.kv_heads * m.hd
    out.append(("model.embed_tokens.weight", (V, h)))
    qkv_bias = m.attention_bias or m.qkv_bias
    for k in range(L):
        p = f"model.layers.{k}."
        for proj, shape in (("q_proj", (hq, h)), ("k_proj", (hkv, h)), ("v_proj", (hkv, h))):
            out.append((p + f"self_attn.{proj}.weight", shape))
            if qkv_bias:
                out.append((p + f"self_attn.{proj}.bias", shape[:1]))
        out.append((p + "self_attn.o_proj.weight", (h, hq)))
        if m.attention_bias:
            out.append((p + "self_attn.o_proj.bias", (h,)))
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            out.append((p + f"mlp.{proj}.weight", shape))
            if m.mlp_bias:
                out.append((p + f"mlp.{proj}.bias", shape[:1]))
        out += [(p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out.append(("model.norm.weight", (h,)))
    if not m.tie_word_embeddings:
        out.append(("lm_head.weight", (V, h)))
    return out


def _is_shape_list(x: Any) -> bool:
    return isinstance(x, list | tuple) and all(
        isinstance(e, list | tuple) and len(e) == 2 and isinstance(e[0], str) for e in x)


def model_shapes(model: Any) -> Shapes:
    """``[(name, shape), ...]`` of every trainable parameter (tied weights once).

    ``model``: a preset name, a path to a HF ``config.json`` (or its folder), a config dict or
    object, a :class:`ModelSpec`, an ``nn.Module`` (its ``named_parameters()``; meta tensors are
    fine, nothing is allocated) or already such a list. Names follow ``transformers``.
    """
    if _is_shape_list(model):
        return [(str(n), tuple(int(d) for d in s)) for n, s in model]
    if hasattr(model, "named_parameters"):
        return [(n, tuple(p.shape)) for n, p in model.named_parameters() if p.requires_grad]
    return _spec_shapes(model_spec(model))


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def num_params(model: Any) -> int:
    return sum(_numel(s) for _, s in model_shapes(model))


# --------------------------------------------------------------------------------------------------
# Optimizer state
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdaPMRule:
    """AdaPM's treatment of one tensor.

    ``momentum``: 'full', 'low_rank', 'none', or a tuple of those for a tensor split into equal chunks
    along ``split_dim`` (GPT-2's fused ``c_attn``: Q, K low rank, V full); ``second_moment``: 'adam'
    (a full fp32 v), 'factored' (fp32 rows + cols) or None (the caller's ``adapm_second_moment``).
    """

    momentum: str | tuple[str, ...]
    second_moment: str | None = None
    split_dim: int = -1


class _Shape(tuple):
    """A shape that also answers like a tensor (``.shape``, ``.dim()``, ``.ndim``, ``.numel()``), so that
    policies written for tensors (``adalomo.optim.adapm.adapm_policy``) can be plugged in as they are."""

    @property
    def shape(self):
        return self

    @property
    def ndim(self) -> int:
        return len(self)

    def dim(self) -> int:
        return len(self)

    def numel(self) -> int:
        return math.prod(self)

    def size(self, d: int | None = None):
        return self if d is None else self[d]


_ADAPM_NONE = ("embed", "wte.", "wpe.", "lm_head", "o_proj", "attn.c_proj")
_ADAPM_LOW_RANK = ("q_proj", "k_proj", "gate_proj", "up_proj", "down_proj", "mlp.c_fc", "mlp.c_proj")


def default_adapm_policy(name: str, shape: Sequence[int]) -> AdaPMRule:
    """The default AdaPM momentum policy, as ``adalomo.optim.adapm.adapm_policy`` has it (LLaMA and GPT-2
    names).

    Embeddings, lm_head and the attention output (``o_proj``, GPT-2's ``attn.c_proj``): no momentum;
    ``q_proj``, ``k_proj`` and the MLP: low rank; ``v_proj``: full; GPT-2's fused ``c_attn`` split
    in three along its last dim (Q, K low rank, V full); any other matrix and every 0-D/1-D tensor
    (norms, biases): full. The second moment is left to ``adapm_second_moment``.
    """
    if len(shape) < 2:
        return AdaPMRule("full")
    n = "." + name.lower()
    if any(k in n for k in _ADAPM_NONE):
        return AdaPMRule("none")
    if "v_proj" in n:
        return AdaPMRule("full")
    if "c_attn." in n and shape[-1] % 3 == 0:
        return AdaPMRule(("low_rank", "low_rank", "full"), split_dim=-1)
    if any(k in n for k in _ADAPM_LOW_RANK) or "c_attn." in n:
        return AdaPMRule("low_rank")
    return AdaPMRule("full")


def _as_rule(x: Any) -> AdaPMRule:
    """An AdaPMRule from what a policy returned: an AdaPMRule, a kind string, or a split (``.kinds``,
    ``.dim``: ``adalomo.momentum.SplitMomentum``)."""
    if isinstance(x, AdaPMRule):
        return x
    if isinstance(x, str):
        return AdaPMRule(x)
    if hasattr(x, "kinds") and hasattr(x, "dim"):
        return AdaPMRule(tuple(x.kinds), split_dim=int(x.dim))
    raise ValueError(f"an AdaPM policy returned {x!r}: an AdaPMRule, 'full', 'low_rank' or 'none' expected")


def _adapm_momentum_numel(kind: str, shape: Sequence[int], rank: int | float) -> int:
    if kind == "none":
        return 0
    if kind == "full" or len(shape) < 2:  # low rank on a 1-D tensor falls back to full
        return _numel(shape)
    if kind == "low_rank":
        rows, cols = shape[0], _numel(shape[1:])  # the 2-D view of adalomo.momentum
        r = max(1, round(rank * min(rows, cols))) if isinstance(rank, float) else int(rank)
        r = max(1, min(r, rows, cols))
        return r * (rows + cols)  # basis P on the smaller side (x r) + momentum M (r x the other side)
    raise ValueError(f"AdaPM momentum {kind!r}: 'full', 'low_rank' or 'none'")


def _factored_numel(shape: Sequence[int]) -> int:
    """Elements of a factored second moment: rows (shape[:-1]) + cols (shape[:-2] + shape[-1:])."""
    if len(shape) < 2:
        return _numel(shape)
    return _numel(shape[:-1]) + _numel(shape[:-2]) * shape[-1]


def _tensor_state_bytes(name: str, shape: Sequence[int], optimizer: str, *, param_bytes: int,
                        master_weights: bool, adafactor_beta1: float | None, bnb_blocksize: int,
                        bnb_min_8bit_size: int, adapm_rank: int | float, adapm_policy: Callable[..., Any],
                        adapm_second_moment: str, adapm_momentum_bytes: int) -> int:
    n = _numel(shape)
    fused = OPTIMIZERS[optimizer][0]
    master = 4 * n if (master_weights and not fused) else 0
    if optimizer == "adamw":
        return master + 2 * n * (4 if master_weights else param_bytes)
    if optimizer == "adamw-8bit":
        if n < bnb_min_8bit_size:
            return master + 8 * n
        return master + 2 * (n + 4 * math.ceil(n / bnb_blocksize))
    if optimizer in ("sgd", "lomo"):
        return master
    if optimizer in ("adafactor", "adafactor-fused", "adalomo"):
        s = 4 * _factored_numel(shape)
        if adafactor_beta1 is not None and optimizer != "adalomo":
            s += param_bytes * n
        return master + s
    if optimizer == "adafactor-torch":
        return master + param_bytes * _factored_numel(shape)
    if optimizer in ("adapm", "adapm-fused"):
        rule = _as_rule(adapm_policy(name, _Shape(shape)))
        sm = rule.second_moment or adapm_second_moment
        if sm == "factored":
            v = 4 * _factored_numel(shape)
        elif sm == "adam":
            v = 4 * n
        else:
            raise ValueError(f"AdaPM second moment {sm!r}: 'adam' or 'factored'")
        if isinstance(rule.momentum, str):
            m = _adapm_momentum_numel(rule.momentum, shape, adapm_rank)
        elif len(shape) < 2:
            m = 0 if all(k == "none" for k in rule.momentum) else n
        else:
            d, k = rule.split_dim % len(shape), len(rule.momentum)
            if shape[d] % k:
                raise ValueError(f"{name}: cannot split dim {d} of {tuple(shape)} into {k} equal chunks")
            chunk = tuple(x // k if j == d else x for j, x in enumerate(shape))
            m = sum(_adapm_momentum_numel(kind, chunk, adapm_rank) for kind in rule.momentum)
        return master + v + adapm_momentum_bytes * m
    raise ValueError(f"unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")


def optimizer_state_bytes(shapes: Any, optimizer: str, *, dtype: str = "bf16", master_weights: bool = False,
                          adafactor_beta1: float | None = None, bnb_blocksize: int = 256,
                          bnb_min_8bit_size: int = 4096, adapm_rank: int | float = 64,
                          adapm_policy: Callable[..., Any] | None = None,
                          adapm_second_moment: str = "adam", adapm_momentum_bytes: int = 4,
                          per_tensor: bool = False) -> int | dict[str, int]:
    """Bytes of optimizer state for ``shapes`` (anything :func:`model_shapes` takes), unsharded.

    * ``adamw``: m and v in the parameter dtype (pure bf16 training, torch AdamW with bf16 params);
      with ``master_weights``: fp32 master + fp32 m, v = 12 bytes/param (16 with weights and grads).
    * ``adamw-8bit`` (bitsandbytes ``AdamW8bit``): 1 + 1 byte/param plus one fp32 absmax per block of
      ``bnb_blocksize`` elements for each state (bitsandbytes allocates 256-element blocks; the paper
      used 2048); tensors under ``bnb_min_8bit_size`` (4096) elements keep fp32 states (8 bytes).
    * ``adafactor`` / ``adafactor-fused`` / ``adalomo``: fp32 rows + cols per matrix (last two dims),
      a full fp32 copy for 1-D tensors; Adafactor with ``adafactor_beta1`` adds momentum in the
      parameter dtype. ``adafactor-torch``: the same in the parameter dtype (torch keeps it so).
    * ``lomo``, ``sgd``: nothing.
    * ``adapm`` / ``adapm-fused``: ``adapm_policy(name, shape) -> AdaPMRule`` (or a kind string, or a
      ``SplitMomentum``) per tensor, default :func:`default_adapm_policy`; ``shape`` also answers
      ``.dim()``/``.shape``, so ``adalomo.optim.adapm.adapm_policy`` plugs in as it is. Momentum
      (``adapm_momentum_bytes``, fp32): 'full' = numel, 'low_rank' = r * (rows + cols) with
      r = min(``adapm_rank``, rows, cols) (a float rank is a fraction of the smaller side), 'none' = 0;
      second moment (``adapm_second_moment`` unless the rule says): 'adam' = 4 * numel, 'factored' =
      4 * (rows + cols). The defaults (rank 64, Adam v) are those of ``adalomo.optim.adapm.AdaPM``.
    * ``master_weights`` adds an fp32 copy of the weights (4 bytes/param) to the classic optimizers
      (not to fused ones, which update the low-precision weights in place).

    ``per_tensor=True`` returns ``{name: bytes}``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")
    pb = _dtype_bytes(dtype)
    if adapm_policy is None:
        adapm_policy = default_adapm_policy
    res = {name: _tensor_state_bytes(name, shape, optimizer, param_bytes=pb, master_weights=master_weights,
                                     adafactor_beta1=adafactor_beta1, bnb_blocksize=bnb_blocksize,
                                     bnb_min_8bit_size=bnb_min_8bit_size, adapm_rank=adapm_rank,
                                     adapm_policy=adapm_policy, adapm_second_moment=adapm_second_moment,
                                     adapm_momentum_bytes=adapm_momentum_bytes)
           for name, shape in model_shapes(shapes)}
    return res if per_tensor else sum(res.values())


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[str(dtype).lower().replace("torch.", "")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r} (bf16, fp16, fp32)") from None


# --------------------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------------------

def _layer_bytes_per_token(m: ModelSpec, a: int, s: int, attention: str, activation_model: str) -> float:
    """Bytes saved for backward by one decoder layer, per token."""
    h, i, heads = m.hidden_size, m.inter, m.num_heads
    if activation_model == "korthikanti":
        per = 34 * h * a / 2
        if attention == "eager":
            per += 5 * heads * s * a / 2
        return per
    if activation_model != "hf":
        raise ValueError(f"unknown activation model {activation_model!r} (hf, korthikanti)")
    if m.arch == "llama":
        hq, hkv = heads * m.hd, m.kv_heads * m.hd
        per = 2 * (4 * h + 2 * a * h) + 2 * a * hq + 2 * a * hkv + 4 * heads + 4 * a * i
        if attention == "eager":
            per += (4 + a) * heads * s - 4 * heads
        return per
    # gpt2
    drop = m.dropout > 0
    mlp = (5 if m.activation == "gelu_new" else 2) * a * i
    per = 2 * 2 * a * h + 6 * a * h + 4 * heads + mlp + (2 * h if drop else 0)
    if attention == "eager":
        per += (a + ((1 + a) if m.attn_dropout > 0 else 0)) * heads * s - 4 * heads
    return per


def _fixed_bytes_per_token(m: ModelSpec, a: int) -> float:
    """Outside the layers: final norm, the saved fp32 log-softmax, GPT-2's embedding-dropout mask."""
    h = m.hidden_size
    norm = (4 * h + 2 * a * h) if m.arch == "llama" else 2 * a * h
    extra = h if (m.arch == "gpt2" and m.dropout > 0) else 0
    return norm + 4 * m.vocab_size + extra


def activation_bytes(model: Any, *, seq_len: int, batch: int, dtype: str = "bf16", grad_ckpt: bool = False,
                     attention: str = "sdpa", activation_model: str = "hf", detail: bool = False):
    """Peak activation bytes of one GPU's micro-batch (see the module docstring for the formula).

    Returns the saved activations after forward plus the loss-backward transients (``8 V`` bytes per
    token); with ``detail=True`` a dict: ``saved`` (after forward), ``loss_transient``,
    ``layer`` (one layer's full activations), ``per_layer_saved`` and ``peak``.
    """
    if attention not in ("sdpa", "flash", "eager"):
        raise ValueError(f"unknown attention {attention!r} (sdpa, flash, eager)")
    if seq_len < 1 or batch < 1:
        raise ValueError("seq_len and batch must be >= 1")
    m = model_spec(model)
    a = _dtype_bytes(dtype)
    t = seq_len * batch
    layer = _layer_bytes_per_token(m, a, seq_len, attention, activation_model) * t
    per_layer_saved = a * m.hidden_size * t if grad_ckpt else layer
    saved = m.num_layers * per_layer_saved + _fixed_bytes_per_token(m, a) * t
    loss_transient = 8 * m.vocab_size * t
    d = {"saved": int(saved), "loss_transient": int(loss_transient), "layer": int(layer),
         "per_layer_saved": int(per_layer_saved), "peak": int(saved + loss_transient)}
    return d if detail else d["peak"]


# --------------------------------------------------------------------------------------------------
# Estimate
# --------------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"\.(?:layers|h)\.(\d+)\.")


def _fsdp_units(shapes: Shapes) -> dict[str, int]:
    """Numel per FSDP unit: each decoder layer, plus the rest (embeddings, final norm, head)."""
    units: dict[str, int] = {}
    for name, shape in shapes:
        mt = _LAYER_RE.search("." + name)
        key = f"layer{mt.group(1)}" if mt else ("head" if "lm_head" in name else "root")
        units[key] = units.get(key, 0) + _numel(shape)
    return units


def _shard(nbytes: int, n_gpus: int) -> int:
    return -(-nbytes // n_gpus)


def estimate(model: Any, optimizer: str, *, seq_len: int = 1024, batch: int = 1, dtype: str = "bf16",
             grad_ckpt: bool = False, n_gpus: int = 1, master_weights: bool = False, attention: str = "sdpa",
             activation_model: str = "hf", activations: int | None = None, overhead: int = GiB,
             **state_kw) -> dict[str, Any]:
    """Bytes per component of one training step on one GPU, and the modelled peak.

    ``model``: anything :func:`model_shapes` takes (a bare shape list needs ``activations=`` bytes,
    or activations count 0); ``optimizer``: a key of :data:`OPTIMIZERS`; ``seq_len``, ``batch``: per
    GPU; ``n_gpus``: FSDP world size (weights, gradients, state divided, plus ``fsdp_buffers``);
    ``overhead``: added to the peak for the ``fits`` verdicts; ``state_kw``: passed to
    :func:`optimizer_state_bytes`.

    Returns ints (bytes) ``params, weights, grads, state, activations, fsdp_buffers, sum, peak,
    overhead``, ``peak_at`` (which moment is the peak), ``fits`` ({'24': bool, ...}) and the
    settings.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")
    if n_gpus < 1:
        raise ValueError("n_gpus must be >= 1")
    fused = OPTIMIZERS[optimizer][0]
    pb = _dtype_bytes(dtype)
    shapes = model_shapes(model)
    spec: ModelSpec | None = None
    if not _is_shape_list(model):
        try:
            spec = model_spec(model)
        except (TypeError, ValueError):
            if not hasattr(model, "named_parameters"):
                raise
            spec = None  # a module without a (supported) HF config: exact shapes, no activations
    numels = [_numel(s) for _, s in shapes]
    params = sum(numels)
    N = n_gpus

    weights = _shard(pb * params, N)
    state = _shard(optimizer_state_bytes(shapes, optimizer, dtype=dtype, master_weights=master_weights,
                                         **state_kw), N)
    largest = max(numels, default=0)
    transient = 4 * 4 * min(_shard(largest, N), BLOCK_NUMEL)  # fp32 block temporaries of one update
    if fused:
        grads = _shard(pb * largest, N) + transient
        step_extra = 0
    else:
        grads = _shard(pb * params, N)
        if optimizer == "adafactor-torch":
            step_extra = grads  # foreach temporaries of gradient size
        elif optimizer in ("adafactor", "adapm"):
            step_extra = transient
        else:
            step_extra = 0

    if activations is not None:
        act = {"saved": int(activations), "loss_transient": 0, "layer": 0, "per_layer_saved": 0,
               "peak": int(activations)}
    elif spec is not None:
        act = activation_bytes(spec, seq_len=seq_len, batch=batch, dtype=dtype, grad_ckpt=grad_ckpt,
                               attention=attention, activation_model=activation_model, detail=True)
    else:
        act = {"saved": 0, "loss_transient": 0, "layer": 0, "per_layer_saved": 0, "peak": 0}

    units = _fsdp_units(shapes)
    fsdp_buffers = 3 * pb * max(units.values(), default=0) if N > 1 else 0

    # The moments of a step (see the module docstring).
    t = seq_len * batch
    head_grad = pb * (spec.vocab_size * spec.hidden_size if spec is not None else largest)
    layer_grad = pb * max((v for k, v in units.items() if k.startswith("layer")), default=0)
    grad_flow = 2 * pb * (spec.hidden_size if spec else 0) * t  # two hidden-state gradients in flight
    first_layer_left = max(0, act["layer"] - (0 if fused else layer_grad)) if act["layer"] else 0
    base = weights + state + fsdp_buffers
    moments = {
        "backward start": base + act["peak"],
        "after lm head": base + act["saved"] - 4 * (spec.vocab_size if spec else 0) * t
        + (act["layer"] if grad_ckpt else 0) + (transient if fused else _shard(head_grad, N)),
        "backward end": base + grads + first_layer_left + grad_flow,
        "optimizer step": base + grads + step_extra if not fused else 0,
    }
    peak_at = max(moments, key=moments.get)
    peak = int(moments[peak_at])
    total_sum = weights + grads + state + act["peak"] + fsdp_buffers
    return {
        "optimizer": optimizer, "fused": fused, "params": params, "weights": int(weights), "grads": int(grads),
        "state": int(state), "activations": int(act["peak"]), "fsdp_buffers": int(fsdp_buffers),
        "sum": int(total_sum), "peak": peak, "peak_at": peak_at, "overhead": int(overhead),
        "fits": {k: peak + overhead <= cap for k, cap in GPUS.items()},
        "seq_len": seq_len, "batch": batch, "dtype": dtype, "grad_ckpt": grad_ckpt, "n_gpus": N,
        "master_weights": master_weights, "attention": attention, "activation_model": activation_model,
    }


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``adalomo memory`` options (argparse)."""
    p.add_argument("model", nargs="?", default=None,
                   help="a preset (" + ", ".join(PRESETS) + ") or a path to a transformers config.json")
    p.add_argument("--preset", default=None, help="a preset name (same as the positional MODEL)")
    p.add_argument("--config", default=None, help="a transformers config.json (LLaMA-like or GPT-2 keys)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU micro-batch (default: %(default)s)")
    p.add_argument("--dtype", default="bf16", help="parameter dtype: bf16, fp16, fp32 (default: %(default)s)")
    p.add_argument("--gradient-checkpointing", dest="grad_ckpt", action=argparse.BooleanOptionalAction,
                   default=False, help="full gradient checkpointing, one checkpoint per layer (default: off)")
    p.add_argument("--grad-ckpt", dest="grad_ckpt", action=DeprecatedAlias, new="--gradient-checkpointing")
    p.add_argument("--no-grad-ckpt", dest="grad_ckpt", action=DeprecatedAlias, new="--no-gradient-checkpointing",
                   const=False)
    p.add_argument("--n-gpus", type=int, default=1, help="FSDP world size (default: %(default)s)")
    p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                   help="comma-separated, from: " + ", ".join(OPTIMIZERS) + " (default: %(default)s)")
    p.add_argument("--master-weights", action="store_true",
                   help="mixed precision: fp32 master weights (and fp32 AdamW m, v) for classic optimizers")
    p.add_argument("--attention", default="sdpa", help="sdpa (flash, no s^2 term) or eager (default: sdpa)")
    p.add_argument("--activation-model", default="hf",
                   help="hf (measured HF LLaMA/GPT-2 count) or korthikanti (34 sbh/layer) (default: hf)")
    p.add_argument("--adafactor-beta1", type=float, default=None, help="Adafactor momentum (default: none)")
    p.add_argument("--adapm-rank", type=int, default=64, help="AdaPM low-rank momentum rank (default: 64)")
    p.add_argument("--adapm-second-moment", default="adam",
                   help="AdaPM second moment: adam (full fp32 v) or factored (fp32 rows+cols) (default: adam)")
    p.add_argument("--bnb-blocksize", type=int, default=256,
                   help="bitsandbytes absmax block size (256 in bitsandbytes, 2048 in the paper)")
    p.add_argument("--overhead-gib", type=float, default=1.0,
                   help="allowance for CUDA context + fragmentation in the fits columns (default: 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON (bytes) instead of the table")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")


def _gib(x: int) -> str:
    return f"{x / GiB:.2f}"


def _table(rows: list[dict[str, Any]], spec_name: str, params: int) -> str:
    r0 = rows[0]
    lines = [f"{spec_name}: {params / 1e9:.3f}B params, seq {r0['seq_len']} x batch {r0['batch']} per GPU, "
             f"{r0['dtype']}, grad ckpt {'on' if r0['grad_ckpt'] else 'off'}, {r0['n_gpus']} GPU(s)"
             + (" (FSDP)" if r0["n_gpus"] > 1 else "") + (", fp32 master weights" if r0["master_weights"] else "")
             + f", {r0['attention']} attention"]
    cols = ["optimizer", "weights", "grads", "state", "activ", "fsdp", "total"] + [f"{k}GB" for k in GPUS]
    if r0["n_gpus"] == 1:
        cols.remove("fsdp")
    data = []
    for r in rows:
        row = [r["optimizer"], _gib(r["weights"]), _gib(r["grads"]), _gib(r["state"]), _gib(r["activations"])]
        if r0["n_gpus"] > 1:
            row.append(_gib(r["fsdp_buffers"]))
        row.append(_gib(r["peak"]))
        row += ["yes" if r["fits"][k] else "no" for k in GPUS]
        data.append(row)
    widths = [max(len(c), *(len(d[j]) for d in data)) for j, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    lines += ["GiB per GPU; total = modelled peak (grads and activations peak at different moments, so it is "
              "less than the sum)", fmt(cols)]
    lines += [fmt(d) for d in data]
    lines.append(f"fits: total + {r0['overhead'] / GiB:g} GiB (CUDA context, fragmentation) <= "
                 + ", ".join(f"{k}GB={v / GiB:.1f} GiB" for k, v in GPUS.items()))
    return "\n".join(lines)


def _error(msg: str) -> int:
    print("adalomo memory: error: " + " ".join(str(msg).split()), file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Print the table (or JSON) for ``args`` from :func:`add_arguments`; 0, or 2 on a usage error."""
    if getattr(args, "list_presets", False):
        for name, s in PRESETS.items():
            print(f"{name:12s} {num_params(s) / 1e9:7.3f}B  {s.arch}  h={s.hidden_size} L={s.num_layers} "
                  f"heads={s.num_heads}/{s.kv_heads} i={s.inter} V={s.vocab_size}")
        return 0
    given = [x for x in (args.model, args.preset, args.config) if x]
    if len(given) != 1:
        return _error("give exactly one model: a preset name (" + ", ".join(PRESETS) + "), --preset or --config")
    if args.preset and args.preset not in PRESETS:
        return _error(f"unknown preset {args.preset!r} (known: {', '.join(PRESETS)})")
    try:
        src = args.config or args.preset or args.model
        if args.config and not os.path.exists(args.config):
            raise ValueError(f"config file not found: {args.config}")
        spec = model_spec(src)
        opts = [o.strip() for o in str(args.optimizers).split(",") if o.strip()]
        bad = [o for o in opts if o not in OPTIMIZERS]
        if not opts or bad:
            raise ValueError(f"unknown optimizer(s) {', '.join(bad) or '(none)'} (known: {', '.join(OPTIMIZERS)})")
        _dtype_bytes(args.dtype)
        if args.attention not in ("sdpa", "flash", "eager"):
            raise ValueError(f"unknown attention {args.attention!r} (sdpa, eager)")
        if args.activation_model not in ("hf", "korthikanti"):
            raise ValueError(f"unknown activation model {args.activation_model!r} (hf, korthikanti)")
        if args.adapm_second_moment not in ("adam", "factored"):
            raise ValueError(f"unknown AdaPM second moment {args.adapm_second_moment!r} (adam, factored)")
        for k in ("seq_len", "batch", "n_gpus", "adapm_rank", "bnb_blocksize"):
            if getattr(args, k) < 1:
                raise ValueError(f"--{k.replace('_', '-')} must be >= 1")
        if args.overhead_gib < 0:
            raise ValueError("--overhead-gib must be >= 0")
        shapes = model_shapes(spec)
        rows = [estimate(spec, o, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype, grad_ckpt=args.grad_ckpt,
                         n_gpus=args.n_gpus, master_weights=args.master_weights, attention=args.attention,
                         activation_model=args.activation_model, overhead=int(args.overhead_gib * GiB),
                         adafactor_beta1=args.adafactor_beta1, adapm_rank=args.adapm_rank,
                         adapm_second_moment=args.adapm_second_moment, bnb_blocksize=args.bnb_blocksize)
                for o in opts]
    except (ValueError, TypeError) as e:
        return _error(e)
    name = spec.name or str(src)
    params = sum(_numel(s) for _, s in shapes)
    if args.json:
        print(json.dumps({"model": name, "params": params, "spec": {k: v for k, v in vars(spec).items()},
                          "gpus": GPUS, "rows": rows}, indent=1))
    else:
        print(_table(rows, name, params))
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adalomo.memory", description=__doc__.strip().split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
