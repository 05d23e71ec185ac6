"""How parameters are laid out over processes: DTensor or plain, the process group a run spans, the block of the
full tensor each rank holds under any DTensor placement (FSDP2, tensor parallel, FSDP2 x TP, HSDP, expert
parallel), and the wrappers whose flattened slices whiten refuses."""

from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch < 2.5
    from torch.distributed._tensor import DTensor

__all__ = ["is_dtensor", "local_shard", "process_group_of", "shard_rows", "local_block", "flattened_by",
           "FLATTENED_HINT"]

# What whiten steps with the numbers of one process, for the messages of refused layouts.
SUPPORTED_LAYOUTS = ("supported: Shard(d) on any dim and Replicate() on every mesh dim (FSDP2's fully_shard, "
                     "tensor parallel's ColwiseParallel/RowwiseParallel, FSDP2 x TP on a 2-D mesh, HSDP, expert "
                     "parallel), FSDP2's _StridedShard over a tensor-parallel Shard of the same dim, and plain "
                     "replicated tensors (DDP)")


def is_dtensor(t) -> bool:
    return isinstance(t, DTensor)


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: a DTensor's local shard, or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


def process_group_of(params: list[torch.Tensor], process_group):
    """The group a run spans: the one given, else the mesh of DTensor parameters when they all share one 1-D mesh
    (FSDP2, tensor parallel), else the default group: parameters on a 2-D mesh (FSDP2 x TP, HSDP) or on several
    meshes (an embedding on the data-parallel sub-mesh beside TP blocks) are planned over every rank of the job,
    which must then be the union of the meshes' ranks (checked when the layout is read, see
    :class:`whiten.distributed.DistributedContext`). None: one process."""
    if process_group is not None:
        return process_group
    meshes = {id(p.device_mesh): p.device_mesh for p in params if is_dtensor(p)}
    if not meshes:
        return None
    mesh = next(iter(meshes.values()))
    if len(meshes) == 1 and mesh.ndim == 1:
        return mesh.get_group()
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("parameters are sharded over a multi-dimensional device mesh or several meshes, and no "
                         "default process group is initialized; call torch.distributed.init_process_group first "
                         "or pass process_group=")
    return dist.group.WORLD


def shard_rows(rows: int, world: int) -> list[int]:
    """Rows of each rank's shard under ``Shard(0)`` as FSDP2 lays them out: ``torch.chunk`` sizes, empty shards
    at the end where the rows run out."""
    size = -(-rows // world) if rows else 0
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def _shard_order(placements) -> list[int]:
    """The mesh dims in the order their sharding applies. DTensor shards left to right, except FSDP2's
    ``_StridedShard(d, split_factor=k)``: on top of a tensor-parallel ``Shard(d)`` it splits each TP shard again,
    so it applies after the mesh dims to its right that shard d (whose sizes multiply to k, checked by the
    caller). Returns the order, or raises for placements whiten does not read (``Partial``, an unknown kind)."""
    order, strided = [], []
    for i, pl in enumerate(placements):
        kind = type(pl).__name__
        if kind == "_StridedShard":
            strided.append(i)
        elif kind in ("Shard", "Replicate"):
            order.append(i)
        else:
            raise ValueError(f"placement {pl} on mesh dim {i}")
    for i in reversed(strided):  # each after the plain shards of its dim to its right
        d = placements[i].dim
        after = [j for j in order if j > i and type(placements[j]).__name__ == "Shard" and placements[j].dim == d]
        order.insert(order.index(after[-1]) + 1 if after else len(order), i)
    return order


def local_block(shape, mesh_shape, coordinate, placements) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(offset, size)`` of the block of the full tensor (``shape``) that the rank at ``coordinate`` of a mesh of
    ``mesh_shape`` holds under ``placements``: each ``Shard(d)`` mesh dim cuts the range of dim d left so far into
    ``torch.chunk`` pieces (uneven, empty at the end when they run out, as FSDP2 and DTensor lay them out) and keeps
    the coordinate's piece; ``Replicate`` keeps it whole. Raises ValueError for a layout whose shards are not such
    blocks (``Partial``, a ``_StridedShard`` that is not FSDP2's over TP)."""
    offset, size = [0] * len(shape), list(shape)
    order = _shard_order(placements)
    for i in order:
        pl = placements[i]
        if type(pl).__name__ == "Replicate":
            continue
        d = pl.dim if pl.dim >= 0 else pl.dim + len(shape)
        if type(pl).__name__ == "_StridedShard":
            inner = [j for j in range(i + 1, len(placements))
                     if type(placements[j]).__name__ == "Shard" and placements[j].dim == pl.dim]
            k = 1
            for j in inner:
                k *= mesh_shape[j]
            if not inner or k != pl.split_factor:
                raise ValueError(f"placement {pl} on mesh dim {i} (not FSDP2's over a tensor-parallel Shard("
                                 f"{pl.dim}) of {pl.split_factor} ranks)")
        pieces = shard_rows(size[d], mesh_shape[i])
        offset[d] += sum(pieces[:coordinate[i]])
        size[d] = pieces[coordinate[i]]
    return tuple(offset), tuple(size)


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
