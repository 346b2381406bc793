"""The Triton update path (imported lazily by ``adalomo.kernels``; needs ``triton``): AdaLomo/Adafactor and LOMO over
a list of tensors in a few grouped launches, and over one tensor as a list of one.

Tensors are grouped by dtypes and layout class (and, for matrices, by the one-read statistics' tile width and the
finalize block, functions of the shape: a matrix computes alike in a fused bucket and in the classic step); each
group runs its family's passes (``factored``, ``one_read``, ``vector``, ``lomo``) as one launch per pass. A tensor
that the grouped kernels cannot take as it is (leading dims that do not merge into one stride, state that is not
contiguous 16-byte-aligned fp32) is updated through contiguous copies, written back. Scalars derived from device data
stay on the device: the host passes launch geometry from shapes, and host floats from the CPU step counter (beta2,
rho, lr, ...) in the metadata, so no call waits for the device.
"""

from __future__ import annotations

import torch

from .. import _compat
from . import factored, lomo, one_read, vector
from .config import CONFIG, fin_block, on_change, set_config
from .grouped import Plan, grouped_key, make_plan, upload
from .launch import LaunchContext, align_flags, aligned, on_tensor_device, scale_arg, shape3, strides3

__all__ = ["scaled_rms_update_many_", "lomo_update_many_", "scaled_rms_update_", "lomo_update_", "CONFIG",
           "set_config"]

_PLANS: dict = {}
_MAX_PLANS = 4096  # above every model's tensor count: one-tensor calls keep a plan per tensor
on_change(_PLANS.clear)


def _all(flags: list) -> torch.Tensor:
    if len(flags) == 1:
        return flags[0].all()
    return torch.cat([f.reshape(-1) for f in flags]).all()


def _cached(key: tuple, build):
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        plan = _PLANS[key] = build()
    return plan


def _classify(p, g):
    """(layout class, g strides, p strides, (B, M, N)) of a tensor for the grouped kernels; None when the leading
    dims of p or g do not merge."""
    sg, sp = strides3(g), strides3(p)
    if sg is None or sp is None:
        return None
    bmn = shape3(p)
    align, g_unit, p_unit = align_flags(bmn[2], sg, sp)
    return (p.dtype, g.dtype, align and aligned(g, p), g_unit, p_unit), sg, sp, bmn


def _state_ok(*ts) -> bool:
    return all(t.is_contiguous() and t.dtype == torch.float32 and t.data_ptr() % 16 == 0 for t in ts)


def _state_keys(fac: bool, has_m: bool) -> tuple[str, ...]:
    keys = ("exp_avg_sq_row", "exp_avg_sq_col") if fac else ("exp_avg_sq",)
    return keys + ("exp_avg",) if has_m else keys


