"""The Triton update path for CUDA (``functional`` holds the torch maths, the reference and CPU path).

``use_triton(*tensors)`` decides per call:

* ``ADALOMO_DISABLE_TRITON=1`` turns the kernels off everywhere (the torch path runs);
* CUDA tensors (plain tensors or ``nn.Parameter``; not DTensor or other subclasses, not while
  ``torch.compile`` traces) of dtype fp16/bf16/fp32 use the kernels when ``triton`` imports;
* CPU tensors use them only with ``ADALOMO_TRITON_INTERPRET=1``: the kernels are then loaded through
  Triton's interpreter (``TRITON_INTERPRET=1`` must also be set before anything imports triton; it is
  set here when triton was not imported yet). This is how the CPU test suite checks them (in a subprocess);
  it is slow, meant for tests only, and ``TRITON_INTERPRET=1`` then stays set for the rest of the process.

``import adalomo`` never imports triton: the kernels load on the first call that needs them. One kernel family
per module: ``factored`` (matrices), ``one_read`` (their statistics from one read of g), ``vector`` (0-D/1-D),
``lomo``, ``adapm`` (its rank-r products in ``products``, the small steps of its basis refresh in ``subspace``);
``grouped`` (metadata rows and launch plans), ``updates`` (the entry points),
``sharded`` (FSDP2 shards), ``config`` (settings and launch geometry). See ``docs/kernels.md``.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch

from .._compat import bump_versions
from .._compat import local_tensor as _local

__all__ = ["use_triton", "gradient_fits", "sharded_fits", "scaled_rms_update_", "lomo_update_",
           "scaled_rms_update_many_", "lomo_update_many_", "adapm_update_many_", "AdaPMChunk",
           "triton_available", "Seed", "set_config", "get_config", "bump_versions", "orthogonal_iteration"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_PLAIN = (torch.Tensor, torch.nn.Parameter)
_MAX_NUMEL = 1 << 31
_MAX_STRIDE = 1 << 25
_impl = None          # the loaded update path (``kernels.updates``)
_impl_failed = False  # triton is missing or failed to import
_impl_interpreted = False


class Seed:
    """What the kernels need of a ``torch.Generator`` for stochastic rounding: ``initial_seed()``.

    Passing ``Seed(s)`` as ``generator`` saves creating a device generator per tensor and step.
    """

    __slots__ = ("seed",)

    def __init__(self, seed: int):
        self.seed = int(seed)

    def initial_seed(self) -> int:
        return self.seed


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0", "false", "False")


def _load(interpret: bool):
    """Import the kernels once; in interpreter mode when asked for (CPU tests)."""
    global _impl, _impl_failed, _impl_interpreted
    if _impl is not None or _impl_failed:
        return _impl
    try:
        if interpret and not _flag("TRITON_INTERPRET"):
            if "triton" in sys.modules:  # imported in compiled mode: its own jit helpers would not interpret
                warnings.warn("adalomo: ADALOMO_TRITON_INTERPRET=1 needs TRITON_INTERPRET=1 set before triton is "
                              "first imported; using the torch path", RuntimeWarning, stacklevel=3)
                _impl_failed = True
                return None
            # Triton reads this when it (and each @triton.jit function) is first imported, and again at
            # launch time: it stays set for the rest of the process (tests only).
            os.environ["TRITON_INTERPRET"] = "1"
        from . import updates
        _impl = updates
        _impl_interpreted = _flag("TRITON_INTERPRET")
    except Exception:  # ImportError, or a triton too old/broken for these kernels: torch path
        _impl_failed = True
    return _impl


def _require(t: torch.Tensor):
    impl = _impl if _impl is not None else _load(t.device.type != "cuda")
    if impl is None:
        raise RuntimeError("adalomo.kernels: triton is not available (pip install triton); use the torch path")
    return impl


def set_config(**changes) -> dict:
    """Change kernel settings (``adalomo.kernels.config.CONFIG``: ``one_read``, ``pipeline_depth`` and the launch
    geometry) for the rest of the process; returns the previous values of the changed keys, so that
    ``set_config(**prev)`` restores them. ``ADALOMO_KERNEL_CONFIG='{"one_read": false}'`` (JSON) does
    the same when the kernels load. See ``docs/kernels.md``."""
    impl = _load(_flag("ADALOMO_TRITON_INTERPRET"))
    if impl is None:
        raise RuntimeError("adalomo.kernels.set_config: the Triton kernels are not available here (triton is not "
                           "installed or failed to import), so there is nothing to configure: the torch path has no "
                           "settings")
    return impl.set_config(**changes)


def get_config() -> dict:
    """A copy of the kernel settings; empty when the kernels are not loaded (nothing imported them yet, or triton is
    missing)."""
    return dict(_impl.CONFIG) if _impl is not None else {}


def triton_available() -> bool:
    """True when the Triton kernels can be imported (on CPU: in interpreter mode only)."""
    return _load(_flag("ADALOMO_TRITON_INTERPRET")) is not None


def _interpret_on(dev: torch.device) -> bool | None:
    """Whether kernels on ``dev`` would run interpreted (CPU), compiled (CUDA), or None: not at all there."""
    if _flag("ADALOMO_DISABLE_TRITON"):
        return None
    if dev.type == "cuda":
        return False
    if dev.type == "cpu" and _flag("ADALOMO_TRITON_INTERPRET"):
        return True
    return None


def _loaded(interpret: bool) -> bool:
    """The kernels import, in the mode ``interpret`` asks for, and no ``torch.compile`` is tracing."""
    if torch.compiler.is_compiling() or _load(interpret) is None:
        return False
    return _impl_interpreted or not interpret


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when a Triton kernel should run this update (see the module docstring for the rules)."""
    if not tensors:
        return False
    dev = tensors[0].device
    interpret = _interpret_on(dev)
    if interpret is None:
        return False
    for t in tensors:
        if type(t) not in _PLAIN or t.device != dev or t.dtype not in _DTYPES or not 0 < t.numel() < _MAX_NUMEL:
            return False
        if t.dim() and max(map(abs, t.stride())) >= _MAX_STRIDE:  # in-tile offsets are int32
            return False
    return _loaded(interpret)


