"""The shared base of the optimizers: validation, eager state, classic step and fused hooks.

Subclasses only validate their hyper-parameters, create their state and call one function of
``adalomo.functional`` per tensor (``_update``). Everything about *when* that function runs lives
here: after ``backward()`` in ``step()`` (classic) or inside ``backward()`` from a post-accumulate
hook (fused), with the same code path so that both modes give bit-identical results.
"""

from __future__ import annotations

import math
import threading
import warnings
import weakref
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from .. import distributed as _dist
from .. import kernels
from ..distributed import _optim as _dist_optim
from ..fused import BackwardTracker
from ..precision import DynamicLossScaler, sr_generator

__all__ = ["LowMemoryOptimizer"]

_NONFINITE = ("warn", "raise", "count")
#: fused mode on CUDA: gradients queued per param group before one grouped update (see ``bucket_cap_mb``).
#: "auto": 15% of the trainable parameters' bytes, kept within [64, 256] MiB (256 from ~0.9B bf16 parameters, 64
#: below ~0.22B). Each flush costs host time inside a backward that is close to host-bound, so fewer, larger
#: buckets are faster: in one process on an H200 (stage am), 0.94B with 256 MiB 1.044x of the floor against 1.075x
#: with 64 MiB; 6.7B 256 against 64 MiB 3-8% faster in four runs. The peak did not move (1.001x of the floor at
#: both sizes: the floor's own peak, at the logits, is higher than anything a bucket adds later)
DEFAULT_BUCKET_CAP_MB = "auto"
AUTO_BUCKET_RANGE_MB = (64.0, 256.0)
AUTO_BUCKET_FRACTION = 0.15


def auto_bucket_cap_mb(params: Iterable[Tensor]) -> float:
    """``bucket_cap_mb="auto"``: 15% of the trainable bytes (global sizes for DTensors), clamped."""
    total = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    lo, hi = AUTO_BUCKET_RANGE_MB
    return min(hi, max(lo, total * AUTO_BUCKET_FRACTION / 2**20))


def _check_number(name: str, value: Any, *, low: float | None = None, low_open: bool = False,
                  high: float | None = None, high_open: bool = False, hint: str = "") -> None:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = float(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}{hint}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high}"
        rule = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"{name} must be {rule}, got {value!r}{hint}")


def _capturing() -> bool:
    """A CUDA graph is being captured on the current stream (never true before CUDA is initialised)."""
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def check_eps(eps: Any) -> tuple[float, float]:
    if not isinstance(eps, (tuple, list)) or len(eps) != 2:
        raise ValueError(f"eps must be a pair (eps1, eps2), e.g. (1e-30, 1e-3), got {eps!r}")
    for i, e in enumerate(eps):
        _check_number(f"eps[{i}]", e, low=0.0)
    return float(eps[0]), float(eps[1])


