"""The maths of the optimizers on one tensor, in plain torch: the reference, the CPU path and the fallback.

Small composable pieces (optax-style) and the updates built from them:

* ``update_second_moment_``: EMA of g^2 + eps1, factored over the last two dims (row/column means)
  for tensors with >= 2 dims, full for 0-D/1-D tensors;
* ``preconditioner`` / ``precondition``: u = g / sqrt(v_hat);
* ``clip_by_rms``: u / max(1, RMS(u) / d) (the "grouped update normalisation");
* ``param_scale``: max(eps2, RMS(p)) (AdaLomo's and Adafactor's relative step size);
* ``apply_update_``: p <- p * (1 - lr_t * wd) - lr_t * u, computed in fp32 (fp64 for fp64 tensors),
  written back with optional bf16 stochastic rounding, masked so that a non-finite gradient never
  touches ``p``.

``scaled_rms_update_`` (the shared core of AdaLomo and Adafactor), ``adalomo_update_``,
``adafactor_update_`` and ``lomo_update_`` compose them. Nothing here chooses a backend or talks to other
processes: the Triton kernels (``adalomo.kernels``) and the FSDP2 maths (``adalomo.distributed.functional``)
are picked by ``adalomo.optim.dispatch``. On accelerators everything stays on the device (no ``.item()``):
every scalar derived from the gradient is a 0-d device tensor and a non-finite gradient is masked by a
device-side select. On CPU there is no device to wait for: the finite flag and the scalars (RMS(p), the clip
factor) are read on the host, so a skipped update costs nothing, the moving averages and the update run in
place, and scalar arithmetic costs no dispatched ops. Large 2-D tensors are processed in row blocks so that the
temporaries stay bounded.

Passes over a factored tensor on CPU (``scaled_rms_update_``), per row block of at most ``BLOCK_NUMEL`` elements
(the temporaries are block-sized): g^2 (a temporary; from an fp32 copy of a 16-bit g) and three reads of it, its row
means, its column sums and the column weights sum_i g_ij^2 / row'_i that give sum(u^2) without u; RMS(p), one read;
g r (the other temporary, from an fp32 copy of a 16-bit g), then p += (g r)(c coef) in place (p *= 1 - lr wd
first, with weight decay). A 16-bit p is updated inside the temporary (p + (g r)(c coef): one pass without weight
decay) and written back, rounded stochastically in place for bf16 (random bits, their sum with the value's bits, a
mask, a copy).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .precision import write_back_

__all__ = [
    "BLOCK_NUMEL",
    "ACCELERATOR_BLOCK_NUMEL",
    "compute_dtype",
    "init_factored_state",
    "factored_state_numel",
    "is_factored",
    "rms",
    "param_scale",
    "step_size_of",
    "on_host",
    "beta2_at",
    "relative_step_size",
    "row_means_col_sums",
    "masked_ema_",
    "update_second_moment_",
    "second_moment_",
    "preconditioner",
    "precondition",
    "sum_of_squares",
    "factored_sum_of_squares",
    "clip_by_rms",
    "apply_update_",
    "clip_and_apply_",
    "scaled_rms_update_",
    "adalomo_update_",
    "adafactor_update_",
    "lomo_update_",
]

#: 2-D CPU tensors with more elements than this are updated in row blocks of about this size: 4 MiB fp32
#: temporaries come from the allocator's free lists (a fresh multi-MiB tensor costs page faults on every step)
#: and stay in cache between the ops of a block, while the per-op overhead stays ~1% of a block's work.
BLOCK_NUMEL = 1 << 20
#: the same on accelerators, where the temporaries are cached by the allocator and each op is a launch
ACCELERATOR_BLOCK_NUMEL = 1 << 24


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype the maths runs in for tensor ``t``: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def is_factored(p: Tensor) -> bool:
    return p.dim() >= 2


def init_factored_state(p: Tensor) -> dict[str, Tensor]:
    """Second-moment state (fp32; fp64 for fp64 tensors): rows+cols for >= 2-D tensors, a full copy for 0-D/1-D."""
    kw = dict(dtype=compute_dtype(p), device=p.device)
    if is_factored(p):
        return {"exp_avg_sq_row": torch.zeros(p.shape[:-1], **kw),
                "exp_avg_sq_col": torch.zeros(p.shape[:-2] + p.shape[-1:], **kw)}
    return {"exp_avg_sq": torch.zeros(p.shape, **kw)}


def factored_state_numel(shape: tuple[int, ...] | torch.Size) -> int:
    """Values ``init_factored_state`` keeps for a tensor of ``shape`` (the memory planner counts with this)."""
    shape = tuple(shape)
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def rms(x: Tensor) -> Tensor:
    """Root mean square in the compute dtype, without an upcast copy of ``x``."""
    n = max(x.numel(), 1)
    return torch.linalg.vector_norm(x, dtype=compute_dtype(x)) / math.sqrt(n)


def param_scale(p: Tensor, eps2: float) -> Tensor:
    return rms(p).clamp_min(eps2)


def step_size_of(p: Tensor, rho: float, eps2: float, scale_parameter: bool) -> Tensor | float:
    """The step rho * max(eps2, RMS(p)) (``scale_parameter``) or rho: a float on CPU, a 0-d tensor elsewhere."""
    cpu = p.device.type == "cpu"
    if not scale_parameter:
        return rho if cpu else torch.full((), rho, dtype=compute_dtype(p), device=p.device)
    if cpu:  # a 16-bit p in blocks: a whole-tensor upcast would be a fresh allocation, page faults and all
        blocks = p.reshape(-1).split(BLOCK_NUMEL) if p.dtype != compute_dtype(p) else (p,)
        sum_sq = sum(float(torch.linalg.vector_norm(x, dtype=compute_dtype(p))) ** 2 for x in blocks)
        return max(eps2, math.sqrt(sum_sq / max(p.numel(), 1))) * rho
    return param_scale(p, eps2) * rho


def on_host(x: Tensor) -> Tensor | float:
    """A 0-d scalar of the maths as a float when it is on the CPU (no device to wait for, and host arithmetic
    saves a dispatched op per scalar operation); left on the device elsewhere (no synchronisation)."""
    return float(x) if x.device.type == "cpu" else x


def beta2_at(step: float, decay_rate: float) -> float:
    """beta2_t = 1 - t^decay_rate (0 at t = 1, so the first step sets the statistics)."""
    return 1.0 - math.pow(step, decay_rate)


def relative_step_size(step: float, warmup_init: bool, cap: float = 1e-2) -> float:
    """Adafactor's rho_t = min(cap, 1/sqrt(t)), or min(1e-6 t, 1/sqrt(t)) with warm-up init."""
    min_step = 1e-6 * step if warmup_init else cap
    return min(min_step, 1.0 / math.sqrt(step))