def _fresh(t: torch.Tensor, dtype=None) -> torch.Tensor:
    """A contiguous, 16-byte-aligned copy of ``t`` (a new allocation)."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device).copy_(t)


def _through_copies(idx: list[int], ps, gs, states, has_m: bool, run):
    """``run(ps, gs, states)`` on contiguous copies of the tensors ``idx`` (and of their ``states``, unless None);
    the results are copied back."""
    with torch.no_grad():
        cps = [_fresh(ps[i]) for i in idx]
        cgs = [gs[i] if strides3(gs[i]) is not None else gs[i].contiguous() for i in idx]
        csts = None if states is None else [{k: _fresh(states[i][k], torch.float32)
                                             for k in _state_keys(ps[i].dim() >= 2, has_m)} for i in idx]
        ok = run(cps, cgs, csts)
        for k, i in enumerate(idx):
            ps[i].copy_(cps[k])
            if csts is not None:
                for key, t in csts[k].items():
                    states[i][key].copy_(t)
    return ok


# ------------------------------------------------------------------------------------- AdaLomo/Adafactor
def _scaled_plan(ps, gs, states, has_m: bool, dev) -> Plan:
    # everything the plan depends on, per tensor: identity, pointer and layout of p, dtype, strides and alignment of
    # g, the state buffers' pointers (one flat tuple: this runs at every flush)
    key = [has_m, dev]
    add = key.extend
    for p, g, st in zip(ps, gs, states):
        shape = p.shape
        if len(shape) >= 2:
            add((id(p), p.data_ptr(), shape, p.stride(), p.dtype, g.dtype, g.stride(), g.data_ptr() % 16 == 0,
                 st["exp_avg_sq_row"].data_ptr(), st["exp_avg_sq_col"].data_ptr()))
        else:
            add((id(p), p.data_ptr(), shape, p.stride(), p.dtype, g.dtype, g.stride(), g.data_ptr() % 16 == 0,
                 st["exp_avg_sq"].data_ptr(), None))
        if has_m:
            key.append(st["exp_avg"].data_ptr())
    return _cached(tuple(key), lambda: _build_scaled_plan(ps, gs, states, has_m, dev))


def _build_scaled_plan(ps, gs, states, has_m: bool, dev) -> Plan:
    groups: dict = {}
    unfit = []
    for i, (p, g, st) in enumerate(zip(ps, gs, states)):
        fac = p.dim() >= 2
        sts = tuple(st[k] for k in _state_keys(fac, has_m))
        c = _classify(p, g)
        if c is None or not _state_ok(*sts):
            unfit.append(i)
            continue
        layout, sg, sp, (B, M, N) = c
        # matrices: one one-read tile width and one finalize block per group (constexprs), both functions of the shape
        shape_key = (one_read.tile_width(N), fin_block(M, N)) if fac else (0, 0)
        groups.setdefault((fac, layout) + shape_key, []).append((i, p, g, sts, sg, sp, (B, M, N)))
    plan = make_plan([factored.plan_group(items, layout, nb, fb, has_m, dev) if fac else
                      vector.plan_group(items, layout, has_m, dev) for (fac, layout, nb, fb), items in groups.items()])
    plan.unfit = unfit
    return plan


@on_tensor_device
def scaled_rms_update_many_(ps, gs, states, *, rhos, beta2s, eps, clip_threshold, weight_decay, scale_parameter,
                            beta1, grad_scale, stochastic_rounding, seeds):
    """AdaLomo/Adafactor's update (``functional._scaled_rms_update_``) for many tensors in a few launches.

    ``rhos``, ``beta2s``, ``seeds``: one per tensor (host numbers; each ``state['step']`` already incremented).
    Returns a 0-d bool device tensor: every gradient was finite (a tensor whose gradient was not is left untouched).
    """
    if not ps:
        return None
    hp = dict(eps=eps, clip_threshold=clip_threshold, weight_decay=weight_decay, scale_parameter=scale_parameter,
              beta1=beta1, grad_scale=grad_scale, stochastic_rounding=stochastic_rounding)
    plan = _scaled_plan(ps, gs, states, beta1 is not None, ps[0].device)
    flags = []
    if plan.unfit:
        idx = plan.unfit
        sub = [[xs[i] for i in idx] for xs in (rhos, beta2s, seeds)]
        flags.append(_through_copies(idx, ps, gs, states, beta1 is not None, lambda cps, cgs, csts: _run_scaled(
            _build_scaled_plan(cps, cgs, csts, beta1 is not None, cps[0].device), cps, cgs, *sub, **hp)))
    if plan.groups:
        flags.append(_run_scaled(plan, ps, gs, rhos, beta2s, seeds, **hp))
    return _all(flags)


def _run_scaled(plan: Plan, ps, gs, rhos, beta2s, seeds, *, eps, clip_threshold, weight_decay, scale_parameter, beta1,
                grad_scale, stochastic_rounding) -> torch.Tensor:
    dev = ps[0].device
    ctx = LaunchContext(ps[0])
    has_scale, scale = scale_arg(grad_scale, ps[0])
    has_m = beta1 is not None
    b1, omb1 = (float(beta1), 1.0 - float(beta1)) if has_m else (0.0, 1.0)
    sp_flag, hw = bool(scale_parameter), weight_decay != 0
    eps1, eps2, ct, wd = float(eps[0]), float(eps[1]), float(clip_threshold), float(weight_decay)
    bufs, ws = upload(plan, ctx.stream, dev, gs, seeds, stochastic_rounding, rhos, beta2s)  # ws: read through meta

    run = (ctx.stream, ctx.device, grouped_key(ctx.device, ctx.stream, scale))
    for gp, (meta_t, fmeta_t, oks) in zip(plan.groups, bufs.views):
        if gp.fac:
            factored.launch_group(gp, meta_t, fmeta_t, oks, run, scale, has_scale, sp_flag, hw, has_m,
                                  stochastic_rounding, eps1, eps2, ct, wd, b1, omb1)
        else:
            vector.launch_group(gp, meta_t, fmeta_t, oks, run, scale, has_scale, sp_flag, hw, has_m,
                                stochastic_rounding, eps1, eps2, ct, wd, b1, omb1)
    del ws
    _compat.bump_versions(ps if not plan.unfit else [ps[i] for gp in plan.groups for i in gp.idx])
    return bufs.oks_all


# ------------------------------------------------------------------------------------------------- LOMO
def _lomo_plan(ps, gs, dev) -> Plan:
    key = ["lomo", dev]
    add = key.extend
    for p, g in zip(ps, gs):
        add((id(p), p.data_ptr(), p.shape, p.stride(), p.dtype, g.dtype, g.stride(), g.data_ptr() % 16 == 0))
    return _cached(tuple(key), lambda: _build_lomo_plan(ps, gs, dev))


def _build_lomo_plan(ps, gs, dev) -> Plan:
    groups: dict = {}
    unfit = []
    for i, (p, g) in enumerate(zip(ps, gs)):
        c = _classify(p, g)
        if c is None:
            unfit.append(i)
            continue
        layout, sg, sp, bmn = c
        groups.setdefault(layout, []).append((i, p, g, (), sg, sp, bmn))
    plan = make_plan([lomo.plan_group(items, layout, dev) for layout, items in groups.items()])
    plan.unfit = unfit
    return plan


@on_tensor_device
def lomo_update_many_(ps, gs, *, lr, weight_decay, clip_grad_value, grad_scale, stochastic_rounding, seeds):
    """LOMO's update (``functional.lomo_update_``) for many tensors in three launches per group; returns "every
    gradient was finite" (a 0-d bool device tensor)."""
    if not ps:
        return None
    hp = dict(lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value, grad_scale=grad_scale,
              stochastic_rounding=stochastic_rounding)
    plan = _lomo_plan(ps, gs, ps[0].device)
    flags = []
    if plan.unfit:
        idx = plan.unfit
        sub = None if seeds is None else [seeds[i] for i in idx]
        flags.append(_through_copies(idx, ps, gs, None, False, lambda cps, cgs, _: _run_lomo(
            _build_lomo_plan(cps, cgs, cps[0].device), cps, cgs, sub, **hp)))
    if plan.groups:
        flags.append(_run_lomo(plan, ps, gs, seeds, **hp))
    return _all(flags)