def sharded_fits(p, grad) -> bool:
    """``use_triton``'s rules for the shards of an FSDP2 parameter ``p`` (a DTensor) and its gradient, decided
    on what every rank sees alike (device, dtypes, global shape; not the local size, which may be zero), so
    that all ranks take the same path and join the same collectives. Any dimension >= 1 (a >= 3-D tensor
    sharded on dim 0 holds whole matrices)."""
    if p.dim() < 1 or p.dtype not in _DTYPES or grad.dtype not in _DTYPES:
        return False
    if not 0 < p.numel() < _MAX_NUMEL or (p.dim() >= 2 and math.prod(p.shape[1:]) >= _MAX_STRIDE):
        return False  # the stride of dim 0 (the largest, of a contiguous shard) within the kernels' int32 maths
    interpret = _interpret_on(p.device)
    return interpret is not None and _loaded(interpret)


def gradient_fits(g: torch.Tensor, p: torch.Tensor) -> bool:
    """``use_triton``'s per-tensor rules for a gradient ``g`` of a parameter ``p`` that passed them already
    (the environment, import and compile checks are not repeated: the fused hooks' fast path)."""
    if type(g) not in _PLAIN or g.dtype not in _DTYPES or g.device != p.device or not 0 < g.numel() < _MAX_NUMEL:
        return False
    return not g.dim() or max(g.stride()) < _MAX_STRIDE  # strides are never negative in torch


def scaled_rms_update_(p, g, state, *, rho, eps, clip_threshold, beta2, weight_decay, scale_parameter, beta1,
                       grad_scale, stochastic_rounding, generator, seed=None, ok_into=None):
    """The AdaLomo/Adafactor core (``functional.scaled_rms_update_``) in Triton kernels: the grouped update of
    ``scaled_rms_update_many_`` with one tensor.

    ``state['step']`` was incremented by the caller. Returns a 0-d bool device tensor "the gradient was
    finite"; when it is False, ``p`` and the state are left untouched. No host synchronisation.
    Stochastic rounding draws from ``seed`` (an int) or, without it, from ``generator.initial_seed()``.
    ``ok_into`` (optional 0-d bool tensor): the flag is also ANDed into it.
    """
    return _require(p).scaled_rms_update_(p, g, state, rho=rho, eps=eps, clip_threshold=clip_threshold, beta2=beta2,
                                          weight_decay=weight_decay, scale_parameter=scale_parameter, beta1=beta1,
                                          grad_scale=grad_scale, stochastic_rounding=stochastic_rounding,
                                          generator=generator, seed=seed, ok_into=ok_into)


def lomo_update_(p, g, *, lr, weight_decay, clip_grad_value, grad_scale, stochastic_rounding, generator, seed=None,
                 ok_into=None):
    """LOMO's update (``functional.lomo_update_``) in Triton kernels; returns the finite flag (see above)."""
    return _require(p).lomo_update_(p, g, lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                                    grad_scale=grad_scale, stochastic_rounding=stochastic_rounding,
                                    generator=generator, seed=seed, ok_into=ok_into)


