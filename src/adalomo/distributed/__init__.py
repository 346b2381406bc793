"""Multi-GPU training: the optimizers under FSDP2 (``fully_shard``), HSDP and DDP.

* **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters are ``DTensor``s sharded on dim 0. Fused
  and classic modes both work; each update equals the single-process update of the full tensor (row
  statistics local, column sums, mean(row), RMS(u), RMS(p) and the finite flag all-reduced over the shard
  group: one batched all-reduce per tensor, no host synchronisation). Optimizer state is stored as
  DTensors, so ``torch.distributed.checkpoint`` saves and reshards it.
* **HSDP** (``fully_shard(model, mesh=hsdp_mesh(N, 1))``): data parallelism with full replicas for fused
  mode; the hooks fire after the gradient all-reduce and statistics are reduced over the shard dim only.
* **DDP**: classic mode only. A fused hook would see the local gradient before DDP's all-reduce, so the
  fused optimizers raise :class:`UnshardedDistributedError` on a plain parameter in a multi-process run
  (opt out with ``opt.allow_unsharded_distributed = True`` when each rank owns different parameters).

See ``docs/distributed.md``.
"""

from __future__ import annotations

from typing import Any

from .shard import ParamLayout, ShardInfo, UnsupportedShardingError, is_dtensor, param_layout
from .state import UnshardedDistributedError

__all__ = ["ShardInfo", "ParamLayout", "param_layout", "is_dtensor", "check_not_ddp", "hsdp_mesh",
           "UnshardedDistributedError", "UnsupportedShardingError"]


def check_not_ddp(model: Any, optimizer: Any = None) -> None:
    """Raise :class:`UnshardedDistributedError` if ``model`` is or contains a ``DistributedDataParallel``
    module and ``optimizer`` is a fused optimizer (or is not given).

    There is no link from a parameter to the DDP wrapper that owns it, so the optimizer itself can only
    detect DDP indirectly (a plain parameter in a multi-process run); call this after wrapping for an
    early, explicit error.
    """
    if optimizer is not None and not getattr(optimizer, "fused", False):
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    mods = model.modules() if hasattr(model, "modules") else [model]
    if any(isinstance(m, DDP) for m in mods):
        raise UnshardedDistributedError(
            "fused optimizers cannot run under DistributedDataParallel: the post-accumulate hook sees each "
            "rank's local gradient before DDP all-reduces it, so the replicas drift apart. Use FSDP2 "
            "(fully_shard), or FSDP2 as HSDP with adalomo.distributed.hsdp_mesh(world_size, 1) to keep full "
            "replicas; or keep DDP with fused=False.")


def hsdp_mesh(replicate: int, shard: int = 1, device_type: str | None = None):
    """A 2-D ``DeviceMesh`` (replicate, shard) for ``fully_shard(..., mesh=mesh)`` (HSDP).

    ``hsdp_mesh(world_size, 1)`` is data parallelism with full replicas whose gradients are all-reduced
    before the optimizer's hooks run (what DDP cannot offer to a fused optimizer);
    ``hsdp_mesh(nodes, gpus_per_node)`` shards within a node and replicates across nodes.
    """
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (replicate, shard), mesh_dim_names=("replicate", "shard"))
