"""CUDA graphs of the grouped launches (kernel setting ``graphs``): captured once per plan, stream and arguments,
then replayed: one graph launch instead of several kernel launches of host time (fused mode pays them inside a
host-bound backward).

A graph's kernel arguments are the plan's device buffers, fixed per plan and stream; what changes per call (gradient
pointers, workspace, seeds, step sizes) travels in the metadata that ``grouped.upload`` copies before the replay.
Not with a grad_scale tensor (a new one each step).
"""

from __future__ import annotations

import warnings

import torch

from .config import CONFIG
from .grouped import DeviceBuffers, grouped_key
from .launch import LaunchContext

GRAPH_CAPTURES = [0]  # CUDA graphs captured so far (tests, benchmarks)
_CAPTURE_STREAMS: dict = {}
_MAX_SEEN, _MAX_GRAPHS = 64, 8


def launch_or_replay(launch, bufs: DeviceBuffers, ctx: LaunchContext, scale: torch.Tensor, has_scale: bool,
                     key: tuple) -> None:
    """``launch(run)`` issues a grouped update's kernels; on CUDA with ``CONFIG["graphs"]`` they are captured into a
    CUDA graph at the second call with the same ``key`` (the first compiles every variant) and replayed after."""
    run = (ctx.stream, ctx.device, grouped_key(ctx.device, ctx.stream, scale))
    if ctx.stream is None or has_scale or not CONFIG["graphs"]:
        launch(run)
        return
    graph = bufs.graphs.get(key)
    if graph is None:
        if key not in bufs.seen:
            if len(bufs.seen) >= _MAX_SEEN:  # keys that keep changing (a hyper-parameter set every step): launched
                bufs.seen.clear()  # directly
            bufs.seen.add(key)
            launch(run)
            return
        graph = _capture(launch, ctx, scale)
        if graph is None:
            launch(run)
            return
        if len(bufs.graphs) >= _MAX_GRAPHS:
            bufs.graphs.clear()
        bufs.graphs[key] = graph
    graph.replay()  # on the current stream, after the metadata copy


def _capture(launch, ctx: LaunchContext, scale: torch.Tensor):
    """The launches captured on a side stream (thread-local mode: other threads keep issuing work), or None."""
    side = _CAPTURE_STREAMS.get(ctx.device)
    if side is None:
        side = _CAPTURE_STREAMS[ctx.device] = torch.cuda.Stream(ctx.device)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                launch((side.cuda_stream, ctx.device, grouped_key(ctx.device, side.cuda_stream, scale)))
            finally:
                graph.capture_end()
    except Exception as e:  # noqa: BLE001 - any failure: launch directly from now on
        CONFIG["graphs"] = False
        warnings.warn(f"adalomo.kernels: capturing the grouped update's launches in a CUDA graph failed ({e!r}); "
                      "they are launched one by one from now on (more host time per bucket). "
                      "adalomo.kernels.set_config(graphs=False) skips the attempt.", RuntimeWarning, stacklevel=4)
        return None
    GRAPH_CAPTURES[0] += 1
    return graph