def row_blocks(t: Tensor) -> Iterator[slice]:
    """Row slices of a 2-D tensor bounding the temporaries; the whole tensor otherwise."""
    limit = BLOCK_NUMEL if t.device.type == "cpu" else ACCELERATOR_BLOCK_NUMEL
    if t.dim() != 2 or t.numel() <= limit:
        yield slice(None)
        return
    rows = max(1, limit // max(t.shape[1], 1))
    for start in range(0, t.shape[0], rows):
        yield slice(start, start + rows)


def upcast(g: Tensor, grad_scale: Tensor | float | None) -> Tensor:
    """A fresh copy of ``g`` in the compute dtype (times ``grad_scale``) that callers may modify in place."""
    if grad_scale is not None:
        return g.to(compute_dtype(g)) * grad_scale
    return g.to(compute_dtype(g), copy=True)


def scaled(g: Tensor, factor: Tensor) -> Tensor:
    """g * factor in the compute dtype, a fresh tensor (bf16/fp16 ``g``: an upcast copy first, since mixed-dtype
    multiplies are no faster than the copy plus a multiply)."""
    return torch.mul(g, factor) if g.dtype == compute_dtype(g) else g.to(compute_dtype(g)).mul_(factor)


def square(g: Tensor, grad_scale: Tensor | float | None) -> Tensor:
    """(g * grad_scale)^2 in the compute dtype, a fresh tensor (one pass when ``g`` is in it already)."""
    if grad_scale is None and g.dtype == compute_dtype(g):
        return g.square()
    return upcast(g, grad_scale).square_()


def sum_of_squares(u: Tensor) -> Tensor:
    """sum(u^2) as a 0-d tensor, in one pass without a temporary (the input of ``clip_by_rms``)."""
    return torch.linalg.vector_norm(u, dtype=compute_dtype(u)).square()


def row_means_col_sums(g: Tensor, eps1: float, grad_scale: Tensor | float | None) -> tuple[Tensor, Tensor]:
    """Row means and column sums of U = g^2 + eps1 over the last two dims, in row blocks for large tensors.

    eps1 is added to the (small) reductions, not to every element: sum(g^2 + eps1) = sum(g^2) + n eps1.
    """
    return factored_statistics(g, eps1, grad_scale)[:2]


def factored_statistics(g: Tensor, eps1: float, grad_scale: Tensor | float | None, row: Tensor | None = None,
                        beta2: float = 0.0) -> tuple[Tensor, Tensor, Tensor | None]:
    """``row_means_col_sums`` in the same pass over g^2, and, given the row statistics ``row`` (the state before
    this step's average with ``beta2``), the column weights w_j = sum_i g_ij^2 / row'_i (row' the averaged
    statistics): sum(u^2) = mean(row') sum_j w_j / col'_j (``factored_sum_of_squares``), so clipping by RMS(u)
    reads g no second time."""
    blocks = list(row_blocks(g))
    if len(blocks) == 1:  # the same sums in fewer ops (small tensors cost their ops' dispatch more than their maths)
        sq = square(g, grad_scale)
        row_mean = sq.mean(-1).add_(eps1)
        col_sum = sq.sum(-2).add_(eps1 * g.shape[-2])
        return row_mean, col_sum, None if row is None else _column_weights(sq, row, row_mean, beta2)
    kw = dict(dtype=compute_dtype(g), device=g.device)
    row_mean = torch.empty(g.shape[:-1], **kw)
    col_sum = torch.full(g.shape[:-2] + g.shape[-1:], eps1 * g.shape[-2], **kw)
    weights = None if row is None else torch.zeros_like(col_sum)
    for b in blocks:
        sq = square(g[b], grad_scale)
        mean = torch.mean(sq, -1, out=row_mean[b])
        col_sum += sq.sum(-2)
        if weights is not None:
            weights += _column_weights(sq, row[b], mean + eps1, beta2)
    return row_mean.add_(eps1), col_sum, weights


def _column_weights(sq: Tensor, row: Tensor, row_mean: Tensor, beta2: float) -> Tensor:
    """sum_i sq_ij / row'_i, row' = beta2 row + (1 - beta2) row_mean rounded as ``masked_ema_`` rounds it."""
    inv_row = (row * beta2 + row_mean * (1.0 - beta2)).reciprocal_()
    return torch.matmul(inv_row.unsqueeze(-2), sq).squeeze(-2)


def masked_ema_(avg: Tensor, new: Tensor, beta: float, ok: Tensor) -> None:
    """avg <- beta avg + (1 - beta) new where ``ok`` (a 0-d bool tensor), else unchanged; rounded as the kernels
    and the sharded row statistics round it (two products, then their sum).

    On CPU in place (the flag read on the host); elsewhere a device-side select, without synchronisation.
    """
    if avg.device.type == "cpu":
        if bool(ok):
            avg.mul_(beta).add_(new * (1.0 - beta))
        return
    avg.copy_(torch.where(ok, avg * beta + new * (1.0 - beta), avg))


def update_second_moment_(state: dict[str, Tensor], g: Tensor, *, beta2: float, eps1: float,
                          grad_scale: Tensor | float | None = None) -> Tensor:
    """EMA of U = g^2 + eps1 (row/col means, or full); returns a 0-d bool: were the stats finite?

    When they are not (NaN/inf in ``g``), the state is left as it was.
    """
    return second_moment_(state, g, beta2=beta2, eps1=eps1, grad_scale=grad_scale)[0]


def second_moment_(state: dict[str, Tensor], g: Tensor, *, beta2: float, eps1: float,
                   grad_scale: Tensor | float | None) -> tuple[Tensor, Tensor | None]:
    """``update_second_moment_``, also returning a factored tensor's column weights for sum(u^2) (see
    ``factored_statistics``)."""
    if is_factored(g):
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row_mean, col_sum, weights = factored_statistics(g, eps1, grad_scale, row, beta2)
        col_mean = col_sum.div_(g.shape[-2])
        ok = torch.isfinite(row_mean.sum() + col_mean.sum())
        masked_ema_(row, row_mean, beta2, ok)
        masked_ema_(col, col_mean, beta2, ok)
        return ok, weights
    v = state["exp_avg_sq"]
    u = square(g, grad_scale).add_(eps1)
    ok = torch.isfinite(u.sum())
    masked_ema_(v, u, beta2, ok)
    return ok, None


def preconditioner(state: dict[str, Tensor], row_mean: Tensor | None = None) -> tuple[Tensor, ...]:
    """Factors whose broadcast product is 1/sqrt(v_hat).

    Factored: v_hat = (row / mean(row)) x col, so the factors are rsqrt(row/mean(row))[..., :, None]
    and rsqrt(col)[..., None, :]. Unfactored: rsqrt(v). ``row_mean`` replaces ``row.mean(-1)`` (the
    global mean when ``row`` holds only some rows of a sharded 2-D tensor).
    """
    if "exp_avg_sq_row" in state:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        mean = row.mean(-1, keepdim=True) if row_mean is None else row_mean
        r = (row / mean).rsqrt_().unsqueeze(-1)
        c = col.unsqueeze(-2).rsqrt()
        return r, c
    return (state["exp_avg_sq"].rsqrt(),)


def precondition(g: Tensor, factors: tuple[Tensor, ...], rows: slice = slice(None),
                 grad_scale: Tensor | float | None = None) -> Tensor:
    """u = g / sqrt(v_hat) in the compute dtype for the rows ``rows`` of a 2-D tensor (or all of it)."""
    g = g[rows] if rows != slice(None) else g
    first = factors[0][rows] if len(factors) == 2 and rows != slice(None) else factors[0]
    if grad_scale is not None:
        first = first * grad_scale  # a row (or v-sized) factor, cheaper than scaling g
    u = scaled(g, first)
    return u.mul_(factors[1]) if len(factors) == 2 else u


def factored_sum_of_squares(weights: Tensor, col: Tensor, row_mean: Tensor) -> Tensor:
    """sum(u^2) for u = g r c, r_i = (row_i / mean(row))^-1/2 and c_j = col_j^-1/2 (``preconditioner`` of the
    averaged statistics), from the column weights w_j = sum_i g_ij^2 / row_i of ``factored_statistics`` and
    ``row_mean`` = mean(row) over the last dim: sum_ij g_ij^2 mean(row) / (row_i col_j) = mean(row) sum_j w_j / col_j.
    Reads no full-size tensor. The weights sum over rows, so those of a sharded tensor's shards add up."""
    return (row_mean * (weights / col).sum(-1)).sum()


def clip_by_rms(sum_sq: Tensor | float, numel: int, threshold: float) -> Tensor | float:
    """The factor 1 / max(1, RMS(u) / threshold), from the sum of squares of u (a 0-d tensor, or a float)."""
    if not isinstance(sum_sq, Tensor):
        return 1.0 / max(1.0, math.sqrt(sum_sq / max(numel, 1)) / threshold)
    r = torch.sqrt(sum_sq / max(numel, 1))
    return (r / threshold).clamp_min(1.0).reciprocal()


def _add_scaled_(x: Tensor, u: Tensor, coef: Tensor | float) -> Tensor:
    """x += coef * u in place (``coef`` a float, a 0-d tensor or a tensor broadcasting against ``u``)."""
    return x.addcmul_(u, coef) if isinstance(coef, Tensor) else x.add_(u, alpha=coef)


def apply_update_(p: Tensor, u: Tensor, step_size: Tensor | float, weight_decay: float, ok: Tensor,
                  stochastic_rounding: bool = False, generator: torch.Generator | None = None,
                  u_scale: Tensor | float | None = None, scratch: bool = False) -> None:
    """p <- p * (1 - step_size * wd) - step_size * u_scale * u in the compute dtype, or p unchanged if ``ok``
    is False.

    ``u_scale`` (e.g. the RMS clip factor, or a tensor broadcasting against ``u`` such as column factors)
    folds into the step instead of costing a pass over ``u``. ``scratch``: ``u`` is a temporary in the compute
    dtype that may be overwritten (a bf16/fp16 ``p`` is then updated in it, without a copy of ``p``).
    On CPU the flag is read on the host (no device to wait for): a skipped update costs nothing and the
    arithmetic runs in place; on accelerators it stays a device-side select (no synchronisation).
    """
    coef = -step_size if u_scale is None else (-step_size) * u_scale
    decay = 1.0 - step_size * weight_decay
    cdt = compute_dtype(p)
    if p.device.type == "cpu":
        if not bool(ok):
            return
        if p.dtype == cdt:
            if weight_decay != 0:
                p.mul_(decay)
            _add_scaled_(p, u, coef)
            return
        if scratch and weight_decay == 0:  # u <- p + coef * u: the fp32 result without a copy of p, one pass
            new = torch.addcmul(p, u, coef, out=u) if isinstance(coef, Tensor) else torch.add(p, u, alpha=coef, out=u)
        elif scratch:  # u <- coef * u + decay * p
            new = u.mul_(coef).add_(p, alpha=float(decay))
        else:
            new = p.to(cdt)
            if weight_decay != 0:
                new.mul_(decay)
            _add_scaled_(new, u, coef)
        write_back_(p, new, stochastic_rounding, generator, scratch=True)
        return
    pc = p.to(cdt)
    new = pc * decay if weight_decay != 0 else pc
    new = torch.addcmul(new, u, coef) if isinstance(coef, Tensor) else torch.add(new, u, alpha=coef)
    write_back_(p, torch.where(ok, new, pc), stochastic_rounding, generator, scratch=True)


def clip_and_apply_(p: Tensor, g: Tensor, state: dict[str, Tensor], factors: tuple[Tensor, ...], ok: Tensor,
                    step_size: Tensor | float, *, numel: int, clip_threshold: float,
                    weight_decay: float, beta1: float | None, grad_scale: Tensor | float | None,
                    stochastic_rounding: bool, generator: torch.Generator | None,
                    sum_sq: Tensor | None = None) -> None:
    """u = precondition(g); clip by RMS(u) (over ``numel`` elements: the whole tensor, all shards);
    optional first moment; apply.

    ``sum_sq``: sum(u^2) (over all shards of a sharded tensor); needed for factored tensors, which never
    materialise u (``factored_sum_of_squares`` gives it from g^2), computed from u otherwise. The factored
    update is p += (g r) * (c * coef), one row-scaled temporary per block.
    """
    factored = len(factors) == 2
    blocks = list(row_blocks(g))
    u = None
    if not factored:
        u = precondition(g, factors, grad_scale=grad_scale)
        if sum_sq is None:
            sum_sq = sum_of_squares(u)
    clip = clip_by_rms(on_host(sum_sq), numel, clip_threshold)
    for b in blocks:
        whole = b == slice(None)
        pb = p if whole else p[b]
        if beta1 is not None:  # the first moment averages the clipped update
            ub = u if u is not None else precondition(g, factors, b, grad_scale)
            m = state["exp_avg"] if whole else state["exp_avg"][b]
            masked_ema_(m, ub.mul_(clip), beta1, ok)
            apply_update_(pb, m, step_size, weight_decay, ok, stochastic_rounding, generator)
        elif not factored:
            apply_update_(pb, u, step_size, weight_decay, ok, stochastic_rounding, generator, u_scale=clip,
                          scratch=True)
        else:
            r = factors[0] if whole else factors[0][b]
            rows_scaled = scaled(g if whole else g[b], r if grad_scale is None else r * grad_scale)
            apply_update_(pb, rows_scaled, step_size, weight_decay, ok, stochastic_rounding, generator,
                          u_scale=clip * factors[1], scratch=True)


def scaled_rms_update_(p: Tensor, g: Tensor, state: dict[str, Tensor], *, rho: float, eps: tuple[float, float],
                       clip_threshold: float, beta2: float, weight_decay: float, scale_parameter: bool,
                       beta1: float | None, grad_scale: Tensor | float | None = None,
                       stochastic_rounding: bool = False, generator: torch.Generator | None = None) -> Tensor:
    """The shared core of AdaLomo and Adafactor: factored second moment -> clip -> relative step.

    ``state['step']`` is not touched (the caller counts steps). Returns the 0-d bool "g was finite"; when it
    is False, ``p`` and ``state`` are left unchanged.
    """
    ok, weights = second_moment_(state, g, beta2=beta2, eps1=eps[0], grad_scale=grad_scale)
    if p.device.type == "cpu" and not bool(ok):
        return ok
    factors = preconditioner(state)
    sum_sq = None if weights is None else factored_sum_of_squares(weights, state["exp_avg_sq_col"],
                                                                  state["exp_avg_sq_row"].mean(-1))
    step_size = step_size_of(p, rho, eps[1], scale_parameter)
    clip_and_apply_(p, g, state, factors, ok, step_size, numel=g.numel(), clip_threshold=clip_threshold,
                    weight_decay=weight_decay, beta1=beta1, grad_scale=grad_scale,
                    stochastic_rounding=stochastic_rounding, generator=generator, sum_sq=sum_sq)
    return ok


def adalomo_update_(p: Tensor, g: Tensor, state: dict[str, Tensor], *, lr: float,
                    eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                    decay_rate: float = -0.8, weight_decay: float = 0.0,
                    grad_scale: Tensor | float | None = None, stochastic_rounding: bool = False,
                    generator: torch.Generator | None = None) -> Tensor:
    """One AdaLomo step on ``p`` (in place). ``state`` holds ``step`` and the second moment.

    Returns a 0-d bool tensor: False when ``g`` was not finite and nothing was changed.
    """
    state["step"] += 1
    beta2 = beta2_at(float(state["step"]), decay_rate)
    return scaled_rms_update_(p, g, state, rho=lr, eps=eps, clip_threshold=clip_threshold, beta2=beta2,
                              weight_decay=weight_decay, scale_parameter=True, beta1=None,
                              grad_scale=grad_scale, stochastic_rounding=stochastic_rounding, generator=generator)


def adafactor_update_(p: Tensor, g: Tensor, state: dict[str, Tensor], *, lr: float, relative_step: bool,
                      warmup_init: bool = False, scale_parameter: bool = True,
                      eps: tuple[float, float] = (1e-30, 1e-3), clip_threshold: float = 1.0,
                      decay_rate: float = -0.8, beta1: float | None = None, weight_decay: float = 0.0,
                      grad_scale: Tensor | float | None = None, stochastic_rounding: bool = False,
                      generator: torch.Generator | None = None) -> Tensor:
    """One Adafactor step (Shazeer & Stern, transformers conventions) on ``p`` (in place).

    With ``relative_step`` the step is rho_t = min(lr, 1/sqrt(t)) (``lr`` is the cap, 1e-2 by
    default) or min(1e-6 t, 1/sqrt(t)) with ``warmup_init``; otherwise rho_t = lr. With
    ``scale_parameter`` it is multiplied by max(eps2, RMS(p)). The first moment, when ``beta1`` is
    set, is an EMA of the clipped update u (transformers keeps an EMA of the lr-scaled update).
    """
    state["step"] += 1
    t = float(state["step"])
    rho = relative_step_size(t, warmup_init, lr) if relative_step else lr
    return scaled_rms_update_(p, g, state, rho=rho, eps=eps, clip_threshold=clip_threshold,
                              beta2=beta2_at(t, decay_rate), weight_decay=weight_decay,
                              scale_parameter=scale_parameter, beta1=beta1, grad_scale=grad_scale,
                              stochastic_rounding=stochastic_rounding, generator=generator)


def lomo_update_(p: Tensor, g: Tensor, *, lr: float, weight_decay: float = 0.0,
                 clip_grad_value: float | None = None, grad_scale: Tensor | float | None = None,
                 stochastic_rounding: bool = False, generator: torch.Generator | None = None,
                 ok: Tensor | None = None) -> Tensor:
    """LOMO (fused SGD): p <- p * (1 - lr * wd) - lr * clamp(g, -c, c). Returns the finite flag.

    ``ok``: the finite flag, when the caller has it already (all shards of a sharded tensor skip together).
    """
    if ok is None:
        scaled_sum = g.sum(dtype=compute_dtype(g))
        ok = torch.isfinite(scaled_sum if grad_scale is None else scaled_sum * grad_scale)
    if p.device.type == "cpu":
        if not bool(ok):
            return ok
        step_size = lr
    else:
        step_size = torch.full((), lr, dtype=compute_dtype(p), device=p.device)
    for b in row_blocks(g):
        gb = g if b == slice(None) else g[b]
        copy = gb.dtype != compute_dtype(gb) or grad_scale is not None or clip_grad_value is not None
        if copy:  # a copy only when it must change (else apply_update_ only reads it)
            gb = upcast(gb, grad_scale)
        if clip_grad_value is not None:
            gb = gb.clamp_(-clip_grad_value, clip_grad_value)
        apply_update_(p if b == slice(None) else p[b], gb, step_size, weight_decay, ok,
                      stochastic_rounding, generator, scratch=copy)
    return ok