def scaled_rms_update_many_(ps, gs, states, *, rhos, beta2s, eps, clip_threshold, weight_decay, scale_parameter,
                            beta1, grad_scale, stochastic_rounding, seeds, shards=None):
    """``scaled_rms_update_`` over many tensors in a few grouped launches (the classic ``step()``).

    Hyper-parameters are shared except ``rhos``, ``beta2s`` and ``seeds`` (one host number per tensor;
    each ``state['step']`` already incremented). Check ``use_triton(*ps, *gs)`` first. Returns a 0-d bool
    device tensor: every gradient was finite (a tensor whose gradient was not is left untouched).

    ``shards``: the tensors are FSDP2 ``DTensor`` parameters, gradients and states, sharded on dim 0, with
    these :class:`~adalomo.distributed.ShardInfo` (one process group; 1-D and 2-D tensors; check
    ``sharded_fits``): each rank updates its rows, and the statistics that span ranks are summed in one
    all-reduce for the whole list. A ``None`` entry: the local tensor is the whole tensor (no collective).
    """
    if shards is not None:
        return _by_shard("scaled_rms_update", ps, gs, states, shards, dict(rhos=rhos, beta2s=beta2s, seeds=seeds),
                         dict(eps=eps, clip_threshold=clip_threshold, weight_decay=weight_decay,
                              scale_parameter=scale_parameter, beta1=beta1, grad_scale=grad_scale,
                              stochastic_rounding=stochastic_rounding))
    return _require(ps[0]).scaled_rms_update_many_(ps, gs, states, rhos=rhos, beta2s=beta2s, eps=eps,
                                                    clip_threshold=clip_threshold, weight_decay=weight_decay,
                                                    scale_parameter=scale_parameter, beta1=beta1,
                                                    grad_scale=grad_scale, stochastic_rounding=stochastic_rounding,
                                                    seeds=seeds)


def lomo_update_many_(ps, gs, *, lr, weight_decay, clip_grad_value, grad_scale, stochastic_rounding, seeds,
                      shards=None):
    """``lomo_update_`` over many tensors in a few grouped launches; returns "every gradient was finite".
    ``shards``: as for ``scaled_rms_update_many_`` (FSDP2 shards: one all-reduce, of the finite test, per call)."""
    if shards is not None:
        return _by_shard("lomo_update", ps, gs, None, shards, dict(seeds=seeds),
                         dict(lr=lr, weight_decay=weight_decay, clip_grad_value=clip_grad_value,
                              grad_scale=grad_scale, stochastic_rounding=stochastic_rounding))
    return _require(ps[0]).lomo_update_many_(ps, gs, lr=lr, weight_decay=weight_decay,
                                             clip_grad_value=clip_grad_value, grad_scale=grad_scale,
                                             stochastic_rounding=stochastic_rounding, seeds=seeds)


class AdaPMChunk:
    """One momentum chunk of an AdaPM matrix (``adapm_update_many_``): its kind, state key prefix, row and column slices
    (the whole matrix, or one of the equal chunks of a ``SplitMomentum``). Never changed once made: a parameter's
    chunks are made once, and a cached launch plan is keyed on the chunk objects themselves."""
    __slots__ = ("kind", "prefix", "rows", "cols")

    def __init__(self, kind: str, prefix: str, rows: slice, cols: slice):
        self.kind, self.prefix, self.rows, self.cols = kind, prefix, rows, cols


def adapm_update_many_(ps, gs, states, chunks_list, **hyper):
    """AdaPM's step on tensors of up to two dims in grouped Triton launches (``kernels.adapm``); each tensor's finite
    flags go to a row of ``flags``."""
    _require(ps[0])
    from . import adapm
    return adapm.adapm_update_many_(ps, gs, states, chunks_list, **hyper)


def orthogonal_iteration(s: torch.Tensor, z: torch.Tensor, iters: int) -> torch.Tensor | None:
    """``for _ in range(iters): z = torch.linalg.qr(s @ z).Q`` (s: (..., k, k), z: (..., k, r), fp32) in one launch
    (``kernels.subspace``: one program per matrix of the batch); None where the kernels do not run it (``use_triton``
    says no, or k > ``subspace.MAX_K``): the caller takes torch's steps then. Used by the basis refresh
    (``momentum.orthonormal_basis(..., iterate=)``)."""
    if not use_triton(s, z):
        return None
    from . import subspace
    return subspace.orthogonal_iteration(s, z, iters)


def _by_shard(kind: str, ps, gs, states, shards, per_tensor: dict, common: dict):
    """The ``*_many_`` functions on FSDP2 DTensors (``kernels.sharded``)."""
    _require(_local(ps[0]))
    from . import sharded
    return sharded.update_many_by_shard(kind, ps, gs, states, shards, per_tensor, common)
