"""Grouped launches: one launch per pass for a whole group of tensors (same dtypes and layout class).

Each tensor of a group has a row of int64 metadata (pointers, shape, strides, tiling, workspace offsets: the
columns ``INT_COLUMNS``) and a row of fp32 metadata (the step-dependent floats: ``FLOAT_COLUMNS``); a program map
(``pmap``) takes a program id to its tensor, whose first program is in its row. Kernels read a column as
``meta_int(row, COL.n_fin)``, ``meta_pointer(row, COL.grad, DT, ALIGN)`` or ``tl.load(frow + FCOL.rho)``.

A launch plan (:class:`Plan`: which tensors go together, their geometry and the static part of their metadata
rows) depends only on the tensors' identities, layouts and state buffers, which are the same step after step
(fused mode flushes the same buckets every backward), so it is cached by the caller; each call then only writes
the gradient pointers, the workspace base, the seeds and the step-dependent floats into the plan's packed host
template, copies it to the device in one piece (one pinned buffer, one copy for all groups) and launches. The
device copy of the metadata and the finite flags live in a small device buffer that the plan keeps per stream, so
stream order protects it. The workspace is allocated per call (one for all groups): it scales with the tensors.
"""

from __future__ import annotations

import ctypes
import math
import struct
import types

import torch
import triton
import triton.language as tl

from .common import step_scalars
from .config import cdiv
from .launch import SEED_BIT, SEED_MASK, Launcher

INT_COLUMNS = (
    # pointers; the first six in this order (``upload`` writes them per call): gradient, parameter, row (or 0-D/1-D)
    # and column second-moment state, first moment (exp_avg), this tensor's workspace
    "grad", "param", "row_state", "col_state", "exp_avg", "workspace",
    # [B, M, N], and the row-tiled passes' geometry (``config.tiling``)
    "B", "M", "N", "row_groups", "col_tiles", "rows_per_prog",
    "g_stride_b", "g_stride_m", "g_stride_n", "p_stride_b", "p_stride_m", "p_stride_n",
    # finalize blocks over rows and columns; the tensor's first program in the row-tiled and finalize launches
    "n_row_blocks", "n_col_blocks", "first_prog", "first_finalize_prog",
    "seed",
    # partial sums of the finite test, sum u^2 and sum p^2; the workspace regions (fp32 offsets)
    "n_fin", "n_usq", "n_psq",
    "off_rowpart", "off_colpart", "off_newrow", "off_newcol", "off_rsum", "off_fin", "off_usq", "off_psq", "off_scal",
    # the one-read statistics (``one_read``): row groups, rows per program, its partial column sums and W, its first
    # program
    "row_groups_1", "rows_per_prog_1", "off_colpart_1", "off_wpart", "first_prog_1",
)
FLOAT_COLUMNS = ("rho", "beta2", "one_minus_beta2", "numel", "sqrt_numel")
INT_WIDTH = len(INT_COLUMNS) + len(INT_COLUMNS) % 2  # even: the fp32 rows after the int64 ones stay 16-byte aligned
FLOAT_WIDTH = cdiv(len(FLOAT_COLUMNS), 4) * 4
INT_INDEX = {name: i for i, name in enumerate(INT_COLUMNS)}
assert INT_COLUMNS[:6] == ("grad", "param", "row_state", "col_state", "exp_avg", "workspace")


def _constexprs(name: str, columns: tuple[str, ...], **aliases: str) -> types.ModuleType:
    """The column indices as ``tl.constexpr`` attributes of a namespace (a module: readable inside @triton.jit)."""
    ns = types.ModuleType(name)
    for i, col in enumerate(columns):
        setattr(ns, col, tl.constexpr(i))
    for alias, col in aliases.items():
        setattr(ns, alias, getattr(ns, col))
    return ns


COL = _constexprs("COL", INT_COLUMNS)
#: LOMO's lr and weight decay travel in the rho and beta2 columns
FCOL = _constexprs("FCOL", FLOAT_COLUMNS, lr="rho", weight_decay="beta2")
INT_W = tl.constexpr(INT_WIDTH)
FLOAT_W = tl.constexpr(FLOAT_WIDTH)


