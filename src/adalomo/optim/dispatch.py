"""The one place that picks how a bucket of (parameter, gradient) pairs of one param group is updated.

Classic ``step()`` and the fused engine's hooks and buckets both come here, so the two modes run the same code
on the same tensors and agree bit for bit. Per tensor:

* zero-size tensors: nothing to update (their step count still advances);
* FSDP2 shards (``DTensor``, ``Shard(0)`` over several ranks): the optimizer's sharded grouped kernels when they
  can take the tensor (decided alike on every rank), else its sharded torch maths
  (:mod:`adalomo.distributed.functional`), each with the shard passed explicitly;
* plain tensors (and DTensors whose local tensor is whole): the optimizer's grouped Triton kernels when they can
  take the tensor (``kernels.use_triton``), else its torch maths (:mod:`adalomo.functional`).

The optimizer supplies the maths per backend (``_update``, ``_update_sharded``, ``_update_many``); each returns
the 0-d bool "the gradient was finite", collected in ``opt._oks`` for the end of the step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import kernels
from .._compat import local_tensor
from ..distributed.shard import is_dtensor
from ..precision import sr_generator

if TYPE_CHECKING:  # pragma: no cover
    from .base import LowMemoryOptimizer

__all__ = ["update", "update_grouped", "grouped_fits", "sharded_kernels_fit", "check_placements", "advance_steps"]

#: step counters whose integral values up to this magnitude are exact (see ``advance_steps``)
_EXACT_COUNT = {torch.float32: 2.0**24, torch.float64: 2.0**53, torch.int64: 2.0**53, torch.int32: 2.0**31}


def update(opt: LowMemoryOptimizer, gi: int, items: list[tuple[Tensor, Tensor]]) -> None:
    """Update the pairs ``items`` of param group ``gi`` (in place); their finite flags go to ``opt._oks``."""
    layouts = opt._shard_layouts
    grouped: dict[Any, list[tuple[Tensor, Tensor]]] = {}
    single: list[tuple[Tensor, Tensor]] = []
    for p, g in items:
        opt._check_grad(g)
        layout = layouts.get(id(p)) if layouts else None
        if layout is not None:
            check_placements(opt, p, g, layout)
        if grouped_fits(opt, p, g, layout):
            grouped.setdefault(None if layout is None else layout.group, []).append((p, g))
        else:
            single.append((p, g))
    for key, pairs in grouped.items():  # FSDP2 shards: one all-reduce per process group
        update_grouped(opt, gi if key is None else (gi, key), pairs)
    for p, g in single:
        _update_one(opt, opt.param_groups[gi], p, g)


def grouped_fits(opt: LowMemoryOptimizer, p: Tensor, grad: Tensor, layout: Any) -> bool:
    """Whether the optimizer's grouped kernels take ``p`` with this gradient. The parameter's part (device, dtype,
    shape, the environment) is decided at its first gradient and kept; for FSDP2 parameters alike on every rank."""
    fits = opt._fits.get(id(p))
    if fits is None:
        if not opt._has_many:
            fits = False
        elif layout is None:
            fits = kernels.use_triton(p) and opt._grouped_takes(p)
        else:
            fits = opt._sharded_many and sharded_kernels_fit(p, grad, layout)
        opt._fits[id(p)] = fits
    if not fits or torch.compiler.is_compiling():
        return False
    return layout is not None or kernels.gradient_fits(grad, p)


def sharded_kernels_fit(p: Tensor, grad: Tensor, layout: Any) -> bool:
    """An FSDP2 parameter that the grouped kernels can update, decided alike on every rank: a shard of a tensor
    of any dimension, or a DTensor whose local tensor is whole (one rank on the shard dim: 1-GPU FSDP2, HSDP)."""
    if layout.shard is None:
        return kernels.use_triton(local_tensor(p), local_tensor(grad))
    return kernels.sharded_fits(p, grad)


def update_grouped(opt: LowMemoryOptimizer, key: Any, pairs: list[tuple[Tensor, Tensor]]) -> None:
    """The grouped kernels on ``pairs`` that ``grouped_fits`` accepted: ``key`` is the param group's index, or
    (index, process group) for FSDP2 parameters (whose shards every rank updates in the same calls)."""
    gi = key if isinstance(key, int) else key[0]
    group = opt.param_groups[gi]
    if not opt._grouped_supported(group):  # settings without a grouped kernel (e.g. AdaLomo's clip_grad_value)
        for p, g in pairs:
            _update_one(opt, group, p, g)
        return
    ps, gs = [p for p, _ in pairs], [g for _, g in pairs]
    shards = None if isinstance(key, int) else [opt._shard_layouts[id(p)].shard for p in ps]
    states, seeds, steps, sr = advance_steps(opt, ps, group)
    opt._oks.append(opt._update_many(ps, gs, group, states=states, steps=steps, seeds=seeds, sr=sr,
                                     grad_scale=opt._grad_scale(ps[0].device), shards=shards))


def _update_one(opt: LowMemoryOptimizer, group: dict, p: Tensor, grad: Tensor) -> None:
    """The torch maths on one tensor (its local rows for an FSDP2 shard)."""
    state = opt.state[p]
    if p.numel() == 0:  # nothing to update (and an empty factored mean would read as "not finite")
        state["step"] += 1
        return
    layout = opt._shard_layouts.get(id(p)) if opt._shard_layouts else None
    sr = opt._sr_enabled(group, p)
    gen = None
    if sr:
        seed = opt._sr_seed(p, state)
        if layout is not None and layout.row_offset:  # other shards draw other bits (replicas the same)
            seed = (seed * 1_000_037 + layout.row_offset) % (1 << 62)
        gen = sr_generator(p.device, seed)
    grad_scale = opt._grad_scale(p.device)
    if layout is None:
        opt._oks.append(_kept(opt._update(p, grad, group, state, grad_scale, sr, gen)))
        return
    with torch.no_grad():
        p_l, g_l = p.to_local(), grad.to_local()
        local = {k: (v.to_local() if is_dtensor(v) else v) for k, v in state.items()}
        before = dict(local)
        if layout.shard is None:
            ok = opt._update(p_l, g_l, group, local, grad_scale, sr, gen)
        else:
            ok = opt._update_sharded(p_l, g_l, group, local, grad_scale, sr, gen, layout.shard)
        for k, v in local.items():  # state the update replaced (e.g. a step counter) goes back into the DTensor
            if before.get(k) is v:
                continue
            old = state.get(k)
            if is_dtensor(old) and isinstance(v, Tensor) and v.shape == old.to_local().shape:
                old.to_local().copy_(v)
            else:
                state[k] = v
    opt._oks.append(_kept(ok))


#: the finite flags of CPU updates, shared (read-only): a fresh 0-d tensor per update, kept until the end of the
#: backward, lands between the gradients' buffers in the allocator's heap and keeps them from being reused
_CPU_FLAGS = {True: torch.tensor(True), False: torch.tensor(False)}


def _kept(ok: Tensor) -> Tensor:
    """The flag ``ok`` as ``opt._oks`` keeps it until the end of the step: one of two shared tensors on CPU (the
    host reads it for free there), the device tensor itself elsewhere (no synchronisation)."""
    return _CPU_FLAGS[bool(ok)] if ok.device.type == "cpu" else ok


def check_placements(opt: LowMemoryOptimizer, p: Tensor, grad: Tensor, layout: Any) -> None:
    if not is_dtensor(grad):
        raise RuntimeError(f"{type(opt).__name__}: parameter of shape {tuple(p.shape)} is a DTensor but its "
                           f"gradient is a {type(grad).__name__}")
    if tuple(grad.placements) != layout.placements:
        raise RuntimeError(f"{type(opt).__name__}: parameter of shape {tuple(p.shape)} has placements "
                           f"{layout.placements} but its gradient has {tuple(grad.placements)} (a Partial "
                           "gradient has not been reduced yet; FSDP2 reduces before calling the hooks)")


def advance_steps(opt: LowMemoryOptimizer, ps: list[Tensor], group: dict) -> tuple[list, list[int], list[float], bool]:
    """For a grouped update: the states, stochastic-rounding seeds (from the count before this step), the new step
    counts, and whether to round stochastically.

    The step counters are 0-d CPU tensors, and each torch call on one (``float``, ``add_``, even ``fill_``) costs a
    dispatcher round trip, which fused mode pays inside backward. So the value last written is remembered with
    the tensor's version counter: while the same tensor still has that version nobody has changed it and its
    value is known; the new count is then written through a NumPy view of the tensor and the version counters
    of the bucket are bumped in one call (what an in-place op does). Exact for integral counts below 2**24
    (fp32); anything else is read and incremented.
    """
    state = opt.state
    states = [state[p] for p in ps]
    s = group.get("stochastic_rounding")
    sr = (s is None or bool(s)) and any(p.dtype == torch.bfloat16 for p in ps)
    counters = [st["step"] for st in states]
    base = opt.sr_seed * 1_000_003
    index = opt._param_index
    if len({id(c) for c in counters}) < len(counters):  # a counter shared by two tensors: the plain way
        seeds = [((base + index[id(p)]) * 1_000_033 + int(c)) % (1 << 62) if sr else 0
                 for p, c in zip(ps, counters)]
        torch._foreach_add_(counters, 1.0)
        return states, seeds, [float(c) for c in counters], sr
    cache = opt._step_cache
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
        seeds.append(((base + index[key]) * 1_000_033 + int(pre)) % (1 << 62) if sr else 0)
    if bumped:
        kernels.bump_versions(bumped)
    return states, seeds, steps, sr


def _numpy_view(c: Tensor):
    """A NumPy array sharing the memory of the 0-d CPU counter ``c``, or None."""
    try:
        arr = c.numpy()
    except Exception:  # NumPy missing, a tensor that refuses (requires grad, a subclass...)
        return None
    return arr if arr.shape == () else None
