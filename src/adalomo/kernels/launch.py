"""How a kernel is launched: the cache of compiled variants with the direct call, the per-call launch context, and
the [B, M, N] views of the tensors that a launch takes.

Launch overhead matters more than anything else here (fused mode updates from Python hooks inside backward): the
kernels take no runtime-specialised integers (``do_not_specialize``; alignment facts are passed as constexprs), so
a compiled kernel depends only on the constexprs, the pointer dtypes and 16-byte alignment, and :class:`Launcher`
calls it directly after its first launch (``adalomo._compat``: Triton's private ``CompiledKernel.run``).
"""

from __future__ import annotations

import functools
import sys

import torch
import triton.language as tl

from .. import _compat

_PKG = sys.modules[__package__]  # adalomo.kernels: its _impl_interpreted is set once the kernels loaded

SEED_MASK = (1 << 62) - 1
SEED_BIT = 1 << 62  # always an int64 seed: one compiled variant
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

#: launches that went through Triton's own (slower, Python) launch path: the first of each variant, and all of them
#: once the direct call is off. Should stop growing after warm-up (benchmarks/bench_gpu.py records it per row)
JIT_LAUNCHES = [0]
_DIRECT = _compat.direct_launch_supported()  # turned off for good when a direct call fails


class Launcher:
    """``fn[(grid,)](*args, **consts)``, but after the first launch of a variant the compiled kernel is called
    directly. A variant is keyed by the constexprs, num_warps, the register cap, the device and the dtype and
    16-byte alignment of every pointer argument: with ``do_not_specialize`` on every integer argument (all of them
    fit in int32: ``use_triton`` refuses larger tensors; the seed is always int64) that is all Triton specialises on.
    """

    def __init__(self, fn, *const_names: str):
        names = list(fn.arg_names)
        assert tuple(names[-len(const_names):]) == const_names, (fn.__name__, const_names)
        self.fn = fn
        self.const_names = const_names
        self.n_ptr = sum(1 for n in names if n.endswith("_ptr"))
        assert all(n.endswith("_ptr") for n in names[:self.n_ptr]), fn.__name__
        self.cache: dict = {}

    def __call__(self, grid: int, args: tuple, consts: tuple, num_warps: int, run: tuple,
                 maxnreg: int | None = None) -> None:
        """``run``: (raw stream or None when interpreted, device index, key or None). A key vouches for the dtype
        and alignment of every pointer argument (``grouped_key``); without one, they are read here."""
        global _DIRECT
        stream, device, rkey = run
        key = None
        if _DIRECT and stream is not None:
            if rkey is not None:
                key = (consts, num_warps, maxnreg) + rkey
            else:
                key = (consts, num_warps, maxnreg, device) + tuple((a.dtype, a.data_ptr() % 16 == 0)
                                                                   for a in args[:self.n_ptr])
            k = self.cache.get(key)
            if k is not None:
                try:
                    _compat.launch_compiled(k, grid, stream, args + consts)
                    return
                except (TypeError, AttributeError, ValueError, SystemError) as e:  # another Triton: its path
                    _DIRECT = False
                    key = None
                    _compat.warn_direct_launch_failed(e)
        opts = {} if maxnreg is None else {"maxnreg": maxnreg}
        JIT_LAUNCHES[0] += 1
        k = self.fn[(grid,)](*args, **dict(zip(self.const_names, consts)), num_warps=num_warps, **opts)
        if key is not None and k is not None and _compat.direct_launch_ok(k, len(args) + len(consts), self.n_ptr):
            self.cache[key] = k


def keyed_launch(launcher: Launcher, keys: list, slot: int, grid: int, args: tuple, consts: tuple, num_warps: int,
                 stream, device: int) -> None:
    """``launcher`` with the launch-cache key of its pointer arguments (dtype and 16-byte alignment of each) read once
    into ``keys[slot]`` and reused: for launches whose pointer arguments have the same dtypes and alignment at every
    call (the same tensors, or fresh allocations, which are 512-byte aligned), as a cached launch plan vouches."""
    key = keys[slot]
    if key is None and stream is not None:
        key = keys[slot] = (device,) + tuple((a.dtype, a.data_ptr() % 16 == 0) for a in args[:launcher.n_ptr])
    launcher(grid, args, consts, num_warps, (stream, device, key))