@triton.jit
def this_program(meta_ptr, fmeta_ptr, pmap_ptr):
    """(program id, its tensor, that tensor's int64 and fp32 metadata rows) in a grouped launch."""
    pid = tl.program_id(0)
    t = tl.load(pmap_ptr + pid).to(tl.int64)
    return pid, t, meta_ptr + t * INT_W, fmeta_ptr + t * FLOAT_W


@triton.jit
def meta_int(row, k):
    """An int32 field of a metadata row."""
    return tl.load(row + k).to(tl.int32)


@triton.jit
def meta_pointer(row, k, DT: tl.constexpr, ALIGN: tl.constexpr):
    """A pointer field of a metadata row (16-byte aligned when ALIGN)."""
    ptr = tl.load(row + k).to(tl.pointer_type(DT))
    if ALIGN:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def grouped_finish_kernel(meta_ptr, fmeta_ptr, scale_ptr, oks_ptr, eps2, clip_threshold, FIN_SCALE: tl.constexpr,
                          HAS_USQ: tl.constexpr, HAS_PSQ: tl.constexpr, BLOCK: tl.constexpr):
    """One program per tensor of a group (every family): its finite flag into ``oks_ptr[t]``, its clip factor and
    step size into its workspace (``off_scal``), from the partial sums of the read passes."""
    t = tl.program_id(0).to(tl.int64)
    row, frow = meta_ptr + t * INT_W, fmeta_ptr + t * FLOAT_W
    ws = meta_pointer(row, COL.workspace, tl.float32, True)
    ok, clip, step = step_scalars(ws, scale_ptr, meta_int(row, COL.n_fin), meta_int(row, COL.n_usq),
                                  meta_int(row, COL.n_psq), meta_int(row, COL.off_fin), meta_int(row, COL.off_usq),
                                  meta_int(row, COL.off_psq), tl.load(frow + FCOL.numel),
                                  tl.load(frow + FCOL.sqrt_numel), tl.load(frow + FCOL.rho), eps2, clip_threshold,
                                  FIN_SCALE, HAS_USQ, HAS_PSQ, BLOCK)
    tl.store(oks_ptr + t, ok != 0)
    off_scal = meta_int(row, COL.off_scal)
    tl.store(ws + off_scal, clip)
    tl.store(ws + off_scal + 1, step)


finish = Launcher(grouped_finish_kernel, "FIN_SCALE", "HAS_USQ", "HAS_PSQ", "BLOCK")


def int_row(**values: int) -> list[int]:
    """One int64 metadata row from named columns (the rest 0)."""
    row = [0] * INT_WIDTH
    for name, v in values.items():
        row[INT_INDEX[name]] = v
    return row


def stride_columns(sg, sp) -> dict[str, int]:
    """The columns of g's and p's [B, M, N] strides."""
    return dict(g_stride_b=sg[0], g_stride_m=sg[1], g_stride_n=sg[2], p_stride_b=sp[0], p_stride_m=sp[1],
                p_stride_n=sp[2])


def float_row(numel: int) -> list[float]:
    """One fp32 metadata row with its static columns (the step-dependent ones written per call)."""
    row = [0.0] * FLOAT_WIDTH
    row[FLOAT_COLUMNS.index("numel")] = float(numel)
    row[FLOAT_COLUMNS.index("sqrt_numel")] = math.sqrt(numel)
    return row


