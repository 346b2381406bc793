"""Optimizer state of FSDP2 ``DTensor`` parameters, norms over shards, and the check against DDP.

The optimizer base calls these few functions; nothing here runs for plain tensors. ``_init_state`` receives
the *local* tensor and its state is wrapped into ``DTensor``s here, so that ``torch.distributed.checkpoint``
saves and reshards it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .shard import ParamLayout, is_dtensor, param_layout

__all__ = ["UnshardedDistributedError", "check_unsharded", "init_sharded_state", "local_norm", "reduce_sq_norms",
           "global_norm", "conform_loaded_state"]


class UnshardedDistributedError(RuntimeError):
    """A fused optimizer saw a plain (unsharded) parameter in a multi-process run."""


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= max(s, 1)
    return tuple(reversed(stride))


def check_unsharded(opt: Any, p: Tensor) -> None:
    """Fused mode on a plain tensor with world size > 1: DDP (wrong) unless the user opted out."""
    if getattr(opt, "allow_unsharded_distributed", False):
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return
    raise UnshardedDistributedError(
        f"{type(opt).__name__}(fused=True): parameter of shape {tuple(p.shape)} is a plain tensor in a "
        f"{dist.get_world_size()}-process run. Under DistributedDataParallel a fused hook sees the *local* "
        "gradient before DDP's all-reduce, so the ranks would silently drift apart. For data parallelism use "
        "FSDP2 (torch.distributed.fsdp.fully_shard), or, to keep full replicas, FSDP2 as HSDP on a "
        "(replicate=N, shard=1) mesh (adalomo.distributed.hsdp_mesh): its hooks fire after the gradient "
        "reduction. DDP works with fused=False (loss.backward(); opt.step()). If each rank really owns "
        "different parameters (model/pipeline parallel), set opt.allow_unsharded_distributed = True.")


def init_sharded_state(opt: Any, p: Tensor, group: dict[str, Any], layout: ParamLayout) -> dict[str, Tensor]:
    """``opt._init_state`` on the local rows, each tensor wrapped as a DTensor of the global shape.

    Which state follows the rows (``Shard(0)`` like the parameter) and which is whole on every rank
    (``Replicate()``) is found by probing ``_init_state`` on meta tensors with m and m + 1 rows: a state
    whose shape changes with the row count is row-sharded, one whose shape does not is replicated.
    0-d state (``step``) stays a plain tensor. An optimizer whose state depends on more than the tensor it is
    given (AdaPM: the momentum kind of that parameter, the side of a low-rank basis) says it instead with
    ``_sharded_state_spec(p, group, layout) -> (state of the whole tensor on the meta device, row-sharded keys)``.
    """
    if not getattr(opt, "_supports_sharding", True):
        raise NotImplementedError(f"{type(opt).__name__} does not support FSDP2-sharded (DTensor) parameters yet")
    spec = getattr(opt, "_sharded_state_spec", None)
    if spec is not None:
        return _state_from_spec(p, layout, *spec(p, group, layout))
    with torch.no_grad():
        local_p = p.to_local().detach()
        try:
            state = opt._init_state(local_p, group)
        except Exception as e:  # noqa: BLE001 - e.g. per-parameter lookups keyed by id(p)
            raise NotImplementedError(
                f"{type(opt).__name__}._init_state failed on the local shard (shape {tuple(local_p.shape)}) of an "
                f"FSDP2 parameter of shape {tuple(p.shape)}: {type(e).__name__}: {e}. Sharded parameters need "
                "an _init_state that depends only on the tensor it is given (AdaLomo, Adafactor, Lomo), or a "
                "_sharded_state_spec (AdaPM).") from e
        shape_a = torch.Size(p.shape)
        shape_b = torch.Size((shape_a[0] + 1,) + tuple(shape_a[1:]))
        try:
            probe_a = opt._init_state(torch.empty(shape_a, dtype=p.dtype, device="meta"), group)
            probe_b = opt._init_state(torch.empty(shape_b, dtype=p.dtype, device="meta"), group)
        except Exception as e:  # noqa: BLE001 - reported with context below
            raise RuntimeError(f"{type(opt).__name__}._init_state must work on meta tensors to shard its state "
                               f"for FSDP2 (parameter of shape {tuple(p.shape)}): {e}") from e
    kinds: dict[str, str] = {}
    for k, v in state.items():
        if not isinstance(v, Tensor) or v.dim() == 0:
            continue
        sa, sb = probe_a[k].shape, probe_b[k].shape
        if sa == sb:
            if v.shape != sa:
                raise RuntimeError(f"{type(opt).__name__}: state {k!r} of a parameter of shape {tuple(p.shape)} "
                                   f"has local shape {tuple(v.shape)} but global shape {tuple(sa)}")
            kinds[k] = "replicate"
        elif len(sa) >= 1 and sa[0] == shape_a[0] and sb[0] == shape_b[0] and sa[1:] == sb[1:] \
                and v.shape[1:] == sa[1:] and v.shape[0] == layout.local_rows:
            kinds[k] = "shard"
        else:
            raise RuntimeError(f"{type(opt).__name__}: cannot tell how to shard state {k!r} (global shape "
                               f"{tuple(sa)}) of a parameter of shape {tuple(p.shape)} sharded on dim 0; state "
                               "must either follow the parameter's rows on dim 0 or not depend on them")
    return _wrap(state, {k: probe_a[k].shape for k in kinds}, kinds, layout)


def _state_from_spec(p: Tensor, layout: ParamLayout, whole: dict[str, Any], rows: set[str] | tuple[str, ...]
                     ) -> dict[str, Tensor]:
    """Zero local state from an optimizer's spec: ``whole`` (the state of the whole tensor, on the meta device
    but for 0-d tensors such as ``step``) and the keys whose dim 0 follows the parameter's rows."""
    device = p.to_local().device
    state, shapes, kinds = {}, {}, {}
    for k, v in whole.items():
        if not isinstance(v, Tensor) or v.dim() == 0:
            state[k] = v
            continue
        kinds[k] = "shard" if k in rows else "replicate"
        shape = (layout.local_rows, *v.shape[1:]) if k in rows else v.shape
        state[k] = torch.zeros(shape, dtype=v.dtype, device=device)
        shapes[k] = v.shape
    return _wrap(state, shapes, kinds, layout)