class LowMemoryOptimizer(torch.optim.Optimizer):
    """Base of AdaLomo, Lomo, Adafactor (and AdaPM): a real ``torch.optim.Optimizer``.

    Modes
        ``fused=False``: ``loss.backward(); opt.step(); opt.zero_grad()``.
        ``fused=True``: each parameter is updated inside ``loss.backward()`` the moment its gradient is
        accumulated, and the gradient is freed at once. ``step()``/``zero_grad()`` stay callable and do
        no second update. One backward is one optimizer step: gradient accumulation over several
        backwards is not possible in this mode (use ``fused=False``).

    Robustness
        ``nonfinite``: a tensor whose gradient has NaN/inf is never updated (the check runs on the
        device); then ``"warn"`` (default) warns once per such step without synchronising (on a GPU the
        warning comes when the flag has reached the host: at a later step, at the latest in
        ``state_dict()``), ``"raise"`` raises after the backward (or step; this waits for the device),
        ``"count"`` only counts (``opt.skipped_updates``, a device tensor).
        ``loss_scaler``: a :class:`~adalomo.precision.DynamicLossScaler` for fp16 training; scale the
        loss with ``opt.scale_loss(loss)`` or use ``opt.fused_backward(loss)``.
        ``clip_grad_norm``: global gradient-norm clipping; in fused mode it needs a first pass,
        ``opt.grad_norm(loss)``, before the updating backward (as in ``lomo-optim``).

    Speed (fused mode, CUDA, Triton kernels)
        ``bucket_cap_mb``: gradients that arrive during backward are queued per param group and
        updated together by the grouped kernels once the queue holds this many MiB (and at the end of
        backward), like DDP's gradient buckets: a few launches instead of four per tensor, for at most
        this much extra gradient memory. ``"auto"`` (default): 15% of the trainable parameters' bytes,
        within [64, 256] MiB (the value is in ``opt.bucket_cap_mb``). ``0`` updates each tensor on its own.
        Results are the same as classic mode's grouped ``step()``. Whether a parameter can use the kernels
        (device, dtype, ``ADALOMO_DISABLE_TRITON``) is decided at its first gradient.
        ``side_stream``: accepted and ignored (the side stream measured no gain and was removed).
        ``flush_thread``: hand each bucket (and each CUDA tensor updated on its own) to one worker thread,
        which issues its update on the stream the hook ran on, so that the host time of the update (Python,
        kernel launches) overlaps the backward's own issuing instead of adding to it when the step is
        host-bound. At most two buckets wait for the worker (the hook waits beyond that: bounded gradient
        memory); ``backward()`` returns after the worker has issued every update. Same results bit for bit.
        Off by default: on an H200 it measured no gain (docs/kernels.md).

    Multi-GPU (see :mod:`adalomo.distributed`)
        FSDP2 ``DTensor`` parameters (``Shard(0)``, HSDP) are updated exactly as the full tensor would be
        in one process, in both modes; their state is stored as DTensors. Fused mode refuses plain
        parameters in a multi-process run (DDP) unless ``allow_unsharded_distributed=True``.
    """

    #: subclasses that keep no per-tensor maths state still keep ``step`` (it seeds stochastic rounding)
    _uses_sr = True
    #: FSDP2 (DTensor) parameters. False: a clear error at construction. True: ``_init_state`` gets the local
    #: shard and ``_update`` local tensors, and must go through ``functional``'s whole-update functions
    #: (checked at the first update) unless ``_sharding_aware`` says that the subclass reduces its statistics
    #: itself (``functional.current_shard()``). See ``adalomo.distributed``.
    _supports_sharding = True
    _sharding_aware = False
    #: ``_update_many`` takes ``shards=`` (a list of ShardInfo) and then updates FSDP2 shards with two
    #: all-reduces per call (AdaLomo, Adafactor); otherwise sharded parameters are updated one by one
    _sharded_many = False

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], defaults: dict[str, Any], *, fused: bool,
                 nonfinite: str = "warn", loss_scaler: DynamicLossScaler | None = None,
                 clip_grad_norm: float | None = None, sr_seed: int = 0,
                 allow_unsharded_distributed: bool = False, bucket_cap_mb: float | str = DEFAULT_BUCKET_CAP_MB,
                 side_stream: bool = False, flush_thread: bool = False):
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if clip_grad_norm is not None:
            _check_number("clip_grad_norm", clip_grad_norm, low=0.0, low_open=True,
                          hint=" (use None to disable clipping)")
        if loss_scaler is not None and not isinstance(loss_scaler, DynamicLossScaler):
            raise TypeError("loss_scaler must be an adalomo.DynamicLossScaler (torch's GradScaler cannot "
                            "unscale gradients that are consumed inside backward)")
        auto_cap = isinstance(bucket_cap_mb, str) and bucket_cap_mb == "auto"
        if not auto_cap:
            _check_number("bucket_cap_mb", bucket_cap_mb, low=0.0,
                          hint=' ("auto", or MiB; 0 updates each tensor on its own)')
        params = _param_list(params, type(self).__name__)
        self._fused = bool(fused)
        self.bucket_cap_mb = 0.0 if auto_cap else float(bucket_cap_mb)  # "auto": set once the groups are known
        self.side_stream = bool(side_stream)
        self.flush_thread = bool(flush_thread)
        self._handed: deque = deque()  # flush_thread: the futures of the work handed to the worker, oldest first
        self._pending: dict[int, list[tuple[Tensor, Tensor]]] = {}  # group index -> queued (param, grad)
        self._pending_bytes: dict[int, int] = {}
        # FSDP2 shards queued for _update_many(shards=...): (group index, process group) -> [(param, grad)], and
        # their *global* bytes, so that every rank flushes the same buckets at the same point
        self._pending_sh: dict[tuple[int, Any], list[tuple[Tensor, Tensor]]] = {}
        self._pending_sh_bytes: dict[tuple[int, Any], int] = {}
        self._param_fits: dict[int, bool] = {}  # id(p) -> kernels.use_triton(p), read at p's first gradient
        self._has_many = type(self)._update_many is not LowMemoryOptimizer._update_many
        # id(p) -> (its step counter, that tensor's _version after our last write, the value written, exact below)
        self._step_cache: dict[int, tuple[Tensor, int, float, float]] = {}
        self._ddp_checked = False  # the plain-tensor-under-DDP check, once per backward
        self.nonfinite = nonfinite
        self.loss_scaler = loss_scaler
        self.clip_grad_norm = clip_grad_norm
        self.sr_seed = int(sr_seed)
        self._handles: dict[int, Any] = {}
        self._group_index: dict[int, int] = {}
        self._param_index: dict[int, int] = {}
        self._tracker = BackwardTracker(self._backward_end, self._backward_abandoned)
        self._mode = "update"
        self._norm_sq: Tensor | None = None
        self._clip_coef: Tensor | None = None
        self._grad_scale_cache: Tensor | None = None
        self._oks: list[Tensor] = []
        self._flags_in_flight: list[tuple[Tensor, Any]] = []  # "warn" mode: (host flag, CUDA event or None)
        self._stale_in_flight: list[tuple[Tensor, Any]] = []  # carry_psq's check, read likewise
        self._skip_next = False
        self.skipped_updates: Tensor | None = None
        self.allow_unsharded_distributed = bool(allow_unsharded_distributed)
        self._shard_layouts: dict[int, Any] = {}  # id(p) -> distributed.ParamLayout, for DTensor parameters
        self._norm_sq_groups: dict[Any, Tensor] = {}
        super().__init__(params, defaults)
        if not any(p.requires_grad for g in self.param_groups for p in g["params"]):
            raise ValueError(f"{type(self).__name__}: no trainable parameters (every tensor has "
                             "requires_grad=False); unfreeze some parameters or pass the trainable ones")
        if auto_cap:
            self.bucket_cap_mb = auto_bucket_cap_mb(p for g in self.param_groups for p in g["params"])

    # ------------------------------------------------------------------ wiring
    @property
    def fused(self) -> bool:
        return self._fused

    def _refuse_capture(self) -> None:
        if _capturing():
            raise RuntimeError(
                f"{type(self).__name__}: a CUDA graph is being captured, but this optimizer's update cannot be "
                "replayed from a graph: its step size, beta2 and the kernels' launch metadata are computed on the "
                "host at every step, so each replay would repeat the captured step's values. Capture the forward "
                "and backward only (fused=False, so that backward does not update) and call step() outside the "
                "graph.")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen: set[int] = set()
        for i, p in enumerate(params):
            _check_param(p, i, type(self).__name__)
            if id(p) in seen or id(p) in self._group_index:
                raise ValueError(f"{type(self).__name__}: parameter {i} (shape {tuple(p.shape)}) is registered "
                                 "twice; pass each tensor once (tied weights appear once in model.parameters())")
            seen.add(id(p))
        super().add_param_group({**param_group, "params": params})
        group = self.param_groups[-1]
        self._validate_group(group)
        gi = len(self.param_groups) - 1
        for p in group["params"]:
            self._group_index[id(p)] = gi
            self._param_index[id(p)] = len(self._param_index)
            if p.requires_grad:
                if _dist.is_dtensor(p):
                    layout = self._shard_layouts[id(p)] = _dist.param_layout(p)
                    if layout.shard is not None:
                        layout.shard.reduce_group = _dist.stats_group(layout.shard.group)
                    self.state[p] = _dist_optim.init_sharded_state(self, p, group, layout)
                else:
                    self.state[p] = self._init_state(p, group)
                if self._fused:
                    self._register_hook(p)

    def _register_hook(self, p: Tensor) -> None:
        owner = getattr(p, "_adalomo_fused_owner", None)
        if owner is not None and owner() is not None and owner() is not self:
            raise ValueError(f"{type(self).__name__}(fused=True): a parameter of shape {tuple(p.shape)} already "
                             "belongs to another fused optimizer, which would update it a second time; call "
                             "remove_hooks() on the old optimizer first")
        p._adalomo_fused_owner = weakref.ref(self)
        self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._hook)

    def remove_hooks(self) -> None:
        """Detach the fused hooks; the optimizer then behaves as ``fused=False``."""
        self._drain(raise_errors=False)
        for h in self._handles.values():
            h.remove()
        self._handles.clear()
        for g in self.param_groups:
            for p in g["params"]:
                if getattr(p, "_adalomo_fused_owner", None) is not None and p._adalomo_fused_owner() is self:
                    p._adalomo_fused_owner = None
        self._fused = False
        self._tracker.reset()

    # ------------------------------------------------------------ subclass API
    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _init_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Tensor]:
        return {"step": torch.tensor(0.0)}

    def _update(self, p: Tensor, grad: Tensor, group: dict[str, Any], state: dict[str, Tensor],
                grad_scale: Tensor | None, stochastic_rounding: bool,
                generator: torch.Generator | None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update_many(self, ps: list[Tensor], grads: list[Tensor], group: dict[str, Any]) -> Tensor | None:
        """Classic mode on CUDA: update a whole group with grouped kernels; None = not supported here."""
        return None

    def _begin_many(self, ps: list[Tensor], group: dict[str, Any]) -> tuple[list, list[int], list[float], bool]:
        """For ``_update_many``: states, SR seeds (taken before the step count moves), new step counts, SR.

        The step counters are 0-d CPU tensors, and each torch call on one (``float``, ``add_``, even ``fill_``)
        costs a dispatcher round trip, which fused mode pays inside backward. So the value this optimizer last
        wrote is remembered together with the tensor's version counter: while the same tensor still has that
        version nobody has changed it and its value is known; the new count is then written through a NumPy
        view of the tensor and the version counters of the bucket are bumped in one call (what an in-place op
        does). Exact for integral counts below 2**24 (fp32); anything else is read and incremented.
        """
        state = self.state
        states = [state[p] for p in ps]
        s = group.get("stochastic_rounding")
        sr = (s is None or bool(s)) and any(p.dtype == torch.bfloat16 for p in ps)
        counters = [st["step"] for st in states]
        base = self.sr_seed * 1_000_003
        index = self._param_index
        if len({id(c) for c in counters}) < len(counters):  # a counter shared by two tensors: the plain way
            seeds = [((base + index[id(p)]) * 1_000_033 + int(c)) % (1 << 62) if sr else 0
                     for p, c in zip(ps, counters)]
            torch._foreach_add_(counters, 1.0)
            return states, seeds, [float(c) for c in counters], sr
        cache = self._step_cache
        seeds: list[int] = []
        steps: list[float] = []
        bumped: list[Tensor] = []
        for p, c in zip(ps, counters):
            key = id(p)
            ent = cache.get(key)
            if ent is not None and ent[0] is c and ent[1] == c._version:
                pre = ent[2]
                new = pre + 1.0
                if new < ent[3]:
                    arr = ent[4]
                    if arr is not None:
                        arr[()] = new
                        bumped.append(c)
                        cache[key] = (c, ent[1] + 1, new, ent[3], arr)  # the version after the bump below
                    else:
                        c.fill_(new)
                        cache[key] = (c, c._version, new, ent[3], None)
                else:
                    c.add_(1.0)
                    new = c.item()
                    del cache[key]
            else:
                pre = c.item()
                c.add_(1.0)
                new = c.item()
                limit = _EXACT_COUNT.get(c.dtype, 0.0) if c.device.type == "cpu" else 0.0
                if float(new).is_integer() and 0 <= new < limit:
                    cache[key] = (c, c._version, float(new), limit, _numpy_view(c))
                elif ent is not None:
                    del cache[key]
            steps.append(float(new))
            # _sr_seed's value, from the count before this step
            seeds.append(((base + index[key]) * 1_000_033 + int(pre)) % (1 << 62) if sr else 0)
        if bumped:
            kernels.bump_versions(bumped)
        return states, seeds, steps, sr

    # ---------------------------------------------------------------- updates
    def _check_grad(self, grad: Tensor) -> None:
        if grad.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients; use a dense "
                               "embedding (nn.Embedding(sparse=False))")
        if self.clip_grad_norm is not None and self._clip_coef is None:
            raise RuntimeError(f"{type(self).__name__}: clip_grad_norm is set, so each step needs the global "
                               "gradient norm first: call opt.grad_norm(loss) before the backward that "
                               "updates (or opt.fused_backward(loss) after it); classic mode computes it in step()")

    def _apply(self, p: Tensor, grad: Tensor) -> None:
        self._check_grad(grad)
        group = self.param_groups[self._group_index[id(p)]]
        state = self.state[p]
        sr = self._sr_enabled(group, p)
        layout = self._shard_layouts.get(id(p)) if self._shard_layouts else None
        gen = None
        if sr:
            seed = self._sr_seed(p, state)
            if layout is not None and layout.row_offset:  # other shards draw other bits (replicas the same)
                seed = (seed * 1_000_037 + layout.row_offset) % (1 << 62)
            gen = kernels.Seed(seed) if layout is None and kernels.use_triton(p, grad) else sr_generator(p.device, seed)
        if layout is None:
            ok = self._update(p, grad, group, state, self._grad_scale(p.device), sr, gen)
        else:
            ok = _dist_optim.sharded_update(self, layout, p, grad, group, state, self._grad_scale(p.device), sr, gen)
        self._oks.append(ok)

    def _sr_seed(self, p: Tensor, state: dict[str, Tensor]) -> int:
        """Stochastic-rounding seed from (optimizer seed, parameter index, step): resumes draw the same bits."""
        step = int(state["step"]) if "step" in state else 0
        return ((self.sr_seed * 1_000_003 + self._param_index[id(p)]) * 1_000_033 + step) % (1 << 62)

    def _sr_enabled(self, group: dict[str, Any], p: Tensor) -> bool:
        sr = group.get("stochastic_rounding")
        return (p.dtype == torch.bfloat16) if sr is None else (bool(sr) and p.dtype == torch.bfloat16)

    def _grad_scale(self, device: torch.device) -> Tensor | None:
        if self.loss_scaler is None and self._clip_coef is None:
            return None
        if self._grad_scale_cache is None or self._grad_scale_cache.device != device:
            s = torch.ones((), dtype=torch.float32, device=device)
            if self.loss_scaler is not None:
                s = s * self.loss_scaler.inv_scale().to(device)
            if self._clip_coef is not None:
                s = s * self._clip_coef.to(device)
            self._grad_scale_cache = s
        return self._grad_scale_cache

    def _hook(self, p: Tensor) -> None:
        # the hot path of fused mode (once per parameter per backward, on the critical path of a host-bound
        # backward): a few attribute and dict look-ups before the gradient is queued
        layout = self._shard_layouts.get(id(p)) if self._shard_layouts else None
        if layout is None and not self._ddp_checked:
            _dist_optim.check_unsharded(self, p)
            self._ddp_checked = True
        self._tracker.enter(p)
        grad = p.grad
        p.grad = None
        if grad is None:
            return
        if self._mode == "norm":
            n, grp = _dist_optim.local_norm(layout, grad)
            if self.loss_scaler is not None:
                n = n * self.loss_scaler.inv_scale().to(n.device)
            sq = n.square()
            if grp is not None:
                prev = self._norm_sq_groups.get(grp)
                self._norm_sq_groups[grp] = sq if prev is None else prev + sq.to(prev.device)
                return
            self._norm_sq = sq if self._norm_sq is None else self._norm_sq + sq.to(self._norm_sq.device)
            return
        cap = self.bucket_cap_mb
        if layout is not None:
            if cap > 0 and self._sharded_many and self._sharded_fits(p, grad, layout):
                self._queue_sharded(p, grad, layout, cap)
                return
        elif cap > 0 and self._has_many:
            key = id(p)
            fits = self._param_fits.get(key)  # _kernels_fit, inlined
            if fits is None:
                fits = self._param_fits[key] = kernels.use_triton(p)
            if fits and kernels.gradient_fits(grad, p) and not torch.compiler.is_compiling():
                if grad.is_sparse or self.clip_grad_norm is not None:
                    self._check_grad(grad)
                gi = self._group_index[key]
                queue = self._pending.get(gi)
                if queue is None:
                    queue = self._pending[gi] = []
                queue.append((p, grad))
                size = self._pending_bytes[gi] = self._pending_bytes.get(gi, 0) + grad.nbytes
                if size >= cap * 1048576.0:
                    self._flush(gi)
                return
        if grad.is_cuda:
            self._refuse_capture()
        if self.flush_thread and layout is None:
            self._hand_over(grad.device, self._apply_one, p, grad)
            return
        self._apply_one(p, grad)

    def _apply_one(self, p: Tensor, grad: Tensor) -> None:
        self._apply(p, grad)

    def _kernels_fit(self, p: Tensor, grad: Tensor) -> bool:
        """``kernels.use_triton(p, grad)``, with the parameter's part decided once, at its first gradient."""
        fits = self._param_fits.get(id(p))
        if fits is None:
            fits = self._param_fits[id(p)] = kernels.use_triton(p)
        return fits and kernels.gradient_fits(grad, p) and not torch.compiler.is_compiling()

    def _sharded_fits(self, p: Tensor, grad: Tensor, layout: Any) -> bool:
        """An FSDP2 parameter that goes through the grouped kernels (decided alike on every rank): a shard of a
        tensor of any dimension, or a DTensor whose local tensor is whole (one rank on the shard dim: 1-GPU FSDP2,
        HSDP)."""
        fits = self._param_fits.get(id(p))
        if fits is None:
            if layout.shard is None:
                fits = kernels.use_triton(kernels._local(p), kernels._local(grad))
            else:
                fits = kernels.sharded_fits(p, grad)
            self._param_fits[id(p)] = fits
        return fits and not torch.compiler.is_compiling()

    def _queue_sharded(self, p: Tensor, grad: Tensor, layout: Any, cap: float) -> None:
        if tuple(grad.placements) != layout.placements:
            raise RuntimeError(f"{type(self).__name__}: parameter of shape {tuple(p.shape)} has placements "
                               f"{layout.placements} but its gradient has {tuple(grad.placements)} (a Partial "
                               "gradient has not been reduced yet; FSDP2 reduces before calling the hooks)")
        if self.clip_grad_norm is not None:
            self._check_grad(grad)
        key = (self._group_index[id(p)], layout.group)
        queue = self._pending_sh.get(key)
        if queue is None:
            queue = self._pending_sh[key] = []
        queue.append((p, grad))
        size = self._pending_sh_bytes[key] = self._pending_sh_bytes.get(key, 0) + grad.numel() * grad.element_size()
        if size >= cap * 1048576.0:
            self._flush_sharded(key)

    def _flush_sharded(self, key: tuple[int, Any]) -> None:
        items = self._pending_sh.pop(key, None)
        self._pending_sh_bytes[key] = 0
        if items:
            self._update_sharded(key[0], items)

    def _update_sharded(self, gi: int, items: list[tuple[Tensor, Tensor]]) -> None:
        """One grouped call for FSDP2 parameters of one process group (sharded ones: two all-reduces in all)."""
        self._refuse_capture()
        ps, grads = [p for p, _ in items], [g for _, g in items]
        shards = [self._shard_layouts[id(p)].shard for p in ps]
        ok = self._update_many(ps, grads, self.param_groups[gi], shards=shards)
        if ok is None:  # this group's settings have no grouped kernel: one by one, in the same order everywhere
            for p, g in items:
                self._apply(p, g)
        else:
            self._oks.append(ok)

    @property
    def _bucketed(self) -> bool:
        return self.bucket_cap_mb > 0 and self._has_many

    def _flush(self, gi: int) -> None:
        """Update the queued tensors of group ``gi`` in one grouped call (their gradients are freed after)."""
        items = self._pending.pop(gi, None)
        self._pending_bytes[gi] = 0
        if not items:
            return
        self._refuse_capture()
        if self.flush_thread:
            self._hand_over(items[0][1].device, self._update_bucket, gi, items)
        else:
            self._update_bucket(gi, items)

    def _update_bucket(self, gi: int, items: list) -> None:
        ps, grads = [p for p, _ in items], [g for _, g in items]
        self._update_queued(gi, items, ps, grads)

    # ------------------------------------------------------------ flush thread
    def _hand_over(self, device: torch.device, fn, *args) -> None:
        """``flush_thread``: run ``fn(*args)`` on the worker, on this thread's current stream (the gradients were
        produced on it, so the update is queued after them); wait for the oldest hand-over beyond two."""
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        handed = self._handed
        while handed and handed[0].done():
            handed.popleft().result()  # re-raises the worker's error in the backward
        if len(handed) >= _MAX_HANDED:
            handed.popleft().result()
        handed.append(_flush_executor().submit(_on_worker, fn, stream, args))

    def _drain(self, raise_errors: bool = True) -> None:
        """Wait until the worker has issued everything handed to it (not for the device to run it)."""
        error = None
        handed = self._handed
        while handed:
            try:
                handed.popleft().result()
            except BaseException as e:  # noqa: BLE001 - the first one is raised once all are done
                if error is None:
                    error = e
        if error is not None and raise_errors:
            raise error

    def _update_queued(self, gi: int, items: list, ps: list[Tensor], grads: list[Tensor]) -> None:
        ok = self._update_many(ps, grads, self.param_groups[gi])
        if ok is None:  # this group's settings have no grouped kernel (e.g. AdaLomo's clip_grad_value)
            for p, g in items:
                self._apply(p, g)
        else:
            self._oks.append(ok)

    def _backward_abandoned(self) -> None:
        """A backward raised midway: drop the gradients it queued (those tensors keep their values)."""
        self._pending.clear()
        self._pending_bytes.clear()
        self._pending_sh.clear()
        self._pending_sh_bytes.clear()
        self._drain(raise_errors=False)  # what was handed over still applies (its gradients were complete)
        self._ddp_checked = False

    def _backward_end(self) -> None:
        if self._mode == "norm":
            return
        self._finish_step()

    def _finish_step(self) -> None:
        self._ddp_checked = False
        for gi in list(self._pending):
            self._flush(gi)
        for key in list(self._pending_sh):
            self._flush_sharded(key)
        if self._handed:
            try:
                self._drain()
            except BaseException:
                self._oks.clear()
                raise
        oks, self._oks = self._oks, []
        ok_all = None
        if oks:
            ok_all = oks[0] if len(oks) == 1 else _stack_all(oks)
        self._clip_coef = None
        self._grad_scale_cache = None
        self._check_carried_sums()
        if ok_all is None:
            return
        self._account(ok_all)

    def _check_carried_sums(self) -> None:
        """``carry_psq`` (kernel setting): report, without waiting, a step whose carried sums of p^2 did not match
        the parameters the write read (changed through ``p.data``), and turn the setting off."""
        impl = kernels._impl
        if impl is None or not (impl.CONFIG["carry_psq"] or self._stale_in_flight):
            return
        for dev in list(impl._STALE):
            flag = impl.take_carry_stale(dev)
            if flag is not None:
                self._stale_in_flight.append(_host_copy(flag))
        for flag in _arrived(self._stale_in_flight, block=False):
            if bool(flag):
                self._stale_in_flight.clear()
                impl.set_config(carry_psq=False)
                warnings.warn(
                    f"{type(self).__name__}: with the kernel setting carry_psq, a parameter changed between two steps "
                    "without its version counter moving (a write through p.data): that step scaled its update by "
                    "the RMS of the weights before the change (the direction was right, the size off by the ratio "
                    "of the two RMS). carry_psq is now off; change parameters in place under torch.no_grad() "
                    "instead of through .data to keep it, or turn it off from the start with "
                    "adalomo.kernels.set_config(carry_psq=False).", RuntimeWarning, stacklevel=3)

    def _account(self, ok_all: Tensor) -> None:
        bad = (~ok_all).to(torch.int64)
        self.skipped_updates = bad if self.skipped_updates is None else self.skipped_updates + bad.to(
            self.skipped_updates.device)
        if self.loss_scaler is not None:
            self.loss_scaler.record(ok_all.to(self.loss_scaler.found_inf.device))
            self.loss_scaler.update()
            return
        if self.nonfinite == "count":
            return
        if self.nonfinite == "raise":
            if not bool(ok_all):
                raise FloatingPointError(self._nonfinite_message())
            return
        self._flags_in_flight.append(_host_copy(ok_all))  # "warn": read when it has arrived, never wait
        self._warn_nonfinite(block=False)

    def _warn_nonfinite(self, block: bool) -> None:
        """Warn for each finished step whose finite flag was False; ``block`` waits for the ones in flight."""
        for flag in _arrived(self._flags_in_flight, block):
            if not bool(flag):
                warnings.warn(self._nonfinite_message(), RuntimeWarning, stacklevel=3)

    def _nonfinite_message(self) -> str:
        return (f"{type(self).__name__}: a gradient contained NaN or inf; the tensors concerned were left "
                "unchanged that step (weights stay finite). Lower the learning rate, check the loss, or use "
                "bf16/fp32 (fp16 needs loss_scaler=adalomo.DynamicLossScaler()).")

    @torch.no_grad()
    def step(self, closure=None):
        """Classic mode: update every parameter that has a gradient. Fused mode: nothing to do."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._fused:
            return loss
        self._refuse_capture()
        if self.clip_grad_norm is not None:
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            if grads:
                total = self._total_norm(grads)
                self._clip_coef = (self.clip_grad_norm / (total + 1e-6)).clamp(max=1.0)
        try:
            for group in self.param_groups:
                ps = [p for p in group["params"] if p.grad is not None]
                if not ps:
                    continue
                if ps and not self._shard_layouts and kernels.use_triton(*ps, *(p.grad for p in ps)):
                    ok = self._update_many(ps, [p.grad for p in ps], group)
                    if ok is not None:  # a few launches for the whole group
                        self._oks.append(ok)
                        continue
                gi = self._group_index[id(ps[0])]
                by_group: dict[Any, list[tuple[Tensor, Tensor]]] = {}
                for p in ps:
                    layout = self._shard_layouts.get(id(p)) if self._shard_layouts else None
                    if layout is not None and self._sharded_many and self._sharded_fits(p, p.grad, layout):
                        self._check_grad(p.grad)
                        by_group.setdefault(layout.group, []).append((p, p.grad))
                    else:
                        self._apply(p, p.grad)
                for items in by_group.values():  # FSDP2 shards: two all-reduces per process group
                    self._update_sharded(gi, items)
        finally:
            self._finish_step()
        return loss

    def _total_norm(self, grads: list[Tensor]) -> Tensor:
        if any(_dist.is_dtensor(g) for g in grads):
            total = _dist_optim.global_norm(grads)
            if self.loss_scaler is not None:
                total = total * self.loss_scaler.inv_scale().to(total.device)
            return total
        dev = grads[0].device
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32).to(dev) for g in grads])
        total = torch.linalg.vector_norm(norms)
        if self.loss_scaler is not None:
            total = total * self.loss_scaler.inv_scale().to(dev)
        return total

    # ------------------------------------------------ lomo-optim compatible API
    def scale_loss(self, loss: Tensor) -> Tensor:
        """The loss to call ``backward()`` on: multiplied by the loss scale when fp16 scaling is on."""
        return loss if self.loss_scaler is None else self.loss_scaler.scale_loss(loss)

    def grad_norm(self, loss: Tensor) -> Tensor:
        """First pass of two-pass fused training: the global gradient norm, without updating.

        Runs ``backward(retain_graph=True)`` that only accumulates squared gradient norms (each gradient
        is freed at once). Sets the clip coefficient for the next updating backward when
        ``clip_grad_norm`` is set, and makes that backward skip the whole step, exactly, when the
        norm is not finite. Returns the (unscaled) norm as a 0-d tensor.
        """
        if not self._fused:
            raise RuntimeError(f"{type(self).__name__}.grad_norm(loss) is the first pass of fused mode; in "
                               "classic mode set clip_grad_norm and call loss.backward(); opt.step()")
        self._mode, self._norm_sq = "norm", None
        self._norm_sq_groups = {}
        try:
            self.scale_loss(loss).backward(retain_graph=True)
        finally:
            self._mode = "update"
        norm_sq = _dist_optim.reduce_sq_norms(self._norm_sq, self._norm_sq_groups)
        self._norm_sq_groups = {}
        total = torch.zeros((), device=loss.device) if norm_sq is None else norm_sq.sqrt()
        self._norm_sq = None
        if self.clip_grad_norm is not None:
            self._clip_coef = (self.clip_grad_norm / (total + 1e-6)).clamp(max=1.0)
        self._skip_next = not bool(torch.isfinite(total))
        return total

    def fused_backward(self, loss: Tensor, lr: float | None = None) -> None:
        """``lomo-optim``'s entry point: set ``lr`` on every group (if given), backward, update."""
        if lr is not None:
            _check_number("lr", lr, low=0.0)
            for g in self.param_groups:
                g["lr"] = lr
        if self._skip_next:
            self._skip_next = False
            self._clip_coef = None
            self._grad_scale_cache = None
            ok = torch.zeros((), dtype=torch.bool, device=loss.device)
            self._account(ok)
            return
        self.scale_loss(loss).backward()
        self.step()
        if not self._fused:
            self.zero_grad(set_to_none=True)

    # ---------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        self._drain(raise_errors=False)  # flush_thread: nothing half-issued after a backward that raised
        self._warn_nonfinite(block=True)  # a checkpoint does not hide a warning still in flight
        sd = super().state_dict()
        if self.loss_scaler is not None:
            sd["loss_scaler"] = self.loss_scaler.state_dict()
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._drain(raise_errors=False)
        state_dict = dict(state_dict)
        scaler = state_dict.pop("loss_scaler", None)
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        # torch casts floating state to the parameter's dtype (bf16!); our statistics are fp32: restore them
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid not in saved_state or p not in self.state:
                continue
            for k, v in saved_state[pid].items():
                if isinstance(v, Tensor) and k != "step" and self.state[p][k].dtype != v.dtype:
                    self.state[p][k] = v.to(device=p.device, copy=True)
        if self._shard_layouts:
            _dist_optim.conform_loaded_state(self)
        if scaler is not None and self.loss_scaler is not None:
            self.loss_scaler.load_state_dict(scaler)