# --------------------------------------------------------------------------------------------- plans
class GroupPlan:
    """One group: ``idx`` (the tensors, by position in the call), ``layout`` (p dtype, g dtype, ALIGN, G_UNIT,
    P_UNIT), program counts and maps per launch, per tensor the static pointers and workspace offsets, and (until
    ``make_plan`` packs them) the metadata rows."""
    __slots__ = ("fac", "layout", "idx", "prog", "fprog", "fb", "rp_block", "ws_total", "pmap", "fpmap", "statics",
                 "moff", "foff", "ooff", "nb", "bm1", "prog1", "pmap1", "counts", "rows", "frows")

    def __init__(self, fac: bool, layout: tuple, idx: list[int]):
        self.fac, self.layout, self.idx = fac, layout, idx
        self.prog = self.fprog = self.fb = self.rp_block = self.ws_total = self.nb = self.bm1 = self.prog1 = 0
        self.pmap = self.fpmap = self.pmap1 = None
        self.statics, self.counts, self.rows, self.frows = [], [], [], []

    def add(self, p: torch.Tensor, state_ptrs: tuple[int, int, int], n_prog: int, ws_numel: int, numel: int,
            **columns: int) -> None:
        """One more tensor: its metadata rows (``columns``, besides its pointers, its first program and workspace
        offset, added here), ``n_prog`` programs in the row-tiled (or 0-D/1-D) launches, ``ws_numel`` workspace
        floats. ``state_ptrs``: row (or 0-D/1-D) and column second moment, exp_avg (0: none)."""
        row_ptr, col_ptr, m_ptr = state_ptrs
        ws_off = 4 * self.ws_total
        self.statics.append((p.data_ptr(), row_ptr, col_ptr, m_ptr, ws_off))
        self.rows += int_row(param=p.data_ptr(), row_state=row_ptr, col_state=col_ptr, exp_avg=m_ptr, workspace=ws_off,
                             first_prog=self.prog, **columns)
        self.frows += float_row(numel)
        self.counts.append(n_prog)
        self.prog += n_prog
        self.ws_total += ws_numel


class Plan:
    """The groups of a call, their packed metadata template and device buffers; ``unfit``: the tensors (positions)
    that the grouped kernels cannot take as they are (updated through copies)."""
    __slots__ = ("groups", "ws_total", "meta_bytes", "oks_bytes", "tmpl", "tmpl_c", "bufs", "unfit")


class DeviceBuffers:
    """A plan's device buffer on one stream: the metadata (uploaded each call) and the finite flags."""
    __slots__ = ("meta_region", "views", "oks_all")


_INT_BYTES, _FLOAT_BYTES = 8 * INT_WIDTH, 4 * FLOAT_WIDTH
_POINTERS = struct.Struct("<6q")
_SEED = struct.Struct("<q")
_SEED_AT = 8 * INT_INDEX["seed"]
_FLOATS = struct.Struct("<3f")  # rho, beta2, 1 - beta2
assert FLOAT_COLUMNS[:3] == ("rho", "beta2", "one_minus_beta2")


def make_plan(groups: list[GroupPlan]) -> Plan:
    """Byte layout of the packed metadata (per group: int64 rows, then fp32 rows; 16-byte aligned), the flags after
    it, and the host template holding the static columns."""
    plan = Plan()
    plan.groups, plan.unfit = groups, []
    off, ooff, ws = 0, 0, 0
    for gp in groups:
        n = len(gp.idx)
        gp.moff = off
        off += n * _INT_BYTES
        gp.foff = off
        off += n * _FLOAT_BYTES
        gp.ooff = ooff
        ooff += cdiv(n, 16) * 16
        gp.statics = [(p, r, c, m, 4 * ws + w) for (p, r, c, m, w) in gp.statics]  # WS offsets within the call's ws
        ws += gp.ws_total
    plan.ws_total = max(ws, 16)
    plan.meta_bytes, plan.oks_bytes = off, ooff
    tmpl = bytearray(off)
    for gp in groups:
        struct.pack_into(f"<{len(gp.rows)}q", tmpl, gp.moff, *gp.rows)
        struct.pack_into(f"<{len(gp.frows)}f", tmpl, gp.foff, *gp.frows)
        gp.rows = gp.frows = None
    plan.tmpl, plan.tmpl_c = tmpl, (ctypes.c_char * off).from_buffer(tmpl)
    plan.bufs = {}
    return plan


