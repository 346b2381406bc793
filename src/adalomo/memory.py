"""Memory planner: GPU memory of full-parameter training per optimizer, from a model config.

Pure arithmetic: nothing is allocated, no model is built (an ``nn.Module`` on the meta device may be
given to count its exact parameter shapes). For a LLaMA-like or GPT-2 model given by a preset name, a
``transformers`` config (JSON file, dict or object) or a module, :func:`estimate` returns the bytes
of each component of one training step on one GPU:

``weights``
    every parameter in the parameter dtype (``--dtype``); divided by N under FSDP.
``grads``
    the gradient memory at its largest. Classic optimizers (step after backward) hold a full
    gradient set in the parameter dtype. Fused ones update inside backward: ``lomo``, ``adalomo`` and
    ``adafactor-fused`` queue gradients into buckets of ``bucket_cap_mb`` (``"auto"``: the optimizers'
    own rule, 15% of the trainable bytes within [64, 256] MiB) and hold at most one bucket;
    ``adapm-fused`` holds one gradient at a time. A tied embedding's gradient is alive from the LM head
    to the end of backward. Never more than a full set.
``state``
    the optimizer state, see :func:`optimizer_state_bytes`. With ``master_weights`` the classic
    optimizers also keep an fp32 copy of the weights (mixed precision, 16 bytes/param for AdamW).
``temporaries``
    the update's own memory at its largest: AdaPM's basis refresh on a GPU (8 bytes per element of the largest
    low-rank matrix, :func:`_adapm_kernel_update_bytes`; its torch maths on tensors of more than two dims,
    about 26 bytes per element in bf16, :func:`_adapm_update_bytes`), torch's foreach
    Adafactor (gradient-sized). The Triton kernels of the other optimizers of this library need only
    fp32 partial sums (0.1-0.5 bytes per parameter updated at once), which are not counted.
``activations``
    what autograd saves in forward, plus the fp32 transients of the loss backward (see below).
``fsdp_buffers``
    with N > 1 GPUs (FSDP2, one unit per decoder layer): two unsharded units (the one in use and
    the prefetched one) plus one unsharded gradient unit before its reduce-scatter.

and ``peak``, the modelled peak (the ``total`` column of the CLI). It is *not* the plain sum
(``sum``, an upper bound): gradients appear while activations are freed, so the peak is the largest
of four moments (``moments``): the start of backward (weights + state + all activations + the
loss-backward transients), after the LM head (its gradient, or the first bucket, has appeared and
is updated if fused; the loss tensors are gone), the end of backward (weights + state + all gradients,
or the largest bucket with its update, + the first layer's activations not yet freed) and the
optimizer step of a classic optimizer (weights + state + gradients + temporaries). ``notes`` says in
words what dominates where the column names do not.

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
output. The table is in GiB (2**30 bytes; MiB for models under 1 GiB), the dict in bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import functional as F
from ._cli_flags import DeprecatedAlias
from .momentum import SplitMomentum, momentum_state_numel
from .optim.adapm import SECOND_MOMENTS, AdaPM, _chunk_shape, momentum_kinds
from .optim.base import auto_bucket_cap_mb

__all__ = [
    "PRESETS",
    "OPTIMIZERS",
    "DEFAULT_OPTIMIZERS",
    "GPUS",
    "ModelSpec",
    "model_spec",
    "model_shapes",
    "num_params",
    "optimizer_state_bytes",
    "activation_bytes",
    "bucket_cap_bytes",
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

#: Fused optimizers whose hooks queue gradients into buckets for the grouped Triton kernels on GPUs (the
#: others update each tensor as its gradient arrives; AdaPM's tensors of more than two dims too). A test checks this
#: against the optimizer classes.
BUCKETED = ("lomo", "adalomo", "adafactor-fused", "adapm-fused")

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

def _factored_numel(shape: Sequence[int]) -> int:
    """fp32 values of the factored second moment, as :func:`adalomo.functional.init_factored_state` makes it."""
    return sum(t.numel() for t in F.init_factored_state(torch.empty(tuple(shape), device="meta")).values())


def _adapm_momentum_numel(kind: Any, shape: Sequence[int], rank: int | float) -> int:
    """fp32 values of AdaPM's momentum of ``kind`` (its effective kind, see ``momentum_kinds``) for ``shape``."""
    if isinstance(kind, SplitMomentum):
        chunk = _chunk_shape(torch.Size(shape), kind)
        return sum(_adapm_momentum_numel(k, chunk, rank) for k in kind.kinds)
    r = AdaPM._rank_for(torch.Size(shape), rank) if kind == "low_rank" else 1
    return momentum_state_numel(kind, shape, r)


