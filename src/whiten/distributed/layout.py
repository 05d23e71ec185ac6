"""How parameters are laid out over processes: DTensor or plain, the process group a run spans, FSDP2's rows per
rank, and the wrappers whose flattened slices whiten refuses."""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

__all__ = ["is_dtensor", "local_shard", "process_group_of", "shard_rows", "flattened_by", "FLATTENED_HINT"]


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: a DTensor's local shard, or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def process_group_of(params: list[torch.Tensor], process_group):
    """The group a run spans: the one given, else the mesh of DTensor parameters, else None (one process)."""
    if process_group is not None:
        return process_group
    meshes = {id(p.device_mesh): p.device_mesh for p in params if is_dtensor(p)}
    if not meshes:
        return None
    if len(meshes) > 1:
        raise ValueError("parameters are sharded over more than one device mesh; pass process_group= explicitly")
    mesh = next(iter(meshes.values()))
    if mesh.ndim != 1:
        raise ValueError(f"parameters are sharded over a {mesh.ndim}-D device mesh; whiten supports 1-D meshes "
                         "(FSDP2 fully_shard); pass process_group= for the data-parallel dimension")
    return mesh.get_group()


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank's shard under ``Shard(0)`` as FSDP2 lays them out: ``torch.chunk`` sizes, empty shards
    at the end where the rows run out."""
    size = -(-rows // world) if rows else 0
    return [max(0, min(size, rows - r * size)) for r in range(world)]


# What to use instead of a wrapper that hands the optimizer flattened slices (FSDP1, DeepSpeed ZeRO).
FLATTENED_HINT = ("whiten would step such a slice as a vector (elementwise, not whitened) and give other numbers "
                  "than one process. Use FSDP2 (torch.distributed.fsdp.fully_shard; accelerate: fsdp_version=2; "
                  "Lightning: ModelParallelStrategy) or DDP, whose parameters whiten steps with the single-device "
                  "numbers (docs/distributed.md)")


def flattened_by(p: torch.Tensor) -> str | None:
    """The wrapper that turned ``p`` into a flattened slice of parameters, or None.

    FSDP1 (``FullyShardedDataParallel``) marks every tensor it flattens with ``_fsdp_flattened``: its
    ``FlatParameter`` (``use_orig_params=False``) and the original parameters, which between forward passes are
    1-D views into this rank's slice of it (``use_orig_params=True``). DeepSpeed ZeRO-3 marks with ``ds_id`` both
    the parameters it partitions in place (shape ``(0,)`` outside a forward pass) and the flat fp32 slice of a
    group that it puts in the optimizer's group for each ``step()`` call (``ds_id`` a string such as ``'0_3'``,
    the first and last parameter ids it holds). (ZeRO-1/2 and DeepSpeed's bf16 optimizer put unmarked flat fp32
    slices into the optimizer's groups; those are caught because they do not replace the group's parameters one
    for one, see :meth:`WhitenOptimizer.check_parameters`.)"""
    if getattr(p, "_fsdp_flattened", False):
        return "FSDP1 (FullyShardedDataParallel), which hands the optimizer flat 1-D slices of its parameters"
    if hasattr(p, "ds_id"):
        return "DeepSpeed ZeRO-3, which partitions the parameters and hands the optimizer flat 1-D slices of them"
    return None