#: step counters whose integral values up to this magnitude are exact (see ``_begin_many``)
_EXACT_COUNT = {torch.float32: 2.0**24, torch.float64: 2.0**53, torch.int64: 2.0**53, torch.int32: 2.0**31}


#: flush_thread: hand-overs that may wait for the worker before the hook waits (each holds a bucket's gradients)
_MAX_HANDED = 2
_EXECUTOR: ThreadPoolExecutor | None = None
_EXECUTOR_LOCK = threading.Lock()


def _flush_executor() -> ThreadPoolExecutor:
    """The one worker thread of every optimizer in the process (updates are issued in hand-over order)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        with _EXECUTOR_LOCK:
            if _EXECUTOR is None:
                _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adalomo-flush")
    return _EXECUTOR


def _on_worker(fn, stream, args) -> None:
    # grad mode is per thread: off, as inside backward (the torch path updates leaves in place)
    with torch.no_grad(), (torch.cuda.stream(stream) if stream is not None else nullcontext()):
        fn(*args)


def _numpy_view(c: Tensor):
    """A NumPy array sharing the memory of the 0-d CPU counter ``c``, or None."""
    try:
        arr = c.numpy()
    except Exception:  # NumPy missing, a tensor that refuses (requires grad, a subclass...)
        return None
    return arr if arr.shape == () else None


def _stack_all(oks: list[Tensor]) -> Tensor:
    """``all`` over the finite flags of a step (0-d bool tensors; on several devices under model parallelism)."""
    dev = oks[0].device
    if all(o.device == dev for o in oks):
        return torch.stack(oks).all()
    return torch.stack([o.to(dev) for o in oks]).all()


def _arrived(flights: list[tuple[Tensor, Any]], block: bool):
    """The host flags of ``_host_copy`` that have arrived, oldest first, each taken off ``flights`` (``block``: all
    of them, waiting; more than 64 in flight: the oldest anyway)."""
    while flights and (block or len(flights) > 64 or flights[0][1] is None or flights[0][1].query()):
        flag, event = flights.pop(0)
        if event is not None:
            event.synchronize()
        yield flag


def _host_copy(flag: Tensor) -> tuple[Tensor, Any]:
    """A host copy of a 0-d device flag without waiting for it: (pinned tensor, CUDA event), or (flag, None)."""
    if flag.device.type != "cuda":
        return flag.cpu(), None
    host = torch.empty((), dtype=flag.dtype, pin_memory=True)
    host.copy_(flag, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def _param_list(params, name: str) -> list:
    if isinstance(params, Tensor):
        raise TypeError(f"{name}: params must be an iterable of tensors or dicts (e.g. model.parameters()), "
                        "got a single Tensor; wrap it in a list")
    params = list(params)
    if not params:
        raise ValueError(f"{name}: got an empty parameter list; pass model.parameters() of a model that has "
                         "parameters")
    return params


def _check_param(p: Any, i: int, name: str) -> None:
    if not isinstance(p, Tensor):
        raise TypeError(f"{name}: parameter {i} is a {type(p).__name__}, not a tensor")
    if not p.is_leaf:
        raise ValueError(f"{name}: parameter {i} (shape {tuple(p.shape)}) is not a leaf tensor (it was computed "
                         "from other tensors); pass the model's own parameters, e.g. model.parameters()")
    if p.is_complex():
        raise ValueError(f"{name}: parameter {i} is complex ({p.dtype}); only real floating-point parameters "
                         "are supported (view complex weights as real with torch.view_as_real)")
    if not p.is_floating_point():
        raise ValueError(f"{name}: parameter {i} has dtype {p.dtype}; only floating-point parameters can be "
                         "optimized")