def _adapm_kinds(shapes: Shapes, policy: Any) -> dict[str, Any]:
    """AdaPM's momentum kind per tensor, resolved exactly as the optimizer resolves it."""
    try:
        return momentum_kinds(shapes, policy)
    except TypeError as e:  # a policy that cannot take (name, tensor)
        raise ValueError(f"adapm_policy: {e}") from None


def _tensor_state_bytes(shape: Sequence[int], optimizer: str, *, param_bytes: int, master_weights: bool,
                        adafactor_beta1: float | None, bnb_blocksize: int, bnb_min_8bit_size: int,
                        adapm_kind: Any, adapm_rank: int | float, adapm_second_moment: str) -> int:
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
        momentum = 4 * n if (adafactor_beta1 is not None and optimizer != "adalomo") else 0  # fp32 exp_avg
        return master + 4 * _factored_numel(shape) + momentum
    if optimizer == "adafactor-torch":
        return master + param_bytes * _factored_numel(shape)
    if optimizer in ("adapm", "adapm-fused"):
        second = _factored_numel(shape) if adapm_second_moment == "factored" else n
        return master + 4 * (second + _adapm_momentum_numel(adapm_kind, shape, adapm_rank))
    raise ValueError(f"unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")


def optimizer_state_bytes(shapes: Any, optimizer: str, *, dtype: str = "bf16", master_weights: bool = False,
                          adafactor_beta1: float | None = None, bnb_blocksize: int = 256,
                          bnb_min_8bit_size: int = 4096, adapm_rank: int | float = 64, adapm_policy: Any = "adapm",
                          adapm_second_moment: str = "adam", per_tensor: bool = False) -> int | dict[str, int]:
    """Bytes of optimizer state for ``shapes`` (anything :func:`model_shapes` takes), unsharded.

    * ``adamw``: m and v in the parameter dtype (pure bf16 training, torch AdamW with bf16 params);
      with ``master_weights``: fp32 master + fp32 m, v = 12 bytes/param (16 with weights and grads).
    * ``adamw-8bit`` (bitsandbytes ``AdamW8bit``): 1 + 1 byte/param plus one fp32 absmax per block of
      ``bnb_blocksize`` elements for each state (bitsandbytes allocates 256-element blocks; the paper
      used 2048); tensors under ``bnb_min_8bit_size`` (4096) elements keep fp32 states (8 bytes).
    * ``adafactor`` / ``adafactor-fused`` / ``adalomo``: the fp32 state of this library's optimizers:
      rows + cols per matrix (last two dims), a full copy for 0-D/1-D tensors
      (``adalomo.functional.init_factored_state``); Adafactor with ``adafactor_beta1`` adds an fp32
      momentum. ``adafactor-torch``: rows + cols in the parameter dtype (torch keeps them so).
    * ``lomo``, ``sgd``: nothing.
    * ``adapm`` / ``adapm-fused``: what :class:`adalomo.AdaPM` allocates, all fp32: the momentum kind of
      each tensor from ``adapm_policy`` (anything ``AdaPM(momentum_policy=...)`` takes, default
      ``"adapm"``), resolved by ``adalomo.optim.adapm.momentum_kinds``; ``full`` = numel, ``low_rank`` =
      basis + momentum (``adalomo.momentum.momentum_state_numel``, rank ``adapm_rank``: an int or a
      fraction of the smaller side), ``none`` = 0; plus the second moment, ``adam`` = numel, ``factored``
      = rows + cols.
    * ``master_weights`` adds an fp32 copy of the weights (4 bytes/param) to the classic optimizers
      (not to fused ones, which update the low-precision weights in place).

    ``per_tensor=True`` returns ``{name: bytes}``. Step counters are not counted.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r} (known: {', '.join(OPTIMIZERS)})")
    if adapm_second_moment not in SECOND_MOMENTS:
        raise ValueError(f"unknown AdaPM second moment {adapm_second_moment!r} ({', '.join(SECOND_MOMENTS)})")
    pb = _dtype_bytes(dtype)
    shapes = model_shapes(shapes)
    kinds = _adapm_kinds(shapes, adapm_policy) if optimizer in ("adapm", "adapm-fused") else {}
    res = {name: _tensor_state_bytes(shape, optimizer, param_bytes=pb, master_weights=master_weights,
                                     adafactor_beta1=adafactor_beta1, bnb_blocksize=bnb_blocksize,
                                     bnb_min_8bit_size=bnb_min_8bit_size, adapm_kind=kinds.get(name),
                                     adapm_rank=adapm_rank, adapm_second_moment=adapm_second_moment)
           for name, shape in shapes}
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
# Gradients and update temporaries
# --------------------------------------------------------------------------------------------------

def _adapm_update_bytes(shape: Sequence[int], kind: Any, second_moment: str, param_bytes: int) -> int:
    """Bytes of the temporaries alive at once while AdaPM updates one tensor on an accelerator.

    AdaPM's torch path (CPU, and tensors of more than two dims on a GPU) is torch maths on the whole tensor (no
    row blocks): per element 12
    bytes of fp32 tensors for the second moment's update, u and the new weights, 4 for the momentum
    estimate (not for ``none``; 4 more for a split tensor, whose chunks are estimated apart and then
    joined), 4 for a 1-D tensor's factored second moment, 8 for fp32 copies of a 16-bit gradient and
    weights, 6 for bf16 stochastic rounding (on by default: random bits, drawn four to a 64-bit word, and the
    rounded values).
    Counted with a tracker of live tensors; tests/test_memory.py checks it against one CPU step.
    """
    per = 12
    if isinstance(kind, SplitMomentum):
        per += 8
    elif kind != "none":
        per += 4
    if second_moment == "factored" and len(shape) < 2:
        per += 4
    if param_bytes == 2:
        per += 14  # bf16: stochastic rounding; fp16 has no rounding but the same fp32 copies (+8)
    return per * _numel(shape)


def _adapm_kernel_update_bytes(shape: Sequence[int], kind: Any) -> int:
    """Bytes of the temporaries alive at once while AdaPM updates tensors of up to two dims on a GPU (the kernels of
    ``kernels.adapm``), counted for one tensor: the fp32 lift of every low-rank chunk (4 bytes per element of the
    chunk) and, as at a basis refresh, the fp32 copies of one chunk's gradient (4 more). The kernels update a
    bucket's tensors in waves whose lifts (a refresh's copy takes its lift's place) fit this figure for the
    bucket's largest tensor, so it bounds every wave. The partial sums, the bfloat16 pieces of the rank-r products
    and the r x b momentum temporaries are left to the overhead, as for the other kernels."""
    kinds = kind.kinds if isinstance(kind, SplitMomentum) else (kind,)
    low = sum(k == "low_rank" for k in kinds)
    return (4 * (low - 1) + 8) * (_numel(shape) // len(kinds)) if low and len(shape) == 2 else 0


def _arrival_order(shapes: Shapes, tied: str | None) -> Shapes:
    """The order in which backward completes the gradients: the reverse of the parameters' (the LM head
    first), a tied embedding last (its gradient is complete only after the embedding's backward)."""
    return [x for x in reversed(shapes) if x[0] != tied] + [x for x in shapes if x[0] == tied]


def _fused_updates(shapes: Shapes, param_bytes: int, cap_bytes: float, tied: str | None) -> list[tuple[int, Shapes]]:
    """The updates a fused optimizer makes inside backward: (gradient bytes alive then, tensors updated).

    As ``LowMemoryOptimizer``'s hook: each gradient is queued until the queue holds ``cap_bytes``
    (0: every tensor is updated on its own), then the queue is updated and freed; the rest at the end of
    backward. A tied embedding's gradient is alive from the LM head on.
    """
    pending = next((param_bytes * _numel(s) for n, s in shapes if n == tied), 0)
    out: list[tuple[int, Shapes]] = []
    queue: Shapes = []
    queued = 0
    for name, shape in _arrival_order(shapes, tied):
        if name == tied:
            pending = 0  # now in the queue
        queue.append((name, shape))
        queued += param_bytes * _numel(shape)
        if queued >= cap_bytes:
            out.append((queued + pending, queue))
            queue, queued = [], 0
    if queue:
        out.append((queued + pending, queue))
    return out


def bucket_cap_bytes(params: int, dtype: str = "bf16", bucket_cap_mb: float | str = "auto") -> int:
    """The bucket size of the fused optimizers for ``params`` trainable parameters (``"auto"``: the
    optimizers' own rule, ``adalomo.optim.base.auto_bucket_cap_mb``; 0: no buckets)."""
    if isinstance(bucket_cap_mb, str):
        if bucket_cap_mb != "auto":
            raise ValueError(f"bucket_cap_mb must be 'auto' or MiB >= 0, got {bucket_cap_mb!r}")
        dt = torch.float32 if _dtype_bytes(dtype) == 4 else torch.bfloat16
        bucket_cap_mb = auto_bucket_cap_mb([torch.empty(params, dtype=dt, device="meta", requires_grad=True)])
    if not bucket_cap_mb >= 0:
        raise ValueError(f"bucket_cap_mb must be 'auto' or MiB >= 0, got {bucket_cap_mb!r}")
    return int(bucket_cap_mb * MiB)


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
             bucket_cap_mb: float | str = "auto", **state_kw) -> dict[str, Any]:
    """Bytes per component of one training step on one GPU, and the modelled peak.

    ``model``: anything :func:`model_shapes` takes (a bare shape list needs ``activations=`` bytes,
    or activations count 0); ``optimizer``: a key of :data:`OPTIMIZERS`; ``seq_len``, ``batch``: per
    GPU; ``n_gpus``: FSDP world size (weights, gradients, state divided, plus ``fsdp_buffers``);
    ``overhead``: added to the peak for the ``fits`` verdicts; ``bucket_cap_mb``: the fused optimizers'
    setting (``"auto"``, MiB, or 0 for no buckets); ``state_kw``: passed to :func:`optimizer_state_bytes`.

    Returns ints (bytes) ``params, weights, grads, state, temporaries, activations, fsdp_buffers, sum,
    peak, overhead, bucket_cap``, ``moments`` (bytes at each moment of the step), ``peak_at`` (the
    largest), ``fits`` ({'24': bool, ...}), ``notes`` (what dominates, in words) and the settings.
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
    params = sum(_numel(s) for _, s in shapes)
    N = n_gpus
    cap = bucket_cap_bytes(params, dtype, bucket_cap_mb) if optimizer in BUCKETED else 0

    weights = _shard(pb * params, N)
    per_tensor_state = optimizer_state_bytes(shapes, optimizer, dtype=dtype, master_weights=master_weights,
                                             per_tensor=True, **state_kw)
    state = _shard(sum(per_tensor_state.values()), N)
    adapm = optimizer in ("adapm", "adapm-fused")
    if adapm:
        second = state_kw.get("adapm_second_moment", "adam")
        kinds = _adapm_kinds(shapes, state_kw.get("adapm_policy", "adapm"))
        temps_of = {n: _adapm_kernel_update_bytes(s, kinds[n]) if len(s) <= 2 else
                    _adapm_update_bytes(s, kinds[n], second, pb) for n, s in shapes}
    else:
        temps_of = {}  # Triton kernels: their fp32 partial sums are left to the overhead (see docs/memory.md)
    tied = shapes[0][0] if spec is not None and spec.tie_word_embeddings and shapes else None
    if fused:
        updates = [(_shard(held, N), _shard(max((temps_of.get(n, 0) for n, _ in group), default=0), N))
                   for held, group in _fused_updates(shapes, pb, cap, tied)] or [(0, 0)]
        grads = max(h for h, _ in updates)
        temps = max(t for _, t in updates)
        first_update, worst_update = sum(updates[0]), max(h + t for h, t in updates)
    else:
        grads = _shard(pb * params, N)
        if optimizer == "adafactor-torch":
            temps = grads  # foreach temporaries of gradient size
        else:
            temps = _shard(max(temps_of.values(), default=0), N)

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
    largest = max((_numel(s) for _, s in shapes), default=0)
    head_grad = pb * (spec.vocab_size * spec.hidden_size if spec is not None else largest)
    layer_grad = pb * max((v for k, v in units.items() if k.startswith("layer")), default=0)
    grad_flow = 2 * pb * (spec.hidden_size if spec else 0) * t  # two hidden-state gradients in flight
    first_layer_left = max(0, act["layer"] - (0 if fused else layer_grad)) if act["layer"] else 0
    base = weights + state + fsdp_buffers
    moments = {
        "backward start": base + act["peak"],
        "after lm head": base + act["saved"] - 4 * (spec.vocab_size if spec else 0) * t
        + (act["layer"] if grad_ckpt else 0) + (first_update if fused else _shard(head_grad, N)),
        "backward end": base + (worst_update if fused else grads) + first_layer_left + grad_flow,
        "optimizer step": 0 if fused else base + grads + temps,
    }
    moments = {k: int(v) for k, v in moments.items()}
    peak_at = max(moments, key=moments.get)
    peak = moments[peak_at]
    total_sum = weights + grads + state + temps + act["peak"] + fsdp_buffers
    row = {
        "optimizer": optimizer, "fused": fused, "params": params, "weights": int(weights), "grads": int(grads),
        "state": int(state), "activations": int(act["peak"]), "fsdp_buffers": int(fsdp_buffers),
        "sum": int(total_sum), "peak": peak, "peak_at": peak_at, "overhead": int(overhead),
        "fits": {k: peak + overhead <= gpu for k, gpu in GPUS.items()},
        "seq_len": seq_len, "batch": batch, "dtype": dtype, "grad_ckpt": grad_ckpt, "n_gpus": N,
        "master_weights": master_weights, "attention": attention, "activation_model": activation_model,
        "temporaries": int(temps), "bucket_cap": cap, "moments": moments,
    }
    row["notes"] = _notes(row, shapes, per_tensor_state, temps_of, pb, state_kw)
    return row


def _momentum_shares(shapes: Shapes, policy: Any) -> dict[str, float]:
    """The fraction of the parameters under each AdaPM momentum kind."""
    kinds = _adapm_kinds(shapes, policy)
    count = dict.fromkeys(("full", "low_rank", "none"), 0)
    for name, shape in shapes:
        kind = kinds[name]
        for k in kind.kinds if isinstance(kind, SplitMomentum) else (kind,):
            count[k] += _numel(shape) // (len(kind.kinds) if isinstance(kind, SplitMomentum) else 1)
    total = max(sum(count.values()), 1)
    return {k: v / total for k, v in count.items()}


def _notes(row: dict[str, Any], shapes: Shapes, per_tensor_state: dict[str, int], temps_of: dict[str, int],
           pb: int, state_kw: dict[str, Any]) -> list[str]:
    """One line for each thing in ``row`` that dominates for a reason the column names do not tell."""
    notes = []
    opt, params, N = row["optimizer"], row["params"], row["n_gpus"]
    full_grads = _shard(pb * params, N)
    if row["fused"] and params and row["grads"] >= full_grads:
        how = (f"fits in one bucket ({row['bucket_cap'] / MiB:.0f} MiB, bucket_cap_mb='auto')" if row["bucket_cap"]
               else "is one tensor")
        notes.append(f"grads: the whole gradient set ({_size(full_grads)}) {how}, so updating in backward "
                     "saves no gradient memory on this model")
    if opt in ("adapm", "adapm-fused") and params:
        master = row["master_weights"]
        adamw_bpp = 12 if master else 2 * pb
        bpp = sum(per_tensor_state.values()) / params - (4 if master else 0)
        if bpp + (4 if master else 0) > adamw_bpp:
            second = state_kw.get("adapm_second_moment", "adam")
            factored = optimizer_state_bytes(shapes, opt, dtype=row["dtype"], master_weights=master,
                                             **{**state_kw, "adapm_second_moment": "factored"})
            v = ("a full fp32 second moment (4 bytes/param" + (", as much as AdamW's bf16 m and v together)"
                                                               if pb == 2 and not master else ")")
                 if second == "adam" else "fp32 row and column statistics")
            share = _momentum_shares(shapes, state_kw.get("adapm_policy", "adapm"))
            notes.append(f"state: {bpp:.2f} bytes/param against AdamW's {adamw_bpp} in {row['dtype']}"
                         + (" with fp32 master weights" if master else "") + f": AdaPM keeps {v} plus fp32 "
                         "momentum (" + ", ".join(f"{k.replace('_', '-')} for {share[k]:.0%}" for k in share
                                                  if share[k]) + " of the parameters)"
                         + (f"; --adapm-second-moment factored: {_size(_shard(factored, N))}"
                            if second == "adam" else ""))
    if row["temporaries"] >= 0.05 * row["peak"] > 0:
        if temps_of:
            name, nbytes = max(temps_of.items(), key=lambda kv: kv[1])
            n = _numel(dict(shapes)[name])
            how = ("at a basis refresh AdaPM holds an fp32 copy of a low-rank gradient and its masked copy"
                   if len(dict(shapes)[name]) <= 2 else "AdaPM updates a tensor of more than two dims with torch "
                   "maths on the whole tensor")
            notes.append(f"temps: {how}, {nbytes // n} bytes of temporaries per element: {_size(_shard(nbytes, N))} "
                         f"for {name} ({_count(n)} elements)")
        elif opt == "adafactor-torch":
            notes.append("temps: torch's foreach Adafactor makes gradient-sized temporaries at the step")
    return notes


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
    p.add_argument("--bucket-cap-mb", default="auto",
                   help="the fused optimizers' bucket_cap_mb: auto, MiB, or 0 for none (default: auto)")
    p.add_argument("--bnb-blocksize", type=int, default=256,
                   help="bitsandbytes absmax block size (256 in bitsandbytes, 2048 in the paper)")
    p.add_argument("--overhead-gib", type=float, default=1.0,
                   help="allowance for CUDA context + fragmentation in the fits columns (default: 1.0)")
    p.add_argument("--json", action="store_true", help="print JSON (bytes) instead of the table")
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")


_UNITS = (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10))


def _unit(nbytes: int) -> tuple[str, int]:
    """The largest unit in which ``nbytes`` is at least 1 (KiB at the least)."""
    return next(((name, u) for name, u in _UNITS if nbytes >= u), _UNITS[-1])


def _size(nbytes: int) -> str:
    name, u = _unit(nbytes)
    return f"{nbytes / u:.2f} {name}"


def _count(n: int) -> str:
    return next((f"{n / d:.3g}{s}" for s, d in (("B", 1e9), ("M", 1e6), ("K", 1e3)) if n >= d), str(n))


#: What the state column holds for each optimizer, for the legend ({dt}: the parameter dtype).
_STATE_WORDS = {
    "adamw": "m, v in {dt}",
    "adamw-8bit": "8-bit m, v + fp32 block scales",
    "sgd": "none",
    "adafactor": "fp32 row/column statistics (+ fp32 momentum with --adafactor-beta1)",
    "adafactor-fused": "as adafactor",
    "adafactor-torch": "row/column statistics in {dt}",
    "lomo": "none",
    "adalomo": "fp32 row/column statistics",
    "adapm": "fp32 second moment + fp32 momentum per the policy (full, low-rank or none)",
    "adapm-fused": "as adapm",
}

_WIDTH = 110  # text lines of the table's legend and notes

_MOMENT_SHORT = {"backward start": "bwd start", "after lm head": "lm head", "backward end": "bwd end",
                 "optimizer step": "step"}


def _legend(rows: list[dict[str, Any]]) -> list[str]:
    r0 = rows[0]
    names = [r["optimizer"] for r in rows]
    classic = [n for n in names if not OPTIMIZERS[n][0]]
    bucketed = [r for r in rows if r["optimizer"] in BUCKETED]
    one_at_a_time = [n for n in names if OPTIMIZERS[n][0] and n not in BUCKETED]
    dt, master = r0["dtype"], r0["master_weights"]
    grads = []
    if classic:
        grads.append(f"{', '.join(classic)} keep every gradient until step()")
    if bucketed:
        cap = bucketed[0]["bucket_cap"]
        who = ", ".join(r["optimizer"] for r in bucketed)
        grads.append(f"{who} update inside backward and hold one bucket of gradients at most ({cap / MiB:.0f} MiB)"
                     if cap else f"{who} update inside backward, one gradient at a time")
    if one_at_a_time:
        grads.append(f"{', '.join(one_at_a_time)} update inside backward, one gradient at a time")
    items = [
        ("weights", f"every parameter in {dt}"
         + (f", divided over {r0['n_gpus']} GPUs (FSDP)" if r0["n_gpus"] > 1 else "")),
        ("grads", "gradient memory at its largest: " + "; ".join(grads)),
        ("state", "; ".join(f"{n}: {_STATE_WORDS[n].format(dt='fp32' if master and n == 'adamw' else dt)}"
                            for n in names)
         + ("; the classic ones also an fp32 master copy of the weights" if master and classic else "")),
        ("temps", "the update's own temporaries at their largest (the Triton kernels' partial sums, 0.1-0.5 bytes "
                  "per parameter updated at once, are not counted)"),
        ("activ", "activations saved by forward, plus the loss backward's fp32 transients"),
    ]
    if r0["n_gpus"] > 1:
        items.append(("fsdp", "two all-gathered decoder layers and one unsharded layer gradient"))
    items += [
        ("total", "the modelled peak, at the moment 'peak at' (start of backward, after the LM head, end of "
                  "backward, optimizer step): less than the sum, as activations are freed while gradients appear"),
        ("fits", f"total + {r0['overhead'] / GiB:g} GiB (CUDA context, fragmentation) <= "
                 + ", ".join(f"{k}GB={v / GiB:.1f} GiB" for k, v in GPUS.items())),
    ]
    return [line for key, text in items for line in _wrap(f"  {key:8s} {text}", 11)]


def _wrap(text: str, indent: int) -> list[str]:
    return textwrap.wrap(text, width=_WIDTH, subsequent_indent=" " * indent, break_on_hyphens=False)


def _table(rows: list[dict[str, Any]], spec_name: str, params: int) -> str:
    r0 = rows[0]
    unit, u = _unit(max(r["peak"] for r in rows))
    fmt_bytes = lambda x: f"{x / u:.2f}"
    lines = [f"{spec_name}: {_count(params)} params, seq {r0['seq_len']} x batch {r0['batch']} per GPU, "
             f"{r0['dtype']}, grad ckpt {'on' if r0['grad_ckpt'] else 'off'}, {r0['n_gpus']} GPU(s)"
             + (" (FSDP)" if r0["n_gpus"] > 1 else "") + (", fp32 master weights" if r0["master_weights"] else "")
             + f", {r0['attention']} attention"]
    fsdp = r0["n_gpus"] > 1
    cols = (["optimizer", "weights", "grads", "state", "temps", "activ"] + (["fsdp"] if fsdp else [])
            + ["total", "peak at"] + [f"{k}GB" for k in GPUS])
    data = []
    for r in rows:
        row = [r["optimizer"]] + [fmt_bytes(r[k]) for k in ("weights", "grads", "state", "temporaries", "activations")]
        if fsdp:
            row.append(fmt_bytes(r["fsdp_buffers"]))
        row += [fmt_bytes(r["peak"]), _MOMENT_SHORT[r["peak_at"]]]
        row += ["yes" if r["fits"][k] else "no" for k in GPUS]
        data.append(row)
    widths = [max(len(c), *(len(d[j]) for d in data)) for j, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(cells, widths)))
    lines += [f"{unit} per GPU", fmt(cols)]
    lines += [fmt(d) for d in data]
    lines += _legend(rows)
    by_note: dict[str, list[str]] = {}  # rows with the same note (adapm and adapm-fused) share one line
    for r in rows:
        for note in r["notes"]:
            by_note.setdefault(note, []).append(r["optimizer"])
    if by_note:
        lines.append("Notes:")
        lines += [line for note, who in by_note.items() for line in _wrap(f"  {', '.join(who)}: {note}", 4)]
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
        cap = args.bucket_cap_mb
        if cap != "auto":
            try:
                cap = float(cap)
            except ValueError:
                raise ValueError(f"--bucket-cap-mb must be auto or MiB >= 0, got {cap!r}") from None
            if not cap >= 0:
                raise ValueError(f"--bucket-cap-mb must be auto or MiB >= 0, got {args.bucket_cap_mb!r}")
        shapes = model_shapes(spec)
        rows = [estimate(spec, o, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype, grad_ckpt=args.grad_ckpt,
                         n_gpus=args.n_gpus, master_weights=args.master_weights, attention=args.attention,
                         activation_model=args.activation_model, overhead=int(args.overhead_gib * GiB),
                         bucket_cap_mb=cap,
                         adafactor_beta1=args.adafactor_beta1, adapm_rank=args.adapm_rank,
                         adapm_second_moment=args.adapm_second_moment, bnb_blocksize=args.bnb_blocksize)
                for o in opts]
    except (ValueError, TypeError) as e:
        return _error(e)
    name = spec.name or str(src)
    params = sum(_numel(s) for _, s in shapes)
    if args.json:
        text = json.dumps({"model": name, "params": params, "spec": {k: v for k, v in vars(spec).items()},
                           "gpus": GPUS, "rows": rows}, indent=1)
    else:
        text = _table(rows, name, params)
    print(text, flush=True)  # a closed pipe (| head) is cli.main's to handle
    return 0


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m adalomo.memory", description=__doc__.strip().split("\n")[0])
    add_arguments(p)
    return run(p.parse_args(None if argv is None else list(argv)))


if __name__ == "__main__":
    from .cli import main as cli_main  # one handler for bad arguments and closed pipes

    sys.exit(cli_main(["memory", *sys.argv[1:]]))
