"""Kernel settings and launch geometry.

``CONFIG`` holds the settings that a measurement showed to pay (``docs/kernels.md``) and the tile geometry that
``benchmarks/bench_kernels.py --sweep`` varies; change them through :func:`set_config` (checked, and the caches
that depend on them dropped), or with ``ADALOMO_KERNEL_CONFIG='{"one_read": false}'`` (JSON) when the kernels
load. :func:`tiling` is the one function that turns a matrix shape into the row-tiled passes' launch geometry;
:func:`workspace` lays out a kernel family's fp32 partial sums.
"""

from __future__ import annotations

import json
import os

CONFIG = {
    # row-tiled passes (three-pass statistics, RMS(u), writes, LOMO): BLOCK_M x BLOCK_N tiles, at most max_tm row
    # groups per matrix (bounds the column partials that the finalize pass reads: max_tm x N)
    "block_m": 32,
    "block_n": 128,
    "max_tm": 32,
    "warps_stats": 4,
    "warps_usq": 4,
    "warps_write": 8,
    # software pipelining of the read-only passes' row loops (``tl.range(num_stages=...)``): > 1 has Triton copy the
    # next tiles into shared memory asynchronously, so that the loads in flight no longer sit in registers
    "pipeline_depth": 3,
    # grouped AdaLomo/Adafactor: the statistics, RMS(u) and sum(p^2) from ONE read of g and p (12 -> 10 bytes per bf16
    # parameter), for matrices whose rows fit one tile (next power of two of the row length <= one_read_max_n)
    "one_read": True,
    "one_read_max_n": 8192,
    "one_read_elems": 8192,  # elements per row tile of g and of p (rows = this / row length)
    "one_read_tm": 64,  # row groups (programs) per matrix, fewer for short ones, more for tall ones
    "warps_one_read": 8,
}
_FLAGS = ("one_read",)
_POW2 = ("block_m", "block_n", "one_read_max_n", "one_read_elems")
_WARPS = ("warps_stats", "warps_usq", "warps_write", "warps_one_read")

VEC_BLOCK = 1024  # elements per program of the 0-D/1-D kernels
FIN_BLOCK = 128  # rows/columns per program of the finalize pass (more for matrices wider than 128K)
ONE_READ_MAX_ROWS = 256  # rows per one-read program and per one-read tile, at most
PIPELINE_SMEM = 96 * 1024  # shared memory a pipelined loop may take for its tiles in flight, per program

_ON_CHANGE: list = []  # callbacks that drop what depends on CONFIG (geometry, plans)


def on_change(fn) -> None:
    """Call ``fn()`` whenever a setting changes (caches of geometry and launch plans)."""
    _ON_CHANGE.append(fn)


def set_config(**changes) -> dict:
    """Change kernel settings (keys of ``CONFIG``); returns the previous values of the changed keys, so that
    ``set_config(**prev)`` restores them."""
    for k, v in changes.items():
        if k not in CONFIG:
            raise ValueError(f"unknown kernel setting {k!r}; known: {', '.join(CONFIG)}")
        if k in _FLAGS:
            if not isinstance(v, bool):
                raise ValueError(f"{k} must be True or False")
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"kernel setting {k}={v!r}: expected a positive int")
        if k == "pipeline_depth" and v > 8:
            raise ValueError(f"kernel setting {k}={v}: at most 8")
        if (k in _POW2 or k in _WARPS) and v & (v - 1):
            raise ValueError(f"kernel setting {k}={v}: must be a power of two")
        if k in _WARPS and v > 32:
            raise ValueError(f"kernel setting {k}={v}: at most 32 warps")
    prev = {k: CONFIG[k] for k in changes}
    CONFIG.update(changes)
    for fn in _ON_CHANGE:
        fn()
    return prev


def next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tiling(M: int, N: int, fit: bool = False) -> dict:
    """The launch geometry of the row-tiled passes over one [M, N] matrix: BLOCK_M x BLOCK_N tiles; a program takes
    ``rows_per_prog`` rows of one column tile, TM x TN programs per matrix (at most ``max_tm`` row groups).

    ``fit``: tiles no larger than the matrix (one tensor per launch: the FSDP2 path). Grouped launches take the
    configured tile for every shape (one compiled variant per group), so a matrix's geometry depends on its shape
    alone: fused buckets and the classic step's groups sum alike."""
    bn, bm = CONFIG["block_n"], CONFIG["block_m"]
    if fit:
        bn, bm = min(bn, max(16, next_pow2(N))), min(bm, next_pow2(M))
    m_tiles = cdiv(M, bm)
    rows_per_prog = cdiv(m_tiles, min(m_tiles, CONFIG["max_tm"])) * bm
    return dict(BLOCK_M=bm, BLOCK_N=bn, TM=cdiv(M, rows_per_prog), TN=cdiv(N, bn), rows_per_prog=rows_per_prog)


def fin_block(M: int, N: int) -> int:
    """Rows/columns per program of the finalize pass: at most ~1024 partial blocks per row or column."""
    return max(FIN_BLOCK, next_pow2(cdiv(max(M, N), 1024)))


def workspace(geo: dict, **sizes: int) -> dict:
    """Lay out regions of fp32 partial sums (``sizes``: name -> floats) after those already in ``geo``, each at a
    multiple of 16 floats: ``geo["off_<name>"]``, and ``geo["ws_numel"]`` the total."""
    off = geo.get("ws_numel", 0)
    for name, size in sizes.items():
        geo["off_" + name] = off
        off += cdiv(size, 16) * 16
    geo["ws_numel"] = off
    return geo


def pipeline_depth_for(depth: int, bm: int, bn: int, *dtypes) -> int:
    """The pipeline depth a row loop gets: Triton keeps ``depth - 1`` tiles of every loaded tensor (of torch
    ``dtypes``) in shared memory, so large tiles of wide dtypes get fewer, down to 1 (not pipelined), instead of a
    launch that fails for want of shared memory."""
    per_tile = bm * bn * sum(d.itemsize for d in dtypes)
    return max(1, min(depth, 1 + PIPELINE_SMEM // per_tile))


if os.environ.get("ADALOMO_KERNEL_CONFIG"):
    set_config(**json.loads(os.environ["ADALOMO_KERNEL_CONFIG"]))