class LaunchContext:
    """Per call: the device index and raw stream to launch on (``stream`` None: interpreted, on the CPU)."""
    __slots__ = ("device", "stream")

    def __init__(self, t: torch.Tensor):
        if _PKG._impl_interpreted or t.device.type != "cuda":
            self.device, self.stream = -1, None
        else:
            self.device = t.device.index
            self.stream = _compat.raw_stream(self.device)


def on_tensor_device(fn):
    """Run ``fn(ps, ...)`` with the device of its first tensor current (kernels launch on the current device)."""
    @functools.wraps(fn)
    def wrapper(ps, *args, **kwargs):
        t = ps if isinstance(ps, torch.Tensor) else ps[0]
        if t.is_cuda and t.device.index != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(ps, *args, **kwargs)
        return fn(ps, *args, **kwargs)
    return wrapper


# ------------------------------------------------------------------------------------ tensors as [B, M, N]
def strides3(t: torch.Tensor) -> tuple[int, int, int] | None:
    """Strides of ``t`` seen as [B, M, N] (0-D/1-D: [1, 1, n]); None when the leading dims don't merge."""
    d = t.dim()
    s = t.stride()
    if d == 2:
        return 0, s[0], s[1]
    if d == 1:
        return 0, 0, s[0]
    if d == 0:
        return 0, 0, 1
    sh = t.shape
    lead = [(sh[k], s[k]) for k in range(d - 2) if sh[k] != 1]
    for (_, s_outer), (n_inner, s_inner) in zip(lead, lead[1:]):
        if s_outer != s_inner * n_inner:
            return None
    return (lead[-1][1] if lead else 0), s[-2], s[-1]


def shape3(t: torch.Tensor) -> tuple[int, int, int]:
    d = t.dim()
    if d < 2:
        return 1, 1, max(t.numel(), 1)
    m, n = t.shape[-2], t.shape[-1]
    return t.numel() // (m * n), m, n


def align_flags(N: int, sg, sp) -> tuple[bool, bool, bool]:
    """(ALIGN, G_UNIT, P_UNIT): unit column strides, and every row and batch offset a multiple of 16 elements."""
    g_unit, p_unit = sg[2] == 1, sp[2] == 1
    align = g_unit and p_unit and N % 16 == 0 and sg[0] % 16 == 0 and sg[1] % 16 == 0 and sp[0] % 16 == 0 \
        and sp[1] % 16 == 0
    return align, g_unit, p_unit


def aligned(*ts) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def prepare(p: torch.Tensor, g: torch.Tensor):
    """(g, its strides, p or a contiguous copy to write back, its strides): copies only where leading dims don't
    merge into one batch stride."""
    sg = strides3(g)
    if sg is None:
        g = g.contiguous()
        sg = strides3(g)
    p_work = p
    sp = strides3(p)
    if sp is None:
        p_work = p.contiguous()
        sp = strides3(p_work)
    return g, sg, p_work, sp


def state_fp32(state: dict, key: str, copies: list) -> torch.Tensor:
    """``state[key]`` as a contiguous fp32 tensor: itself, or a copy recorded in ``copies`` to write back."""
    t = state[key]
    if t.is_contiguous() and t.dtype == torch.float32:
        return t
    t = t.float().contiguous()
    copies.append((key, t))
    return t


def scale_arg(grad_scale, ref: torch.Tensor):
    """(HAS_SCALE, the gradient scale as a device tensor, or ``ref`` as a placeholder pointer)."""
    if grad_scale is None:
        return False, ref
    if not isinstance(grad_scale, torch.Tensor):
        grad_scale = torch.full((), float(grad_scale), dtype=torch.float32, device=ref.device)
    return True, grad_scale


def seed_arg(stochastic_rounding: bool, seed: int | None) -> int:
    """The int64 seed a write kernel takes (a fixed value without stochastic rounding: one compiled variant)."""
    if not stochastic_rounding:
        return SEED_BIT
    return (int(seed if seed is not None else 0) & SEED_MASK) | SEED_BIT