def _run_lomo(plan: Plan, ps, gs, seeds, *, lr, weight_decay, clip_grad_value, grad_scale,
              stochastic_rounding) -> torch.Tensor:
    dev = ps[0].device
    ctx = LaunchContext(ps[0])
    has_scale, scale = scale_arg(grad_scale, ps[0])
    clip = clip_grad_value is not None
    n = len(ps)
    lr, wd = float(lr), float(weight_decay)
    # lr and weight decay travel in the fp32 rows' rho and beta2 columns (per call: schedulers), like AdaLomo's rho
    bufs, ws = upload(plan, ctx.stream, dev, gs, seeds, stochastic_rounding, [lr] * n, [wd] * n)
    cv = float(clip_grad_value) if clip else 0.0

    run = (ctx.stream, ctx.device, grouped_key(ctx.device, ctx.stream, scale))
    for gp, (meta_t, fmeta_t, oks) in zip(plan.groups, bufs.views):
        lomo.launch_group(gp, meta_t, fmeta_t, oks, run, scale, has_scale, clip, cv, wd, stochastic_rounding)
    del ws  # read through the metadata: kept until the launches above were issued
    _compat.bump_versions(ps if not plan.unfit else [ps[i] for gp in plan.groups for i in gp.idx])
    return bufs.oks_all


# ------------------------------------------------------------------------------------------- one tensor
def _one_seed(p, stochastic_rounding, generator, seed) -> int:
    """The stochastic-rounding seed of a one-tensor update: ``seed``, else ``generator.initial_seed()``, else drawn."""
    if not stochastic_rounding or p.dtype != torch.bfloat16:
        return 0
    if seed is None:
        seed = generator.initial_seed() if generator is not None else int(torch.randint(0, 1 << 62, (1,)))
    return seed


def scaled_rms_update_(p, g, state, *, rho, eps, clip_threshold, beta2, weight_decay, scale_parameter, beta1,
                       grad_scale, stochastic_rounding, generator, seed=None, ok_into=None):
    """``scaled_rms_update_many_`` for one tensor; returns its finite flag, also ANDed into ``ok_into`` if given."""
    ok = scaled_rms_update_many_([p], [g], [state], rhos=[rho], beta2s=[beta2], eps=eps, clip_threshold=clip_threshold,
                                 weight_decay=weight_decay, scale_parameter=scale_parameter, beta1=beta1,
                                 grad_scale=grad_scale, stochastic_rounding=stochastic_rounding,
                                 seeds=[_one_seed(p, stochastic_rounding, generator, seed)])
    if ok_into is not None:
        ok_into.logical_and_(ok)
    return ok


def lomo_update_(p, g, *, lr, weight_decay, clip_grad_value, grad_scale, stochastic_rounding, generator, seed=None,
                 ok_into=None):
    """``lomo_update_many_`` for one tensor; returns its finite flag, also ANDed into ``ok_into`` if given."""
    ok = lomo_update_many_([p], [g], lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                           grad_scale=grad_scale, stochastic_rounding=stochastic_rounding,
                           seeds=[_one_seed(p, stochastic_rounding, generator, seed)])
    if ok_into is not None:
        ok_into.logical_and_(ok)
    return ok