def _device_buffers(plan: Plan, stream, dev: torch.device) -> DeviceBuffers:
    bufs = plan.bufs.get(stream)
    if bufs is None:
        if len(plan.bufs) >= 8:
            plan.bufs.clear()
        buf = torch.empty(plan.meta_bytes + plan.oks_bytes, dtype=torch.uint8, device=dev)
        oks = buf[plan.meta_bytes:]
        oks.fill_(1)  # the padding between groups' flags stays True: ``all()`` reads the whole region
        bufs = plan.bufs[stream] = DeviceBuffers()
        bufs.meta_region, bufs.oks_all = buf[:plan.meta_bytes], oks.view(torch.bool)
        bufs.views = [(buf[gp.moff:gp.moff + len(gp.idx) * _INT_BYTES].view(torch.int64),
                       buf[gp.foff:gp.foff + len(gp.idx) * _FLOAT_BYTES].view(torch.float32),
                       oks[gp.ooff:gp.ooff + len(gp.idx)].view(torch.bool)) for gp in plan.groups]
    return bufs


def upload(plan: Plan, stream, dev: torch.device, gs, seeds, stochastic_rounding, rhos, beta2s) -> tuple:
    """This call's metadata into the plan's device buffer on ``stream``: workspace and gradient pointers, seeds and
    floats written into the host template, one (pinned on CUDA) host buffer, one copy. Returns (device buffers,
    this call's workspace: keep it alive until the launches are issued)."""
    ws = torch.empty(plan.ws_total, dtype=torch.float32, device=dev)
    base = ws.data_ptr()
    tmpl = plan.tmpl
    pack_ptrs, pack_seed, pack_floats = _POINTERS.pack_into, _SEED.pack_into, _FLOATS.pack_into
    for gp in plan.groups:
        sr = bool(stochastic_rounding) and gp.layout[0] == torch.bfloat16
        o = gp.moff
        for i, (p_ptr, row_ptr, col_ptr, m_ptr, ws_off) in zip(gp.idx, gp.statics):
            pack_ptrs(tmpl, o, gs[i].data_ptr(), p_ptr, row_ptr, col_ptr, m_ptr or base, base + ws_off)
            pack_seed(tmpl, o + _SEED_AT, ((int(seeds[i]) if seeds is not None else 0) & SEED_MASK) | SEED_BIT
                      if sr else SEED_BIT)
            o += _INT_BYTES
        f = gp.foff
        for i in gp.idx:
            beta2 = float(beta2s[i])
            try:
                pack_floats(tmpl, f, float(rhos[i]), beta2, 1.0 - beta2)
            except OverflowError:  # beyond fp32: the value torch.tensor(..., dtype=float32) would hold
                pack_floats(tmpl, f, *torch.tensor([float(rhos[i]), beta2, 1.0 - beta2], dtype=torch.float32).tolist())
            f += _FLOAT_BYTES
    host = torch.empty(plan.meta_bytes, dtype=torch.uint8, pin_memory=dev.type == "cuda")
    ctypes.memmove(host.data_ptr(), plan.tmpl_c, plan.meta_bytes)
    bufs = _device_buffers(plan, stream, dev)
    # no host sync; the pinned block is not reused before the copy ran (torch's host allocator records it)
    bufs.meta_region.copy_(host, non_blocking=True)
    return bufs, ws


def grouped_key(device: int, stream, scale: torch.Tensor) -> tuple | None:
    """The launch-cache key of the grouped kernels (see ``launch.Launcher``): their pointer arguments are the plan's
    metadata, program maps and flags (fixed dtypes, 16-byte aligned by construction) and ``scale``."""
    if stream is None:
        return None
    return ("grk", device, scale.dtype, scale.data_ptr() % 16 == 0)


_PMAPS: dict = {}


def program_map(counts: list[int], dev: torch.device, rows: list[int] | None = None) -> torch.Tensor:
    """program id -> metadata row (int32), for a grouped launch of ``counts[k]`` programs of row ``rows[k]`` (default
    k); cached per device and group layout. Made on the device by fills: no host data to copy, so nothing waits for
    the device, also when a plan is built."""
    rows = list(range(len(counts))) if rows is None else rows
    key = (dev, tuple(counts), tuple(rows))
    m = _PMAPS.get(key)
    if m is None:
        m = torch.cat([torch.full((n,), r, dtype=torch.int32, device=dev) for r, n in zip(rows, counts)])
        if len(_PMAPS) > 256:
            _PMAPS.clear()
        _PMAPS[key] = m
    return m