def _wrap(state: dict[str, Any], shapes: dict[str, torch.Size], kinds: dict[str, str], layout: ParamLayout
          ) -> dict[str, Any]:
    """The local ``state`` as DTensors of the global ``shapes``: row-sharded like the parameter (``kinds[k]`` is
    "shard") or replicated; anything else (0-d ``step``) stays as it is."""
    from torch.distributed.tensor import DTensor, Replicate

    out: dict[str, Any] = {}
    for k, v in state.items():
        kind = kinds.get(k)
        if kind is None:
            out[k] = v
            layout.state_layout[k] = "local"
            continue
        sa = shapes[k]
        placements = list(layout.placements) if kind == "shard" else [Replicate()] * layout.mesh.ndim
        out[k] = DTensor.from_local(v, layout.mesh, placements, run_check=False, shape=sa,
                                    stride=_contiguous_stride(sa))
        layout.state_layout[k] = kind
        layout.state_shapes[k] = (sa, v.dtype)
    return out


def local_norm(layout: ParamLayout | None, grad: Tensor) -> tuple[Tensor, object]:
    """L2 norm (fp32) of this rank's part of ``grad`` and the group over which to sum its square (None:
    this rank holds all of it, as for plain tensors and replicated DTensors)."""
    if not is_dtensor(grad):
        return torch.linalg.vector_norm(grad, dtype=torch.float32), None
    lay = layout if layout is not None else param_layout(grad, "gradient")
    group = lay.group if lay.shard is not None else None
    return torch.linalg.vector_norm(grad.to_local(), dtype=torch.float32), group


def reduce_sq_norms(local: Tensor | None, by_group: dict[object, Tensor]) -> Tensor | None:
    """local + sum over each group of its partial sums (one all-reduce per group, in insertion order)."""
    if not by_group:
        return local
    import torch.distributed as dist

    total = local
    for grp, sq in by_group.items():
        sq = sq.clone()
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=grp)
        total = sq if total is None else total.to(sq.device) + sq
    return total


def global_norm(grads: list[Tensor]) -> Tensor:
    """The L2 norm of all of ``grads`` (DTensor shards summed over their shard groups, the rest local)."""
    local, by_group = None, {}
    for g in grads:
        n, grp = local_norm(None, g)
        sq = n.square()
        if grp is None:
            local = sq if local is None else local + sq.to(local.device)
        else:
            by_group[grp] = sq if grp not in by_group else by_group[grp] + sq.to(by_group[grp].device)
    return reduce_sq_norms(local, by_group).sqrt()


def conform_loaded_state(opt: Any) -> None:
    """After ``load_state_dict``: plain full-size state of a sharded parameter becomes a DTensor again.

    (``torch.distributed.checkpoint`` hands DTensors back; a plain ``opt.load_state_dict`` of a state saved
    by an unsharded run hands full tensors, whose local rows are taken here.)
    """
    from torch.distributed.tensor import DTensor, Replicate

    layouts: dict[int, ParamLayout] = opt._shard_layouts
    if not layouts:
        return
    for group in opt.param_groups:
        for p in group["params"]:
            layout = layouts.get(id(p))
            if layout is None or p not in opt.state:
                continue
            st = opt.state[p]
            for k, kind in layout.state_layout.items():
                v = st.get(k)
                if kind == "local" or not isinstance(v, Tensor) or is_dtensor(v):
                    continue
                shape, dtype = layout.state_shapes[k]
                if v.shape != shape:
                    raise RuntimeError(f"{type(opt).__name__}.load_state_dict: state {k!r} has shape "
                                       f"{tuple(v.shape)}, expected the global shape {tuple(shape)}")
                if kind == "shard":
                    v = v[layout.row_offset:layout.row_offset + layout.local_rows]
                    placements = list(layout.placements)
                else:
                    placements = [Replicate()] * layout.mesh.ndim
                local = v.to(device=p.to_local().device, dtype=dtype, copy=True).contiguous()
                st[k] = DTensor.from_local(local, layout.mesh, placements, run_check=False, shape=shape,
                                           stride=_contiguous_stride(shape))
