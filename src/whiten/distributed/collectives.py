"""The collectives whiten's optimizers use, in one place: none of them calls ``torch.distributed`` itself.

Each takes a process group (None: one process, where it does nothing) and packs what it sends into one flat
buffer per dtype, in the order given: the packing of a collective decides which ranks' values an element is summed
with in which order (ring algorithms split a buffer into chunks), so callers keep the same order on every rank and
in every run."""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

__all__ = ["is_process_group", "collective_device", "default_group", "world_and_rank", "all_reduce_flat", "any_true", "sum_values",
           "broadcast_flat", "broadcast_objects"]


def is_process_group(value) -> bool:
    return isinstance(value, dist.ProcessGroup)


def collective_device(group) -> torch.device:
    """Where a collective of ``group`` takes its tensors: the current GPU for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def default_group():
    """The world group when this process runs in one with other processes, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def world_and_rank(group) -> tuple[int, int]:
    """``(world size, rank)`` in ``group``; ``(1, 0)`` for None."""
    return (dist.get_world_size(group), dist.get_rank(group)) if group is not None else (1, 0)


def all_reduce_flat(tensors: list[torch.Tensor], group, op: str = "sum") -> list[torch.Tensor]:
    """Reduce ``tensors`` over ``group`` (``op``: "sum" or "max"): one flat buffer per dtype (dtypes in the order of
    their names, tensors in the order given). Returns the reduced tensors, shaped as the inputs, on the
    collective's device; the inputs are not changed."""
    device = collective_device(group)
    by_dtype: dict = defaultdict(list)
    for i, t in enumerate(tensors):
        by_dtype[t.dtype].append(i)
    out: list = [None] * len(tensors)
    for dtype, idx in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
        if len(idx) == 1:
            flat = tensors[idx[0]].reshape(-1).to(device, copy=True)
        else:
            flat = torch.cat([tensors[i].reshape(-1).to(device) for i in idx])
        dist.all_reduce(flat, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
        offset = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].view(tensors[i].shape)
            offset += n
    return out


def any_true(flags: list[bool], group) -> list[bool]:
    """Each flag or-ed over the ranks of ``group``: one float vector, reduced with max."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return (t > 0).tolist()


def sum_values(values: list[float], group) -> list[float]:
    """Python numbers summed over the ranks of ``group``, in float64."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def broadcast_flat(parts: list[torch.Tensor] | None, numel: int, dtype: torch.dtype, owner: int, group,
                   async_op: bool = False):
    """One flat buffer of ``dtype`` and ``numel`` elements from ``owner`` (a rank of ``group``) to every rank: the
    owner passes its ``parts`` (concatenated in order), the others None. Returns the buffer, on the collective's
    device on the ranks that received it; with ``async_op``, ``(buffer, work)``: the buffer holds the values once
    ``work.wait()`` returns."""
    device = collective_device(group)
    if parts is not None:
        flat = torch.cat([t.reshape(-1).to(device) for t in parts]) if parts else torch.empty(0, dtype=dtype,
                                                                                             device=device)
    else:
        flat = torch.empty(numel, dtype=dtype, device=device)
    work = dist.broadcast(flat, src=dist.get_global_rank(group, owner), group=group, async_op=async_op)
    return (flat, work) if async_op else flat


def broadcast_objects(objects: list, owner: int, group) -> list:
    """Picklable ``objects`` from ``owner`` (a rank of ``group``) to every rank, in place."""
    dist.broadcast_object_list(objects, src=dist.get_global_rank(group, owner), group=group)
    return objects
