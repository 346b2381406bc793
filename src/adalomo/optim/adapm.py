"""AdaPM (Zhang, Liu & Fang, arXiv 2510.09103): Adam with partial momentum, per tensor "full", "low_rank" or "none".

Our reading of the paper (its code is not public); docs/adapm.md says which parts are the paper's and
which are ours. The momentum maths is in :mod:`adalomo.momentum`, the second moment in
:mod:`adalomo.functional`; this module wires them, resolves the per-tensor momentum policy and builds
parameter groups for Hugging Face / our models. Its memory: ``adalomo memory MODEL --optimizers adamw,adapm``.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .. import kernels
from .. import momentum as M
from ..distributed import functional as DF
from ..distributed import momentum as DM
from ..momentum import KINDS, SplitMomentum
from .base import LowMemoryOptimizer
from .checks import as_float, check_number

__all__ = ["AdaPM", "SplitMomentum", "adapm_policy", "resolve_policy", "adapm_param_groups", "momentum_kinds"]

Kind = str | SplitMomentum
Policy = str | Mapping[str, Kind] | Callable[[str | None, Tensor], Kind]

SECOND_MOMENTS = ("adam", "factored")
BASIS_METHODS = ("randomized", "svd")
#: the floor of RMS(p) in the relative step size (``relative_lr=True``), as AdaLomo's eps2
PARAM_SCALE_EPS = 1e-3

# --------------------------------------------------------------------------------------------- the policy

_C = r"(?:^|\.)"  # start of a dotted name component
#: The default "adapm" policy for matrices: first match wins, unmatched matrices keep full momentum.
ADAPM_RULES: tuple[tuple[str, Kind], ...] = (
    # embeddings (input, positional, output head): no momentum
    (r"embed|" + _C + r"(?:wte|wpe|tok_emb|pos_emb|tok_embeddings|lm_head|embed_out)\.", "none"),
    # attention output projection: no momentum
    (r"(?:attn|attention)\.(?:c_proj|dense|o_proj|out_proj|wo)\.|" + _C + r"(?:o_proj|out_proj|wo)\.", "none"),
    # value projection: full momentum
    (_C + r"(?:v_proj|wv|value)\.", "full"),
    # query and key projections: low-rank momentum
    (_C + r"(?:q_proj|k_proj|wq|wk|query|key)\.", "low_rank"),
    # fused QKV: GPT-2's Conv1D c_attn (in, 3*dim) and Phi-3's qkv_proj / MPT's Wqkv (3*dim, in) hold
    # [Q | K | V] contiguously: split them (see _split_qkv); GPT-NeoX's query_key_value interleaves heads
    (_C + r"c_attn\.", SplitMomentum(-1, ("low_rank", "low_rank", "full"))),
    (_C + r"(?:qkv_proj|Wqkv)\.", SplitMomentum(0, ("low_rank", "low_rank", "full"))),
    (_C + r"query_key_value\.", "low_rank"),
    # MLP: low-rank momentum
    (_C + r"(?:gate_proj|up_proj|down_proj|gate_up_proj|w1|w2|w3|c_fc|fc1|fc2|fc_in|fc_out|dense_h_to_4h|"
     r"dense_4h_to_h)\.|mlp\.c_proj\.", "low_rank"),
)
_ADAPM_COMPILED = tuple((re.compile(p), k) for p, k in ADAPM_RULES)


def adapm_policy(name: str | None, p: Tensor) -> Kind:
    """The default policy (the paper's block policy as a third-party summary gives it, our name patterns).

    0-D/1-D tensors (norm weights, biases): ``full``. Matrices: embeddings and the LM head ``none``;
    attention output ``none``; value ``full``; query, key and MLP ``low_rank``; fused QKV split
    (Q, K low-rank, V full); every other matrix ``full``. Unnamed tensors: ``full``.
    """
    if p.dim() < 2 or name is None:
        return "full"
    for rx, kind in _ADAPM_COMPILED:
        if rx.search(name):
            if isinstance(kind, SplitMomentum) and p.shape[kind.dim] % len(kind.kinds) != 0:
                return "low_rank"
            return kind
    return "full"


def _check_kind(kind: Any, where: str) -> Kind:
    if isinstance(kind, str):
        if kind in KINDS:
            return kind
    elif isinstance(kind, (tuple, list)) and len(kind) == 2 and isinstance(kind[1], (tuple, list)) and kind[1]:
        dim, kinds = kind
        if isinstance(dim, int) and not isinstance(dim, bool) and all(k in KINDS for k in kinds):
            return SplitMomentum(dim, tuple(kinds))
    raise ValueError(f"{where}: unknown momentum kind {kind!r}; choose one of 'full', 'low_rank', 'none', or "
                     "SplitMomentum(dim, kinds) for equal chunks of a fused tensor")


def resolve_policy(policy: Policy) -> Callable[[str | None, Tensor], Kind]:
    """``policy`` as a function (name, tensor) -> kind.

    ``"adapm"``: :func:`adapm_policy`. ``"full"`` / ``"low_rank"`` / ``"none"``: that kind for every
    tensor. A mapping {regex: kind}: the first regex (in order) that ``re.search``-matches the name
    wins, unmatched or unnamed tensors keep ``full`` (add ``".*"`` last to change that). A callable
    (name, tensor) -> kind is used as is (``name`` is None for tensors passed without names).
    """
    if isinstance(policy, str):
        if policy == "adapm":
            return adapm_policy
        kind = _check_kind(policy, "momentum_policy")
        return lambda name, p: kind
    if isinstance(policy, Mapping):
        rules = []
        for rx, kind in policy.items():
            try:
                rules.append((re.compile(rx), _check_kind(kind, f"momentum_policy[{rx!r}]")))
            except (re.error, TypeError) as e:
                raise ValueError(f"momentum_policy: bad regular expression {rx!r}: {e}") from None

        def by_regex(name: str | None, p: Tensor) -> Kind:
            if name is not None:
                for rx, kind in rules:
                    if rx.search(name):
                        return kind
            return "full"
        return by_regex
    if callable(policy):
        return policy
    raise ValueError(f"momentum_policy must be 'adapm', a kind ({', '.join(KINDS)}), a dict {{regex: kind}} or a "
                     f"callable (name, param) -> kind; got {policy!r}")


def _effective_kind(kind: Kind, shape: torch.Size, where: str) -> Kind:
    """Low-rank (or split) momentum on a 0-D/1-D (or empty) tensor falls back to full; check split sizes."""
    if len(shape) < 2 or math.prod(shape) == 0:
        kinds = kind.kinds if isinstance(kind, SplitMomentum) else (kind,)
        return "none" if all(k == "none" for k in kinds) else "full"
    if isinstance(kind, SplitMomentum):
        if not -len(shape) <= kind.dim < len(shape):
            raise ValueError(f"{where}: SplitMomentum dim {kind.dim} is out of range for shape {tuple(shape)}")
        n, k = shape[kind.dim], len(kind.kinds)
        if n % k:
            raise ValueError(f"{where}: SplitMomentum needs dim {kind.dim} (size {n}) divisible into {k} equal chunks")
        if len(set(kind.kinds)) == 1:
            return kind.kinds[0]
    return kind


def _chunk_shape(shape: torch.Size, kind: SplitMomentum) -> torch.Size:
    s = list(shape)
    s[kind.dim] //= len(kind.kinds)
    return torch.Size(s)


def momentum_kinds(named_params: Iterable[tuple[str, Tensor]], policy: Policy = "adapm") -> dict[str, Kind]:
    """{name: effective kind} for ``model.named_parameters()`` (or (name, shape) pairs) under ``policy``."""
    fn = resolve_policy(policy)
    out = {}
    for name, p in named_params:
        if not isinstance(p, Tensor):
            p = torch.empty(tuple(p), device="meta")
        out[name] = _effective_kind(_check_kind(fn(name, p), f"momentum_policy({name!r})"), p.shape, name)
    return out


def adapm_param_groups(model: nn.Module, policy: Policy = "adapm", *, rank: int | float | None = None,
                       weight_decay: float = 0.0,
                       no_decay_names: Iterable[str] = ("bias", "norm", "ln_", "embed", "wte", "wpe", "tok_emb"),
                       **group_options) -> list[dict[str, Any]]:
    """Parameter groups for :class:`AdaPM`: one per (momentum kind, decay or not), with names.

    Each group has ``params``, ``param_names``, ``momentum`` (the kind) and ``weight_decay``
    (``weight_decay`` for matrices, 0 for 0-D/1-D tensors and names containing any of
    ``no_decay_names``); ``rank`` and ``group_options`` (e.g. ``lr``) are copied into every group.
    Frozen parameters are skipped; tied weights appear once (``named_parameters`` deduplicates).
    """
    check_number("weight_decay", weight_decay, low=0.0)
    no_decay_names = tuple(no_decay_names)
    kinds = momentum_kinds(((n, p) for n, p in model.named_parameters() if p.requires_grad), policy)
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = p.dim() >= 2 and not any(s in name for s in no_decay_names)
        kind = kinds[name]
        key = (repr(kind), decay)
        if key not in groups:
            g = {"params": [], "param_names": [], "momentum": kind,
                 "weight_decay": weight_decay if decay else 0.0, **group_options}
            if rank is not None:
                g["rank"] = rank
            groups[key] = g
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return list(groups.values())


# --------------------------------------------------------------------------------- the second moment


def _beta2(group: dict[str, Any], t: float) -> tuple[float, float]:
    """beta2 at step t and its bias correction 1 - beta2^t (1 with ``decay_rate``, whose beta2_t needs none)."""
    if group["decay_rate"] is not None:
        return F.beta2_at(t, group["decay_rate"]), 1.0
    beta2 = group["betas"][1]
    return beta2, 1.0 - beta2 ** t


def _adam_direction(m_hat: Tensor, g: Tensor, v: Tensor, ok: Tensor, beta2: float, bc2: float, eps: float) -> Tensor:
    """v <- beta2 v + (1 - beta2) g^2 (where ``ok``); u = m_hat / (sqrt(v / bc2) + eps), elementwise."""
    v.copy_(torch.where(ok, torch.lerp(g * g, v, beta2), v))
    return m_hat / (v / bc2).sqrt_().add_(eps)


def _factored_direction(m_hat: Tensor, factors: tuple[Tensor, ...], bc2: float) -> Tensor:
    """u = m_hat / sqrt(v_hat / bc2), v_hat the product of the preconditioner's ``factors``."""
    u = m_hat * factors[0]  # m_hat may be the state itself: the first multiply makes a new tensor
    for f in factors[1:]:
        u.mul_(f)
    if bc2 != 1.0:
        u.mul_(math.sqrt(bc2))
    return u


# ------------------------------------------------------------------------------------------- the optimizer


class RandomizedBasis:
    """A chunk's basis function at a refresh (``momentum.orthonormal_basis``, randomized, its draws seeded by
    parameter, step and chunk): ``basis(g2, r, side)``; ``sketch`` is its large part alone, so that the kernel path
    can solve the small problems of a call's refreshes together (``momentum.leading_subspaces``)."""
    __slots__ = ("seed",)

    def __init__(self, seed: int):
        self.seed = seed

    def _generator(self, device) -> torch.Generator:
        gen = torch.Generator(device=device)
        gen.manual_seed(self.seed)
        return gen

    def __call__(self, g2: Tensor, r: int, side: str) -> Tensor:
        return M.orthonormal_basis(g2, r, side, "randomized", generator=self._generator(g2.device),
                                   iterate=kernels.orthogonal_iteration)

    def sketch(self, g2: Tensor, r: int, side: str) -> tuple[Tensor, Tensor, Tensor]:
        return M.range_sketch(g2, r, side, self._generator(g2.device))


class AdaPM(LowMemoryOptimizer):
    """AdaPM: Adam(W) whose first moment is, per tensor, full, low-rank with bias correction, or absent.

    Per tensor with gradient g at step t (all maths in fp32, state fp32):

    * momentum estimate m_hat (:mod:`adalomo.momentum`): ``full``: m = beta1 m + (1-beta1) g,
      m_hat = m / (1 - beta1^t); ``none``: m_hat = g; ``low_rank``: m_hat = P M / (1 - beta1^t) + (g - P P^T g)
      with an orthonormal basis P (rank ``rank``) refreshed from g at step 1 and every ``update_proj_gap``
      steps and M = beta1 M + (1-beta1) P^T g. E[m_hat] = E[g] for stationary gradients.
    * ``second_moment="adam"``: v = beta2 v + (1-beta2) g^2, u = m_hat / (sqrt(v / (1 - beta2^t)) + eps),
      step size ``lr`` (with every tensor ``full`` this is exactly ``torch.optim.AdamW``).
    * ``second_moment="factored"``: the AdaLomo/Adafactor factored v (row and column EMAs of g^2 + eps^2 for
      matrices, full v for 0-D/1-D), bias-corrected, u = m_hat / sqrt(v_hat), then the update clipping
      u /= max(1, RMS(u) / clip_threshold); step size ``lr``, or ``lr * max(1e-3, RMS(p))`` with
      ``relative_lr=True`` (AdaLomo's relative step). With ``decay_rate`` (e.g. -0.8) beta2_t = 1 - t^decay_rate
      replaces ``betas[1]`` and its bias correction, in both modes.
    * p <- p (1 - step_size * weight_decay) - step_size * u (decoupled weight decay, AdamW style).

    The momentum kind of each tensor: a group's ``momentum`` key if set (e.g. from
    :func:`adapm_param_groups`), else ``momentum_policy`` applied to the tensor's name: pass
    ``model.named_parameters()`` (or groups with ``param_names``) for name-based policies. Tensors without
    names get what the policy says for ``name=None`` (``full`` for "adapm" and dict policies, with a warning).
    ``low_rank`` (or a split) on a 0-D/1-D tensor means ``full``; tensors with more than two dims are
    flattened to (shape[0], rest) for the low-rank maths.

    ``rank``: an int (capped at min(m, n)) or a float in (0, 1], a fraction of min(m, n).
    ``refresh_fill``: at a basis refresh, fill the part of the new subspace that the old one did not
    cover with the current gradient (keeps the estimate unbiased across refreshes; see docs/adapm.md).
    ``proj_method``: ``"randomized"`` (range finder, seeded from ``proj_seed``, the tensor and the step, so
    that resumed runs are exact) or ``"svd"``. ``fused=True`` updates inside ``backward()`` (momentum,
    basis refresh and all). See :class:`LowMemoryOptimizer` for ``fused``, ``nonfinite``, ``loss_scaler``,
    ``clip_grad_norm``, ``stochastic_rounding``.
    """

    #: tensors of up to two dims go through the Triton kernels (``kernels.adapm``) on CUDA, classic and fused alike
    _has_many = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, rank: int | float = 64, update_proj_gap: int = 200,
                 second_moment: str = "adam", momentum_policy: Policy = "adapm", fused: bool = False, *,
                 proj_method: str = "randomized", clip_threshold: float | None = 1.0, relative_lr: bool = False,
                 decay_rate: float | None = None, refresh_fill: bool = True, proj_seed: int = 0,
                 stochastic_rounding: bool | None = None, **options: Any):
        self._policy_spec = momentum_policy  # what a copy resolves again (a resolved kind policy is a closure)
        self._policy = resolve_policy(momentum_policy)
        self._policy_is_named = momentum_policy in ("adapm", adapm_policy) or isinstance(momentum_policy, Mapping)
        self._kinds: dict[int, Kind] = {}
        self._kernel_chunks: dict[int, tuple] = {}  # id(p) -> its chunks for the kernels (``_chunks``)
        self._names: dict[int, str | None] = {}
        self._local_owner: dict[int, Tensor] = {}  # id(step counter) -> parameter, for FSDP2's local tensors
        self._warned_unnamed = False
        self.proj_seed = int(proj_seed)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, rank=rank,
                        update_proj_gap=update_proj_gap, second_moment=second_moment, momentum=None,
                        proj_method=proj_method, clip_threshold=clip_threshold, relative_lr=relative_lr,
                        decay_rate=decay_rate, refresh_fill=refresh_fill, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults, fused=fused, **options)

    # -------------------------------------------------------------------------------- wiring
    def _validate_group(self, group: dict[str, Any]) -> None:
        check_number("lr", group["lr"], low=0.0)
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), e.g. (0.9, 0.999), got {betas!r}")
        check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
        check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
        group["betas"] = (float(betas[0]), float(betas[1]))
        check_number("eps", group["eps"], low=0.0)
        check_number("weight_decay", group["weight_decay"], low=0.0)
        rank = group["rank"]
        if isinstance(rank, bool) or not isinstance(rank, (int, float)) or not rank > 0 or (
                isinstance(rank, float) and rank > 1):
            raise ValueError(f"rank must be a positive int (capped at min(m, n)) or a fraction in (0, 1], "
                             f"got {rank!r}")
        gap = group["update_proj_gap"]
        if isinstance(gap, bool) or not isinstance(gap, int) or gap < 1:
            raise ValueError(f"update_proj_gap must be an int >= 1 (steps between basis refreshes), got {gap!r}")
        if group["second_moment"] not in SECOND_MOMENTS:
            raise ValueError(f"second_moment must be one of {SECOND_MOMENTS}, got {group['second_moment']!r}")
        if group["proj_method"] not in BASIS_METHODS:
            raise ValueError(f"proj_method must be one of {BASIS_METHODS}, got {group['proj_method']!r}")
        if group["clip_threshold"] is not None:
            check_number("clip_threshold", group["clip_threshold"], low=0.0, low_open=True,
                          hint=" (use None to disable update clipping)")
        if group["decay_rate"] is not None:
            check_number("decay_rate", group["decay_rate"], high=0.0, high_open=True,
                          hint=" (beta2_t = 1 - t^decay_rate; the usual value is -0.8; None uses betas[1])")
        if group["momentum"] is not None:  # stored as a plain str / tuple: checkpoints load with weights_only
            kind = _check_kind(group["momentum"], "param group 'momentum'")
            group["momentum"] = (kind.dim, tuple(kind.kinds)) if isinstance(kind, SplitMomentum) else kind
        self._resolve_group(group)

    def _resolve_group(self, group: dict[str, Any]) -> None:
        names = group.get("param_names")
        for i, p in enumerate(group["params"]):
            self._names[id(p)] = None if names is None else names[i]
            self._kinds[id(p)] = self._resolve(p, group)
            self._kernel_chunks.pop(id(p), None)

    def _resolve(self, p: Tensor, group: dict[str, Any]) -> Kind:
        name = self._names.get(id(p))
        where = f"AdaPM: parameter {name!r}" if name is not None else f"AdaPM: a parameter of shape {tuple(p.shape)}"
        if group["momentum"] is not None:
            kind = _check_kind(group["momentum"], "param group 'momentum'")
        else:
            if name is None and self._policy_is_named and not self._warned_unnamed:
                self._warned_unnamed = True
                warnings.warn("AdaPM: parameters were passed without names, so the momentum policy cannot tell "
                              "blocks apart and they all keep full momentum (plain Adam memory); pass "
                              "model.named_parameters() or adapm_param_groups(model)", UserWarning, stacklevel=5)
            kind = _check_kind(self._policy(name, p), f"{where}: momentum_policy returned")
        return _effective_kind(kind, p.shape, where)

    @staticmethod
    def _rank_for(shape: torch.Size, rank: int | float) -> int:
        a, b = shape[0], math.prod(shape[1:])
        if isinstance(rank, float):
            return max(1, round(rank * min(a, b)))
        return int(rank)

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return self._state_for(p, self._kinds[id(p)], group)

    def _state_for(self, p: Tensor, kind: Kind, group: dict[str, Any]) -> dict[str, Tensor]:
        """Zero state of a tensor like ``p`` (a meta tensor of the global shape for FSDP2) with momentum ``kind``."""
        state: dict[str, Tensor] = {"step": torch.tensor(0.0)}
        dt = F.compute_dtype(p)
        if isinstance(kind, SplitMomentum):
            cs = _chunk_shape(p.shape, kind)
            for i, k in enumerate(kind.kinds):
                state.update(M.init_momentum_state(k, cs, self._rank_for(cs, group["rank"]), p.device, f"{i}.", dt))
        else:
            rank = self._rank_for(p.shape, group["rank"]) if kind == "low_rank" else 1
            state.update(M.init_momentum_state(kind, p.shape, rank, p.device, dtype=dt))
        if group["second_moment"] == "factored":
            state.update(F.init_factored_state(p))
        else:
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=dt, device=p.device)
        return state

    def _sharded_state_spec(self, p: Tensor, group: dict[str, Any], layout: Any) -> tuple[dict[str, Tensor], set[str]]:
        """The state of an FSDP2 parameter: that of the whole tensor (meta) and the keys that follow its rows
        (:mod:`adalomo.distributed.momentum` says which and why)."""
        kind, shape = self._kinds[id(p)], torch.Size(p.shape)
        whole = self._state_for(torch.empty(shape, dtype=p.dtype, device="meta"), kind, group)
        if layout.shard is None:  # one rank on the shard dim (HSDP): every rank holds the whole state
            return whole, set()
        DM.check_split(kind, shape, f"AdaPM: parameter {self._names.get(id(p)) or tuple(shape)!r}")
        rows = set(DM.second_moment_row_keys(group["second_moment"], len(shape)))
        if isinstance(kind, SplitMomentum):
            cs = _chunk_shape(shape, kind)
            for i, k in enumerate(kind.kinds):
                rows.update(DM.row_state_keys(k, cs, f"{i}."))
        else:
            rows.update(DM.row_state_keys(kind, shape))
        return whole, rows

    def _registered(self, t: Tensor, state: dict[str, Tensor]) -> Tensor:
        """The registered parameter that ``t`` is, or whose local tensor it is: the FSDP2 path hands the maths a
        fresh ``p.to_local()`` and a dict of its local state, whose step counter is the parameter's own (found
        again after ``load_state_dict`` replaced the counters)."""
        if id(t) in self._kinds:
            return t
        counter = state["step"]
        owner = self._local_owner.get(id(counter))
        if owner is None or self.state[owner].get("step") is not counter:
            self._local_owner = {id(st["step"]): q for q, st in self.state.items() if "step" in st}
            owner = self._local_owner.get(id(counter))
            if owner is None:
                raise KeyError(f"AdaPM: a tensor of shape {tuple(t.shape)} is not one of this optimizer's parameters")
        return owner

    def momentum_kind(self, p: Tensor) -> Kind:
        """The momentum kind AdaPM uses for ``p``."""
        return self._kinds[id(p)]

    # ---------------------------------------------------------------------------------- maths
    def _basis_fn(self, p: Tensor, group: dict[str, Any], step: int, chunk: int):
        method = group["proj_method"]
        if method == "svd":
            return lambda g2, r, side: M.orthonormal_basis(g2, r, side, "svd")
        seed = ((self.proj_seed * 1_000_003 + self._param_index[id(p)]) * 1_000_033 + step) * 31 + chunk
        return RandomizedBasis(seed % (1 << 62))

    def _grouped_takes(self, p: Tensor) -> bool:
        return p.dim() <= 2 and all(v.is_contiguous() and v.dtype == torch.float32
                                    for k, v in self.state[p].items() if k != "step")

    def _chunks(self, p: Tensor) -> tuple:
        """The momentum chunks of the matrix ``p`` for the kernels (the whole matrix, or a ``SplitMomentum``'s equal
        chunks): made once per parameter (the kernels' launch plans are keyed on these objects)."""
        out = self._kernel_chunks.get(id(p))
        if out is not None:
            return out
        kind, whole = self._kinds[id(p)], slice(None)
        if not isinstance(kind, SplitMomentum):
            chunks = [kernels.AdaPMChunk(kind, "", whole, whole)]
        else:
            d, n = kind.dim % 2, len(kind.kinds)
            size = p.shape[d] // n
            chunks = []
            for i, k in enumerate(kind.kinds):
                part = slice(i * size, (i + 1) * size)
                rows, cols = (part, whole) if d == 0 else (whole, part)
                chunks.append(kernels.AdaPMChunk(k, f"{i}.", rows, cols))
        out = self._kernel_chunks[id(p)] = tuple(chunks)
        return out

    def _update_many(self, ps, grads, group, *, states, steps, seeds, sr, grad_scale, shards):
        beta1, lr = group["betas"][0], as_float(group["lr"])
        # every tensor's finite flags [momentum, parameter] in one buffer: one reduction for the bucket
        flags = torch.empty((len(ps), 2), dtype=torch.int32, device=ps[0].device)
        gap = group["update_proj_gap"]
        beta2s, bc2s, bases = [], [], []
        for p, t in zip(ps, steps):
            b2, bc2 = _beta2(group, t)
            beta2s.append(b2)
            bc2s.append(bc2)
            # at a refresh: chunk index -> its basis function
            bases.append((lambda k, p=p, t=t: self._basis_fn(p, group, int(t), k)) if (int(t) - 1) % gap == 0
                         else None)
        kernels.adapm_update_many_(
            ps, grads, states, [self._chunks(p) for p in ps], flags=flags, ts=steps, lr=lr, beta1=beta1,
            beta2s=beta2s, bc2s=bc2s, eps=group["eps"], weight_decay=group["weight_decay"],
            second_moment=group["second_moment"], clip_threshold=group["clip_threshold"],
            relative_lr=group["relative_lr"], bases=bases, fill=group["refresh_fill"], grad_scale=grad_scale,
            stochastic_rounding=sr, seeds=seeds)
        kernels.bump_versions(ps)
        return flags[:, 1].all()

    def _update(self, p, grad, group, state, grad_scale, stochastic_rounding, generator):
        state["step"] += 1
        t = float(state["step"])
        beta1, beta2 = group["betas"]
        # read-only from here on: no copy when the gradient is in the compute dtype already
        g = grad.to(F.compute_dtype(grad)) if grad_scale is None else F.upcast(grad, grad_scale)
        ok = torch.isfinite(g.sum())
        param = self._registered(p, state)  # under HSDP ``p`` is the (whole) local tensor of a DTensor
        kind = self._kinds[id(param)]
        refresh = (int(t) - 1) % group["update_proj_gap"] == 0
        if isinstance(kind, SplitMomentum):
            parts = []
            for i, (k, gc) in enumerate(zip(kind.kinds, g.chunk(len(kind.kinds), kind.dim))):
                parts.append(M.momentum_estimate_(k, state, gc, beta1=beta1, step=t, ok=ok, refresh=refresh,
                                                  basis=self._basis_fn(param, group, int(t), i),
                                                  fill=group["refresh_fill"], prefix=f"{i}."))
            m_hat = torch.cat(parts, kind.dim)
        else:
            m_hat = M.momentum_estimate_(kind, state, g, beta1=beta1, step=t, ok=ok, refresh=refresh,
                                         basis=self._basis_fn(param, group, int(t), 0), fill=group["refresh_fill"])
        beta2, bc2 = _beta2(group, t)
        lr, u_scale = as_float(group["lr"]), None
        if group["second_moment"] == "adam":
            u = _adam_direction(m_hat, g, state["exp_avg_sq"], ok, beta2, bc2, group["eps"])
            step_size = torch.full((), lr, dtype=g.dtype, device=p.device)
        else:
            ok = ok & F.update_second_moment_(state, g, beta2=beta2, eps1=group["eps"] ** 2)
            u = _factored_direction(m_hat, F.preconditioner(state), bc2)
            if group["clip_threshold"] is not None:  # folded into the step: no pass over u
                u_scale = F.clip_by_rms(F.sum_of_squares(u), u.numel(), group["clip_threshold"])
            if group["relative_lr"]:
                step_size = F.param_scale(p, PARAM_SCALE_EPS) * lr
            else:
                step_size = torch.full((), lr, dtype=g.dtype, device=p.device)
        F.apply_update_(p, u, step_size, group["weight_decay"], ok, stochastic_rounding, generator, u_scale=u_scale)
        return ok

    def _update_sharded(self, p, grad, group, state, grad_scale, stochastic_rounding, generator, shard):
        """``_update`` on the local rows of an FSDP2 parameter (:mod:`adalomo.distributed.momentum`).

        Collectives: one all-reduce of [finite flag | P^T g of each ``left`` low-rank chunk | the factored second
        moment's column sums and row-statistic sums | sum p^2 (``relative_lr``)]; a second one of sum u^2 for the
        update clipping (factored second moment only); at a basis refresh one all-gather of the whole gradient.
        """
        param = self._registered(p, state)
        kind = self._kinds[id(param)]
        state["step"] += 1
        t = float(state["step"])
        beta1 = group["betas"][0]
        beta2, bc2 = _beta2(group, t)
        g = grad.to(F.compute_dtype(grad)) if grad_scale is None else F.upcast(grad, grad_scale)
        shape = shard.global_shape
        parts = DM.chunks(kind, g, shape, _chunk_shape(shape, kind) if isinstance(kind, SplitMomentum) else None)
        if (int(t) - 1) % group["update_proj_gap"] == 0 and any(c.kind == "low_rank" for c in parts):
            DM.refresh_(kind, parts, g, state, beta1=beta1, step=t, fill=group["refresh_fill"], shard=shard,
                        bases=[self._basis_fn(param, group, int(t), i) for i in range(len(parts))])
        projected = DM.partial_projections(parts, state)
        factored = group["second_moment"] == "factored"
        relative = factored and group["relative_lr"]
        extra = [(~torch.isfinite(g.sum())).float(), *projected, *([F.sum_of_squares(p)] if relative else [])]
        if factored:
            ok_v, row_mean, _, extra = DF.second_moment_(state, g, beta2=beta2, eps1=group["eps"] ** 2, grad_scale=None,
                                                      shard=shard, extra=extra)
        else:
            extra = shard.all_reduce_sum_(extra)
        ok = extra[0] == 0
        summed = [x.to(g.dtype) for x in extra[1:1 + len(projected)]]
        m_parts = DM.estimates_(parts, state, beta1=beta1, step=t, ok=ok, projected=summed)
        m_hat = m_parts[0] if len(m_parts) == 1 else torch.cat(m_parts, kind.dim)
        lr, u_scale = as_float(group["lr"]), None
        step_size = torch.full((), lr, dtype=g.dtype, device=p.device)
        if not factored:
            u = _adam_direction(m_hat, g, state["exp_avg_sq"], ok, beta2, bc2, group["eps"])
        else:
            ok = ok & ok_v
            u = _factored_direction(m_hat, F.preconditioner(state, row_mean), bc2)
            if group["clip_threshold"] is not None:
                sum_sq = shard.all_reduce_sum_([F.sum_of_squares(u)])[0]
                u_scale = F.clip_by_rms(sum_sq, shard.numel, group["clip_threshold"])
            if relative:
                step_size = DF.param_scale(extra[-1], shard.numel, PARAM_SCALE_EPS) * lr
        F.apply_update_(p, u, step_size, group["weight_decay"], ok, stochastic_rounding, generator, u_scale=u_scale)
        return ok

    # ---------------------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid not in saved or p not in self.state:
                continue
            want = {k: tuple(v.shape) for k, v in self.state[p].items() if k != "step"}
            got = {k: tuple(v.shape) for k, v in saved[pid].items() if k != "step" and isinstance(v, Tensor)}
            if want != got:
                name = self._names.get(id(p)) or f"of shape {tuple(p.shape)}"
                raise ValueError(f"AdaPM.load_state_dict: the checkpoint's state for parameter {name} is {got}, "
                                 f"this optimizer expects {want}: it was saved with another momentum policy, "
                                 "rank or second_moment")
        super().load_state_dict(state_dict)

    # ---------------------------------------------------------------------------------- copies
    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(_policy_spec=self._policy_spec, _policy_is_named=self._policy_is_named, proj_seed=self.proj_seed)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        copy = "_policy_spec" in state  # not torch's load_state_dict, which passes state and param_groups only
        if copy:
            self._kinds, self._names, self._local_owner, self._warned_unnamed = {}, {}, {}, True
            self._kernel_chunks = {}
            self._policy = resolve_policy(state["_policy_spec"])
        super().__setstate__(state)
        if copy:
            for group in self.param_groups:
                self._resolve_group(group)
