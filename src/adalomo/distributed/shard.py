"""How the local rows of an FSDP2 parameter relate to the full tensor, and the batched all-reduce.

FSDP2 (``torch.distributed.fsdp.fully_shard``) registers each parameter as a ``DTensor`` sharded on dim 0
(``Shard(0)``) over the shard dimension of its device mesh, and ``Replicate()`` over the replicate
dimension for HSDP. Shards follow ``torch.chunk``: rank r holds rows [r*c, min((r+1)*c, m)) with
c = ceil(m / world), so the last shards may be short or empty. Everything that needs the full tensor is
divided by *global* sizes.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["ShardInfo", "ParamLayout", "is_dtensor", "param_layout", "UnsupportedShardingError"]

class UnsupportedShardingError(ValueError):
    """A DTensor parameter whose placements are not FSDP2's dim-0 sharding (optionally HSDP)."""


def is_dtensor(t: object) -> bool:
    """True for a ``torch.distributed.tensor.DTensor``, without importing torch.distributed."""
    mod = sys.modules.get("torch.distributed.tensor")
    if mod is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return False
    return isinstance(t, mod.DTensor)


@dataclass(eq=False)
class ShardInfo:
    """The local rows of a tensor sharded on dim 0 over ``group`` (the shard dimension of the mesh).

    ``all_reduce_sum_`` concatenates its tensors into one flat fp32 buffer and does a single all-reduce
    (SUM) over ``group``, on the tensors' device and without host synchronisation.
    """

    group: object  # torch.distributed.ProcessGroup
    global_shape: torch.Size
    row_offset: int = 0
    local_rows: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.global_shape)

    def all_reduce_sum_(self, tensors: list[Tensor] | tuple[Tensor, ...]) -> list[Tensor]:
        """Sum each tensor over the group (one collective); returns fp32 tensors of the same shapes."""
        import torch.distributed as dist

        tensors = list(tensors)
        if not tensors:
            return []
        flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        out = flat.split([t.numel() for t in tensors])
        return [o.view(t.shape) for o, t in zip(out, tensors)]


@dataclass(eq=False)
class ParamLayout:
    """What the optimizer keeps about a ``DTensor`` parameter.

    ``shard`` is None when no collective is needed (every mesh dim is ``Replicate`` or the shard group has
    one rank): the update then runs the single-process code on the local tensor. ``state_layout`` maps
    each state key to ``"shard"`` (rows, the parameter's placements), ``"replicate"`` or ``"local"``
    (0-d scalars such as ``step``, kept as plain tensors).
    """

    mesh: object  # DeviceMesh
    placements: tuple
    shard: ShardInfo | None
    group: object  # the shard dim's ProcessGroup, or None
    row_offset: int
    local_rows: int
    state_layout: dict[str, str] = field(default_factory=dict)
    state_shapes: dict[str, tuple[torch.Size, torch.dtype]] = field(default_factory=dict)


def _chunk_offset(rows: int, world: int, rank: int) -> int:
    chunk = -(-rows // world) if rows else 0
    return min(rank * chunk, rows)


def param_layout(p: Tensor, what: str = "parameter") -> ParamLayout:
    """The layout of a ``DTensor`` parameter; raises for anything but dim-0 sharding (FSDP2/HSDP)."""
    from torch.distributed.tensor import Replicate, Shard

    mesh, placements = p.device_mesh, tuple(p.placements)
    shard_dims = []
    for i, pl in enumerate(placements):
        if isinstance(pl, Replicate):
            continue
        if type(pl) is Shard and pl.dim in (0, -p.dim()):
            shard_dims.append(i)
            continue
        raise UnsupportedShardingError(
            f"{what} of shape {tuple(p.shape)} is a DTensor with placements {placements}: only FSDP2's "
            "dim-0 sharding (Shard(0) on one mesh dim, Replicate() on the others, as fully_shard and HSDP "
            "create) is supported. Tensor parallelism and other shardings are not.")
    if len(shard_dims) > 1:
        raise UnsupportedShardingError(f"{what} of shape {tuple(p.shape)} is sharded on dim 0 over several mesh "
                                       f"dims {placements}; only one shard dim is supported")
    if p.dim() == 0 and shard_dims:
        raise UnsupportedShardingError(f"0-d {what} cannot be sharded")
    local_rows = p.to_local().shape[0] if p.dim() else 0
    if not shard_dims or mesh.size(shard_dims[0]) == 1:
        group = mesh.get_group(shard_dims[0]) if shard_dims else None
        return ParamLayout(mesh, placements, None, group, 0, local_rows)
    d = shard_dims[0]
    world, rank = mesh.size(d), mesh.get_local_rank(d)
    offset = _chunk_offset(p.shape[0], world, rank)
    group = mesh.get_group(d)
    info = ShardInfo(group, torch.Size(p.shape), offset, local_rows)
    return ParamLayout(mesh, placements, info, group, offset, local_rows)
